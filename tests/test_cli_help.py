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


@pytest.mark.parametrize(("command", "says"), [("sft", ["sft.KEY"]), ("grpo", ["grpo.KEY", "eval.examples"]),
                                               ("speedrun", ["sft.KEY", "grpo.KEY", "eval.examples"]),
                                               ("distill", ["sft.KEY"]), ("train", ["eval"])])  # fmt: skip
def test_set_help_names_the_sections(command, says, capsys):
    """Each command's --set help says which section prefixes it takes (the speedrun's sft.KEY / grpo.KEY are the
    sft and grpo commands' KEY), as the run's settings tree (train/run_config.py) reads them."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(s in text for s in says), (says, text)
