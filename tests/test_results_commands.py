"""Every table of figures in README.md and benchmarks/RESULTS.md names the command that produced it (issue 24
§3): between the table and the heading above it, a line

    Command: `nanoseek bench decode smollm2 --threads 2` (more text may follow)

naming one or more commands, each of which exists in the repository: `nanoseek bench NAME` for a benchmark
of nanoseek.bench.BENCHMARKS, `nanoseek COMMAND` for a CLI command, `python benchmarks/FILE.py` for a script
here, or `make TARGET` for a Makefile target. A table of figures is one with a cell that starts with a digit
(a table of words, such as README's "What is inside", needs none)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "benchmarks/RESULTS.md")
COMMAND_LINE = re.compile(r"^Command: ((?:`[^`]+`(?:, | and | or | then |; )?)+)")


def figure_tables(text: str) -> list[tuple[int, list[str]]]:
    """(line number, the lines from the nearest heading above down to the table) for every table with a cell
    that starts with a digit; fenced code blocks are skipped."""
    lines = text.splitlines()
    found, fenced, heading = [], False, 0
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            heading = i
        elif not fenced and line.startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            body = [c.strip().strip("*") for row in lines[start + 2 : i] for c in row.strip("|").split("|")]
            if any(re.match(r"[-+]?\d", c) for c in body):
                found.append((start + 1, lines[heading:start]))
            continue
        i += 1
    return found


def commands_named(section: list[str]) -> list[str]:
    return [cmd for line in section if (m := COMMAND_LINE.match(line)) for cmd in re.findall(r"`([^`]+)`", m[1])]


def command_exists(command: str) -> bool:
    from nanoseek.bench import BENCHMARKS
    from nanoseek.cli import build_parser

    words = command.split()
    env = 0
    while env < len(words) and re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", words[env]):  # NANOSEEK_Q4_ISA=avx2 nanoseek ...
        env += 1
    words = words[env:]
    if words[:2] == ["nanoseek", "bench"]:
        return len(words) > 2 and words[2] in BENCHMARKS
    if words[:1] == ["nanoseek"]:
        sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
        return len(words) > 1 and words[1] in sub.choices
    if words[:1] in (["python"], [".venv/bin/python"]):
        return len(words) > 1 and (ROOT / words[1]).is_file()
    if words[:1] == ["make"]:
        return len(words) > 1 and re.search(rf"^{re.escape(words[1])}:", (ROOT / "Makefile").read_text(), re.M)
    return False


@pytest.mark.parametrize("doc", DOCS)
def test_every_figure_table_names_an_existing_command(doc):
    tables = figure_tables((ROOT / doc).read_text())
    assert tables, f"{doc}: no tables of figures found (has the format changed?)"
    for line, section in tables:
        commands = commands_named(section)
        assert commands, f"{doc}:{line}: a table of figures without a 'Command: `...`' line above it"
        for command in commands:
            assert command_exists(command), f"{doc}:{line}: {command!r} is not a command of this repository"


def test_the_convention_is_checked():
    text = "\n".join([
        "## A", "Command: `nanoseek bench decode smollm2`", "", "| a | b |", "|---|---|", "| x | 1.0 |",
        "## B", "no command", "| a | b |", "|---|---|", "| x | 2 |",
        "## C", "| piece | where |", "|---|---|", "| words | only |",
    ])  # fmt: skip
    (a, a_section), (b, b_section) = figure_tables(text)
    assert (a, b) == (4, 9)
    assert commands_named(a_section) == ["nanoseek bench decode smollm2"] and commands_named(b_section) == []
    assert command_exists("nanoseek bench quality gemma3-270m") and command_exists("make peers")
    assert command_exists("NANOSEEK_Q4_ISA=avx2 nanoseek bench decode smollm2")
    assert command_exists("python benchmarks/int4_kernels.py --threads 2")
    assert not command_exists("nanoseek bench nonesuch") and not command_exists("python benchmarks/gone.py")
