"""What switching torch's intra-op thread count between engine steps costs (engine/threads.py needs it to be ~0).

    python benchmarks/thread_switch.py [MODEL] [--rows 1 --steps 40 --rounds 3]

1. torch.set_num_threads(1) / (cap) back and forth on a thread that has run parallel regions: time per call.
2. In situ: an engine (MODEL, default smollm2, --quant auto) on its own thread decodes --rows rows; in alternating
   rounds its steps run fixed on 1 thread, fixed on the cap, or switching 1, cap, 1, cap... every step. If a
   switch cost anything, the switching steps would take longer than the fixed ones of the same count: reported
   are the median step times on each count, fixed and switching, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time


def set_call_us(cap: int, n: int = 20000) -> float:
    import torch

    x = torch.randn(256, 256)
    for _ in range(20):
        x @ x  # the pool of OpenMP threads exists
    t = time.perf_counter()
    for _ in range(n):
        torch.set_num_threads(1)
        torch.set_num_threads(cap)
    return (time.perf_counter() - t) / (2 * n) * 1e6


def engine_steps(engine, rows: int, steps: int, counts: list[int]) -> dict[int, list[float]]:
    """Decode steps of `rows` rows; step k runs on counts[k % len(counts)] threads. Times per count."""
    import torch

    from nanoseek.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    ids = [engine.add_request([11 + r, 12, 13, 14], params) for r in range(rows)]
    while any(not engine.get(i).output_ids for i in ids):
        engine.step()
    times: dict[int, list[float]] = {c: [] for c in counts}
    for k in range(steps):
        n = counts[k % len(counts)]
        torch.set_num_threads(n)
        t = time.perf_counter()
        engine.step()
        times[n].append(time.perf_counter() - t)
    for i in ids:
        engine.abort(i)
        engine.release(i)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    import nanoseek
    from nanoseek.bench.decode import resolve_model
    from nanoseek.engine.engine import Engine
    from nanoseek.loading import resolve_quant

    cap = torch.get_num_threads()
    path = resolve_model(args.model)
    model = nanoseek.load(path, quant=resolve_quant("auto", path, None))
    engine = Engine(model, eos_ids=[])
    modes = {"fixed 1": [1], f"fixed {cap}": [cap], "switching": [1, cap]}
    results: dict[str, dict[int, list[float]]] = {m: {} for m in modes}
    out: dict = {}

    def run() -> None:  # on a fresh thread, as the server's engine runs
        out["set_us"] = set_call_us(cap)
        for r in range(args.rounds):
            for m in list(modes)[r % 3 :] + list(modes)[: r % 3]:
                for c, ts in engine_steps(engine, args.rows, args.steps, modes[m]).items():
                    results[m].setdefault(c, []).extend(ts[1:])

    t = threading.Thread(target=run, name="nanoseek-engine")
    t.start()
    t.join()
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    print(f"torch.set_num_threads: {out['set_us']:.2f} us a call (1 <-> {cap}, on a worker thread)")
    print(f"{args.rows}-row decode steps of {path.name}, {args.rounds} alternating rounds, median ms:")
    for c in (1, cap):
        fixed, switching = med(results[f"fixed {c}"][c]), med(results["switching"][c])
        print(f"  on {c} thread(s): fixed {fixed:.2f}, switching every step {switching:.2f} "
              f"(ratio {switching / fixed:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
