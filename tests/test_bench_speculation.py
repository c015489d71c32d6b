"""`nanoseek bench speculation` (bench/speculation.py): bad arguments are one-line errors; marked slow, a real
short run on SmolLM2 (the same greedy reply with and without n-gram speculation, checked before timing, and a
per-round speedup with the drafts accepted)."""

from __future__ import annotations

import re

import pytest

from nanoseek.cli import main


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["bench", "speculation", "smollm2", "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_speculation_benchmark_on_smollm2(capsys):
    from nanoseek.assets import default_cache_dir

    if not any(default_cache_dir().glob("models/SmolLM2*.gguf")):
        pytest.skip("SmolLM2 is not in the cache (nanoseek fetch smollm2)")
    assert main(["bench", "speculation", "smollm2", "--tokens", "24", "--words", "30", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "the same tokens with and without speculation, checked before timing" in out
    assert re.search(
        r"speedup, plain / speculative time per round: \d+\.\d\dx .*; \d+ of [1-9]\d* drafts accepted", out
    )
