"""The benchmark commands run end to end on tiny sizes (the real figures come from `make bench`): both
sides agree before timing, and the printed tables have one row per contender with finite, positive figures."""

from __future__ import annotations

import math
import re

import pytest
import torch

from nanoseek.bench.timing import OutputsDisagree, Spread, alternate, paired_ratio
from nanoseek.cli import main

SPREAD = re.compile(r"^(\d+\.\d+)× \((\d+\.\d+)–(\d+\.\d+)\)$")  # "1.07× (1.03–1.11)"


def tables(out: str) -> list[list[list[str]]]:
    """The Markdown tables in `out`: each a list of rows (header and separator dropped), cells stripped."""
    found, current = [], None
    for line in out.splitlines():
        if line.startswith("|"):
            if current is None:
                current = found.append([]) or found[-1]
            current.append([c.strip() for c in line.strip("|").split("|")])
        else:
            current = None
    return [t[2:] for t in found]


def positive(text: str) -> float:
    value = float(text.replace(",", ""))
    assert math.isfinite(value) and value > 0, text
    return value


def spread(text: str) -> tuple[float, float, float]:
    m = SPREAD.match(text)
    assert m, f"not 'median× (min–max)': {text!r}"
    median, lo, hi = (positive(g) for g in m.groups())
    assert lo <= median <= hi
    return median, lo, hi


def check_timing_row(row: list[str]) -> None:
    median, range_ = positive(row[1]), row[2]
    lo, hi = (positive(x) for x in range_.split("–"))
    assert lo <= median <= hi
    positive(row[3])  # tokens/s or rows/s
    spread(row[4])


def test_moe_step_benchmark_prints_agreeing_rows_with_finite_figures(capsys):
    assert main(["bench", "moe-step", "--config", "test-tiny", "--batch", "2", "--seq", "16", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"loss within (\S+), gradients within (\S+) ", out)
    assert m and float(m.group(1)) <= 1e-5 and float(m.group(2)) <= 1e-4
    (rows,) = tables(out)
    names = [r[0] for r in rows]
    assert names[:2] == [
        "nanoseek grouped_mm experts (index_add_ combine)",
        "nanoseek padded_bmm experts (gather combine)",
    ]
    assert len(rows) == 5 and sum(n.startswith("transformers") for n in names) == 3
    for row in rows:
        check_timing_row(row)
    # the faster nanoseek path is named, and its own ratio is exactly 1
    best = re.search(r"faster nanoseek path: (.+?);", out).group(1)
    assert spread(rows[names.index(best)][4]) == (1.0, 1.0, 1.0)


def test_train_throughput_benchmark_prints_same_work_rows_and_ratios(capsys):
    assert main(["bench", "train-throughput", "--batch", "8", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"losses within (\S+), gradient norms within (\S+) ", out)
    assert m and float(m.group(1)) <= 1e-5 and float(m.group(2)) <= 1e-4
    steps, ratios = tables(out)
    assert len(steps) == 6 and steps[0][0].startswith("nanoseek Trainer step")
    for row in steps:
        check_timing_row(row)
    assert len(ratios) == 6 and ratios[0][0].endswith("(headline)")
    for _, cell in ratios:
        spread(cell)


def test_benchmarks_leave_the_thread_count_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # a caller's setting that differs from the benchmark's --threads 1
    try:
        main(["bench", "moe-step", "--config", "test-tiny", "--batch", "1", "--seq", "8", "--reps", "1"])
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_alternate_rotates_rows_and_ratios_pair_rounds():
    order, now = [], [0.0]

    def row(name, seconds):
        def step(i):
            order.append((i, name))
            now[0] += seconds
            return name

        return step

    times, results = alternate({"a": row("a", 1.0), "b": row("b", 3.0)}, rounds=3, warmup=1, clock=lambda: now[0])
    assert order == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (3, "b"), (3, "a")]
    assert times == {"a": [1.0, 1.0, 1.0], "b": [3.0, 3.0, 3.0]} and results["a"] == ["a"] * 4
    assert paired_ratio(times, "b", "a") == Spread(3.0, 3.0, 3.0)
    assert Spread.of([3.0, 1.0, 2.0, 10.0]).format(unit="×") == "2.50× (1.00–10.00)"
    with pytest.raises(ValueError, match="no measurements"):
        Spread.of([])


def test_alternate_checks_the_warmup_round_before_timing_any():
    ran = []

    def step(i):
        ran.append(i)
        return i

    def disagree(results):
        assert results == {"a": [0], "b": [0]}  # the warm-up round's outputs, nothing timed yet
        raise OutputsDisagree("the sides differ")

    with pytest.raises(OutputsDisagree, match="the sides differ"):
        alternate({"a": step, "b": step}, rounds=5, warmup=1, clock=lambda: 0.0, after_warmup=disagree)
    assert ran == [0, 0]  # stopped before the first timed round


def test_disagreeing_sides_stop_the_benchmark():
    from nanoseek.bench.moe_step import check_agreement

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        b.load_state_dict(a.state_dict())
    a(torch.ones(1, 2)).sum().backward()
    (2 * b(torch.ones(1, 2))).sum().backward()  # twice the gradient
    with pytest.raises(OutputsDisagree, match="gradient of weight differs"):
        check_agreement({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, "a")
    with pytest.raises(OutputsDisagree, match="b: loss 1.1 vs a 1"):
        check_agreement({"a": a, "b": b}, {"a": 1.0, "b": 1.1}, "a")


def test_sft_benchmark_prints_agreeing_curves_both_sides_and_the_ratio(capsys):
    assert main(["bench", "sft", "--model", "tiny", "--conversations", "16", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "loss curves agree" in out
    (rows,) = tables(out)
    assert [r[0] for r in rows] == [
        "nanoseek SFT step (packed rows, fused linear+CE)",
        "transformers loop (padded batch, labels=)",
    ]
    for r in rows:
        median, range_ = positive(r[1]), r[2]
        lo, hi = (positive(x) for x in range_.split("–"))
        assert lo <= median <= hi and positive(r[3])
    spread(out.strip().splitlines()[-1].split(": ")[-1])


def test_sft_lora_benchmark_prints_both_sides_their_memory_and_the_ratio(capsys):
    argv = ["bench", "sft", "--lora", "--model", "tiny", "--conversations", "16", "--reps", "1", "--memory-steps", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (rows,) = tables(out)
    assert [r[0] for r in rows] == ["full SFT (every weight)", "LoRA SFT (adapter only)"]
    for r in rows:  # trained params, median, min–max, conversations/s, training state, RSS after set-up, peak RSS
        assert positive(r[1].rstrip("M")) and all(positive(x) for x in r[2:3] + r[4:])
    assert float(rows[1][1].rstrip("M")) < float(rows[0][1].rstrip("M"))
    assert positive(rows[1][5]) < positive(rows[0][5])  # the adapter's training state is the smaller
    spread(out.strip().splitlines()[-1].split(": ")[-1])


def test_sft_benchmark_stops_when_the_loss_curves_part():
    from nanoseek.bench.sft import check_curves

    check_curves([2.0, 1.9, 1.8], [2.0, 1.91, 1.79], 3)  # within float noise after step 0
    with pytest.raises(OutputsDisagree, match="step 0: nanoseek loss 2 vs transformers 2.1"):
        check_curves([2.0, 1.9], [2.1, 1.9], 2)
    with pytest.raises(OutputsDisagree, match="step 1"):
        check_curves([2.0, 1.9], [2.0, 1.5], 2)
