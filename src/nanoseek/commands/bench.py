"""`nanoseek bench NAME [ARGS...]`: run a benchmark that measures nanoseek against a peer in the same run."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.bench import BENCHMARKS

    p = sub.add_parser(
        "bench",
        help="benchmarks vs a peer measured in the same run",
        description="Run a benchmark; arguments after NAME go to it (`nanoseek bench NAME --help`).",
    )
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib

    from nanoseek.bench import BENCHMARKS

    try:
        module = importlib.import_module(BENCHMARKS[args.name])
    except ModuleNotFoundError as exc:
        raise ValueError(f"benchmark {args.name!r} is not available ({exc})") from exc
    from nanoseek.bench.timing import OutputsDisagree

    try:
        module.main(args.args)
    except OutputsDisagree as exc:  # the sides would time different work: a plain message, no traceback
        print(f"nanoseek bench {args.name}: the sides disagree: {exc}", file=sys.stderr)
        return 1
    return 0
