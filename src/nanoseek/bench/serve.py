"""Serving speed: `nanoseek serve` vs llama.cpp's own server (`llama-server`, continuous batching), the same
GGUF on the same machine, in one run; llama-cpp-python's `llama_cpp.server` (one request at a time) can run
beside them as a labelled queueing baseline.

    nanoseek bench serve [MODEL] [--rounds 3 --concurrency 1,4,16,64 --plot serve.png]   (MODEL: smollm2)

MODEL is a .gguf file or an asset name (default `smollm2`: SmolLM2-135M-Instruct Q4_1 from PyPI). Each server
runs in its own process, one at a time: every round starts a server, sends one untimed warm-up request,
drives it at each concurrency C (C distinct text prompts sent at once to /v1/completions as streams), then
stops it; the next server follows, and the order of the servers rotates every round. nanoseek is started once
a round with --max-num-seqs the largest C; llama-server once per level with `-np C` slots (`-c` C x a slot's
context, `--cont-batching`, `-t`/`-tb` the same threads), as a self-hoster sizes it for C streams.
`make peers` builds llama-server (and llama-bench) once into the cache; without it the peer is a note that says
so. The report names the llama.cpp build that ran (version, commit, CPU options). Both get the same
prompts (each server's own tokenize endpoint is asked for their ids, and the report says whether they
match), the same max_tokens and temperature 0; both are asked to run every stream to max_tokens
(nanoseek and llama-server: ignore_eos; llama_cpp.server has no ignore_eos, so min_tokens = max_tokens, which
masks its EOS token).
The warm-up and every level get prompts of their own, so no prefix cache carries work from one to the next.

A stream is *completed* when it ends with finish_reason "length" and then [DONE] and has max_tokens tokens
(nanoseek's usage chunk counts them; llama.cpp's stream has no usage, so "length" is its count). Anything
else is a *failed* stream, by reason: an HTTP error, a timeout (--request-timeout bounds every stream, so
the benchmark never hangs), a stream cut short ([DONE] without a finish reason; llama.cpp's server does that
to the running stream whenever another request arrives, unless started with --interrupt_requests False: the
`llama.cpp-queue` peer), or a stop before max_tokens. Figures cover completed streams only: TTFT (send to
first text chunk), TPOT ((end of stream - first text chunk) / (tokens - 1)), per-request tok/s (tokens /
request latency) and aggregate tok/s (tokens of completed streams / wall time of the whole level). Each
figure is taken per round (median, or p90/p99, over the level's requests) and reported as the median over the
rounds with the min-max; the ratios nanoseek / peer are taken round by round (the two servers ran minutes
apart at most) and summarised the same way. The machine load is printed: on a shared machine it matters,
and more for llama.cpp, whose worker threads spin: with --threads 2 on a busy 2-core machine (load ~8) its
server took 300-930 ms per token against 17-30 ms with one thread (measured here), so compare at
--threads 1 there. Peak RSS of each server process is printed.

Agreement, checked BEFORE any timing (bench/agreement.py): every server is started once with one slot and
given the same token ids of a fixed text at --agreement-positions positions, teacher-forced (the text up to
the position, one greedy token at temperature 0); nanoseek's picks and each peer's must be equal at
--agreement-threshold of the positions, or the benchmark stops with the two figures and no ratio is reported.
After timing, the concurrency-1 greedy outputs are compared too (longest common
prefix, in tokens of the GGUF's tokenizer), for the record. Exact equality is not expected: nanoseek runs a Q4_1 GGUF as
int4 (`--quant auto`; int8 activations in blocks of 32 on its own kernel) while llama.cpp runs its own Q4_1
kernels (activations as Q8_1 blocks of 32); the rounding differs, so the greedy texts agree for a prefix and
may part where two candidates are close. Each server must give the same text in every round (determinism), or
the report says so.

llama-server: `make peers`. The queueing baselines: `pip install -e '.[bench]'` (llama-cpp-python with its
server extra).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nanoseek.bench.agreement import (
    DEFAULT_POSITIONS,
    DEFAULT_THRESHOLD,
    Agreement,
    check_threshold,
    picks,
    teacher_forced_prefixes,
)
from nanoseek.bench.decode import TEXT, resolve_model, worker_env
from nanoseek.bench.timing import Spread, matching_prefix, table

INSTALL_HINT = "pip install -e '.[bench]' (llama-cpp-python with its server extra; builds from source, ~10 min)"
QUICK = {"rounds": 1, "concurrency": "1,2", "max_tokens": 8, "prompt_words": 6, "agreement_positions": 16}


# ---- the servers -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server on a port, and what its requests must add to ask for equal work."""

    label: str
    argv: Callable[..., list[str]]  # (port, slots) -> the command line
    equal_work: Callable[[int], dict]  # max_tokens -> extra request fields that make it run to max_tokens
    tokenize_path: str  # the server's own tokenize endpoint: {"model", field: text} -> {"tokens": [...]}
    tokenize_field: str
    per_level: bool = False  # started for each concurrency level with as many slots (llama-server's -np)
    build: str = ""  # which build of it runs (llama-server: its build record), for the report


def nanoseek_spec(model: Path, quant: str, max_num_seqs: int, compile: bool = False) -> ServerSpec:
    def argv(port: int, slots: int = 0) -> list[str]:
        return [sys.executable, "-m", "nanoseek", "serve", str(model), "--port", str(port), "--quant", quant,
                "--max-num-seqs", str(max_num_seqs), "--shutdown-timeout", "2",
                *(["--compile"] if compile else [])]  # fmt: skip

    return ServerSpec("nanoseek", argv, lambda n: {"ignore_eos": True}, "/tokenize", "prompt")


def llama_spec(label: str, model: Path, threads: int, n_ctx: int, interrupt_requests: bool) -> ServerSpec:
    def argv(port: int, slots: int = 0) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads", str(threads),
                "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx), "--port", str(port),
                "--interrupt_requests", str(interrupt_requests), "--verbose", "False"]  # fmt: skip

    return ServerSpec(label, argv, lambda n: {"min_tokens": n}, "/extras/tokenize", "input")


def slot_context(prompt_words: int, max_tokens: int) -> int:
    """llama-server's context per slot: a prompt (at most ~3 tokens a word) and its max_tokens, with room to
    spare, in 256s."""
    return -(-(3 * prompt_words + max_tokens + 16) // 256) * 256


def llama_server_argv(binary: Path, model: Path, port: int, threads: int, slots: int, slot_ctx: int) -> list[str]:
    """llama.cpp's own server as a self-hoster runs it: continuous batching over `slots` slots (-np), a context
    of slots x slot_ctx (each slot gets slot_ctx), the same threads for decode and prompt batches."""
    return [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-np", str(slots), "-c", str(slots * slot_ctx), "--cont-batching",
            "--no-webui"]  # fmt: skip


def llama_server_spec(binary: Path, record: dict, model: Path, threads: int, slot_ctx: int) -> ServerSpec:
    from nanoseek.bench.peers import describe

    def argv(port: int, slots: int = 1) -> list[str]:
        return llama_server_argv(binary, model, port, threads, slots, slot_ctx)

    return ServerSpec("llama-server", argv, lambda n: {"ignore_eos": True}, "/tokenize", "content", per_level=True,
                      build=describe(record))  # fmt: skip


# llama-server: llama.cpp's own C++ server (built by `make peers`), the peer. llama.cpp / llama.cpp-queue:
# llama-cpp-python's `llama_cpp.server`, one request at a time, kept as labelled queueing baselines.
PEERS = ("llama-server", "llama.cpp", "llama.cpp-queue")
PEER_NOTES = {
    "llama-server": "llama-server = llama.cpp's own C++ server (continuous batching, -np = the level's concurrency)",
    "llama.cpp": "llama.cpp = llama-cpp-python's llama_cpp.server, a queueing baseline: one request at a time, and "
    "a new request cuts the running stream short",
    "llama.cpp-queue": "llama.cpp-queue = llama-cpp-python's llama_cpp.server, a queueing baseline: one request at "
    "a time, the others wait their turn",
}


def peer_specs(peers: list[str], model: Path, threads: int, n_ctx: int, slot_ctx: int = 256):
    """The peers' servers that can run here, and a note for each one that cannot (and why)."""
    specs, notes = [], []
    for peer in peers:
        if peer == "llama-server":
            from nanoseek.bench.peers import PeerMissing, find_peer

            try:
                binary, record = find_peer("llama-server")
            except PeerMissing as exc:
                notes.append(f"llama-server MISSING: {exc}")
                continue
            specs.append(llama_server_spec(binary, record, model, threads, slot_ctx))
            continue
        missing = [m for m in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
                   if importlib.util.find_spec(m) is None]  # fmt: skip
        if missing:
            notes.append(f"{peer} MISSING: {', '.join(missing)} not importable ({INSTALL_HINT})")
            continue
        # llama.cpp (default): a new request ends the running stream; -queue: requests wait their turn
        specs.append(llama_spec(peer, model, threads, n_ctx, interrupt_requests=peer == "llama.cpp"))
    return specs, notes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


class ServerFailed(RuntimeError):
    pass


@contextlib.contextmanager
def running(
    spec: ServerSpec, env: dict, startup_timeout: float, slots: int = 1
) -> Iterator[tuple[str, str, subprocess.Popen]]:
    """The server in its own process on a free loopback port, ready (GET /v1/models answers 200), with the
    name of the model it serves; stopped
    with SIGTERM (then SIGKILL after 30 s) on exit. Its output goes to a temporary log, quoted on failure."""
    import httpx

    port = free_port()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            spec.argv(port, slots), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

        def tail() -> str:
            log.flush()
            log.seek(0)
            return log.read()[-1500:]

        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise ServerFailed(f"{spec.label} server exited with code {proc.returncode}:\n{tail()}")
                if time.monotonic() > deadline:
                    raise ServerFailed(f"{spec.label} server not ready after {startup_timeout:.0f} s:\n{tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    answer = httpx.get(f"{url}/v1/models", timeout=2)
                    if answer.status_code == 200:
                        break
                time.sleep(0.25)
            yield url, answer.json()["data"][0]["id"], proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# ---- one stream, one level ---------------------------------------------------------------------------------


@dataclass
class Stream:
    """One streamed request, timed by the client (seconds from the level's start)."""

    sent: float
    first: float | None = None  # first chunk that carries text
    last: float | None = None  # last chunk that carries text
    end: float | None = None
    chunks: int = 0  # chunks that carried text
    usage_tokens: int | None = None  # the server's own count (usage chunk), where it sends one
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False  # saw [DONE]
    text: str = ""
    error: str | None = None  # why the stream failed before its end (HTTP status, timeout, ...)

    def tokens(self, max_tokens: int) -> int:
        """Completion tokens: the usage count, else max_tokens for a "length" finish, else the text chunks."""
        if self.usage_tokens is not None:
            return self.usage_tokens
        return max_tokens if self.finish_reason == "length" else self.chunks

    def verdict(self, max_tokens: int) -> str:
        """'completed', or the reason it failed."""
        if self.error:
            return self.error
        if not self.done:
            return "no [DONE]"
        if self.finish_reason is None:
            return "cut short (no finish_reason)"
        if self.finish_reason != "length" or self.tokens(max_tokens) != max_tokens:
            return f"{self.finish_reason} after {self.tokens(max_tokens)} tokens"
        if self.first is None:
            return "no text"
        return "completed"


async def stream_one(client, url: str, body: dict, t0: float, timeout: float) -> Stream:
    s = Stream(sent=time.perf_counter() - t0)

    async def read() -> None:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                s.text = (await response.aread()).decode(errors="replace")[:300]
                s.error = f"HTTP {response.status_code}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    s.done = True
                    return
                read_chunk(s, json.loads(data), time.perf_counter() - t0)

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        s.error = f"timeout ({timeout:g} s)"
    except Exception as exc:  # noqa: BLE001 - any transport failure is a failed stream, counted by reason
        s.error = type(exc).__name__
    s.end = time.perf_counter() - t0
    return s


def read_chunk(s: Stream, chunk: dict, now: float) -> None:
    if "error" in chunk:
        s.error = "error event"
        return
    if chunk.get("usage"):
        s.usage_tokens = chunk["usage"]["completion_tokens"]
        s.prompt_tokens = chunk["usage"]["prompt_tokens"]
    for choice in chunk.get("choices") or []:
        if choice.get("text"):
            s.chunks += 1
            s.text += choice["text"]
            s.last = now
            if s.first is None:
                s.first = now
        if choice.get("finish_reason"):
            s.finish_reason = choice["finish_reason"]


@dataclass
class Level:
    """One concurrency level of one round on one server."""

    concurrency: int
    wall: float
    streams: list[Stream]


async def drive(url: str, prompts: list[str], body: dict, timeout: float) -> Level:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(stream_one(client, url, {**body, "prompt": p}, t0, timeout) for p in prompts))
        wall = time.perf_counter() - t0
    return Level(len(prompts), wall, list(streams))


def request_body(spec: ServerSpec, model: str, max_tokens: int) -> dict:
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "top_p": 1, "stream": True,
            "stream_options": {"include_usage": True}, **spec.equal_work(max_tokens)}  # fmt: skip


def make_prompts(count: int, words: int) -> list[str]:
    """`count` distinct prompts of `words` words: windows of the text that start one word apart (no two
    share a 16-token cache block, so no prefix cache can reuse one prompt's work for another)."""
    text = TEXT.split()
    if count > len(text):
        raise ValueError(f"at most {len(text)} distinct prompts (the text has {len(text)} words), asked for {count}")
    while len(text) < count + words:
        text = text + TEXT.split()
    return [" ".join(text[i : i + words]) for i in range(count)]


def level_prompts(concurrency: list[int], words: int) -> dict[int | str, list[str]]:
    """Prompts for the warm-up ("warmup") and each level: all different, so neither a level nor the warm-up
    before it can leave a prompt in a server's prefix cache for the next (llama.cpp's server keeps the
    previous request's tokens and reuses a matching prefix; nanoseek's engine caches full blocks)."""
    windows = make_prompts(1 + sum(concurrency), words)
    prompts: dict[int | str, list[str]] = {"warmup": windows[:1]}
    start = 1
    for c in concurrency:
        prompts[c] = windows[start : start + c]
        start += c
    return prompts


# ---- figures -----------------------------------------------------------------------------------------------


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics (q=0.5: the median)."""
    if not xs:
        return math.nan
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


METRICS = ("ttft_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_ms", "request_tok_s", "aggregate_tok_s")


def level_figures(level: Level, max_tokens: int) -> dict:
    """A level's figures over its completed streams, and its stream counts."""
    done = [s for s in level.streams if s.verdict(max_tokens) == "completed"]
    ttft = [(s.first - s.sent) * 1000 for s in done]
    # TPOT from the end of the stream, not the last text chunk: a server may hold back tokens that end inside a
    # UTF-8 character and send them in one chunk (the first text chunk can then be the last)
    tpot = [(s.end - s.first) * 1000 / (max_tokens - 1) for s in done if max_tokens > 1]
    return {
        "ttft_ms": percentile(ttft, 0.5),
        "ttft_p90_ms": percentile(ttft, 0.9),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "tpot_ms": percentile(tpot, 0.5),
        "request_tok_s": percentile([max_tokens / (s.end - s.sent) for s in done], 0.5),
        "aggregate_tok_s": len(done) * max_tokens / level.wall if done else math.nan,
        "sent": len(level.streams),
        "completed": len(done),
        "failures": dict(Counter(s.verdict(max_tokens) for s in level.streams if s not in done)),
        "tokens_streamed": sum(s.tokens(max_tokens) for s in level.streams),
        "prompt_tokens": sorted({s.prompt_tokens for s in level.streams if s.prompt_tokens is not None}),
    }


def spread(values: list[float], digits: int = 1) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "—"
    shown = Spread.of(finite).format(digits)
    return shown if len(finite) == len(values) else f"{shown} [{len(finite)}/{len(values)} rounds]"


def ratio_table(figures: dict, label: str, peer: str, concurrency: list[int]) -> tuple[str, dict]:
    """nanoseek / peer per round (times inverted: > 1 always means nanoseek is better), median (min–max)."""
    rows, ratios = [], {}
    for c in concurrency:
        ours, theirs = figures[label][c], figures[peer][c]
        cells, ratios[c] = [str(c)], {}
        for metric in METRICS:
            per_round = []
            for a, b in zip(ours, theirs):
                x, y = a[metric], b[metric]
                per_round.append(y / x if metric.endswith("_ms") else x / y)
            ratios[c][metric] = per_round
            cells.append(spread(per_round, 2))
        done = sum(f["completed"] for f in ours), sum(f["completed"] for f in theirs)
        sent = sum(f["sent"] for f in ours)
        cells.append(f"{done[0]}/{sent} vs {done[1]}/{sent}")
        rows.append(cells)
    header = ["C", "TTFT", "TTFT p90", "TTFT p99", "TPOT", "per-request tok/s", "aggregate tok/s", "completed"]
    return table(header, rows), ratios


# ---- the run -----------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="nanoseek bench serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2", help="a .gguf file or an asset name (default smollm2)")
    ap.add_argument("--peers", default="llama-server,llama.cpp-queue",
                    help=f"peer servers, comma-separated, from {', '.join(PEERS)}; 'none' for none. llama-server: "
                    "llama.cpp's own server (`make peers` builds it); llama.cpp, llama.cpp-queue: llama-cpp-python's "
                    "server, one request at a time (queueing baselines)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2, help="threads of every server (OMP_NUM_THREADS, --n_threads)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (each server once per round, alternating order)")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrent-stream counts")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens every stream generates")
    ap.add_argument("--prompt-words", type=int, default=40, help="words in each prompt (~1.2 tokens a word)")
    ap.add_argument("--quant", default="auto", choices=["auto", "none", "int8", "int4", "fp16"],
                    help="nanoseek serve --quant (auto: int4 for 4-bit GGUF layers, int8 for others)")  # fmt: skip
    ap.add_argument("--compile", action="store_true",
                    help="nanoseek serve --compile (decode steps through torch.compile, built at start)")  # fmt: skip
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds one stream may take in all")
    ap.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to start")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 1 round, concurrency 1,2, 8 tokens, 6-word prompts, 16 agreement positions "
                    "(for tests)")  # fmt: skip
    ap.add_argument(
        "--agreement-positions",
        type=int,
        default=DEFAULT_POSITIONS,
        help="teacher-forced positions of the agreement check before timing (one greedy token each)",
    )
    ap.add_argument("--agreement-threshold", type=float, default=DEFAULT_THRESHOLD,
                    help="fraction of those positions at which nanoseek and each peer must pick the same token, "
                    "or the benchmark stops before timing")  # fmt: skip
    ap.add_argument("--plot", help="write a PNG (TTFT and aggregate throughput vs concurrency) here")
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    try:
        args.concurrency = sorted({int(c) for c in str(args.concurrency).split(",") if c.strip()})
    except ValueError as exc:
        raise ValueError(f"--concurrency takes integers like 1,4,16: {args.concurrency!r}") from exc
    if not args.concurrency or min(args.concurrency) < 1:
        raise ValueError("--concurrency needs counts >= 1")
    args.peers = [] if args.peers.strip() in ("", "none") else [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in args.peers:
        if p not in PEERS:
            raise ValueError(f"unknown peer {p!r}; choose from {', '.join(PEERS)} (or 'none')")
    check_threshold(args.agreement_threshold)
    for name in ("threads", "rounds", "max_tokens", "prompt_words", "agreement_positions"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("request_timeout", "startup_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if importlib.util.find_spec("httpx") is None:
        raise ValueError(f"the serve benchmark's client needs httpx: {INSTALL_HINT}")
    model = resolve_model(args.model)
    n_ctx = 2048  # llama.cpp's default; prompts (~50 tokens) + max_tokens fit far below it
    specs = [nanoseek_spec(model, args.quant, max(args.concurrency), args.compile)]
    peers, notes = peer_specs(args.peers, model, args.threads, n_ctx, slot_context(args.prompt_words, args.max_tokens))
    specs += peers
    notes = [PEER_NOTES[p] for p in args.peers] + [f"{s.label} build: {s.build}" for s in peers if s.build] + notes
    env = worker_env(args.threads)
    prompts = level_prompts(args.concurrency, args.prompt_words)
    load_start = os.getloadavg()

    agreement = check_servers_agree(specs, args, env, model, notes)
    specs = [s for s in specs if s.label in agreement["picks"]]  # a peer whose server failed to start is a note

    # figures[label][C] = one dict per round; texts[label] = the concurrency-1 output of each round
    figures: dict[str, dict[int, list[dict]]] = {s.label: {c: [] for c in args.concurrency} for s in specs}
    texts: dict[str, list[str]] = {s.label: [] for s in specs}
    rss: dict[str, list[float]] = {s.label: [] for s in specs}
    prompt_ids: dict[str, list[list[int]]] = {}  # each server's tokenization of every timed prompt
    failed: dict[str, str] = {}
    for r in range(args.rounds):
        shift = r % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            if spec.label in failed:
                continue
            print(f"round {r + 1}/{args.rounds}: {spec.label} ...", file=sys.stderr, flush=True)
            try:
                run_server(spec, args, env, prompts, figures, texts, rss, prompt_ids)
            except ServerFailed as exc:
                if spec.label == "nanoseek":
                    raise SystemExit(f"nanoseek bench serve: error: {exc}") from exc
                failed[spec.label] = str(exc)
                notes.append(f"{spec.label} MISSING: its server failed: {str(exc).strip()}")
    for label in failed:
        for d in (figures, texts, rss, prompt_ids):
            d.pop(label, None)

    report(args, model, figures, texts, rss, notes, load_start, same_prompt_tokens(prompt_ids), agreement)


def server_next_token(url: str, model: str, timeout: float) -> Callable[[list[int]], str]:
    """Ask a server for its greedy next token after a token-id prompt (/v1/completions, one token, temperature
    0); the token's text is the pick."""
    import httpx

    def next_token(prefix: list[int]) -> str:
        body = {"model": model, "prompt": prefix, "max_tokens": 1, "temperature": 0, "top_p": 1}
        try:
            answer = httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise ServerFailed(f"its /v1/completions failed on a token-id prompt: {exc}") from exc
        if answer.status_code != 200:
            raise ServerFailed(f"its /v1/completions answered {answer.status_code} to a token-id prompt of "
                               f"{len(prefix)} tokens: {answer.text[:300]}")  # fmt: skip
        return answer.json()["choices"][0]["text"]

    return next_token


def check_servers_agree(specs: list[ServerSpec], args, env: dict, model: Path, notes: list[str]) -> dict:
    """Before timing: every server's teacher-forced greedy picks on the same token ids of the text (one start
    each, one slot); each peer must agree with nanoseek at --agreement-threshold of the positions, or the
    benchmark stops (SystemExit naming both figures). A peer whose server fails to start becomes a note."""
    import nanoseek

    ids = nanoseek.load_tokenizer(model).encode(TEXT)
    prefixes = teacher_forced_prefixes(ids, args.agreement_positions)
    chosen: dict[str, list[str]] = {}
    for spec in specs:
        print(f"agreement check: {spec.label} ...", file=sys.stderr, flush=True)
        try:
            with running(spec, env, args.startup_timeout, slots=1) as (url, name, _proc):
                chosen[spec.label] = picks(server_next_token(url, name, args.request_timeout), prefixes)
        except ServerFailed as exc:
            if spec.label == "nanoseek":
                raise SystemExit(f"nanoseek bench serve: error: {exc}") from exc
            notes.append(f"{spec.label} MISSING: its server failed: {str(exc).strip()}")
    checks = [Agreement.of("nanoseek", label, chosen["nanoseek"], chosen[label], args.agreement_threshold)
              for label in chosen if label != "nanoseek"]  # fmt: skip
    failed = [c for c in checks if not c.ok]
    if failed:
        raise SystemExit("nanoseek bench serve: stopped before timing: " + "; ".join(c.refusal() for c in failed))
    return {"picks": chosen, "checks": [c.line() for c in checks], "positions": len(prefixes)}


def server_prompt_ids(spec: ServerSpec, url: str, model: str, prompts: list[str]) -> list[list[int]]:
    """How the server itself tokenizes each prompt (its tokenize endpoint), to check that every server is
    given the same prompt tokens."""
    import httpx

    ids = []
    for prompt in prompts:
        body = {"model": model, spec.tokenize_field: prompt}
        try:
            answer = httpx.post(f"{url}{spec.tokenize_path}", json=body, timeout=60)
            answer.raise_for_status()
        except httpx.HTTPError as exc:
            raise ServerFailed(f"{spec.label}: its tokenize endpoint {spec.tokenize_path} failed: {exc}") from exc
        ids.append(answer.json()["tokens"])
    return ids


def run_server(spec, args, env, prompts, figures, texts, rss, prompt_ids) -> None:
    """One round of one server: started once for every level (nanoseek: --max-num-seqs the largest level), or
    once per level with that level's slots (llama-server: -np C); a warm-up request after each start."""
    starts = [[c] for c in args.concurrency] if spec.per_level else [args.concurrency]
    peak = math.nan
    for levels in starts:
        with running(spec, env, args.startup_timeout, slots=max(levels)) as (url, model, proc):
            body = request_body(spec, model, args.max_tokens)
            # untimed: lazy initialisation, first allocations
            warm = asyncio.run(drive(url, prompts["warmup"], request_body(spec, model, 2), args.request_timeout))
            if warm.streams[0].error:
                raise ServerFailed(f"{spec.label}: the warm-up request failed: {warm.streams[0].error} "
                                   f"{warm.streams[0].text}")  # fmt: skip
            for c in levels:
                level = asyncio.run(drive(url, prompts[c], body, args.request_timeout))
                figures[spec.label][c].append(level_figures(level, args.max_tokens))
                if c == 1:
                    texts[spec.label].append(level.streams[0].text)
            peak = max(peak, peak_rss_mb(proc.pid)) if math.isfinite(peak) else peak_rss_mb(proc.pid)
            if spec.label not in prompt_ids:
                prompt_ids[spec.label] = server_prompt_ids(
                    spec, url, model, [p for c in args.concurrency for p in prompts[c]]
                )
    rss[spec.label].append(peak)


def same_prompt_tokens(prompt_ids: dict[str, list[list[int]]]) -> str:
    """A line saying whether every server tokenized every prompt the same (equal work needs it)."""
    labels = list(prompt_ids)
    ours = prompt_ids["nanoseek"]
    lengths = sorted({len(ids) for ids in ours})
    differ = {peer: sum(a != b for a, b in zip(ours, prompt_ids[peer])) for peer in labels[1:]}
    shown = f"{len(ours)} prompts of {lengths[0]}–{lengths[-1]} tokens (each server's tokenize endpoint)"
    if not any(differ.values()):
        return shown + (": the same token ids on every server" if differ else "")
    return shown + ": DIFFERENT token ids on " + ", ".join(f"{p} for {n}" for p, n in differ.items() if n)


def report(args, model: Path, figures, texts, rss, notes, load_start, prompt_tokens_line: str,
           checked: dict) -> None:  # fmt: skip
    load_end = os.getloadavg()
    labels = list(figures)
    print(
        f"serve benchmark: {model.name}, {args.threads} thread(s) per server, {args.rounds} round(s) (median, min–max "
        f"over rounds), {args.max_tokens} tokens per stream, prompts of {args.prompt_words} words, "
        f"{os.cpu_count()} CPUs, load average {load_start[0]:.2f} at the start and {load_end[0]:.2f} at the end"
    )
    print(f"nanoseek serve --quant {args.quant}{' --compile' if args.compile else ''} (its defaults otherwise)")
    for note in notes:
        print(f"NOTE: {note}")
    print(f"prompts: {prompt_tokens_line}")
    print(f"agreement, checked before timing (teacher-forced greedy next tokens at {checked['positions']} positions "
          "of the benchmark's text, the same token ids on every server):")  # fmt: skip
    for line in checked["checks"] or ["no peer to compare with"]:
        print(f"  {line}")
    print()
    rows = []
    for label in labels:
        for c in args.concurrency:
            per_round = figures[label][c]
            sent = sum(f["sent"] for f in per_round)
            done = sum(f["completed"] for f in per_round)
            fails = Counter()
            for f in per_round:
                fails.update(f["failures"])
            cells = [label, str(c), f"{done}/{sent}", ", ".join(f"{n} {why}" for why, n in fails.items()) or "—"]
            cells += [spread([f[m] for f in per_round]) for m in METRICS]
            rows.append(cells)
    header = ["server", "C", "completed", "failed (why)", "TTFT ms", "TTFT p90 ms", "TTFT p99 ms", "TPOT ms",
              "per-request tok/s", "aggregate tok/s"]  # fmt: skip
    print(table(header, rows))
    print()
    print("peak RSS of each server process (MB): " + ", ".join(f"{lab} {spread(rss[lab], 0)}" for lab in labels))

    ratios = {}
    for peer in labels[1:]:
        shown, ratios[peer] = ratio_table(figures, "nanoseek", peer, args.concurrency)
        print()
        print(f"ratios nanoseek / {peer}, per round (> 1: nanoseek better; TTFT and TPOT as {peer} time / nanoseek "
              "time):")  # fmt: skip
        print(shown)

    agreement = report_agreement(model, texts, labels)
    if args.plot:
        plot(args, model, figures, Path(args.plot))
        print(f"plot: {args.plot}")
    if args.json:
        raw = {"args": {k: v for k, v in vars(args).items()}, "figures": figures, "texts": texts, "rss_mb": rss,
               "ratios": ratios, "agreement": agreement, "checked_before_timing": checked,
               "notes": notes, "load": [load_start, load_end],
               "prompts": prompt_tokens_line}  # fmt: skip
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))


def report_agreement(model: Path, texts: dict[str, list[str]], labels: list[str]) -> dict:
    """Each server's concurrency-1 output across rounds (must not change), and nanoseek's against each peer's
    (longest common prefix in tokens; Q4_1 in llama.cpp vs int8 in nanoseek, so not expected to be equal)."""
    import nanoseek

    tokenizer = nanoseek.load_tokenizer(model)
    print()
    print("greedy agreement at concurrency 1 (same prompt, temperature 0):")
    result = {}
    for label in labels:
        stable = len(set(texts[label])) == 1
        result[f"{label} stable"] = stable
        if not stable:
            print(f"  {label}: its output CHANGED between rounds")
    ours = tokenizer.encode(texts["nanoseek"][0]) if texts["nanoseek"] else []
    for peer in labels[1:]:
        theirs = tokenizer.encode(texts[peer][0]) if texts[peer] else []
        n = matching_prefix(ours, theirs)
        chars = matching_prefix(list(texts["nanoseek"][0]), list(texts[peer][0])) if texts[peer] else 0
        result[peer] = {"tokens": n, "of": min(len(ours), len(theirs)), "chars": chars}
        print(
            f"  nanoseek vs {peer}: first {n} of {min(len(ours), len(theirs))} tokens equal ({chars} characters); "
            "not expected to be equal: nanoseek runs its --quant format (auto: int4 for a GGUF with 4-bit layers, with "
            "int8 activations), llama.cpp its own Q4_1 kernels"
        )
    if all(result[f"{lab} stable"] for lab in labels):
        print("  every server gave the same output in every round")
    return result


def plot(args, model: Path, figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("ttft_ms", "time to first token, median (ms)", True), ("aggregate_tok_s", "aggregate tok/s", False),
              ("completed", "completed streams (fraction)", False)]  # fmt: skip
    colors = {
        "nanoseek": "tab:blue",
        "llama-server": "tab:red",
        "llama.cpp": "tab:gray",
        "llama.cpp-queue": "tab:orange",
    }
    for ax, (metric, title, logy) in zip(axes, panels):
        for label, per_c in figures.items():
            cs, meds, lo, hi = [], [], [], []
            for c in args.concurrency:
                vals = [f[metric] / f["sent"] if metric == "completed" else f[metric] for f in per_c[c]]
                vals = [v for v in vals if math.isfinite(v)]
                if vals:
                    s = Spread.of(vals)
                    cs.append(c)
                    meds.append(s.median)
                    lo.append(s.median - s.lo)
                    hi.append(s.hi - s.median)
            ax.errorbar(cs, meds, yerr=[lo, hi], marker="o", capsize=3, label=label, color=colors.get(label))
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.concurrency, [str(c) for c in args.concurrency])
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.legend()
    load = os.getloadavg()[0]
    fig.suptitle(f"serve benchmark: {model.name}, {args.threads} thread(s) per server, {args.max_tokens} "
                 f"tokens/stream, median of {args.rounds} rounds (load {load:.1f})")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
