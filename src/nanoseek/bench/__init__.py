"""Benchmarks that compare nanoseek with a peer measured in the same run (`nanoseek bench NAME`).

Each module has `main(argv: list[str] | None) -> None`; `benchmarks/<name>.py` are thin script wrappers.
Peers such as transformers are dev dependencies (`pip install -e .[dev]`).
"""

BENCHMARKS = {
    "decode": "nanoseek.bench.decode",
    "moe-step": "nanoseek.bench.moe_step",
    "peers": "nanoseek.bench.peers",
    "quality": "nanoseek.bench.quality",
    "serve": "nanoseek.bench.serve",
    "speculation": "nanoseek.bench.speculation",
    "sft": "nanoseek.bench.sft",
    "train-throughput": "nanoseek.bench.train_throughput",
}
