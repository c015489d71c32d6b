"""`nanoseek --help` and every subcommand's --help print and exit 0 (argparse formats help strings with %,
so a bare "95%" in a help text crashes the top-level help)."""

from __future__ import annotations

import pytest

from nanoseek.cli import build_parser, main


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


def test_every_command_is_registered():
    assert {"sft", "grpo", "eval", "distill", "serve", "speedrun", "bench"} <= set(_commands())


@pytest.mark.parametrize("argv", [[], *[[c] for c in _commands()]], ids=lambda a: " ".join(a) or "nanoseek")
def test_help_prints_and_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out
