import json
import time

import pytest
import torch

from nanoseek.train.meter import (
    CpuTimeEnergy,
    Meter,
    RaplEnergy,
    device_peak_flops,
    format_summary,
    make_energy_counter,
    rapl_domains,
)


def _busy(seconds):
    end = time.perf_counter() + seconds
    x = torch.randn(128, 128)
    while time.perf_counter() < end:
        x = (x @ x).tanh()


def test_meter_records_metrics_and_summary(tmp_path, capsys):
    meter = Meter(tmp_path, flops_per_token=1e6, peak_flops=1e12, price_per_device_hour=3.6, n_devices=2,
                  watts_per_core=20.0, total_steps=3, show=True)  # fmt: skip
    for step in range(3):
        _busy(0.1)
        with meter.paused():  # not training time
            time.sleep(0.2)
        rec = meter.step(step, loss=2.0 - step, tokens=1000, lr=torch.tensor(0.5))
    assert rec["lr"] == 0.5
    meter.log(event="eval", step=2, accuracy=0.9)
    s = meter.close()
    assert s["steps"] == 3 and s["tokens"] == 3000 and s["final_loss"] == 0.0
    assert 0.25 <= s["train_s"] < 0.6 < s["wall_s"]  # paused time excluded from training time only
    assert s["tok_s"] == pytest.approx(3000 / s["train_s"])
    assert s["mfu"] == pytest.approx(1e6 * s["tok_s"] / (1e12 * 2))
    assert s["cost"] == pytest.approx(s["wall_s"] / 3600 * 2 * 3.6)
    assert s["device_hours"] == pytest.approx(s["wall_s"] / 3600 * 2)
    # no GPU and no RAPL here: an estimate, labelled, from CPU time
    if not rapl_domains():
        assert s["energy_estimated"] is True and "20 W per busy core" in s["energy_assumption"]
        assert 0.2 * 20 <= s["energy_j"] <= 5 * 20 * 1.0  # ~0.3 busy CPU-seconds (threads may add more)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == ["step", "step", "step", "eval", "summary"]
    assert {"loss", "tok_s", "mfu", "wall_s", "energy_j", "cost", "lr"} <= set(lines[0])
    assert lines[-1]["tokens"] == 3000
    out = capsys.readouterr().out
    for word in ("tokens/s", "MFU", "energy", "cost", "wall time", "final loss"):
        assert word in out
    assert meter.close(print_summary=False)["steps"] == 3  # closing twice is harmless


def test_cpu_peak_probe_and_summary_text():
    peak, source = device_peak_flops("cpu")
    assert 1e8 < peak < 1e14 and "measured" in source
    meter = Meter(None, flops_per_token=1.0, show=False, energy=CpuTimeEnergy(5.0))
    meter.step(0, loss=1.0, tokens=10)
    text = format_summary(meter.close(print_summary=False))
    assert "estimated: process CPU time x 5 W per busy core" in text


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
