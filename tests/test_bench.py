"""The benchmark commands run end to end (a tiny config; the real figures come from `make bench`)."""

from nanoseek.cli import main


def test_moe_step_benchmark_smoke(capsys):
    assert main(["bench", "moe-step", "--config", "test-tiny", "--batch", "2", "--seq", "16", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "nanoseek (grouped_mm)" in out and "transformers grouped_mm" in out and "x" in out
