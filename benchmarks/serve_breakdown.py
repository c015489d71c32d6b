"""Where a lone user's time per token goes between nanoseek's engine and the socket.

    python benchmarks/serve_breakdown.py [MODEL] [--tokens 64 --rounds 3 --variants default,fixed,omp1]

For each variant (the server process's environment and engine threads: `default` as `nanoseek serve` runs, each
step on 1 thread or the cap as its calibration measured; `fixed`, every step on the cap, as before issue 23's
thread plan; `omp1`, `passive`, `active`, `spin0`, or VAR=VALUE+VAR=VALUE, environments with fixed threads) and
round, in alternating order, a fresh process loads MODEL (default smollm2, run format
--quant auto), times the engine alone on one stream (its own thread, the tokens read from a plain queue: the
same prompt and max_tokens, no server), then serves it the way `nanoseek serve` does (make_server, create_app,
uvicorn_config, uvicorn in the main thread) and streams one /v1/completions request to a client in its own
process (httpx, as `nanoseek bench serve` does). Every token is stamped along its way (perf_counter is
CLOCK_MONOTONIC, shared by both processes):

    step end (engine thread) -> consumed on the event loop (Generation._consume) -> written to the socket
    (the ASGI send of its SSE chunk returned) -> read by the client

and every thread's CPU time over the timed request is read from /proc (engine thread, torch's OpenMP workers,
the event loop, the rest), per token. Reported per variant: median over rounds of each round's median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

VARIANTS = {
    "default": {},
    "fixed": {},
    "omp1": {"OMP_NUM_THREADS": "1"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "spin0": {"GOMP_SPINCOUNT": "0"},
}

CLIENT = r"""
import json, sys, time, httpx
url, body = sys.argv[1], json.loads(sys.argv[2])
stamps = []
with httpx.Client(timeout=300) as c:
    t0 = time.perf_counter()
    with c.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunk = json.loads(line[5:])
                if any(ch.get("text") for ch in chunk.get("choices") or []):
                    stamps.append(time.perf_counter())
print(json.dumps({"sent": t0, "stamps": stamps}))
"""


def thread_cpu() -> dict[int, tuple[str, float]]:
    """{tid: (name, CPU seconds)} of this process's threads."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def serve_once(args) -> dict:
    """One variant, one round, in this process: the engine alone, then through the server."""
    import torch
    import uvicorn

    import nanoseek
    from nanoseek.bench.decode import resolve_model
    from nanoseek.bench.serve import make_prompts
    from nanoseek.engine.sampling import SamplingParams
    from nanoseek.loading import resolve_quant
    from nanoseek.serve import serving
    from nanoseek.serve.app import create_app
    from nanoseek.serve.connection import uvicorn_config

    path = resolve_model(args.model)
    tok = nanoseek.load_tokenizer(path)
    from nanoseek.engine.engine import EngineConfig
    from nanoseek.engine.threads import cap_threads, off_main_thread

    # as `nanoseek serve`: the model loads on a thread that ends, the main thread then runs torch on one thread
    cap = cap_threads(None)
    model = off_main_thread(lambda: nanoseek.load(path, quant=resolve_quant("auto", path, None)), cap)
    torch.set_num_threads(1)
    config = EngineConfig(max_num_seqs=32, threads=cap, adaptive_threads=args.variant == "default")
    server = serving.make_server(model, tok, "m", config)
    plan = server.engine.engine.thread_plan
    engine = server.engine.engine
    prompt = make_prompts(4, args.prompt_words)[args.round % 4]
    ids = tok.encode(prompt)

    # the engine alone: the server's engine thread, its tokens read by this thread from a plain queue (no server)
    steps: list[tuple[float, float]] = []
    real_step = engine.step

    def timed_step():
        t = time.perf_counter()
        out = real_step()
        if out:
            steps.append((t, time.perf_counter()))
        return out

    engine.step = timed_step
    alone = []
    for _ in range(2):
        steps.clear()
        for _ in server.engine.stream(ids, SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)):
            pass
        alone.append(median([b - a for a, b in steps[1:]]))
    steps.clear()

    consumed: list[float] = []
    real_consume = serving.Generation._consume

    def consume(self, out):
        delta = real_consume(self, out)
        if delta is not None and delta.text:
            consumed.append(time.perf_counter())
        return delta

    serving.Generation._consume = consume
    app = create_app(server)
    written: list[float] = []

    async def stamped(scope, receive, send):
        async def send_stamped(message):
            await send(message)
            if (
                message["type"] == "http.response.body"
                and b'"text": "' in message.get("body", b"")
                and (b'"text": ""' not in message.get("body", b""))
            ):
                written.append(time.perf_counter())

        await app(scope, receive, send_stamped if scope["type"] == "http" else send)

    stamped.state = app.state
    port = args.port
    config = uvicorn_config(stamped, host="127.0.0.1", port=port, log_level="warning")
    config.lifespan = "off"
    userver = uvicorn.Server(config)
    result: dict = {}

    def client() -> None:
        while not userver.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        warm = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True}
        subprocess.run([sys.executable, "-c", CLIENT, url, json.dumps(warm)], capture_output=True, check=True)
        steps.clear(), consumed.clear(), written.clear()
        body = {"prompt": prompt, "max_tokens": args.tokens, "temperature": 0, "stream": True, "ignore_eos": True}
        before = thread_cpu()
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", CLIENT, url, json.dumps(body)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = thread_cpu()
        result.update(json.loads(run.stdout), wall=wall, before=before, after=after)
        userver.should_exit = True

    threading.Thread(target=client, daemon=True).start()
    main_tid = threading.get_native_id()
    userver.run()
    server.engine.shutdown()

    stamps = result["stamps"]
    n = min(len(stamps), len(written), len(consumed), len(steps))
    ends = [b for _, b in steps][:n]
    gaps = lambda xs: [b - a for a, b in zip(xs, xs[1:])]  # noqa: E731
    engine_tid = server.engine._thread.native_id
    cpu = {"engine thread": 0.0, "omp workers": 0.0, "event loop": 0.0, "other": 0.0}
    for tid, (name, t1) in result["after"].items():
        t0 = result["before"].get(tid, (name, 0.0))[1]
        key = ("engine thread" if tid == engine_tid else "event loop" if tid == main_tid
               else "omp workers" if name.startswith("python") else "other")  # fmt: skip
        cpu[key] += t1 - t0
    tokens = len(stamps)
    ms = 1000
    return {
        "threads": torch.get_num_threads(),
        "plan": plan.describe() if plan is not None else "every step on the cap",
        "alone_step_ms": median(alone) * ms,
        "served_step_ms": median([b - a for a, b in steps[1:n]]) * ms,
        "engine_gap_ms": median([steps[i + 1][0] - steps[i][1] for i in range(1, n - 1)]) * ms,
        "step_to_loop_ms": median([c - e for c, e in zip(consumed[1:n], ends[1:n])]) * ms,
        "loop_to_socket_ms": median([w - c for w, c in zip(written[1:n], consumed[1:n])]) * ms,
        "socket_to_client_ms": median([s - w for s, w in zip(stamps[1:n], written[1:n])]) * ms,
        "client_itl_ms": median(gaps(stamps)) * ms,
        "client_tok_s": (tokens - 1) / (stamps[-1] - stamps[0]),
        "ttft_ms": (stamps[0] - result["sent"]) * ms,
        "cpu_ms_per_token": {k: v * ms / tokens for k, v in cpu.items()},
        "tokens": tokens,
        "matched": n,
        "load": os.getloadavg()[0],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="default,fixed,omp1")
    ap.add_argument("--port", type=int, default=8971)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="fixed", help=argparse.SUPPRESS)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write every round's figures here")
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(serve_once(args)), flush=True)
        return
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    env0 = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env0["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env0.get("PYTHONPATH")])])
    results: dict[str, list[dict]] = {v: [] for v in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for v in order:
            extra = VARIANTS[v] if v in VARIANTS else dict(kv.split("=", 1) for kv in v.split("+"))
            cmd = [sys.executable, __file__, args.model, "--one", "--round", str(r), "--tokens", str(args.tokens),
                   "--prompt-words", str(args.prompt_words), "--port", str(args.port), "--variant", v]  # fmt: skip
            run = subprocess.run(cmd, env={**env0, **extra}, capture_output=True, text=True)
            line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"variant {v} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
            res = json.loads(line[7:])
            results[v].append(res)
            shown = f"{res['client_tok_s']:.1f} tok/s, step alone {res['alone_step_ms']:.2f} ms"
            print(f"round {r + 1} {v}: {shown}, served {res['served_step_ms']:.2f} ms, load {res['load']:.1f}; "
                  f"{res['plan']}", file=sys.stderr, flush=True)  # fmt: skip
    keys = ["alone_step_ms", "served_step_ms", "engine_gap_ms", "step_to_loop_ms", "loop_to_socket_ms",
            "socket_to_client_ms", "client_itl_ms", "client_tok_s", "ttft_ms"]  # fmt: skip
    cpu_keys = ["engine thread", "omp workers", "event loop", "other"]
    head = ["variant", *keys, *(f"cpu {k} ms/tok" for k in cpu_keys), "load"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for v, rs in results.items():
        cells = [v] + [f"{median([x[k] for x in rs]):.2f}" for k in keys]
        cells += [f"{median([x['cpu_ms_per_token'][k] for x in rs]):.2f}" for k in cpu_keys]
        cells.append(f"{min(x['load'] for x in rs):.1f}-{max(x['load'] for x in rs):.1f}")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
