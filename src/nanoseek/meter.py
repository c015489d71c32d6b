"""The meter: loss, throughput, MFU, wall time, energy and cost, to `metrics.jsonl` and a live bar.

    meter = Meter(out_dir, flops_per_token=model_cfg.flops_per_token(seq_len), device="cpu",
                  price_per_device_hour=cfg.price_per_device_hour, watts_per_core=cfg.watts_per_core,
                  total_steps=cfg.max_steps)
    for step in ...:
        ...train...
        meter.step(step, loss=loss.item(), tokens=B * T, lr=lr)      # tokens: positions processed
        with meter.paused():                                        # eval time: not training throughput
            acc = evaluate(...)
        meter.log(event="eval", step=step, accuracy=acc)
    summary = meter.close()                                        # dict, also printed as a table

Definitions (all in the summary and in each metrics.jsonl step line):
- tokens/s: token positions processed per second of training time (time inside `paused()` excluded);
  the live value is smoothed (EMA), the summary uses total tokens / total training time.
- MFU: flops_per_token x tokens/s / (peak FLOP/s x n_devices). flops_per_token comes from the architecture
  (DeepseekV3Config.flops_per_token counts only the active experts). The peak is the spec dense figure for
  known GPUs (PEAK_FLOPS), else measured once with a matmul probe (labelled as measured), or given.
- energy: NVML's total-energy counter on NVIDIA GPUs (GPU only); Linux RAPL package counters where
  readable; otherwise an ESTIMATE = process CPU-seconds x watts_per_core, flagged `energy_estimated: true`
  with its assumption spelled out.
- cost: wall hours x n_devices x price_per_device_hour.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# Dense (no sparsity) peak FLOP/s from the vendors' spec sheets, by device-name pattern and dtype.
# float32 is the non-tensor-core FP32 figure.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 51.2e12}),
    ("H100", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 66.9e12}),  # SXM
    ("H200", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 66.9e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    ("L4", {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12}),
]


def matmul_probe_flops(device: str = "cpu", dtype: str = "float32", n: int = 1024, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of an n x n matmul on `device` with the current thread count (measured once per process
    and thread count: a probe made with 1 thread is no peak for a run on 2)."""
    return _probe(device, dtype, n, seconds, torch.get_num_threads())


@functools.cache
def _probe(device: str, dtype: str, n: int, seconds: float, threads: int) -> float:
    dt = getattr(torch, dtype)
    # its own generator: a draw from torch's global one would shift the training's random numbers (LoRA's dropout
    # masks) by whether and when this probe first ran in the process, for each thread count the ThreadTuner tries
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up
    sync()
    # The fastest single matmul, not the mean: on a shared machine the mean reads other processes' load as a
    # slower device, and MFU against such a "peak" went past 100% once the load eased.
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak_flops(device: str = "cpu", dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
        for pattern, table in PEAK_FLOPS:
            if pattern in name and dtype in table:
                return table[dtype], f"{name} {dtype} dense spec"
        return matmul_probe_flops(device, dtype, n=4096), f"{name} {dtype} measured by a 4096^2 matmul probe"
    threads = torch.get_num_threads()
    return (
        matmul_probe_flops("cpu", "float32"),
        f"CPU fp32 measured by a 1024^2 matmul probe on {threads} threads (achieved, not a spec peak)",
    )


# ---- energy -------------------------------------------------------------------------------------------
class EnergyCounter:
    """Joules used since construction. `estimated` and `assumption` say how much to trust it."""

    source = "none"
    estimated = False
    assumption: str | None = None

    def joules(self) -> float:
        raise NotImplementedError


class NvmlEnergy(EnergyCounter):
    """NVML total-energy counters (millijoules since driver load) of the given GPUs."""

    source = "nvml"

    def __init__(self, indices: list[int]):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self._start = self._read()
        self.source = f"nvml (GPU {', '.join(map(str, indices))} only; host CPU not counted)"

    def _read(self) -> float:
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) / 1000.0

    def joules(self) -> float:
        return self._read() - self._start


class RaplEnergy(EnergyCounter):
    """Linux RAPL package counters (/sys/class/powercap/intel-rapl:N/energy_uj), wraparound handled.
    Counts the whole package (other processes too)."""

    def __init__(self, domains: list[Path]):
        self._domains = domains
        self._max = [int((d / "max_energy_range_uj").read_text()) for d in domains]
        self._last = [self._read_one(d) for d in domains]
        self._total_uj = 0
        self.source = f"rapl ({len(domains)} package domain(s), whole CPU package)"

    @staticmethod
    def _read_one(domain: Path) -> int:
        return int((domain / "energy_uj").read_text())

    def joules(self) -> float:
        for i, d in enumerate(self._domains):
            now = self._read_one(d)
            delta = now - self._last[i]
            if delta < 0:  # the counter wrapped
                delta += self._max[i]
            self._total_uj += delta
            self._last[i] = now
        return self._total_uj / 1e6


def process_cpu_seconds() -> float:
    """This process's CPU-seconds so far: user + system, finished children included."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuTimeEnergy(EnergyCounter):
    """An estimate: this process's CPU-seconds (user + system, children included) x watts per busy core.

    cpu_seconds: the CPU-time source (tests pass a fake one to get exact figures)."""

    source = "estimate"
    estimated = True

    def __init__(self, watts_per_core: float, cpu_seconds: Callable[[], float] = process_cpu_seconds):
        self.watts_per_core = watts_per_core
        self._cpu_seconds = cpu_seconds
        self._start = cpu_seconds()
        self.assumption = (
            f"estimated: process CPU time x {watts_per_core:g} W per busy core "
            f"(no NVML or readable RAPL energy counter on this machine)"
        )

    def joules(self) -> float:
        return (self._cpu_seconds() - self._start) * self.watts_per_core


def rapl_domains(root: Path = Path("/sys/class/powercap")) -> list[Path]:
    """Readable top-level RAPL package domains (sub-domains like intel-rapl:0:0 are inside the package)."""
    if not root.is_dir():
        return []
    found = []
    for d in sorted(root.glob("intel-rapl:*")):
        if d.name.count(":") != 1:
            continue
        try:
            int((d / "energy_uj").read_text())
            int((d / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            continue
        found.append(d)
    return found


def make_energy_counter(device: str = "cpu", watts_per_core: float = 10.0) -> EnergyCounter:
    """The best counter available: NVML on CUDA, else RAPL, else the CPU-time estimate."""
    if device.startswith("cuda") and torch.cuda.is_available():
        try:
            index = torch.device(device).index
            return NvmlEnergy([index if index is not None else torch.cuda.current_device()])
        except Exception:  # NVML missing or energy counter unsupported (pre-Volta): fall through
            pass
    domains = rapl_domains()
    if domains:
        return RaplEnergy(domains)
    return CpuTimeEnergy(watts_per_core)


# ---- the meter ----------------------------------------------------------------------------------------
class Meter:
    """Records training steps; see the module docstring."""

    def __init__(
        self,
        out_dir: str | os.PathLike | None,
        *,
        flops_per_token: float,
        device: str = "cpu",
        dtype: str = "float32",
        peak_flops: float | None = None,
        n_devices: int = 1,
        price_per_device_hour: float = 0.0,
        currency: str = "USD",
        watts_per_core: float = 10.0,
        total_steps: int | None = None,
        log_every: int = 1,
        show: bool = True,
        ema: float = 0.9,
        energy: EnergyCounter | None = None,
        clock: Callable[[], float] = time.perf_counter,
        mirror: str | os.PathLike | None = None,
    ):
        """energy: the energy counter (default: the best one for `device`, see make_energy_counter).
        clock: seconds from an arbitrary origin, monotonic (default time.perf_counter; tests pass a fake).
        mirror: another JSONL file that gets every record too (appended; e.g. a pipeline's own log)."""
        self.clock = clock
        self.flops_per_token = float(flops_per_token)
        self.n_devices = n_devices
        self.price, self.currency = price_per_device_hour, currency
        self.log_every, self.ema = max(1, log_every), ema
        if peak_flops is not None:
            self.peak_flops, self.peak_source = float(peak_flops), "given in the config"
        else:
            self.peak_flops, self.peak_source = device_peak_flops(device, dtype)
        self.device = device
        self.energy = energy if energy is not None else make_energy_counter(device, watts_per_core)
        self.path: Path | None = None
        self._file = None
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(out_dir) / "metrics.jsonl"
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (kept open for the run)
        self._mirror = None
        if mirror is not None:
            Path(mirror).parent.mkdir(parents=True, exist_ok=True)
            self._mirror = open(mirror, "a", buffering=1)  # noqa: SIM115 (kept open for the run)
        self._bar = None
        if show:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True, leave=True)
        self._t0 = self.clock()
        self._last = self._t0
        self._paused_s = 0.0  # paused time since the last step
        self._train_s = 0.0
        self.tokens = 0
        self.steps = 0
        self.last_step: int | None = None
        self.last_loss: float | None = None
        self.tok_s_ema: float | None = None
        self.last_scalars: dict[str, Any] = {}
        self._closed = False

    # ---- recording -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpointing) counts in wall time but not in tokens/s."""
        start = self.clock()
        try:
            yield
        finally:
            self._paused_s += self.clock() - start

    def step(self, step: int, loss: float, tokens: int, **scalars: Any) -> dict[str, Any]:
        """Record one optimizer step that processed `tokens` token positions (all devices)."""
        now = self.clock()
        dt = max(1e-9, now - self._last - self._paused_s)
        self._last, self._paused_s = now, 0.0
        self._train_s += dt
        self.tokens += tokens
        self.steps += 1
        self.last_step, self.last_loss, self.last_scalars = step, float(loss), scalars
        tok_s = tokens / dt
        self.tok_s_ema = tok_s if self.tok_s_ema is None else self.ema * self.tok_s_ema + (1 - self.ema) * tok_s
        record = {
            "event": "step",
            "step": step,
            "loss": float(loss),
            "tokens": self.tokens,
            "tok_s": self.tok_s_ema,
            "mfu": self.mfu(self.tok_s_ema),
            "wall_s": now - self._t0,
            "energy_j": self.energy.joules(),
            "cost": self.cost(now - self._t0),
            **{k: _jsonable(v) for k, v in scalars.items()},
        }
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{self.tok_s_ema:,.0f}", mfu=f"{100 * record['mfu']:.2f}%", refresh=False
            )
        if self.steps % self.log_every == 0:
            self._write(record)
        return record

    def log(self, **record: Any) -> None:
        """Write any other record (eval results, notes) to metrics.jsonl, with the wall time."""
        record.setdefault("event", "log")
        record["wall_s"] = self.clock() - self._t0
        self._write({k: _jsonable(v) for k, v in record.items()})
        if self._bar is not None and record["event"] == "eval":
            self._bar.write(json.dumps({k: v for k, v in record.items() if k != "wall_s"}))

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        for f in (self._file, self._mirror):
            if f is not None:
                f.write(line)

    # ---- derived quantities --------------------------------------------------------------------------
    def mfu(self, tok_s: float) -> float:
        return self.flops_per_token * tok_s / (self.peak_flops * self.n_devices)

    def cost(self, wall_s: float) -> float:
        return wall_s / 3600 * self.n_devices * self.price

    def summary(self) -> dict[str, Any]:
        wall = self.clock() - self._t0
        tok_s = self.tokens / self._train_s if self._train_s > 0 else 0.0
        joules = self.energy.joules()
        return {
            "steps": self.steps,
            "last_step": self.last_step,
            "final_loss": self.last_loss,
            "tokens": self.tokens,
            "wall_s": wall,
            "train_s": self._train_s,
            "tok_s": tok_s,
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops,
            "peak_source": self.peak_source,
            "n_devices": self.n_devices,
            "mfu": self.mfu(tok_s),
            "energy_j": joules,
            "energy_kwh": joules / 3.6e6,
            "energy_source": self.energy.source,
            "energy_estimated": self.energy.estimated,
            "energy_assumption": self.energy.assumption,
            "device_hours": wall / 3600 * self.n_devices,
            "price_per_device_hour": self.price,
            "cost": self.cost(wall),
            "currency": self.currency,
        }

    def close(self, print_summary: bool = True) -> dict[str, Any]:
        """Finish: write the summary line, close the bar and file, print the table; returns the summary."""
        summary = self.summary()
        if self._closed:
            return summary
        self._closed = True
        self._write({"event": "summary", **summary})
        if self._bar is not None:
            self._bar.close()
        for f in (self._file, self._mirror):
            if f is not None:
                f.close()
        if print_summary:
            print(format_summary(summary))
        return summary


def format_summary(s: dict[str, Any]) -> str:
    """A plain-text table of a Meter summary."""
    energy = f"{s['energy_j']:,.0f} J ({s['energy_kwh'] * 1000:.3f} Wh), {s['energy_source']}"
    if s["energy_estimated"]:
        energy += f" -- {s['energy_assumption']}"
    loss = "n/a" if s["final_loss"] is None else f"{s['final_loss']:.4f}"
    rows = [
        ("steps", f"{s['steps']:,}"),
        ("final loss", loss),
        ("tokens", f"{s['tokens']:,}"),
        ("wall time", f"{s['wall_s']:.1f} s (training {s['train_s']:.1f} s)"),
        ("tokens/s", f"{s['tok_s']:,.0f}"),
        (
            "MFU",
            f"{100 * s['mfu']:.2f}% of {s['peak_flops'] / 1e12:.3g} TFLOP/s x {s['n_devices']} ({s['peak_source']})",
        ),
        ("FLOPs/token", f"{s['flops_per_token']:.3g} (active experts only)"),
        ("energy", energy),
        ("device-hours", f"{s['device_hours']:.4f}"),
        ("cost", f"{s['cost']:.4f} {s['currency']} at {s['price_per_device_hour']:g} {s['currency']}/device-hour"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, int | float | str | bool) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return str(v)
