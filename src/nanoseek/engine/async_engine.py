"""The engine on a background thread, for servers and interactive use.

    engine = AsyncEngine(Engine(model, eos_ids=tok.stop_token_ids))
    async for out in engine.generate(prompt_ids, SamplingParams(max_tokens=64)):   # asyncio
        ...                                   # leaving the loop early (client gone) aborts the request
    for out in engine.stream(prompt_ids, params):   # plain threads (the CLI)
        ...
    engine.shutdown()                         # aborts what is in flight, stops the thread

One thread owns the engine and runs `step()` while there is work; every other thread only drops requests
and aborts into an inbox (a lock held for a list append), so an asyncio handler never waits for a step.
Each step's outputs go to their request's queue: an asyncio.Queue fed through its loop's
call_soon_threadsafe, or a queue.Queue for threads. Concurrent requests share each batched step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from nanoseek.engine.engine import Engine, StepOutput
from nanoseek.engine.sampling import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple[int, list[int], SamplingParams, Callable[[StepOutput], None]]] = []
        self._aborts: list[int] = []
        self._sinks: dict[int, Callable[[StepOutput], None]] = {}
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
        self._thread.start()

    # ---- submitting ---------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Callable[[StepOutput], None]) -> int:
        """Queue a request whose outputs go to `sink` (called on the engine thread). ValueError on bad input."""
        prompt = self.engine.validate(prompt_ids, params)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            if self.error is not None:
                raise RuntimeError(f"the engine stopped after an error: {self.error!r}")
            rid = self.engine.new_request_id()
            self._inbox.append((rid, prompt, params, sink))
            self._wake.notify()
        return rid

    def abort(self, request_id: int) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._wake.notify()

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None
    ) -> AsyncIterator[StepOutput]:
        """Outputs of one request as they come; closing the iterator early (or cancelling) aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput] = asyncio.Queue()
        rid = self.submit(
            prompt_ids, params or SamplingParams(), lambda o: loop.call_soon_threadsafe(outputs.put_nowait, o)
        )
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
        while True:
            with self._lock:
                while not (self._inbox or self._aborts or self._stopping or engine.has_work()):
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
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
                return
            try:
                outputs = engine.step()
            except BaseException as exc:  # a broken model: end every stream instead of hanging them
                self.error = exc
                for rid in list(self._sinks):
                    engine.abort(rid)
                    self._emit(StepOutput(rid, None, True, "error"))
                return
            for out in outputs:
                self._emit(out)

    def _emit(self, out: StepOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is not None:
            sink(out)
        if out.finished:
            self._sinks.pop(out.request_id, None)
            self.engine.release(out.request_id)
