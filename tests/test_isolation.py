"""The conftest guard fails a test that leaves process-wide state changed, and passes one that restores it."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

LEAKY = """
import os, torch
from nanoseek.train import checkpoint

def test_threads():
    torch.set_num_threads(torch.get_num_threads() + 1)

def test_env():
    os.environ["NANOSEEK_LEAK"] = "1"

def test_module_global():
    checkpoint.FORMAT_VERSION = 99

def test_dtype():
    torch.set_default_dtype(torch.float64)

def test_restores(monkeypatch):
    monkeypatch.setenv("NANOSEEK_LEAK", "1")
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 99)
    n = torch.get_num_threads()
    torch.set_num_threads(n + 1)
    torch.set_num_threads(n)
"""


def test_guard_fails_leaking_tests_only(pytester: pytest.Pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_leaky=LEAKY)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, errors=4)
    out = result.stdout.str()
    for leak in ("torch.get_num_threads()", "os.environ['NANOSEEK_LEAK'] was None, left '1'",
                 "nanoseek.train.checkpoint.FORMAT_VERSION was replaced", "torch.get_default_dtype()"):  # fmt: skip
        assert leak in out
