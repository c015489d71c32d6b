"""`nanoseek distill --teacher MODEL --student MODEL --tasks ... --out DIR`: teacher traces, verified, SFT'd in."""

from __future__ import annotations

import argparse
import sys
import warnings

EPILOG = """The teacher answers training-split problems in the R1 format (<think>…</think><answer>…</answer>) by
default, prompted and scored exactly as nanoseek eval --format F --system-prompt S would; the task verifiers keep
the correct replies, DIR/traces.jsonl holds them as chat conversations (with the system message the teacher was
prompted with, or none, so the student learns the format it is scored in), and the student is fine-tuned on them
(nanoseek sft) into DIR/sft/model. The student's held-out accuracy on the synthetic tasks is measured before and
after, in the same format; DIR/summary.json has the counts, the SFT run and both evaluations.

examples:
  nanoseek distill --teacher runs/big/model --student runs/small/model --tasks add3 --out runs/distill
  nanoseek distill --teacher runs/x/model --student runs/x/sft/model --tasks add2 --format r1 --system-prompt '' \
      --out runs/self-distill      # a speedrun model: R1 format without a system prompt, as it was trained
  nanoseek distill --teacher smollm2 --student runs/x/model --tasks gsm8k:train.jsonl --traces-only --out d
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="train a student on a teacher's verified reasoning traces",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--teacher", required=True, help="a HF model folder, a .gguf file or a known name")
    p.add_argument("--student", required=True, help="the model to fine-tune (anything nanoseek sft takes)")
    p.add_argument("--tasks", nargs="+", required=True, metavar="SPEC",
                   help="synthetic task names (add3, countdown, …) or gsm8k:FILE.jsonl; commas also separate "
                   "them")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--problems", type=int, default=64, help="training problems per task (default 64)")
    p.add_argument("--samples", type=int, default=4, help="teacher completions per problem (default 4)")
    p.add_argument("--temperature", type=float, default=0.8, help="the teacher's sampling temperature (default 0.8)")
    p.add_argument("--per-problem", type=int, default=1, help="verified traces kept per problem (default 1)")
    p.add_argument("--format", default="r1", choices=["r1", "chat", "plain"],
                   help="how the teacher is prompted and scored, as nanoseek eval --format: r1 (default; R1 system "
                   "prompt, answer read from <answer>), chat (chat template) or plain (the raw prompt, for base "
                   "models); the traces are written as chat conversations")  # fmt: skip
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="system message of the chat and r1 formats, as nanoseek eval --system-prompt (default: none "
                   "for chat, the R1 prompt for r1; '' for none); the traces carry the same one")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per teacher completion (default 256)")
    p.add_argument("--eval-limit", type=int, default=200, help="held-out problems per task for before/after")
    p.add_argument("--logit-kl-steps", type=int, default=0,
                   help="after SFT, steps of logit distillation (KL to the teacher's token distributions on the "
                   "traces; teacher and student must share the vocabulary) (default 0: off)")  # fmt: skip
    p.add_argument("--logit-kl-lr", type=float, default=5e-5, help="learning rate of logit distillation")
    p.add_argument("--traces-only", action="store_true", help="stop after writing DIR/traces.jsonl")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an SFT setting, as nanoseek sft --set (max_steps, epochs, optim.lr, …; bare or "
                   "sft.KEY)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the SFT (and logit-distillation) runs from their newest checkpoints",
    )
    p.add_argument("--parallel", default="auto", choices=["auto", "none", "ddp", "fsdp"],
                   help="data parallelism of the student's training under torchrun: ddp (replicas) or fsdp (FSDP2 "
                   "sharding); auto = ddp. Every rank generates the same traces; rank 0 writes")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the problems and the teacher's sampling")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.eval import EvalWarning
    from nanoseek.parallel import is_main_process, leaving_process_group
    from nanoseek.train.distill import distill

    if args.system_prompt and args.format == "plain":
        raise ValueError("--system-prompt needs --format chat or r1 (the plain format sends the bare prompt)")
    specs = [s for item in args.tasks for s in item.split(",") if s]
    with warnings.catch_warnings(record=True) as caught, leaving_process_group():
        warnings.simplefilter("always", EvalWarning)
        result = distill(
            args.teacher, args.student, specs, args.out, args.overrides, problems=args.problems,
            samples=args.samples, temperature=args.temperature, fmt=args.format, system_prompt=args.system_prompt,
            per_problem=args.per_problem,
            max_new_tokens=args.max_tokens, eval_limit=args.eval_limit, traces_only=args.traces_only,
            logit_kl_steps=args.logit_kl_steps, logit_kl_lr=args.logit_kl_lr,
            device=args.device, show_progress=not args.no_progress, seed=args.seed, parallel=args.parallel,
            resume=args.resume,
        )  # fmt: skip
        main = is_main_process()  # (asked before the group is left)
    if not main:  # rank 0 reports
        return 0
    for w in caught:
        if issubclass(w.category, EvalWarning):
            print(f"nanoseek distill: warning: {w.message}", file=sys.stderr)
    summary = result.to_summary()
    print(f"teacher: {result.correct}/{result.generated} completions verified, {result.kept} kept "
          f"-> {result.traces_path}")  # fmt: skip
    for name, c in summary["per_task"].items():
        print(f"  {name}: {c['correct']}/{c['generated']} correct over {c['problems']} problems, {c['kept']} kept")
    for name in summary["eval_after"]:
        b = summary["eval_before"][name]["metrics"]["pass@1"]
        a = summary["eval_after"][name]["metrics"]["pass@1"]
        print(f"  student {name} pass@1 (95% CI): {b['value']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] -> "
              f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]")  # fmt: skip
    print(f"summary: {result.traces_path.parent / 'summary.json'}")
    return 0
