"""The benchmark commands run end to end (a tiny config; the real figures come from `make bench`)."""

from nanoseek.cli import main


def test_moe_step_benchmark_smoke(capsys):
    assert main(["bench", "moe-step", "--config", "test-tiny", "--batch", "2", "--seq", "16", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "nanoseek (grouped_mm)" in out and "transformers grouped_mm" in out and "x" in out


def test_benchmark_leaves_the_experts_backend_alone():
    from nanoseek.model import moe

    before = moe.EXPERTS_BACKEND
    main(["bench", "moe-step", "--config", "test-tiny", "--batch", "1", "--seq", "8", "--reps", "1"])
    assert before == moe.EXPERTS_BACKEND
