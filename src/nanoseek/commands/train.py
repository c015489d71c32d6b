"""`nanoseek train CONFIG [--preset P] [--set key=value ...] [--resume] [--parallel ddp|fsdp]`

Single process:   nanoseek train run.toml --set optim.lr=3e-3
Data parallel:    torchrun --nproc-per-node 8 -m nanoseek train run.toml --parallel fsdp
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a DeepSeek-V3-style model from a config (single process or under torchrun)",
        description="Train a DeepSeek-V3-style model. Settings: dataclass defaults < --preset < CONFIG < --set.",
    )
    p.add_argument(
        "config", nargs="?", help="TOML or YAML config file (optional: defaults, --preset and --set also work)"
    )
    p.add_argument("--preset", help="a named preset (tiny, small, gpt2-small-moe)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a setting, e.g. --set optim.lr=3e-4 --set model.hidden_size=96 --set eval.examples=50 "
        "(repeatable; sections model, data, tokenizer, optim, eval)",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument(
        "--parallel", default="auto", choices=["auto", "none", "ddp", "fsdp"],
        help="data parallelism under torchrun: ddp (replicas) or fsdp (FSDP2 sharding); auto = ddp",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.parallel import leaving_process_group
    from nanoseek.train.config import load_train_config
    from nanoseek.train.trainer import Trainer

    cfg = load_train_config(args.config, preset=args.preset, overrides=args.overrides)
    with leaving_process_group():
        Trainer(cfg, parallel=args.parallel, resume=args.resume, show_progress=not args.quiet).train()
    return 0
