"""Prompt-lookup (n-gram) speculation: the engine decoding a reply that repeats its prompt, with and without
`EngineConfig(speculative="ngram")`, the same model, prompt and greedy settings, in one process.

    nanoseek bench speculation [MODEL] [--quant fp16 --tokens 128 --rounds 5 --threads 2 --plot spec.png]

MODEL is a .gguf file or an asset name (default `smollm2`, SmolLM2-135M-Instruct Q4_1), run in --quant (default
fp16, the format README's figure was taken in). The prompt is a chat turn asking the model to repeat a passage
of the decode benchmark's text, the case prompt lookup is for: its drafts are the prompt's own next tokens.
Before timing, both engines decode the reply once and must give the same tokens (speculation is exact for
greedy decoding; the benchmark stops otherwise). Then the two alternate, --rounds timed rounds after a
warm-up, each a fresh request of the whole reply (wall clock); the speedup is taken per round (plain time /
speculative time), median (min–max), with the drafts proposed and accepted.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from nanoseek.bench.timing import OutputsDisagree, Spread, alternate, paired_ratio, table

PLAIN, NGRAM = "plain decoding", "n-gram speculation"


def repeat_prompt(words: int) -> str:
    from nanoseek.bench.decode import TEXT

    return "Repeat this text exactly, word for word:\n\n" + " ".join(TEXT.split()[:words])


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="nanoseek bench speculation", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2", help="a .gguf file or an asset name (default smollm2)")
    ap.add_argument("--quant", default="fp16", choices=["auto", "none", "int8", "int4", "fp16"],
                    help="run format (default fp16)")  # fmt: skip
    ap.add_argument("--tokens", type=int, default=128, help="most tokens of the reply (it may end at EOS first)")
    ap.add_argument("--words", type=int, default=90, help="words of the passage the model is asked to repeat")
    ap.add_argument("--drafts", type=int, default=4, help="draft tokens per step (num_speculative_tokens)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--plot", help="write a PNG here: the per-round speedups and each side's tok/s")
    args = ap.parse_args(argv)
    for name in ("tokens", "words", "drafts", "rounds", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> None:
    import nanoseek
    from nanoseek.bench.decode import resolve_model
    from nanoseek.engine.engine import Engine, EngineConfig
    from nanoseek.engine.sampling import SamplingParams
    from nanoseek.loading import resolve_quant

    path = resolve_model(args.model)
    quant = resolve_quant(args.quant, path, None)
    model = nanoseek.load(path, quant=quant).eval()
    tok = nanoseek.load_tokenizer(path)
    prompt = tok.encode_chat([{"role": "user", "content": repeat_prompt(args.words)}])
    params = SamplingParams(temperature=0, max_tokens=args.tokens)
    engines = {
        PLAIN: Engine(model, EngineConfig(), eos_ids=tok.stop_token_ids),
        NGRAM: Engine(
            model, EngineConfig(speculative="ngram", num_speculative_tokens=args.drafts), eos_ids=tok.stop_token_ids
        ),  # fmt: skip
    }

    def step(name: str):
        return lambda i: engines[name].generate([prompt], params)[0].token_ids

    # before timing: the same greedy reply from both (speculation must not change a token)
    replies = {name: step(name)(0) for name in engines}
    if replies[PLAIN] != replies[NGRAM]:
        from nanoseek.bench.timing import matching_prefix

        same = matching_prefix(replies[PLAIN], replies[NGRAM])
        raise OutputsDisagree(f"n-gram speculation changed the greedy reply after {same} tokens: stopped before timing")
    before = engines[NGRAM].stats()
    load = os.getloadavg()[0]
    times, outputs = alternate({name: step(name) for name in engines}, rounds=args.rounds, warmup=1,
                               clock=time.perf_counter)  # fmt: skip
    if any(o != replies[PLAIN] for outs in outputs.values() for o in outs):
        raise OutputsDisagree("a timed round gave another reply than the check before timing")
    stats = engines[NGRAM].stats()
    drafted, accepted = stats["num_drafted"] - before["num_drafted"], stats["num_accepted"] - before["num_accepted"]
    n = len(replies[PLAIN])
    print(f"speculation benchmark: {path.name} in {quant}, {args.threads} threads, a {len(prompt)}-token chat prompt "
          f"asking to repeat {args.words} words, a {n}-token greedy reply (the same tokens with and without "
          f"speculation, checked before timing), {args.rounds} alternating rounds after 1 warm-up, wall clock, load "
          f"average {load:.2f} -> {os.getloadavg()[0]:.2f}")  # fmt: skip
    rows = []
    for name, ts in times.items():
        s = Spread.of(ts)
        rows.append([name, f"{s.median * 1000:.0f} ({s.lo * 1000:.0f}–{s.hi * 1000:.0f})", f"{n / s.median:.1f}"])
    print(table(["decode", "reply ms, median (min–max)", "tok/s"], rows))
    rate = f"{accepted} of {drafted} drafts accepted ({accepted / drafted:.0%})" if drafted else "no drafts"
    print(f"\nspeedup, plain / speculative time per round: {paired_ratio(times, PLAIN, NGRAM).format(unit='x')}; "
          f"{rate} in the timed rounds")  # fmt: skip
    if args.plot:
        plot(args, path.name, quant, n, times, rate, args.plot)
        print(f"plot: {args.plot}")


def plot(args, model: str, quant: str, n: int, times: dict[str, list[float]], rate: str, path) -> None:
    from nanoseek.bench.plots import machine_note, ratio_plot, round_ratios

    ratio_plot(path, f"n-gram speculation: {model} in {quant}, a {n}-token reply repeating the prompt",
               {"plain / speculative time": round_ratios(times, PLAIN, NGRAM)}, ylabel="speedup (per round)",
               absolute={name: [n / t for t in ts] for name, ts in times.items()}, absolute_ylabel="decode tok/s",
               footnote=f"{machine_note(args.threads, 'wall clock')}; {rate}; > 1: speculation faster")  # fmt: skip


if __name__ == "__main__":
    main()
