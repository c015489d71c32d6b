"""The `nanoseek` command: subcommands → configs → library calls.

Each subcommand lives in `nanoseek/commands/<name>.py` with `register(subparsers)`, which adds its parser
and sets `func(args) -> int`. Heavy imports happen inside `func`, so `--help` stays fast.
Bad input (ValueError, FileNotFoundError) is printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order here is the order in `nanoseek --help`.
COMMAND_MODULES = [
    "nanoseek.commands.info",
    "nanoseek.commands.speedrun",
    "nanoseek.commands.train",
    "nanoseek.commands.sft",
    "nanoseek.commands.grpo",
    "nanoseek.commands.generate",
    "nanoseek.commands.chat",
    "nanoseek.commands.fetch",
    "nanoseek.commands.serve",
    "nanoseek.commands.eval",
    "nanoseek.commands.distill",
    "nanoseek.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="nanoseek: train, align, run and serve open-weight LLMs, frugally.",
    )
    parser.add_argument("--version", action="version", version=f"nanoseek {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command not written yet
                continue
            raise
        module.register(sub)
    return parser


def _version() -> str:
    from nanoseek import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        print(f"nanoseek {args.command}: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"nanoseek {args.command}: interrupted", file=sys.stderr)
        code = 130
    return _end(code)


def _end(code: int) -> int:
    """`code`, or, for a torchrun worker that has left its process group, the process's end (no interpreter
    finalization: nanoseek/parallel/distributed.end_of_worker). Only a command that joined a group imports it."""
    distributed = sys.modules.get("nanoseek.parallel.distributed")
    return code if distributed is None else distributed.end_of_worker(code)


if __name__ == "__main__":
    raise SystemExit(main())
