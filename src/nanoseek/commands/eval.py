"""`nanoseek eval MODEL --tasks SPEC ... [--json]`: held-out synthetic tasks, GSM8K-style math, multiple choice."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from nanoseek.commands._textgen import add_model_args, load_model_and_tokenizer

EPILOG = """task specs:
  add2, sort, countdown, ...   a synthetic task (nanoseek.tasks), on its held-out split
  gsm8k:PATH.jsonl             math problems {"question", "answer": "... #### 42"}, checked with math-verify
  mc:PATH.jsonl                multiple choice by log-likelihood: HellaSwag {ctx, endings, label} or
                               ARC {question, choices: {text, label}, answerKey}; reports acc and acc_norm

pass@1 with one greedy sample per problem carries a Wilson 95% interval; with --samples N at a --temperature,
pass@k (unbiased estimator, k <= N) carries a percentile bootstrap interval over problems.

examples:
  nanoseek eval runs/x/model --tasks add2 sort
  nanoseek eval runs/x/model --tasks countdown --format r1 --samples 8 --k 1 8 --temperature 0.8
  nanoseek eval smollm2 --tasks gsm8k:gsm8k_test.jsonl mc:arc_easy.jsonl --limit 100 --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a model: synthetic tasks, GSM8K-style math, multiple choice (pass@k, 95%% CIs)",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_model_args(p)
    p.add_argument("--tasks", nargs="+", required=True, metavar="SPEC",
                   help="task specs (see below); commas also separate them")  # fmt: skip
    p.add_argument("--limit", type=int, default=None,
                   help="problems per task (default: 200 held-out problems of a synthetic task, every line of "
                   "a file)")  # fmt: skip
    p.add_argument("--format", default="auto", choices=["auto", "plain", "chat", "r1"],
                   help="prompt format for generation tasks: plain (raw prompt), chat (chat template), r1 (R1 "
                   "system prompt, answer read from <answer>); auto: plain for synthetic tasks, chat for math "
                   "(default)")  # fmt: skip
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="system message of the chat and r1 formats (default: none for chat, the R1 prompt for r1; "
                   "'' for none)")  # fmt: skip
    p.add_argument("--samples", type=int, default=1, help="completions per problem (default 1; >1 needs --temperature)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="pass@k values to report (default: 1 and --samples)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens per completion (default: the answer's length for plain synthetic tasks, 128 for "
                   "r1, 256 for math)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problems drawn and of sampling (default 0)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--details", default=None, metavar="FILE",
                   help="also write every problem's prompt, reference, completions and verdicts (or choice "
                   "log-likelihoods) to this JSONL file")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.eval import EvalWarning, evaluate, format_table, parse_spec

    if args.system_prompt and args.format == "plain":
        raise ValueError("--system-prompt needs --format chat or r1 (the plain format sends the bare prompt)")
    specs = [s for item in args.tasks for s in item.split(",") if s]
    for spec in specs:  # bad specs fail before the model loads
        parse_spec(spec)
    ks = args.k or sorted({1, args.samples})
    model, tok = load_model_and_tokenizer(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EvalWarning)
        results = evaluate(
            model, tok, specs, limit=args.limit, samples=args.samples, k=ks, temperature=args.temperature,
            top_p=args.top_p, format=args.format, system_prompt=args.system_prompt, max_new_tokens=args.max_tokens,
            batch_size=args.batch_size, seed=args.seed,
        )  # fmt: skip
    for w in caught:
        if issubclass(w.category, EvalWarning):
            print(f"nanoseek eval: warning: {w.message}", file=sys.stderr)
    if args.details:
        with open(args.details, "w", encoding="utf-8") as f:
            for name, r in results.items():
                for d in r.details:
                    f.write(json.dumps({"task": name, **d}, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps({name: r.to_dict() for name, r in results.items()}, indent=2))
    else:
        print(format_table(results))
    return 0
