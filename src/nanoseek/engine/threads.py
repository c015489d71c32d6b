"""How many intra-op (OpenMP) threads an engine step runs on, chosen per step from the step's work.

    plan = calibrate(engine)                 # on the thread that will run the steps (AsyncEngine does this)
    engine.thread_plan = plan                # each step then runs on plan.threads(tokens in the step)

Why: a small step's parallel regions can be too short to pay for waking and joining a second thread, where
sixteen rows, or a long prompt chunk, do pay. (The first measurement of this, a one-row SmolLM2-135M int4 step of
24 ms on the engine's thread with two threads against 13 ms with one, was mostly OpenMP's throttled spinning, see
`off_main_thread`; with the model loaded off the main thread the same step takes 10-14 ms on two threads and
14-15 ms on one, and the plan picks two from the first row on that machine.) Where
the crossover lies depends on the model, the weights' format and the machine, so it is measured, not guessed:
`calibrate` times decode steps at growing batch sizes with 1 thread and with the cap, alternating, on the calling
thread, and `crossover` turns the timings into the smallest step work (tokens computed in the step: rows x
tokens) from which the cap is faster (`ThreadPlan`). Steps below it run on 1 thread.

Only the step's thread is affected: torch.set_num_threads sets the calling thread's OpenMP thread count
(omp_set_num_threads is per thread), so the server's engine thread switching does not change the main thread's
count, and `calibrate` restores the calling thread's count when it is done. A switch itself costs nothing
measurable (torch.set_num_threads between 1 and 2: 0.2 us a call, benchmarks/thread_switch.py), so the plan needs
no hysteresis: a batch that hovers at the crossover switches every step for free, and at the crossover both counts
are equally fast by definition.

The cap (`EngineConfig.threads`, `nanoseek serve --threads`) is the most threads a step may use; None: torch's
count on the thread that builds the engine (OMP_NUM_THREADS, or torch.set_num_threads, or the cores).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)  # decode rows timed by calibrate (up to max_num_seqs)


@dataclass(frozen=True)
class ThreadPlan:
    """Steps computing at least `all_from` tokens run on `cap` threads, smaller ones on 1."""

    cap: int
    all_from: int = 1
    timings: tuple[tuple[int, float, float], ...] = ()  # (rows, seconds on 1 thread, on cap) as measured

    def __post_init__(self) -> None:
        if self.cap < 1 or self.all_from < 1:
            raise ValueError(f"need cap >= 1 and all_from >= 1, got {self.cap}, {self.all_from}")

    def threads(self, work: int) -> int:
        return threads_for(work, self.cap, self.all_from)

    def describe(self) -> str:
        if self.cap == 1:
            return "1 intra-op thread (the cap)"
        measured = ", ".join(f"{rows} rows {one * 1e3:.1f}/{cap * 1e3:.1f} ms" for rows, one, cap in self.timings)
        shown = f" (decode step on 1/{self.cap} threads: {measured})" if measured else ""
        if self.all_from <= 1:
            return f"intra-op threads: {self.cap} on every step{shown}"
        return (f"intra-op threads: 1 below {self.all_from} tokens a step, {self.cap} from there"
                + shown)  # fmt: skip


def threads_for(work: int, cap: int, all_from: int) -> int:
    """The threads of a step computing `work` tokens (rows x tokens): 1 below `all_from`, else `cap`."""
    if cap < 1:
        raise ValueError(f"the thread cap must be >= 1, got {cap}")
    return cap if work >= all_from else 1


def crossover(timings: list[tuple[int, float, float]]) -> int:
    """The smallest measured work (rows) from which `cap` threads are faster than 1 at it and at every larger
    measured size: a plan that never switches back and forth with the batch size. When 1 thread wins even at the
    largest size measured, twice that size (bigger steps, such as long prompt chunks, are assumed to pay, as
    they do wherever measured; see benchmarks/RESULTS.md). `timings`: (rows, seconds on 1, seconds on cap)."""
    if not timings:
        return 1
    ordered = sorted(timings)
    start = 2 * ordered[-1][0]
    for rows, one, cap in reversed(ordered):
        if cap >= one:
            break
        start = rows
    return start


def off_main_thread(fn, threads: int):
    """`fn()` on a short-lived thread running `threads` intra-op threads; its result (or its exception).

    Why: libgomp keeps one pool of OpenMP workers per thread that has run a parallel region, and once it manages
    more threads than the machine has CPUs it stops spinning between regions (its "throttled" spin count: a few
    hundred iterations, whatever GOMP_SPINCOUNT says), so every region then pays a futex sleep and wake. A server
    that loads its model on the main thread (2 threads: main + 1 worker) and then steps the engine on its own
    thread (2 more) runs every region that way: on the 2-core machine an elementwise op took 15 us on the main
    thread and 140-220 us on another thread once the main thread had its pool, and a SmolLM2-135M int4 decode
    step 12 ms against 25-39 ms (benchmarks/RESULTS.md at 530752a, its History's "Measured on the idle machine
    (2026-12-06 20:43-21:05 UTC), and the cause of the gap: OpenMP's pools"). Work done here leaves no pool
    behind: a thread's workers end with it (leaving the `with` joins the executor's one thread)."""
    from concurrent.futures import ThreadPoolExecutor

    def work():
        torch.set_num_threads(threads)
        return fn()

    with ThreadPoolExecutor(1, thread_name_prefix="nanoseek-load") as pool:
        return pool.submit(work).result()


def cap_threads(threads: int | None) -> int:
    """The cap a config asks for: `threads`, or the calling thread's torch count when None."""
    cap = torch.get_num_threads() if threads is None else threads
    if cap < 1:
        raise ValueError(f"threads must be >= 1, got {cap}")
    return cap


def calibrate(engine, cap: int | None = None, reps: int = 5, sizes=BATCH_SIZES) -> ThreadPlan:
    """Time decode steps of `engine` at growing batch sizes (up to its max_num_seqs) with 1 thread and with `cap`
    (default: the engine's cap), alternating, on the calling thread; the plan from each count's fastest step.
    Stops once the cap has won at two sizes in a row. Its requests are aborted afterwards (the prefix cache may
    keep their short prompts); the calling thread's thread count is restored.

    The fastest of `reps`, not their median: a server calibrates once, at its start, and one disturbed step among
    three decided the plan for its whole life. Measured with `nanoseek serve` on SmolLM2-135M int4 (2 cores, idle,
    the layer stack: 7.3 ms a decode step on 2 threads, 10.8 on 1): the medians of 3 picked 1 thread for a lone
    stream in 4 server starts of 6 (1 row 10.5-13.4 ms on 1 thread against 11.2-18.1 on 2), which then streamed
    ~70 tok/s instead of ~115."""
    from nanoseek.engine.sampling import SamplingParams

    cap = engine.thread_cap if cap is None else cap
    if cap == 1:
        return ThreadPlan(1)
    before = torch.get_num_threads()
    plan, engine.thread_plan = engine.thread_plan, None  # the steps below choose their own threads
    timings: list[tuple[int, float, float]] = []
    prompt_len = 4
    steps = 2 + 2 * reps  # one warm-up step per count, then reps each
    try:
        for rows in (r for r in sizes if r <= engine.config.max_num_seqs):
            max_tokens = min(steps + 2, engine.runner.context_length - prompt_len - 1)
            if max_tokens < steps + 1:
                break
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            vocab = engine.vocab_size
            try:
                ids = [engine.add_request([(7 * r + 3 * j + 1) % vocab for j in range(prompt_len)], params)
                       for r in range(rows)]  # fmt: skip
            except ValueError:
                break  # the cache cannot hold this many: the sizes measured so far decide
            try:
                while any(not engine.get(i).output_ids for i in ids):  # prefill: every row decoding
                    engine.step()
                times: dict[int, list[float]] = {1: [], cap: []}
                for k in range(steps):
                    n = (1, cap)[(k + rows) % 2]
                    torch.set_num_threads(n)
                    t = time.perf_counter()
                    engine.step()
                    if k >= 2:
                        times[n].append(time.perf_counter() - t)
            finally:
                for i in ids:
                    engine.abort(i)
                    engine.release(i)
            timings.append((rows, min(times[1]), min(times[cap])))
            if len(timings) >= 2 and all(c < o for _, o, c in timings[-2:]):
                break
    finally:
        torch.set_num_threads(before)
        engine.thread_plan = plan
        engine._burst_rows = 0  # calibration is not a burst of traffic worth returning memory after
    return ThreadPlan(cap, crossover(timings), tuple(timings))
