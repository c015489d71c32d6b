"""Subprocesses in tests: a generous bound that only a hang reaches, and a failure that says what was still
running and what it had printed so far."""

from __future__ import annotations

import shlex
import subprocess

import pytest

# Far above the slowest run seen on a loaded 2-core machine (a torchrun test: ~2 min); below pytest's
# per-test timeout (pyproject.toml) so this message, not a bare stack dump, reports a hang.
BOUND_S = 1200


def _tail(text: str | bytes | None, n: int = 3000) -> str:
    if text is None:
        return "(nothing)"
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-n:] or "(nothing)"


def still_running(cmd: list[str], seconds: float, stdout, stderr) -> str:
    return (
        f"still running after {seconds:.0f} s, stopped: {shlex.join(map(str, cmd))}\n"
        f"--- its stdout so far ---\n{_tail(stdout)}\n--- its stderr so far ---\n{_tail(stderr)}"
    )


def run(cmd: list[str], *, env: dict[str, str] | None = None, bound_s: float = BOUND_S) -> subprocess.CompletedProcess:
    """subprocess.run with text output captured; a process still running after bound_s fails the test."""
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=bound_s)
    except subprocess.TimeoutExpired as exc:  # run() has killed it and collected its output
        pytest.fail(still_running(cmd, bound_s, exc.stdout, exc.stderr))
