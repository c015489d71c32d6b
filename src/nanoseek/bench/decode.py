"""Decode speed: nanoseek's engine vs llama.cpp's own `llama-bench`, llama.cpp in-process (llama-cpp-python) and
transformers `generate`, same GGUF, same prompt token ids, greedy, on this machine, timed alternately in one run.

    nanoseek bench decode MODEL [--threads 2 --reps 3 --plot decode.png]   (or python benchmarks/decode.py)

MODEL is a .gguf file or an asset name (`smollm2`). Every side runs in its own process (so its peak RSS is
its own) and is loaded once; the parent hands each side the same task in turn, alternating the order every
repeat. Tasks: one stream with a ~200-token prompt (time to first token, prefill tok/s, then decode tok/s),
and C distinct prompts at once for C in 1/4/16/64 (aggregate tok/s, every stream must reach max_tokens;
the prompts differ from their first block on, so the prefix cache cannot share them). nanoseek runs its
engine in fp32 (what `nanoseek.load` gives), fp16 and int8 (`quantize_model`). llama.cpp runs the GGUF's
own Q4_1 kernels, one sequence at a time (its Python API does not batch sequences); transformers runs
fp32 with its KV cache, the C prompts as one batch (equal lengths: no padding). llama-bench, llama.cpp's own
C++ tool without Python's per-token work, runs `-p 0 -n DECODE -d PROMPT -t THREADS` (decode after a prompt of
the same length, filled into its KV cache untimed) once per repeat in turn with the single-stream runs; the
ratios to it are taken per repeat (median, min–max). It generates no text, so the agreement check rests on
llama-cpp-python where installed. `make peers` builds it; the report names the build.

Agreement is checked BEFORE timing, and the benchmark stops when it fails: nanoseek fp32 must equal
transformers' greedy tokens for the first 32 (--check-tokens), and every nanoseek format must pick llama.cpp's
greedy next token at --agreement-threshold of --agreement-positions teacher-forced positions of the text
(bench/agreement.py; llama.cpp = llama-server of llama-bench's build, or llama-cpp-python). After timing the
greedy outputs are compared too (matching prefix lengths), for the record.
Figures are medians of the repeats with their min-max spread;
the ratios are the result. A DeepSeek-V3 model is run through the engine with and without MTP speculation:
random weights of a named config (`--deepseek bench-20m`, the default), or a trained model folder with its
MTP layer (`--deepseek runs/NAME/model`, the speedrun's final model), whose MTP drafts are worth measuring.
The speculative run reports its acceptance rate and must give the plain run's greedy tokens.

llama-bench: `make peers`. llama-cpp-python is optional: `pip install -e .[bench]` (builds from source, ~10 min
on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.bench.agreement import (
    DEFAULT_POSITIONS,
    DEFAULT_THRESHOLD,
    Agreement,
    check_threshold,
    picks,
    teacher_forced_prefixes,
)
from nanoseek.bench.peers import BUILD_HINT
from nanoseek.bench.timing import OutputsDisagree, matching_prefix

WORKER = Path(__file__).with_name("decode_worker.py")
INSTALL_HINT = "pip install -e '.[bench]' (builds llama-cpp-python from source, ~10 min on 2 cores)"

# English prose for the prompts (public-domain style text written for this benchmark).
TEXT = (
    "The history of the lighthouse is a history of people who decided that a dangerous coast should not stay "
    "dark. The earliest lights were fires kept burning on hills and towers, tended through the night by "
    "watchmen who carried wood and oil up narrow stairs. Later, builders learned to set glass lenses around a "
    "single lamp so that its light was gathered into a beam that could be seen far out at sea. Each station "
    "was given its own pattern of flashes, and sailors carried printed lists that told them which light they "
    "were looking at, so that a captain could find his position on a cloudy night by counting seconds between "
    "the flashes. Keepers lived with their families in small houses beside the tower. They cleaned the lenses "
    "every morning, trimmed the wicks, wound the clockwork that turned the lamp, and wrote the weather into a "
    "logbook. In storms they stayed awake until dawn. Many stations were so remote that supplies came only "
    "once a month by boat, and children learned to read from the few books that the supply boat brought. "
    "When electricity arrived, the lamps became brighter and the clockwork was replaced by motors. Radio "
    "beacons and then satellite navigation made the lights less important, and most towers are now automatic. "
    "Some have become museums, where visitors climb the same stairs the keepers climbed and look out over the "
    "water. The old logbooks are kept in archives, and historians read them to learn how the weather and the "
    "traffic of ships changed over two centuries. A lighthouse is a simple machine, but it stands for an idea "
    "that is easy to forget: that the safety of strangers is worth a lifetime of patient, ordinary work."
)


@dataclass
class Side:
    label: str  # "llama.cpp", "transformers", "nanoseek-fp32", ...
    settings: dict
    max_concurrency: int
    proc: subprocess.Popen | None = None
    stderr: object = None
    info: dict = field(default_factory=dict)
    error: str | None = None

    def start(self, env: dict) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the worker; close() closes it
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(self.settings)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
        )  # fmt: skip
        self.info = self._read()
        if "error" in self.info:
            self.error = self.info["error"]
            self.close()

    def call(self, task: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"task": task, **kwargs}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"{self.label}: {task} failed: {answer['error']}")
        return answer

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            tail = self.stderr.read()[-2000:]
            return {"error": f"the worker process ended (exit code {self.proc.poll()}):\n{tail}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None


@dataclass
class Figures:
    """One side's measurements, one entry per repeat."""

    decode: list[float] = field(default_factory=list)  # tok/s after the first token
    prefill: list[float] = field(default_factory=list)  # prompt tok/s (prompt tokens / time to first token)
    ttft: list[float] = field(default_factory=list)  # seconds
    aggregate: dict[int, list[float]] = field(default_factory=dict)  # concurrency -> output tok/s
    tokens: list[list[int]] = field(default_factory=list)  # greedy single-stream output of each repeat
    kv_bytes: int = 0  # largest KV cache the side allocated (nanoseek)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    if not xs:
        return "—"
    return f"{fmt.format(median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def resolve_model(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: the decode benchmark takes a .gguf file (llama.cpp reads GGUF only)")
        return path
    from nanoseek.assets import ASSETS, fetch

    if name in ASSETS:
        return Path(fetch(name))
    raise ValueError(f"{name}: no such .gguf file, and not an asset name ({', '.join(sorted(ASSETS))})")


def prompt_ids(tokenizer, length: int) -> list[int]:
    ids = tokenizer.encode(TEXT)
    while len(ids) < length:
        ids = ids + tokenizer.encode(" " + TEXT)
    return ids


def worker_env(threads: int) -> dict:
    import nanoseek

    env = dict(os.environ)
    src = str(Path(nanoseek.__file__).resolve().parents[1])  # the nanoseek this process runs, for the workers
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="nanoseek bench decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a .gguf file or an asset name (smollm2)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every side (llama.cpp's n_threads too)")
    ap.add_argument("--reps", type=int, default=3, help="timed repeats (after one warm-up)")
    ap.add_argument("--prompt-tokens", type=int, default=200, help="prompt of the single-stream run")
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens generated in the single-stream run")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrent-request counts")
    ap.add_argument("--batch-prompt-tokens", type=int, default=32, help="prompt length of each concurrent request")
    ap.add_argument("--batch-tokens", type=int, default=32, help="max_tokens of each concurrent request")
    ap.add_argument("--kv-cache-dtype", choices=("auto", "model", "fp16"), default="auto",
                    help="nanoseek's KV cache (EngineConfig.kv_cache_dtype): auto fp16 for the quantized formats, "
                    "the weights' dtype for fp32 (default); model: the weights' dtype for every format")  # fmt: skip
    ap.add_argument("--formats", default="fp32,fp16,int8,int8+compile",
                    help="nanoseek run formats (fp32, fp16, int8, int4); FORMAT+compile runs decode steps through "
                    "torch.compile")  # fmt: skip
    ap.add_argument("--peers", default="llama-bench,llama.cpp,transformers",
                    help="peers to run (comma-separated; '' for none): llama-bench (llama.cpp's own tool, `make peers` "
                    "builds it; single-stream decode at the prompt's depth), llama.cpp (llama-cpp-python in-process), "
                    "transformers")  # fmt: skip
    ap.add_argument("--transformers-max-concurrency", type=int, default=64,
                    help="largest concurrency transformers runs (its batched generate is slow)")  # fmt: skip
    ap.add_argument("--deepseek", default="bench-20m",
                    help="DeepSeek-V3 to run with and without MTP speculation: a named config (random weights) or a "
                    "model folder such as a speedrun's runs/NAME/model ('none' to skip)")  # fmt: skip
    ap.add_argument("--deepseek-prompt", default=None,
                    help="prompt text for a --deepseek model folder (default: the benchmark's text), e.g. a task "
                    "it was trained on; a user turn where its tokenizer has a chat template")  # fmt: skip
    ap.add_argument("--check-tokens", type=int, default=32,
                    help="nanoseek fp32 must equal transformers greedy for this many tokens")  # fmt: skip
    ap.add_argument("--agreement-positions", type=int, default=DEFAULT_POSITIONS,
                    help="teacher-forced positions of the text at which every format's greedy next token is "
                    "compared with llama.cpp's before timing")  # fmt: skip
    ap.add_argument(
        "--agreement-threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="fraction of those positions that must agree, or the benchmark stops before timing",
    )
    ap.add_argument("--plot", help="write a PNG of the figures here")
    ap.add_argument("--json", help="write the raw figures here")
    ap.add_argument("--profile", metavar="FORMAT", help="also profile nanoseek's decode step in this format")
    args = ap.parse_args(argv)
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError as exc:
        raise ValueError(f"--concurrency takes integers like 1,4,16: {args.concurrency!r}") from exc
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for f in args.formats:
        base, plus, extra = f.partition("+")
        if base not in ("fp32", "fp16", "int8", "int4") or (plus and extra != "compile"):
            raise ValueError(f"unknown nanoseek format {f!r}; choose from fp32, fp16, int8, int4, each maybe +compile")
    for p in args.peers:
        if p not in ("llama-bench", "llama.cpp", "transformers"):
            raise ValueError(f"unknown peer {p!r}; choose from llama-bench, llama.cpp, transformers")
    check_threshold(args.agreement_threshold)
    positive = ("threads", "reps", "prompt_tokens", "decode_tokens", "batch_prompt_tokens", "batch_tokens",
                "agreement_positions")  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.concurrency or min(args.concurrency) < 1:
        raise ValueError("--concurrency needs counts >= 1")
    if args.deepseek_prompt is not None and not (Path(args.deepseek) / "tokenizer.json").is_file():
        raise ValueError("--deepseek-prompt needs a --deepseek model folder with its tokenizer")
    if args.deepseek != "none" and not Path(args.deepseek).is_dir():
        from nanoseek.model.config import ConfigError, from_name

        try:
            from_name(args.deepseek)
        except ConfigError as exc:
            why = f"neither a model folder nor a named config ({exc})"
            raise ValueError(f"--deepseek {args.deepseek!r}: {why}") from None
    if args.profile and args.profile not in args.formats:
        raise ValueError(f"--profile {args.profile}: not among --formats {','.join(args.formats)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from tqdm import tqdm

    import nanoseek

    model = resolve_model(args.model)
    tokenizer = nanoseek.load_tokenizer(model)
    text_ids = prompt_ids(tokenizer, max(args.prompt_tokens, max(args.concurrency) + args.batch_prompt_tokens))
    long_prompt = text_ids[: args.prompt_tokens]
    # distinct windows of the text: request i starts at token i, so no two share a first cache block
    batches = {c: [text_ids[i : i + args.batch_prompt_tokens] for i in range(c)] for c in args.concurrency}
    n_ctx = max(args.prompt_tokens + args.decode_tokens, args.batch_prompt_tokens + args.batch_tokens)
    n_ctx = -(-(n_ctx + 16) // 256) * 256

    sides: list[Side] = []
    notes: list[str] = []
    bench_peer = None
    if "llama-bench" in args.peers:
        from nanoseek.bench.peers import PeerMissing, describe, find_peer

        try:
            binary, record = find_peer("llama-bench")
            bench_peer = LlamaBench(binary, model, args.threads, args.prompt_tokens, args.decode_tokens,
                                    build=record)  # fmt: skip
            notes.append(
                f"llama-bench: {describe(record)}; `{bench_peer.command()}` once per repeat, in turn with the "
                "other sides (tg at the prompt's depth: decode only, it generates no text to compare)"
            )
        except PeerMissing as exc:
            notes.append(f"llama-bench column MISSING: {exc}")
    for peer in [p for p in args.peers if p != "llama-bench"]:
        module = "llama_cpp" if peer == "llama.cpp" else "transformers"
        if importlib.util.find_spec(module) is None:
            hint = INSTALL_HINT if peer == "llama.cpp" else "pip install -e '.[dev]'"
            notes.append(f"{peer} column MISSING: {module} is not installed ({hint})")
            continue
        limit = 1 if peer == "llama.cpp" else args.transformers_max_concurrency
        side = "llama.cpp" if peer == "llama.cpp" else "transformers"
        sides.append(Side(peer, {"side": side, "model": str(model), "threads": args.threads, "n_ctx": n_ctx}, limit))
    for fmt in args.formats:
        settings = {"side": "nanoseek", "model": str(model), "threads": args.threads, "format": fmt,
                    "kv_cache_dtype": args.kv_cache_dtype}  # fmt: skip
        sides.append(Side(f"nanoseek-{fmt}", settings, max(args.concurrency)))

    env = worker_env(args.threads)
    figures = {s.label: Figures() for s in sides}
    try:
        for side in tqdm(sides, desc="loading sides", file=sys.stderr, leave=False):
            side.start(env)
            if side.error is None:
                t0 = time.perf_counter()
                side.call("single", prompt=long_prompt[:16], max_tokens=4)  # warm-up (lazy init, allocator)
                if side.label.endswith("+compile"):  # compiles for one row above, for several rows here
                    side.call("batch", prompts=batches[max(args.concurrency)][:2],
                              max_tokens=4)  # fmt: skip
                    took = time.perf_counter() - t0
                    notes.append(f"{side.label}: compiling its decode step took {took:.0f} s (warm-up, before "
                                 "timing; inductor's disk cache shortens it in later runs)")  # fmt: skip
                # the generation peak starts after the warm-up (for a compiled side, its compilation)
                side.info["warmup_peak_kb"] = side.call("reset_peak")["peak_kb"]
        for side in [s for s in sides if s.error]:
            notes.append(f"{side.label} column MISSING: it failed to load: {side.error.strip()}")
        sides = [s for s in sides if s.error is None]
        if not any(s.label.startswith("nanoseek") for s in sides):
            raise RuntimeError("no nanoseek side loaded: " + "; ".join(notes))
        llama = next((s for s in sides if s.label == "llama.cpp"), None)
        if llama is not None:
            same = llama.call("tokenize", text=TEXT)["tokens"][: args.prompt_tokens] == long_prompt
            notes.append(
                f"llama.cpp tokenizes the prompt text {'identically' if same else 'DIFFERENTLY'} "
                "(every side is fed the same token ids either way)"
            )

        notes += check_before_timing(args, sides, long_prompt, text_ids, bench_peer, model, env, tokenizer)

        jobs = [(rep, task) for rep in range(args.reps) for task in ["single", *args.concurrency]]
        total = sum(1 for _, t in jobs for s in sides if t == "single" or t <= s.max_concurrency)
        bar = tqdm(total=total + (args.reps if bench_peer else 0), desc="timing", file=sys.stderr)
        if bench_peer is not None:
            bench_peer.run()  # untimed warm-up (page cache, first run)
        for rep, task in jobs:
            order = [*sides, *([bench_peer] if bench_peer and task == "single" else [])]
            order = order if rep % 2 == 0 else order[::-1]  # alternate who goes first
            for side in order:
                if side is bench_peer:
                    bench_peer.decode.append(bench_peer.run())
                    bar.update()
                    continue
                fig = figures[side.label]
                if task == "single":
                    out = side.call("single", prompt=long_prompt, max_tokens=args.decode_tokens)
                    if len(out["tokens"]) != args.decode_tokens:
                        raise RuntimeError(f"{side.label}: {len(out['tokens'])} of {args.decode_tokens} tokens")
                    fig.decode.append((args.decode_tokens - 1) / out["decode_s"])
                    fig.prefill.append(len(long_prompt) / out["ttft"])
                    fig.ttft.append(out["ttft"])
                    fig.tokens.append(out["tokens"])
                elif task <= side.max_concurrency:
                    out = side.call("batch", prompts=batches[task], max_tokens=args.batch_tokens)
                    if out["lengths"] != [args.batch_tokens] * task:
                        raise RuntimeError(
                            f"{side.label}: incomplete streams at concurrency {task}: lengths {out['lengths']}"
                        )
                    fig.aggregate.setdefault(task, []).append(task * args.batch_tokens / out["wall"])
                    fig.kv_bytes = max(fig.kv_bytes, out["kv_bytes"] or 0)
                else:
                    continue
                bar.update()
        bar.close()
        memory = {s.label: {**s.info, **s.call("memory")} for s in sides}
        read = {s.label: s.call("read_bytes", depth=args.prompt_tokens) for s in sides
                if s.label.startswith("nanoseek")}  # fmt: skip
        if bench_peer is not None:
            read["llama-bench"] = gguf_read_bytes(model, args.prompt_tokens)
        profile = None
        if args.profile:
            side = next(s for s in sides if s.label == f"nanoseek-{args.profile}")
            profile = side.call("profile", prompt=long_prompt[:32], steps=32)
    finally:
        for side in sides:
            side.close()

    deepseek = run_deepseek(args, env) if args.deepseek != "none" else None
    bandwidth = read_bandwidth_gbs(args.threads)
    report(args, model, figures, memory, notes, deepseek, profile, bench_peer, (read, bandwidth))


@dataclass
class LlamaBench:
    """llama.cpp's own `llama-bench`: single-stream decode (tg) at the prompt's depth, one process per repeat."""

    binary: Path
    model: Path
    threads: int
    depth: int
    tokens: int
    decode: list[float] = field(default_factory=list)  # tok/s, one per repeat
    build: dict = field(default_factory=dict)  # the build record (build.json) of the binary

    def argv(self) -> list[str]:
        return llama_bench_argv(self.binary, self.model, self.threads, self.depth, self.tokens)

    def command(self) -> str:
        return " ".join([Path(self.binary).name, *self.argv()[1:]])

    def run(self) -> float:
        proc = subprocess.run(self.argv(), capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-bench failed (exit code {proc.returncode}): {proc.stderr[-1500:]}")
        return llama_bench_tok_s(proc.stdout)


def llama_bench_argv(binary: Path, model: Path, threads: int, depth: int, tokens: int) -> list[str]:
    """tg`tokens` at depth `depth` (-d fills the KV cache with a `depth`-token prompt first, untimed): the
    decode that follows the benchmark's prompt; one timed repetition (the benchmark repeats the process)."""
    return [str(binary), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(tokens), "-d", str(depth),
            "-r", "1", "-o", "json"]  # fmt: skip


def llama_bench_tok_s(stdout: str) -> float:
    """The tok/s of llama-bench's (single) tg test in its JSON output."""
    rows = [r for r in json.loads(stdout) if r.get("n_gen")]
    if len(rows) != 1:
        raise RuntimeError(f"llama-bench: expected one tg result, got {len(rows)}")
    return float(rows[0]["avg_ts"])


def gguf_read_bytes(path: Path, depth: int) -> dict[str, int]:
    """What llama.cpp's single-stream decode step at `depth` reads from a GGUF: every tensor in its stored
    format but the token embedding table (one row), unless the file has no output.weight (the head is tied to
    the table, so the table is read whole as the head), and `depth` positions of its default f16 KV cache in
    every layer (K and V: head_count_kv x key/value length, 2 bytes each)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    weights = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight" or tied)

    def field(key: str) -> int | None:
        f = reader.fields.get(key)
        return None if f is None else int(f.parts[f.data[0]][0])

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    layers, kv_heads = field(f"{arch}.block_count"), field(f"{arch}.attention.head_count_kv")
    head_dim = field(f"{arch}.attention.key_length") or field(f"{arch}.embedding_length") // field(
        f"{arch}.attention.head_count"
    )
    value_dim = field(f"{arch}.attention.value_length") or head_dim
    return {"weights": weights, "kv": layers * kv_heads * (head_dim + value_dim) * 2 * depth}


def read_bandwidth_gbs(threads: int, mib: int = 512, repeats: int = 7) -> float:
    """The machine's memory read bandwidth at `threads` (GB/s): a torch sum over `mib` MiB of float32, best of
    `repeats` (far larger than the caches, so the sum streams from memory). torch's thread count is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(mib * 2**18, dtype=torch.float32)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum().item()
            best = min(best, time.perf_counter() - t0)
        return x.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(before)


def print_read_bytes(args, figures: dict[str, Figures], read: dict[str, dict], bench_peer: LlamaBench | None,
                     bandwidth: float) -> None:  # fmt: skip
    """Bytes a single-stream decode step reads per side, the bandwidth its decode speed implies, and the ceiling
    the machine's read bandwidth puts on it: how far a side can still go reading the same bytes."""
    print()
    print(f"bytes a single-stream decode step reads at depth {args.prompt_tokens} (weights in their run format but "
          f"the embedding table, + KV cache), against the machine's read bandwidth: {bandwidth:.1f} GB/s at "
          f"{args.threads} threads (a torch sum over 512 MiB, best of 7, measured after the timing):")  # fmt: skip
    print("| side | MB read per token (weights + KV) | decode tok/s (median) | GB/s it implies | of the read "
          "bandwidth | ceiling tok/s at that bandwidth |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    rows = [(label, read[label], figures[label].decode) for label in read if label in figures]
    if bench_peer is not None and "llama-bench" in read:
        rows.append((f"llama-bench (tg at depth {args.prompt_tokens})", read["llama-bench"], bench_peer.decode))
    for label, r, decode in rows:
        if not decode:
            continue
        per_token = r["weights"] + r["kv"]
        tok_s = statistics.median(decode)
        implied = per_token * tok_s / 1e9
        print(f"| {label} | {r['weights'] / 1e6:.2f} + {r['kv'] / 1e6:.2f} = {per_token / 1e6:.2f} | {tok_s:.1f} | "
              f"{implied:.2f} | {implied / bandwidth:.0%} | {bandwidth * 1e9 / per_token:.0f} |")  # fmt: skip


def per_round_ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """ours[r] / theirs[r] for each round r (the two ran in turn, under the same load)."""
    return [a / b for a, b in zip(ours, theirs)]


def deepseek_prompt(name_or_folder: str, text: str | None = None, length: int = 32) -> list[int]:
    """The DeepSeek run's prompt: `text` (or the first `length` tokens of the benchmark's text) in a model folder's
    own tokenizer, else random ids (a named config has random weights, and a folder without a tokenizer has
    none to read text with)."""
    folder = Path(name_or_folder)
    if (folder / "tokenizer.json").is_file():
        import nanoseek

        tokenizer = nanoseek.load_tokenizer(folder)
        if not text:
            return prompt_ids(tokenizer, length)[:length]
        if tokenizer.chat_template:  # a chat model (the speedrun's final one) gets the text as a user turn
            return tokenizer.encode_chat([{"role": "user", "content": text}])
        return tokenizer.encode(text)
    if folder.is_dir():
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    else:
        from nanoseek.model.config import from_name

        vocab = from_name(name_or_folder).vocab_size
    rng = random.Random(0)
    return [rng.randrange(3, vocab) for _ in range(length)]


def run_deepseek(args, env: dict) -> dict:
    """Single-stream decode tok/s of a DeepSeek-V3 (a named config with one random MTP layer, or a model folder)
    through the engine, without and with MTP speculation, and the drafts the latter proposed and had accepted.
    Before timing, the speculative run's greedy tokens must equal the plain run's (OutputsDisagree otherwise);
    then the two alternate, repeat by repeat."""
    from tqdm import tqdm

    prompt = deepseek_prompt(args.deepseek, args.deepseek_prompt)
    if not prompt:
        raise ValueError("--deepseek-prompt: the text gives no tokens")
    results: dict[str, dict] = {}
    sides: dict[str, Side] = {}
    try:
        for mtp in (False, True):
            label = "with MTP speculation" if mtp else "plain"
            source = {"model": args.deepseek} if Path(args.deepseek).is_dir() else {"config": args.deepseek}
            side = Side(label, {"side": "deepseek", **source, "threads": args.threads, "mtp": mtp}, 1)
            side.start(env)
            if side.error:
                results[label] = {"error": side.error.strip().splitlines()[-1]}
                continue
            sides[label] = side
            side.call("single", prompt=prompt, max_tokens=4)  # warm-up
            # untimed, before timing: the tokens the timed repeats must give again
            out = side.call("single", prompt=prompt, max_tokens=args.decode_tokens)
            results[label] = {"decode": [], "tokens": out["tokens"], "weights_bytes": side.info["weights_bytes"],
                              "drafted": 0, "accepted": 0}  # fmt: skip
        if len(sides) == 2:
            plain, spec = results["plain"]["tokens"], results["with MTP speculation"]["tokens"]
            if plain != spec:
                raise OutputsDisagree(
                    f"DeepSeek-V3 with MTP speculation gives different greedy tokens from plain decoding after "
                    f"{matching_prefix(plain, spec)} of {len(plain)}: stopped before timing"
                )
        for rep in tqdm(range(args.reps), desc="deepseek", file=sys.stderr, leave=False):
            order = list(sides.items()) if rep % 2 == 0 else list(sides.items())[::-1]
            for label, side in order:
                r = results[label]
                try:
                    out = side.call("single", prompt=prompt, max_tokens=args.decode_tokens)
                except RuntimeError as exc:
                    results[label] = {"error": str(exc)}
                    sides.pop(label)
                    continue
                r["decode"].append((args.decode_tokens - 1) / out["decode_s"])
                r["drafted"], r["accepted"] = r["drafted"] + out["drafted"], r["accepted"] + out["accepted"]
                if out["tokens"] != r["tokens"]:
                    r["changed"] = True  # not the tokens of the check: reported
    finally:
        for side in sides.values():
            side.close()
    return results


def print_deepseek(args, deepseek: dict) -> None:
    weights = "weights of the folder" if Path(args.deepseek).is_dir() else "random weights"
    print(f"DeepSeek-V3 ({args.deepseek}, {weights}, fp32) through the engine, single stream:")
    for label, r in deepseek.items():
        if "error" in r:
            print(f"  {label}: not run: {r['error']}")
            continue
        line = f"  {label}: decode {spread(r['decode'])} tok/s"
        if r["drafted"]:
            line += f"; MTP drafts accepted {r['accepted']} of {r['drafted']} ({r['accepted'] / r['drafted']:.0%})"
        plain = deepseek.get("plain", {}).get("tokens")
        if label != "plain" and plain is not None:
            same = matching_prefix(r["tokens"], plain)
            equal = same == len(plain) == len(r["tokens"])
            line += ("; the same greedy tokens as plain (checked before timing)" if equal
                     else f"; DIFFERENT greedy tokens from plain after {same}")  # fmt: skip
        if r.get("changed"):
            line += "; a timed repeat gave OTHER tokens than the check before timing"
        print(line)


def report(args, model: Path, figures: dict[str, Figures], memory: dict, notes, deepseek, profile,
           bench_peer: LlamaBench | None = None, read_bytes: tuple[dict, float] | None = None) -> None:  # fmt: skip
    import torch

    labels = list(figures)
    load = os.getloadavg()
    print(
        f"decode benchmark: {model.name}, {args.threads} threads, {args.reps} repeats (median, min–max), "
        f"torch {torch.__version__}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    llama_version = memory.get("llama.cpp", {}).get("version")
    if llama_version:
        print(f"llama-cpp-python {llama_version} (in-process, n_threads={args.threads})")
    for note in notes:
        print(f"NOTE: {note}")
    print(
        f"single stream: {args.prompt_tokens}-token prompt, {args.decode_tokens} greedy tokens; concurrent: "
        f"C distinct {args.batch_prompt_tokens}-token prompts x {args.batch_tokens} tokens (ignore_eos), "
        "aggregate = C x max_tokens / wall time"
    )
    print(f"nanoseek's KV cache: --kv-cache-dtype {args.kv_cache_dtype} (auto: fp16 for int8/int4/fp16, fp32 for fp32; "
          "llama.cpp's default cache is f16)")  # fmt: skip
    print()
    conc_cols = [f"agg tok/s @{c}" for c in args.concurrency]
    header = ["side", "decode tok/s", "prefill tok/s", "TTFT ms", *conc_cols]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label in labels:
        f = figures[label]
        cells = [label, spread(f.decode), spread(f.prefill, "{:.0f}"), spread([t * 1000 for t in f.ttft], "{:.0f}")]
        cells += [spread(f.aggregate.get(c, [])) for c in args.concurrency]
        print("| " + " | ".join(cells) + " |")
    if bench_peer is not None:
        print("| " + " | ".join([f"llama-bench (tg at depth {args.prompt_tokens})", spread(bench_peer.decode),
                                 "—", "—", *["—"] * len(args.concurrency)]) + " |")  # fmt: skip

    print()
    print("memory (RSS of each side's own process; generation peak = VmHWM reset after loading and warm-up)")
    mem_header = ["side", "weights MB (run format)", "KV MB (allocated)", "RSS MB after imports", "peak MB loading",
                  "RSS MB loaded", "peak MB warm-up", "peak MB generating", "RSS MB idle after",
                  "gen peak / (weights+KV)", "(gen peak - imports) / (weights+KV)"]  # fmt: skip
    print("| " + " | ".join(mem_header) + " |")
    print("|" + "---|" * len(mem_header))
    mb = 1 / 2**20
    for label in labels:
        m, f = memory[label], figures[label]
        whole, above = (f"{r:.2f}x" if f.kv_bytes else "—" for r in memory_ratios(m, f))
        kv = f"{f.kv_bytes * mb:.1f}" if f.kv_bytes else "—"
        cells = [label, f"{m['weights_bytes'] * mb:.1f}", kv, f"{m['baseline_kb'] / 1024:.0f}",
                 f"{m['load_peak_kb'] / 1024:.0f}", f"{m['loaded_kb'] / 1024:.0f}",
                 f"{m['warmup_peak_kb'] / 1024:.0f}", f"{m['peak_kb'] / 1024:.0f}",
                 f"{m['rss_kb'] / 1024:.0f}", whole, above]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print(
        "(weights = the model's tensors in the format they run in (nanoseek: packed projections; the embedding "
        "table as int8 rows in int8/int4, shared with a tied lm_head, fp32 in fp16); KV = the largest cache "
        "nanoseek allocated, sized to its task; 'imports' = RSS "
        "with torch and the side's libraries imported, before the model is loaded (a +compile side's include "
        "torch.compile's dynamo and inductor); 'idle after' = RSS when "
        "every task is done)"
    )
    unreset = [label for label in labels if not memory[label].get("peak_resettable", True)]
    if unreset:
        print(f"NOTE: the kernel could not reset the peak for {', '.join(unreset)}: their generation peak "
              "includes the loading peak")  # fmt: skip

    # greedy agreement
    print()
    print("greedy agreement (matching prefix of the single-stream outputs, of", args.decode_tokens, "tokens)")
    refs = [r for r in ("transformers", "llama.cpp", "nanoseek-fp32") if r in figures]
    for label in labels:
        toks = figures[label].tokens
        stable = all(t == toks[0] for t in toks)
        parts = [f"vs {r}: {matching_prefix(toks[0], figures[r].tokens[0])}" for r in refs if r != label]
        print(f"  {label:14s} " + ", ".join(parts) + ("" if stable else "  (NOT the same across repeats!)"))

    ratios, fastest = print_ratios(args, figures)
    if bench_peer is not None:
        ratios.update(print_bench_ratios(args, figures, bench_peer))
    print()
    print(
        f"nanoseek formats: nanoseek.load gives fp32; the CLI's --quant auto runs a GGUF with 4-bit layers "
        f"as int4 where its kernel runs, other quantized GGUFs as int8; fastest single stream: {fastest}"
    )
    print_targets(args, figures, memory, fastest, bench_peer.decode if bench_peer else [])
    if read_bytes is not None:
        print_read_bytes(args, figures, read_bytes[0], bench_peer, read_bytes[1])

    if deepseek is not None:
        print()
        print_deepseek(args, deepseek)
    if profile is not None:
        print()
        print(
            f"profile of nanoseek-{args.profile} single-stream decode ({profile['steps']} steps): "
            f"{profile['total_us'] / profile['steps'] / 1000:.1f} ms/token of op time, matmul kernels "
            f"{profile['matmul_us'] / profile['total_us']:.0%}, {profile['aten_calls'] / profile['steps']:.0f} "
            "aten ops/token"
        )
        print(profile["table"])

    if args.plot:
        plot(args, figures, Path(args.plot))
        print(f"plot: {args.plot}")
    if args.json:
        raw = {label: vars(f) for label, f in figures.items()}
        bench = None
        if bench_peer is not None:
            bench = {"decode": bench_peer.decode, "command": bench_peer.command(), "build": bench_peer.build}
        Path(args.json).write_text(
            json.dumps(
                {
                    "figures": raw,
                    "memory": memory,
                    "ratios": ratios,
                    "deepseek": deepseek,
                    "llama-bench": bench,
                    "read_bytes": None
                    if read_bytes is None
                    else {"per_token": read_bytes[0], "read_bandwidth_gbs": read_bytes[1]},
                    "notes": notes,
                },
                indent=1,
            )  # fmt: skip
        )


def print_ratios(args, figures: dict[str, Figures]) -> tuple[dict, str]:
    ours = [label for label in figures if label.startswith("nanoseek")]
    fastest = max(ours, key=lambda label: median(figures[label].decode))
    ratios: dict[str, dict[str, float]] = {}
    print()
    print("ratios (nanoseek / peer; > 1 means nanoseek is faster; TTFT as peer time / nanoseek time)")
    for peer in ("llama.cpp", "transformers"):
        if peer not in figures:
            continue
        p = figures[peer]
        for label in ours:
            f = figures[label]
            r = {
                "decode": median(f.decode) / median(p.decode),
                # the best repeat of each: the one least disturbed by other jobs on a shared machine
                "decode best/best": max(f.decode) / max(p.decode),
                "prefill": median(f.prefill) / median(p.prefill),
                "ttft": median(p.ttft) / median(f.ttft),
            }
            for c in args.concurrency:
                if c in p.aggregate:
                    r[f"agg@{c}"] = median(f.aggregate[c]) / median(p.aggregate[c])
            ratios[f"{label}/{peer}"] = r
            print(f"  {label:14s} / {peer:12s}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    return ratios, fastest


def print_bench_ratios(args, figures: dict[str, Figures], bench_peer: LlamaBench) -> dict:
    """Every side's single-stream decode over llama-bench's, per repeat, median (min–max)."""
    print()
    print(f"single-stream decode / llama-bench tg{args.decode_tokens} at depth {args.prompt_tokens}, per repeat "
          "(the two ran in turn), median (min–max):")  # fmt: skip
    ratios = {}
    for label, f in figures.items():
        per = per_round_ratios(f.decode, bench_peer.decode)
        if per:
            ratios[f"{label}/llama-bench"] = {"decode per round": per}
            print(f"  {label:22s}: {spread(per, '{:.2f}')}x  (rounds: {', '.join(f'{r:.2f}' for r in per)})")
    return ratios


# the targets: (column, goal, whether larger is better)
TARGETS = (
    ("decode vs llama-bench", 1.3, True),  # per repeat, median; llama.cpp's own tool at the prompt's depth
    ("decode vs llama.cpp", 1.0, True),
    ("agg @16 / own @1", 3.0, True),
    ("decode vs transformers", 5.0, True),
    ("peak above libraries / (W+KV)", 1.5, False),
    ("peak whole process / (W+KV)", 1.5, False),
)


def target_values(figures: dict[str, Figures], memory: dict, label: str, bench: list[float] = ()) -> dict[str, float]:
    """The side's figure for each target (NaN where its task or peer was not run)."""
    f, m, nan = figures[label], memory[label], math.nan
    per_round = per_round_ratios(f.decode, list(bench))

    def vs(peer: str) -> float:
        return median(f.decode) / median(figures[peer].decode) if peer in figures else nan

    whole, above = memory_ratios(m, f)
    return dict(zip([t[0] for t in TARGETS], [
        median(per_round),
        vs("llama.cpp"),
        median(f.aggregate[16]) / median(f.aggregate[1]) if {1, 16} <= f.aggregate.keys() else nan,
        vs("transformers"),
        above,
        whole,
    ]))  # fmt: skip


def memory_ratios(m: dict, f: Figures) -> tuple[float, float]:
    """The generation peak over (weights + KV): of the whole process, and above the libraries' imports (NaN for
    a side without a KV cache of nanoseek's)."""
    if not f.kv_bytes:
        return math.nan, math.nan
    footprint = m["weights_bytes"] + f.kv_bytes
    return m["peak_kb"] * 1024 / footprint, (m["peak_kb"] - m["baseline_kb"]) * 1024 / footprint


def print_targets(args, figures: dict[str, Figures], memory: dict, fastest: str, bench: list[float] = ()) -> None:
    """Every nanoseek format against every target: a table, met or missed and by how much."""
    print("targets, every nanoseek format (value, then met or MISSED by the factor it is short):")
    print("| format | " + " | ".join(f"{name} ({'≥' if up else '≤'} {goal:g}x)" for name, goal, up in TARGETS) + " |")
    print("|---" * (len(TARGETS) + 1) + "|")
    for label in (x for x in figures if x.startswith("nanoseek-")):
        cells = []
        for (_, goal, up), value in zip(TARGETS, target_values(figures, memory, label, bench).values()):
            if math.isnan(value):
                cells.append("not measured")
                continue
            short = goal / value if up else value / goal
            cells.append(f"{value:.2f}x " + ("met" if short <= 1 else f"MISSED by {short:.2f}x"))
        star = " (fastest single stream)" if label == fastest else ""
        print(f"| {label.removeprefix('nanoseek-')}{star} | " + " | ".join(cells) + " |")
    if not bench:
        why = f"not built: {BUILD_HINT}" if "llama-bench" in args.peers else "not among --peers"
        print(f"  single-stream decode vs llama-bench: not measured ({why})")
    if "llama.cpp" not in figures:  # a side that failed is in figures, with its error in the notes
        why = f"llama.cpp missing: {INSTALL_HINT}" if "llama.cpp" in args.peers else "not among --peers"
        print(f"  single-stream decode vs llama.cpp: not measured ({why})")


def check_exact(ours: list[int], theirs: list[int], need: int) -> str:
    """nanoseek fp32 and transformers run the same fp32 model: their greedy tokens must be equal for `need`
    tokens (OutputsDisagree otherwise); the line that says so."""
    got = matching_prefix(ours, theirs)
    if got < need:
        raise OutputsDisagree(
            f"nanoseek fp32 and transformers greedy outputs differ at token {got} (must agree on the first {need}): "
            "stopped before timing"
        )
    return f"outputs agree: nanoseek fp32 equals transformers greedy for {got} tokens (required {need})"


def check_before_timing(args, sides: list[Side], long_prompt, text_ids, bench_peer, model: Path, env: dict,
                        tokenizer) -> list[str]:  # fmt: skip
    """Before any timing: nanoseek fp32 must equal transformers' greedy tokens (--check-tokens), and every
    nanoseek format must pick llama.cpp's greedy next token at --agreement-threshold of the teacher-forced
    positions of the text (bench/agreement.py): llama.cpp is llama-server of the same build as llama-bench, or
    llama-cpp-python in-process. Stops with OutputsDisagree otherwise; returns the lines for the report."""
    by_label = {s.label: s for s in sides}
    lines = []
    if "transformers" in by_label and "nanoseek-fp32" in by_label:
        need = min(args.check_tokens, args.decode_tokens)
        ours, theirs = (by_label[label].call("single", prompt=long_prompt, max_tokens=need)["tokens"]
                        for label in ("nanoseek-fp32", "transformers"))  # fmt: skip
        lines.append(check_exact(ours, theirs, need))
    prefixes = teacher_forced_prefixes(text_ids, args.agreement_positions)
    reference, peer = None, None
    if bench_peer is not None:
        reference, peer = (
            llama_server_picks(model, args, env, prefixes),
            "llama.cpp (llama-server, llama-bench's build)",
        )
    elif "llama.cpp" in by_label:
        side = by_label["llama.cpp"]
        reference = picks(lambda p: tokenizer.decode(side.call("single", prompt=p, max_tokens=1)["tokens"]), prefixes)
        peer = "llama.cpp (llama-cpp-python)"
    if reference is None:
        return lines + ["agreement with llama.cpp: not checked (no llama.cpp peer runs here)"]
    checks = []
    for side in (s for s in sides if s.label.startswith("nanoseek-")):
        ours = picks(lambda p, side=side: tokenizer.decode(side.call("single", prompt=p, max_tokens=1)["tokens"]),
                     prefixes)  # fmt: skip
        checks.append(Agreement.of(side.label, peer, ours, reference, args.agreement_threshold))
    failed = [c for c in checks if not c.ok]
    if failed:
        raise OutputsDisagree("stopped before timing: " + "; ".join(c.refusal() for c in failed))
    return lines + [f"agreement (before timing): {c.line()}" for c in checks]


def llama_server_picks(model: Path, args, env: dict, prefixes: list[list[int]]) -> list[str]:
    """llama.cpp's greedy next tokens after each prefix, from llama-server of the same build as llama-bench
    (which generates no text), started once with one slot."""
    from nanoseek.bench.peers import find_peer
    from nanoseek.bench.serve import llama_server_spec, running, server_next_token

    binary, record = find_peer("llama-server")
    spec = llama_server_spec(binary, record, model, args.threads, -(-(len(prefixes[-1]) + 64) // 256) * 256)
    with running(spec, env, 600, slots=1) as (url, name, _proc):
        return picks(server_next_token(url, name, 300), prefixes)


def plot(args, figures: dict[str, Figures], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(figures)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))

    def bars(ax, values: list[list[float]], title: str) -> None:
        meds = [median(v) for v in values]
        lo = [m - min(v) for m, v in zip(meds, values)]
        hi = [max(v) - m for m, v in zip(meds, values)]
        ax.bar(labels, meds, yerr=[lo, hi], capsize=4, color=[_color(label) for label in labels])
        ax.set_title(title)
        # rotated labels end under their bar (centred, they would sit between two bars)
        plt.setp(ax.get_xticklabels(), rotation=25, ha="right", rotation_mode="anchor")

    bars(axes[0, 0], [figures[label].decode for label in labels], "single-stream decode (tok/s, higher is better)")
    prefill_title = f"prefill, {args.prompt_tokens}-token prompt (tok/s)"
    bars(axes[0, 1], [figures[label].prefill for label in labels], prefill_title)
    bars(axes[1, 0], [[t * 1000 for t in figures[label].ttft] for label in labels], "time to first token (ms)")
    ax = axes[1, 1]
    for label in labels:
        agg = figures[label].aggregate
        cs = sorted(agg)
        ax.errorbar(cs, [median(agg[c]) for c in cs],
                    yerr=[[median(agg[c]) - min(agg[c]) for c in cs], [max(agg[c]) - median(agg[c]) for c in cs]],
                    marker="o", capsize=3, label=label, color=_color(label))  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_title("aggregate decode (tok/s)")
    ax.legend()
    load = os.getloadavg()[0]
    fig.suptitle(f"decode benchmark: {args.model}, {args.threads} threads, median of {args.reps} (load {load:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _color(label: str) -> str:
    """A colour of its own for every side (a compiled format in the colour family of its eager one)."""
    return {"llama.cpp": "tab:gray", "transformers": "tab:orange", "nanoseek-fp32": "tab:blue",
            "nanoseek-fp16": "tab:cyan", "nanoseek-int8": "tab:green", "nanoseek-int4": "tab:purple",
            "nanoseek-fp32+compile": "navy", "nanoseek-fp16+compile": "teal", "nanoseek-int8+compile": "darkgreen",
            "nanoseek-int4+compile": "indigo"}.get(label, "tab:brown")  # fmt: skip


if __name__ == "__main__":
    main()
