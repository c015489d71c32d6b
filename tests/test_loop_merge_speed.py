"""benchmarks/loop_merge_speed.py's bookkeeping (no timing): step times from the meter's records, the
same-work check and the round order."""

from __future__ import annotations

import pytest

from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("loop_merge_speed")


def records(walls, energies=None, losses=None, tokens=None):
    n = len(walls)
    energies = energies or [0.0] * n
    losses = losses or [1.0 / (i + 1) for i in range(n)]
    tokens = tokens or [100 * (i + 1) for i in range(n)]
    return [{"step": i + 1, "loss": losses[i], "tokens": tokens[i], "wall_s": walls[i], "energy_j": energies[i]}
            for i in range(n)]  # fmt: skip


def test_step_times_skip_the_warmup_and_take_the_median_wall_and_mean_cpu(bench):
    # steps take 5.0 (first, no previous record), 1.0, 9.0, 2.0, 3.0, 2.0 s of wall time
    walls = [5.0, 6.0, 15.0, 17.0, 20.0, 22.0]
    energies = [10.0, 20.0, 40.0, 50.0, 60.0, 80.0]  # 10 W per core: 1, 2, 1, 1, 2 CPU-s per step
    wall, cpu, n = bench.step_times(records(walls, energies), warmup=2, watts=10.0)
    assert n == 4  # steps 3..6
    assert wall == pytest.approx(2.5)  # median of 9, 2, 3, 2
    assert cpu == pytest.approx((80.0 - 20.0) / 10.0 / 4)
    wall, cpu, n = bench.step_times(records(walls, energies), warmup=0, watts=None)
    assert (n, cpu) == (5, None)  # the first step has no start to time from: left out even without warm-up
    assert wall == pytest.approx(2.0)
    with pytest.raises(ValueError, match="nothing left to time"):
        bench.step_times(records(walls[:3]), warmup=3, watts=None)


def test_work_mismatch_names_the_first_differing_step(bench):
    a = records([1.0, 2.0, 3.0])
    assert bench.work_mismatch(a, records([1.5, 2.5, 3.5])) is None  # times may differ, the work may not
    b = records([1.0, 2.0, 3.0], losses=[1.0, 0.5, 0.3333])
    assert "step 3: loss" in bench.work_mismatch(a, b)
    assert bench.work_mismatch(a, b, rtol=1e-3) is None
    c = records([1.0, 2.0, 3.0], tokens=[100, 201, 300])
    assert "step 2: 200 vs 201 tokens" in bench.work_mismatch(a, c)
    assert "different steps" in bench.work_mismatch(a, a[:2])


def test_rounds_alternate_which_tree_runs_first(bench):
    assert [bench.round_order(i) for i in range(4)] == [("old", "new"), ("new", "old")] * 2
