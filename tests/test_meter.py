import json
import math
import re

import pytest
import torch

from nanoseek.meter import (
    CpuTimeEnergy,
    Meter,
    RaplEnergy,
    device_peak_flops,
    format_summary,
    make_energy_counter,
    process_cpu_seconds,
    rapl_domains,
)


class FakeClock:
    """Seconds that move only when the test says so (for the wall clock and for CPU time alike)."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_meter_records_exact_metrics_and_summary(tmp_path, capsys):
    wall, cpu = FakeClock(100.0), FakeClock(7.0)
    energy = CpuTimeEnergy(20.0, cpu_seconds=cpu)
    meter = Meter(tmp_path, flops_per_token=1e6, peak_flops=1e12, price_per_device_hour=3.6, n_devices=2,
                  total_steps=3, show=True, energy=energy, clock=wall)  # fmt: skip
    for step in range(3):
        wall.advance(0.5)  # a training step: 0.5 s, 0.5 CPU-seconds
        cpu.advance(0.5)
        rec = meter.step(step, loss=2.0 - step, tokens=1000, lr=torch.tensor(0.5))
        with meter.paused():  # evaluation: wall time and energy, but not training time
            wall.advance(0.25)
            cpu.advance(0.25)
    assert rec["lr"] == 0.5 and rec["tok_s"] == 2000.0 and rec["wall_s"] == 2.0 and rec["energy_j"] == 2.0 * 20
    meter.log(event="eval", step=2, accuracy=0.9)
    s = meter.close()
    assert s["steps"] == 3 and s["tokens"] == 3000 and s["final_loss"] == 0.0
    assert s["train_s"] == 1.5 and s["wall_s"] == 2.25  # paused time counts in wall time only
    assert s["tok_s"] == 2000.0
    assert s["mfu"] == pytest.approx(1e6 * 2000 / (1e12 * 2), rel=1e-12)
    assert s["energy_j"] == 2.25 * 20 and s["energy_kwh"] == pytest.approx(45 / 3.6e6, rel=1e-12)
    assert s["energy_estimated"] is True and "20 W per busy core" in s["energy_assumption"]
    assert s["cost"] == pytest.approx(2.25 / 3600 * 2 * 3.6, rel=1e-12)
    assert s["device_hours"] == pytest.approx(2.25 / 3600 * 2, rel=1e-12)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == ["step", "step", "step", "eval", "summary"]
    assert [line["wall_s"] for line in lines] == [0.5, 1.25, 2.0, 2.25, 2.25]
    assert [line["energy_j"] for line in lines[:3]] == [10.0, 25.0, 40.0]
    assert {"loss", "tok_s", "mfu", "wall_s", "energy_j", "cost", "lr"} <= set(lines[0])
    assert lines[-1]["tokens"] == 3000
    table = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines()[1:])
    assert table["wall time"] == "2.2 s (training 1.5 s)" and table["tokens/s"] == "2,000"
    assert table["MFU"].startswith("0.10% of 1 TFLOP/s x 2") and table["energy"].startswith("45 J")
    assert table["cost"] == "0.0045 USD at 3.6 USD/device-hour"
    assert meter.close(print_summary=False)["steps"] == 3  # closing twice is harmless


def test_tokens_per_second_is_smoothed_per_step_and_exact_in_the_summary():
    clock = FakeClock()
    meter = Meter(None, flops_per_token=1.0, peak_flops=1.0, show=False, energy=CpuTimeEnergy(1.0, FakeClock()),
                  clock=clock, ema=0.5)  # fmt: skip
    clock.advance(1.0)
    assert meter.step(0, loss=1.0, tokens=100)["tok_s"] == 100.0
    clock.advance(0.25)
    assert meter.step(1, loss=1.0, tokens=100)["tok_s"] == 0.5 * 100 + 0.5 * 400
    assert meter.close(print_summary=False)["tok_s"] == 200 / 1.25


def test_cpu_peak_probe_and_summary_text():
    peak, source = device_peak_flops("cpu")
    # measured, so its size depends on the machine and its load: only its form is checked
    assert math.isfinite(peak) and peak > 0 and "measured" in source
    meter = Meter(None, flops_per_token=1.0, show=False, energy=CpuTimeEnergy(5.0), clock=FakeClock())
    meter.step(0, loss=1.0, tokens=10)
    text = format_summary(meter.close(print_summary=False))
    assert "estimated: process CPU time x 5 W per busy core" in text


def test_cpu_time_energy_defaults_to_this_process():
    counter = CpuTimeEnergy(10.0)
    before = process_cpu_seconds()
    sum(i * i for i in range(200_000))  # some CPU work: the counter cannot go backwards
    assert 0.0 <= counter.joules() <= (process_cpu_seconds() - before + 1.0) * 10.0


def test_energy_counter_choice_and_rapl_reader(tmp_path):
    counter = make_energy_counter("cpu", watts_per_core=7.0)
    if not rapl_domains():
        assert isinstance(counter, CpuTimeEnergy) and counter.estimated
    # RAPL reader on a sysfs-shaped tree: package domains only, wraparound handled
    pkg = tmp_path / "intel-rapl:0"
    sub = tmp_path / "intel-rapl:0:0"
    for d in (pkg, sub):
        d.mkdir()
        (d / "energy_uj").write_text("900000\n")
        (d / "max_energy_range_uj").write_text("1000000\n")
    assert rapl_domains(tmp_path) == [pkg]
    rapl = RaplEnergy([pkg])
    (pkg / "energy_uj").write_text("950000\n")
    assert rapl.joules() == pytest.approx(0.05)
    (pkg / "energy_uj").write_text("100000\n")  # wrapped past 1e6
    assert rapl.joules() == pytest.approx(0.05 + 0.15)
    assert not rapl.estimated and "rapl" in rapl.source
