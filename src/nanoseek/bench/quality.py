"""Quality at equal bits: how far each of nanoseek's run formats of a GGUF file, and llama.cpp's own run of the
same file, are from the file's dequantized fp32 model, on the same tokens of a fixed text.

    nanoseek bench quality [MODEL] [--formats auto,int4,int8,fp16 --ctx 512 --threads 2 --json q.json --plot q.png]

MODEL is a .gguf file or an asset name (default `smollm2`). The text is bench/quality_text.py (English prose,
~1,800 words; over 2,000 tokens). It is split the way llama.cpp's `llama-perplexity` splits it: chunks of
--ctx tokens (the file's BOS in place of each chunk's first token where the file adds one), each chunk scored on
its second half (every scored position sees at least ctx/2 tokens), teacher-forced.

- The reference: `nanoseek.load(MODEL)`, the file's tensors dequantized to fp32 (`--quant none`; its logits
  equal transformers' on these files, README), its log-probabilities at every scored position.
- nanoseek: `nanoseek.load(MODEL, quant=FORMAT)` for each --formats entry (`auto` names what it resolves to),
  the same forward on the same token ids.
- llama.cpp: `llama-perplexity -m MODEL -f TEXT -c CTX -b CTX --kl-divergence-base FILE` (built by `make
  peers` from the same llama.cpp tree as llama-server and llama-bench), which runs the file in llama.cpp's own
  kernels and saves every scored position's log-probabilities (16 bits per token over the top 16 nats, as
  llama.cpp's own KL tool stores them) with the token ids it used; those ids are the ones every side scores.

For every side: the mean KL divergence KL(reference || side) over the scored positions (nats), its 99th
percentile, the top-1 agreement (the side's most likely next token is the reference's), and the text's
perplexity under the side. The ratio is KL(nanoseek --quant auto) / KL(llama.cpp): <= 1 means nanoseek's
default run of the file is no further from the file's model than llama.cpp's run of it (issue 24's goal).

llama.cpp's side comes through its 16-bit file, every token below the top 16 nats floored there and not
renormalised, which lowers the KL measured for it. So every nanoseek row also gives its mean KL with its logits put
through the same encoding (encode_rows, a copy of perplexity.cpp's, and back; the last column), and the ratio is
printed on those equal terms too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanoseek.bench.timing import table

FORMATS = ("auto", "int4", "int8", "fp16", "none")
KL_BASE_MAGIC = b"_logits_"


# ---- the pure parts: scores, llama.cpp's log-prob file, the table ------------------------------------------


def kl_and_top1(ref_logp: torch.Tensor, side_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(ref || side) = sum_v p_ref (log p_ref - log p_side), and whether the two argmaxes agree.
    Both [N, V] log-probabilities (normalised)."""
    kl = (ref_logp.exp() * (ref_logp - side_logp)).sum(-1)
    return kl, ref_logp.argmax(-1) == side_logp.argmax(-1)


@dataclass
class Scores:
    """One side's running figures over the scored positions."""

    kl: list[torch.Tensor] = field(default_factory=list)
    kl16: list[torch.Tensor] = field(default_factory=list)  # the side's log-probs through llama.cpp's 16-bit rows
    top1: int = 0
    nll: float = 0.0
    positions: int = 0

    def add(self, ref_logp: torch.Tensor, side_logp: torch.Tensor, targets: torch.Tensor,
            side_logp16: torch.Tensor | None = None) -> None:  # fmt: skip
        kl, same = kl_and_top1(ref_logp.double(), side_logp.double())
        self.kl.append(kl.float())
        if side_logp16 is side_logp:  # a side whose log-probs already came through the 16-bit rows (llama.cpp's)
            self.kl16.append(self.kl[-1])
        elif side_logp16 is not None:
            self.kl16.append(kl_and_top1(ref_logp.double(), side_logp16.double())[0].float())
        self.top1 += int(same.sum())
        self.nll -= float(side_logp.double().gather(-1, targets[:, None]).sum())
        self.positions += len(targets)

    def figures(self) -> dict[str, float]:
        kl = torch.cat(self.kl).double()
        out = {
            "mean_kl": float(kl.mean()),
            "p99_kl": float(torch.quantile(kl, 0.99)),
            "top1": self.top1 / self.positions,
            "ppl": float(np.exp(self.nll / self.positions)),
            "positions": self.positions,
            "chunk_mean_kl": [float(k.double().mean()) for k in self.kl],  # one entry per add() (a chunk)
        }
        if self.kl16:
            out["mean_kl_16bit"] = float(torch.cat(self.kl16).double().mean())
            out["chunk_mean_kl_16bit"] = [float(k.double().mean()) for k in self.kl16]
        return out


@dataclass
class LlamaLogProbs:
    """llama-perplexity's --kl-divergence-base file: "_logits_", int32 n_ctx, n_vocab, n_chunk, the int32 token
    ids of every chunk, then per chunk n_ctx - 1 - n_ctx/2 rows of nv = 2*((n_vocab+1)/2) + 4 uint16: the row's
    scale and minimum log-prob as two float32, then each token's log-prob above the minimum in steps of scale
    (tools/perplexity/perplexity.cpp, log_softmax)."""

    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # [n_chunk, n_ctx] int32
    rows: np.ndarray  # [n_chunk, n_ctx - 1 - n_ctx // 2, nv] uint16 (a memory map)

    @classmethod
    def read(cls, path: Path) -> LlamaLogProbs:
        with open(path, "rb") as f:
            if f.read(8) != KL_BASE_MAGIC:
                raise ValueError(f"{path}: not a llama-perplexity --kl-divergence-base file")
            n_ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32)
        n_ctx, n_vocab, n_chunk = int(n_ctx), int(n_vocab), int(n_chunk)
        nv = 2 * ((n_vocab + 1) // 2) + 4
        offset = 8 + 12
        tokens = np.fromfile(path, dtype=np.int32, count=n_chunk * n_ctx, offset=offset).reshape(n_chunk, n_ctx)
        scored = n_ctx - 1 - n_ctx // 2
        rows = np.memmap(path, dtype=np.uint16, mode="r", offset=offset + 4 * n_chunk * n_ctx,
                         shape=(n_chunk, scored, nv))  # fmt: skip
        return cls(n_ctx, n_vocab, tokens, rows)

    def log_probs(self, chunk: int) -> torch.Tensor:
        """[scored, n_vocab] float32 log-probabilities of one chunk's scored positions."""
        return decode_rows(np.asarray(self.rows[chunk]), self.n_vocab)


def encode_rows(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 logits [N, n_vocab] to llama.cpp's 16-bit log-prob rows [N, nv], exactly as llama-perplexity
    --kl-divergence-base writes them: log_softmax(n_vocab, logits, log_prob, tok) in tools/perplexity/perplexity.cpp
    (llama.cpp 0c1e57098, vendored in llama-cpp-python 0.3.36), in its float32 arithmetic. Per row: the minimum logit is
    clamped to the top one - 16; scale = (max - min) / 65535 and min_log_prob = min - max - log(sum exp(logit - max))
    go in as two float32; a token above the minimum is nearest_int((logit - min) / scale) (round half to even), one
    at or below it 0, i.e. the floor min_log_prob (not renormalised)."""
    x = np.asarray(logits.detach().float().numpy() if isinstance(logits, torch.Tensor) else logits, np.float32)
    n, n_vocab = x.shape
    hi = x.max(1, keepdims=True)
    lo = np.maximum(x.min(1, keepdims=True), hi - np.float32(16))
    sum_exp = np.exp(x - hi).sum(1, keepdims=True, dtype=np.float64)  # expf per token, summed in double
    log_sum_exp = np.log(sum_exp).astype(np.float32)
    min_log_prob = (lo - hi) - log_sum_exp
    scale = (hi - lo) / np.float32(65535)
    with np.errstate(divide="ignore", invalid="ignore"):  # scale 0 (a flat row): every token 0, as memset there
        inv_scale = np.float32(1) / scale
        q = np.where((x > lo) & (scale > 0), np.rint(inv_scale * (x - lo)), 0)
    rows = np.zeros((n, 2 * ((n_vocab + 1) // 2) + 4), dtype=np.uint16)
    rows[:, :4] = np.concatenate([scale, min_log_prob], 1).astype(np.float32).view(np.uint16)
    rows[:, 4 : 4 + n_vocab] = q.astype(np.int64).astype(np.uint16)
    return rows


def through_kl_base(logits: torch.Tensor) -> torch.Tensor:
    """A run's logits [N, V] as llama.cpp's KL tool would see them had llama-perplexity written them: encoded to its
    16-bit rows and decoded back (the equal-terms column: llama.cpp's side of the comparison comes through it)."""
    return decode_rows(encode_rows(logits), logits.shape[-1])


def decode_rows(rows: np.ndarray, n_vocab: int) -> torch.Tensor:
    """llama.cpp's 16-bit log-prob rows back to float32 log-probabilities [N, n_vocab]."""
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)  # [N, 2]: scale, min_log_prob
    scale, low = torch.from_numpy(head[:, 0].copy()), torch.from_numpy(head[:, 1].copy())
    q = torch.from_numpy(rows[:, 4 : 4 + n_vocab].astype(np.float32))
    return low[:, None] + scale[:, None] * q


def chunk_ids(tokens: np.ndarray, bos: int | None) -> list[list[int]]:
    """Each chunk's input ids as llama-perplexity evaluates them: its first token replaced by BOS where the file
    adds one (bos not None)."""
    out = []
    for row in tokens.tolist():
        if bos is not None:
            row[0] = bos
        out.append(row)
    return out


def tokenize_chunks(ids: list[int], n_ctx: int) -> np.ndarray:
    """llama-perplexity's chunks of a tokenized text (whole chunks only); at least two are needed."""
    n_chunk = len(ids) // n_ctx
    if len(ids) < 2 * n_ctx:
        raise ValueError(f"the text gives {len(ids)} tokens; --ctx {n_ctx} needs at least {2 * n_ctx}")
    return np.asarray(ids[: n_chunk * n_ctx], dtype=np.int32).reshape(n_chunk, n_ctx)


def quality_table(figures: dict[str, dict[str, float]]) -> str:
    rows = [[label, f"{f['mean_kl']:.4f}", f"{f['p99_kl']:.3f}", f"{100 * f['top1']:.1f}%", f"{f['ppl']:.2f}"]
            for label, f in figures.items()]  # fmt: skip
    header = ["run of the file", "mean KL to the file's fp32 model (nats)", "p99 KL", "top-1 agreement", "perplexity"]
    if any("mean_kl_16bit" in f for f in figures.values()):
        header.append("mean KL, log-probs through llama.cpp's 16-bit KL-base rows")
        for row, f in zip(rows, figures.values()):
            row.append(f"{f['mean_kl_16bit']:.6f}" if "mean_kl_16bit" in f else "")
    return table(header, rows)


def verdict(auto: dict[str, float], peer: dict[str, float], key: str = "mean_kl") -> tuple[float, str]:
    """KL(auto) / KL(llama.cpp) (key: mean_kl, or mean_kl_16bit for the two on equal terms), and the goal's verdict
    (<= 1: no further from the file's model)."""
    ratio = auto[key] / peer[key] if peer[key] > 0 else float("inf")
    if ratio <= 1:
        return ratio, "met: nanoseek's default run format is no further from the file's model than llama.cpp's run"
    return ratio, f"MISSED by {ratio:.2f}x: nanoseek's default run format is further from the file's model"


# ---- the run -----------------------------------------------------------------------------------------------


def gguf_bos(path: Path) -> int | None:
    """The file's BOS id where it adds one to a text (tokenizer.ggml.add_bos_token), else None."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key: str):
        f = fields.get(key)
        return None if f is None else f.parts[f.data[0]][0]

    add, bos = value("tokenizer.ggml.add_bos_token"), value("tokenizer.ggml.bos_token_id")
    return int(bos) if add and bos is not None else None


def llama_perplexity_argv(binary: Path, model: Path, text: Path, n_ctx: int, threads: int, out: Path) -> list[str]:
    return [str(binary), "-m", str(model), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(threads),
            "--kl-divergence-base", str(out)]  # fmt: skip


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="nanoseek bench quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2", help="a .gguf file or an asset name (default smollm2)")
    ap.add_argument(
        "--formats",
        default="auto,int4,int8,fp16",
        help=f"nanoseek run formats to score, from {', '.join(FORMATS)} (none: the reference itself)",
    )
    ap.add_argument("--ctx", type=int, default=512, help="chunk length (llama-perplexity -c); half of it is scored")
    ap.add_argument("--threads", type=int, default=2, help="threads of every side")
    ap.add_argument(
        "--peer",
        default="llama-perplexity",
        choices=["llama-perplexity", "none"],
        help="llama.cpp's run of the file (`make peers` builds llama-perplexity); none: nanoseek only",
    )
    ap.add_argument("--max-chunks", type=int, default=0, help="score only the first N chunks (0: all; smoke runs)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--plot", help="write a PNG here: per chunk, KL(auto) / KL(llama.cpp) and every side's mean KL")
    args = ap.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for f in args.formats:
        if f not in FORMATS:
            raise ValueError(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
    if args.ctx < 16 or args.ctx % 2:
        raise ValueError("--ctx must be an even number >= 16")
    if args.threads < 1 or args.max_chunks < 0:
        raise ValueError("--threads must be >= 1 and --max-chunks >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import nanoseek
    from nanoseek.bench.decode import resolve_model
    from nanoseek.bench.quality_text import TEXT

    model_path = resolve_model(args.model)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    notes = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            peer = None
            if args.peer == "llama-perplexity":
                peer, note = run_llama_perplexity(model_path, TEXT, args, Path(tmp))
                notes.append(note)
            bos = gguf_bos(model_path)
            tokenizer = nanoseek.load_tokenizer(model_path)
            ids = ([bos] if bos is not None else []) + tokenizer.encode(TEXT)
            ours = tokenize_chunks(ids, args.ctx)
            if peer is not None:
                n = len(peer.tokens)  # llama-perplexity wrote the chunks it scored (--chunks)
                same = peer.tokens.shape[1:] == ours.shape[1:] and bool((peer.tokens == ours[:n]).all())
                notes.append(f"token ids: llama.cpp's tokenization of the text and nanoseek's are "
                             f"{'the same' if same else 'DIFFERENT (every side scores llama.cpp’s)'}")  # fmt: skip
                tokens = peer.tokens
            else:
                tokens = ours
            chunks = chunk_ids(tokens, bos)[: args.max_chunks or None]
            figures, resolved = score(model_path, chunks, args.formats, peer)
    finally:
        torch.set_num_threads(threads)
    report(args, model_path, TEXT, len(chunks), figures, resolved, notes)


def run_llama_perplexity(model: Path, text: str, args, tmp: Path) -> tuple[LlamaLogProbs, str]:
    from nanoseek.bench.peers import describe, find_peer

    binary, record = find_peer("llama-perplexity")
    (tmp / "text.txt").write_text(text)
    argv = llama_perplexity_argv(binary, model, tmp / "text.txt", args.ctx, args.threads, tmp / "base.kld")
    if args.max_chunks:
        argv += ["--chunks", str(args.max_chunks)]
    print("$ " + " ".join(argv), file=sys.stderr, flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed (exit code {proc.returncode}): {proc.stderr[-1500:]}")
    names = {str(model): model.name, str(tmp / "text.txt"): "TEXT", str(tmp / "base.kld"): "BASE"}
    shown = " ".join([binary.name, *(names.get(a, a) for a in argv[1:])])
    return LlamaLogProbs.read(tmp / "base.kld"), f"llama.cpp: `{shown}`; {describe(record)}"


def forward_logits(model, ids: list[int], first: int) -> torch.Tensor:
    """float32 logits at positions first .. len(ids)-2 (each predicts the next token)."""
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0, first:-1].float()


def score(model_path: Path, chunks: list[list[int]], formats: list[str], peer: LlamaLogProbs | None):
    """Every side's Scores against the reference, chunk by chunk (one reference forward per chunk)."""
    import nanoseek
    from nanoseek.loading import resolve_quant

    reference = nanoseek.load(model_path).eval()
    resolved = {f: resolve_quant(f, model_path, None) for f in formats}
    models = {f: nanoseek.load(model_path, quant=resolved[f]).eval() for f in formats}
    labels = {f: f"nanoseek --quant {f}" + (f" (= {resolved[f]})" if f == "auto" else "") for f in formats}
    scores = {labels[f]: Scores() for f in formats}
    if peer is not None:
        scores["llama.cpp (llama-perplexity, same file)"] = Scores()
    n_ctx = len(chunks[0])
    first = n_ctx // 2
    for c, ids in enumerate(chunks):
        print(f"chunk {c + 1}/{len(chunks)}", file=sys.stderr, flush=True)
        ref = torch.log_softmax(forward_logits(reference, ids, first), -1)
        targets = torch.tensor(ids[first + 1 :])
        for f, m in models.items():
            logits = forward_logits(m, ids, first)
            # plain, and through llama.cpp's 16-bit rows as llama.cpp's side is (equal terms)
            scores[labels[f]].add(ref, torch.log_softmax(logits, -1), targets, through_kl_base(logits))
        if peer is not None:
            # as llama.cpp's own KL tool reads them: not renormalised (the tokens below the top 16 nats share a
            # floor of e^-16 of the top one; renormalising would move every log-prob by their summed floor)
            theirs = peer.log_probs(c)[:, : ref.shape[-1]]
            scores["llama.cpp (llama-perplexity, same file)"].add(ref, theirs, targets, theirs)
    return {label: s.figures() for label, s in scores.items()}, resolved


def report(args, model: Path, text: str, n_chunks: int, figures: dict, resolved: dict, notes: list[str]) -> None:
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    positions = next(iter(figures.values()))["positions"]
    load = os.getloadavg()
    print(f"quality benchmark: {model.name}, text bench/quality_text.py (sha256 {digest}), {n_chunks} chunks of "
          f"{args.ctx} tokens, {positions} scored positions (teacher-forced, second half of each chunk), "
          f"{args.threads} threads, load average {load[0]:.2f}")  # fmt: skip
    for note in notes:
        print(f"NOTE: {note}")
    print("reference: the file's tensors dequantized to fp32 (nanoseek.load, --quant none); KL(reference || run)")
    print()
    print(quality_table(figures))
    auto = next((f for label, f in figures.items() if label.startswith("nanoseek --quant auto")), None)
    peer = figures.get("llama.cpp (llama-perplexity, same file)")
    result = {"model": model.name, "ctx": args.ctx, "chunks": n_chunks, "text_sha256": digest,
              "resolved": resolved, "figures": figures, "notes": notes}  # fmt: skip
    if auto is not None and peer is not None:
        ratio, said = verdict(auto, peer)
        print()
        print(f"mean KL, nanoseek --quant auto / llama.cpp: {ratio:.3f}x ({auto['mean_kl']:.6f} / "
              f"{peer['mean_kl']:.6f}; {said}); top-1 agreement {100 * auto['top1']:.1f}% against "
              f"{100 * peer['top1']:.1f}%")  # fmt: skip
        result["ratio_auto_over_llama_cpp"] = ratio
        if "mean_kl_16bit" in auto and "mean_kl_16bit" in peer:
            ratio16, said16 = verdict(auto, peer, "mean_kl_16bit")
            print(f"on equal terms, both through llama.cpp's 16-bit KL-base rows (floored at the top - 16 nats, "
                  f"not renormalised): {ratio16:.3f}x ({auto['mean_kl_16bit']:.6f} / {peer['mean_kl_16bit']:.6f}; "
                  f"{said16})")  # fmt: skip
            result["ratio_auto_over_llama_cpp_16bit"] = ratio16
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(args, model, figures, Path(args.plot), notes)
        print(f"plot: {args.plot}")


def plot(args, model: Path, figures: dict, path: Path, notes: list[str] = ()) -> Path:
    """Per chunk: nanoseek --quant auto's mean KL over llama.cpp's (plain, and on equal terms where both have the
    16-bit column), and every side's mean KL (nats)."""
    from nanoseek.bench.plots import machine_note, ratio_plot

    auto = next((f for label, f in figures.items() if label.startswith("nanoseek --quant auto")), None)
    peer = figures.get("llama.cpp (llama-perplexity, same file)")
    ratios = {}
    if auto is not None and peer is not None:
        ratios["auto / llama.cpp"] = [a / b for a, b in zip(auto["chunk_mean_kl"], peer["chunk_mean_kl"])]
        if "chunk_mean_kl_16bit" in auto and "chunk_mean_kl_16bit" in peer:
            ratios["auto / llama.cpp,\nequal terms (16-bit rows)"] = [
                a / b for a, b in zip(auto["chunk_mean_kl_16bit"], peer["chunk_mean_kl_16bit"])
            ]
    short = {label: label.replace("nanoseek --quant ", "").replace(" (llama-perplexity, same file)", "")
             for label in figures}  # fmt: skip
    absolute = {short[label]: f["chunk_mean_kl"] for label, f in figures.items()}
    peer_note = next((n.partition("`; ")[2] for n in notes if n.startswith("llama.cpp:")), "")
    footnote = (f"{machine_note(args.threads)} (quality does not depend on load); one point per chunk of {args.ctx} "
                f"tokens, its second half scored; KL(the file's fp32 model || side)\n{peer_note}")  # fmt: skip
    return ratio_plot(path, f"quality at equal bits: {model.name}, mean KL per chunk",
                      ratios or absolute, ylabel="mean KL ratio (lower: closer to the fp32 model)", per="chunk",
                      absolute=absolute if ratios else None, absolute_ylabel="mean KL per chunk (nats)",
                      footnote=footnote, reference=1.0 if ratios else None, fmt=".3f", absolute_fmt=".4f")  # fmt: skip


if __name__ == "__main__":
    main()
