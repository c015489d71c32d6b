"""The engine on a background thread, for servers and interactive use.

    engine = AsyncEngine(Engine(model, eos_ids=tok.stop_token_ids))
    async for out in engine.generate(prompt_ids, SamplingParams(max_tokens=64)):   # asyncio
        ...                                   # leaving the loop early (client gone) aborts the request
    for out in engine.stream(prompt_ids, params):   # plain threads (the CLI)
        ...
    vectors = await engine.embed([ids1, ids2])   # embeddings: each forward a job on the engine thread
    engine.shutdown()                         # aborts what is in flight, stops the thread

One thread owns the engine and runs `step()` while there is work; every other thread only drops requests
and aborts into an inbox (a lock held for a list append), so an asyncio handler never waits for a step.
Each step's outputs go to their request's sink: a queue.Queue's put for threads (called on the engine
thread), or for asyncio code a callback run on its event loop. A step's outputs for every request of one
event loop cross over in ONE call_soon_threadsafe (in order), not one per token: each crossing wakes the
loop (a self-pipe write) and makes it take the GIL from the engine thread, so with 64 streams a step cost 64
wake-ups and GIL hand-offs where it now costs one. Concurrent requests share each batched step.

Work that is not a request (embeddings' forwards) goes in as a job (`call`): a function of the engine, run on the
engine thread between two steps, one job per step. So only this thread ever runs the model: a job's forward never
overlaps a step's (no two forwards fight for the same cores, and no module is entered by two threads at once),
and between a long embedding request's forwards the running streams still get their tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from nanoseek.engine.embeddings import embedding_batches, gather
from nanoseek.engine.engine import Engine, StepOutput
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.threads import ThreadPlan, calibrate

log = logging.getLogger("nanoseek.engine")


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple[int, list[int], SamplingParams, Sink]] = []
        self._aborts: list[int] = []
        self._jobs: list[tuple[concurrent.futures.Future, Callable[[Engine], Any]]] = []  # run one per step
        self._sinks: dict[int, Sink] = {}
        self._unread: dict[int, list[int]] = {}  # request id -> [outputs not taken by its reader, max_unread]
        # outputs emitted since the last flush, per event loop: [(callback, output), ...] in emission order
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[StepOutput], None], StepOutput]]] = {}
        self.num_loop_calls = 0  # call_soon_threadsafe calls made (one per step and event loop with outputs)
        self._stopping = False
        self.error: BaseException | None = None
        # set once the engine thread is ready for requests: after measuring its thread plan when the engine's
        # config asks for adaptive threads (threads.calibrate, on the thread that runs the steps)
        self.ready = threading.Event()
        self.startup_error: Exception | None = None  # what stopped the thread before it was ready (warm_up)
        self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
        self._thread.start()

    # ---- submitting ---------------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        sink: Callable[[StepOutput], None],
        loop: asyncio.AbstractEventLoop | None = None,
        max_unread: int | None = None,
    ) -> int:
        """Queue a request whose outputs go to `sink`: called on the engine thread, or with `loop` on that event
        loop (a step's outputs for all of the loop's requests in one call_soon_threadsafe, in order; a closed
        loop gets nothing). ValueError on bad input.

        `max_unread`: a bound on the outputs sent to `sink` that its reader has not yet `taken`. When a step leaves
        that many unread, the request is paused (not scheduled; it keeps its cache blocks) until `taken` brings it
        below the bound. So a reader slower than the tokens holds at most max_unread + one step's tokens (1, or
        1 + drafts when speculating) in its buffer, and costs the other requests no compute while paused."""
        if max_unread is not None and max_unread < 1:
            raise ValueError(f"max_unread must be None or >= 1, got {max_unread}")
        prompt = self.engine.validate(prompt_ids, params)
        sink = Sink(sink, loop, max_unread)
        with self._lock:
            self._check_running()
            rid = self.engine.new_request_id()
            self._inbox.append((rid, prompt, params, sink))
            self._wake.notify()
        return rid

    def call(self, job: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run `job(engine)` on the engine thread, between two steps; its result (or exception) in the future.
        A future cancelled before the job starts skips it; a shut-down or failed engine fails it (RuntimeError)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._check_running()
            self._jobs.append((future, job))
            self._wake.notify()
        return future

    async def embed(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Engine.embed from asyncio: each forward of the plan is its own job, so steps run between them.
        ValueError on bad input, before anything runs; cancelling skips the forwards not yet started."""
        engine = self.engine
        inputs = [engine.check_embedding_input(p) for p in prompts]
        if not inputs:
            raise ValueError("no inputs to embed")
        groups = embedding_batches([len(ids) for ids in inputs], engine.config.max_step_tokens)
        parts = []
        for group in groups:
            rows = [inputs[i] for i in group]
            parts.append(await asyncio.wrap_future(self.call(lambda e, rows=rows: e.embed_forward(rows))))
        return gather(groups, parts)

    def abort(self, request_id: int) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._wake.notify()

    def taken(self, request_id: int, n: int = 1) -> None:
        """The reader of a request submitted with max_unread has taken `n` of its outputs (any thread): a paused
        request below its bound again is resumed. Unknown or finished requests are ignored."""
        with self._lock:
            unread = self._unread.get(request_id)
            if unread is None:
                return
            unread[0] -= n
            req = self.engine.requests.get(request_id)
            if req is not None and req.paused and unread[0] < unread[1]:
                req.paused = False  # under the lock the engine thread waits with: it sees the work at once
                self._wake.notify()

    def unread(self, request_id: int) -> int | None:
        """Outputs of a request submitted with max_unread that its reader has not taken (None: not tracked)."""
        with self._lock:
            unread = self._unread.get(request_id)
            return None if unread is None else unread[0]

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None
    ) -> AsyncIterator[StepOutput]:
        """Outputs of one request as they come; closing the iterator early (or cancelling) aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput] = asyncio.Queue()
        rid = self.submit(prompt_ids, params or SamplingParams(), outputs.put_nowait, loop)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Iterator[StepOutput]:
        """generate() for threads: a blocking iterator; closing it early aborts the request."""
        outputs: queue.Queue[StepOutput] = queue.Queue()
        rid = self.submit(prompt_ids, params or SamplingParams(), outputs.put)
        finished = False
        try:
            while not finished:
                out = outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    def _check_running(self) -> None:
        """(Called under the lock.)"""
        if self._stopping:
            raise RuntimeError("the engine is shut down")
        if self.error is not None:
            raise RuntimeError(f"the engine stopped after an error: {self.error!r}")

    @property
    def healthy(self) -> bool:
        """The engine thread is running and has not stopped on an error."""
        return self.error is None and self._thread.is_alive()

    def shutdown(self) -> None:
        """Abort every request in flight (their streams end with finish_reason "abort") and stop the thread."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    # ---- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        # a compiled decode step compiles here, on the thread that will run it, before the first request: compiled
        # on another thread (the server's main one), that thread kept an OpenMP pool of its own beside this one's,
        # and every parallel region then paid libgomp's throttled wake-ups (threads.off_main_thread): nanoseek
        # serve --compile decoded 0.86x llama-server where the same compiled step runs 1.42x llama-bench
        try:
            engine.warm_up()
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits for `ready` (make_server raises it)
            self.startup_error = exc
            self.ready.set()
            return
        if engine.config.adaptive_threads:
            try:
                engine.thread_plan = calibrate(engine)
            except Exception as exc:  # a plan is an optimisation: serve on the cap rather than not at all
                engine.thread_plan = ThreadPlan(engine.thread_cap)
                log.warning("thread calibration failed (%r): every step runs on %d threads", exc, engine.thread_cap)
            log.info("%s", engine.thread_plan.describe())
        self.ready.set()
        while True:
            with self._lock:
                while not (self._inbox or self._aborts or self._jobs or self._stopping or engine.has_work()):
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                jobs, self._jobs = (self._jobs, []) if self._stopping else (self._jobs[:1], self._jobs[1:])
                stopping = self._stopping
            for rid, prompt, params, sink in inbox:
                self._sinks[rid] = sink
                engine.add_request(prompt, params, request_id=rid)
            if stopping:
                aborts += list(self._sinks)
            for rid in aborts:
                if engine.abort(rid):
                    self._emit(StepOutput(rid, None, True, "abort"))
            if stopping:
                self._fail_jobs(jobs, RuntimeError("the engine is shut down"))
                self._flush()
                return
            for future, job in jobs:
                _run_job(future, job, engine)
            try:
                outputs = engine.step()
            except BaseException as exc:  # a broken model: end every stream instead of hanging them
                with self._lock:
                    self.error = exc  # under the lock: no job is queued after this one's check
                    jobs, self._jobs = self._jobs, []
                self._fail_jobs(jobs, RuntimeError(f"the engine stopped after an error: {exc!r}"))
                for rid in list(self._sinks):
                    engine.abort(rid)
                    self._emit(StepOutput(rid, None, True, "error"))
                self._flush()
                return
            for out in outputs:
                self._emit(out)
            self._flush()

    @staticmethod
    def _fail_jobs(jobs, exc: BaseException) -> None:
        for future, _ in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)

    def _emit(self, out: StepOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is not None and sink.max_unread is not None:
            self._count_unread(out, sink.max_unread)
        if sink is not None:
            if sink.loop is None:
                sink.callback(out)
            else:
                self._pending.setdefault(sink.loop, []).append((sink.callback, out))
        if out.finished:
            self._sinks.pop(out.request_id, None)
            self.engine.release(out.request_id)

    def _count_unread(self, out: StepOutput, bound: int) -> None:
        """One more output its reader has not taken; at the bound, pause the request (before the next step)."""
        with self._lock:
            if out.finished:
                self._unread.pop(out.request_id, None)
                return
            unread = self._unread.setdefault(out.request_id, [0, bound])
            unread[0] += 1
            req = self.engine.requests.get(out.request_id)
            if unread[0] >= bound and req is not None:
                req.paused = True

    def _flush(self) -> None:
        """Hand each event loop the outputs gathered for it, in one call."""
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            self.num_loop_calls += 1
            # RuntimeError: the loop is closed (its server stopped) and nobody is listening any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)


def _run_job(future: concurrent.futures.Future, job: Callable[[Engine], Any], engine: Engine) -> None:
    if not future.set_running_or_notify_cancel():
        return  # cancelled before it started
    try:
        future.set_result(job(engine))
    except Exception as exc:  # the job's own failure goes to its caller; the engine goes on
        future.set_exception(exc)


class Sink(NamedTuple):
    callback: Callable[[StepOutput], None]
    loop: asyncio.AbstractEventLoop | None  # None: called on the engine thread
    max_unread: int | None = None  # pause the request while its reader has this many outputs not taken


def _deliver(items: list[tuple[Callable[[StepOutput], None], StepOutput]]) -> None:
    for callback, out in items:
        callback(out)
