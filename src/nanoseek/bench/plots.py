"""The benchmarks' shared `--plot` drawing (matplotlib, Agg backend: no display needed).

    ratio_plot(path, "decode, nanoseek / llama-bench", {"int4": [0.93, 1.02, 0.88]}, footnote="1 thread, ...")
    interval_plot(path, "speedrun, three seeds", {"countdown": {"sft": [(30.5, 26.2, 35.2), ...], ...}}, ...)

ratio_plot: one column per series, its per-round values as points, its median as a bar across them and
printed beside it, a dashed 1.0 line (the peer or baseline); optionally a second panel of absolute values
(times, rates) drawn the same way. interval_plot: per panel (a task), per group (a stage), one point with its
interval per member (a seed), side by side.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path


def round_ratios(times: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """times[numerator][i] / times[denominator][i] for every round i (timing.paired_ratio's values, unsummarised)."""
    return [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _strip(ax, series: dict[str, list[float]], ylabel: str, reference: float | None, fmt: str) -> None:
    """Per series: its values as points over a column (spread sideways by round), the median as a bar. Series
    named "GROUP: WHAT" share a colour with every other series of the same WHAT (e.g. one distance per shape)."""
    names = list(series)
    kinds: dict[str, int] = {}
    for i, name in enumerate(names):
        values = list(series[name])
        if not values:
            continue
        n = len(values)
        xs = [i + (0.5 * (k / (n - 1) - 0.5) if n > 1 else 0.0) for k in range(n)]
        colour = kinds.setdefault(name.rsplit(": ", 1)[-1], len(kinds)) % 10
        ax.scatter(xs, values, s=22, color=f"C{colour}", alpha=0.8, zorder=3)
        med = statistics.median(values)
        ax.hlines(med, i - 0.3, i + 0.3, color="black", linewidth=2, zorder=4)
        ax.annotate(format(med, fmt), (i + 0.32, med), va="center", fontsize=7 if len(names) > 8 else 8)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, zorder=1)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if max((len(n) for n in names), default=0) * len(names) > 60:
        for label in ax.get_xticklabels():
            label.set_rotation(25)
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")


def ratio_plot(
    path: str | Path,
    title: str,
    series: dict[str, list[float]],
    *,
    ylabel: str = "ratio (per round)",
    per: str = "round",
    absolute: dict[str, list[float]] | None = None,
    absolute_ylabel: str = "",
    footnote: str = "",
    reference: float | None = 1.0,
    fmt: str = ".2f",
    absolute_fmt: str = ".3g",
) -> Path:
    """A PNG at `path`: each series' per-round ratios as points, the median marked, a `reference` line (the peer
    or baseline, 1.0); with `absolute`, a second panel of each row's absolute values per round (`per` names what
    a point is: a round, a chunk). The footnote (machine, threads, load: see machine_note) goes under it."""
    plt = _pyplot()
    panels = 2 if absolute else 1
    width = max(6.0, 1.3 * len(series) + 2.5) + (max(6.0, 1.3 * len(absolute) + 2.5) if absolute else 0.0)
    fig, axes = plt.subplots(1, panels, figsize=(min(width, 18.0), 5.0), squeeze=False)
    _strip(axes[0, 0], series, ylabel, reference, fmt)
    ref = "" if reference is None else f"; {reference:g}: dashed"
    axes[0, 0].set_title(f"one point per {per}; median: bar{ref}", fontsize=9)
    if absolute:
        _strip(axes[0, 1], absolute, absolute_ylabel, None, absolute_fmt)
        axes[0, 1].set_title(f"absolute values, one point per {per}", fontsize=9)
    _finish(fig, title, footnote)
    return _save(fig, path)


def interval_plot(
    path: str | Path,
    title: str,
    panels: dict[str, dict[str, Sequence[tuple[float, float, float]]]],
    *,
    members: Sequence[str] = (),
    ylabel: str = "",
    references: dict[str, float] | None = None,
    footnote: str = "",
) -> Path:
    """A PNG at `path`: one panel per key of `panels` (e.g. a task); in it, per group (e.g. a stage), one point
    with its interval, (value, low, high), per member (e.g. a seed), side by side and labelled by `members`;
    `references` draws a dashed line at a value in the panels it names (e.g. 0 in a panel of differences)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 3.6 * len(panels)), 4.8), squeeze=False)
    for ax, (panel, groups) in zip(axes[0], panels.items()):
        names = list(groups)
        width = max((len(v) for v in groups.values()), default=1)
        for i, name in enumerate(names):
            for k, (value, lo, hi) in enumerate(groups[name]):
                x = i + (0.6 * (k / (width - 1) - 0.5) if width > 1 else 0.0)
                label = members[k] if i == 0 and k < len(members) else None
                ax.errorbar([x], [value], yerr=[[value - lo], [hi - value]], fmt="o", capsize=3, markersize=4,
                            color=f"C{k % 10}", label=label)  # fmt: skip
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=25, ha="right", rotation_mode="anchor")
        ax.set_title(panel, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if references and panel in references:
            ax.axhline(references[panel], color="gray", linestyle="--", linewidth=1, zorder=1)
    axes[0, 0].set_ylabel(ylabel)
    if members:
        axes[0, -1].legend(fontsize=8, loc="best")
    _finish(fig, title, footnote)
    return _save(fig, path)


def machine_note(threads: int | None = None, clock: str = "") -> str:
    """The footnote's machine part: CPU model and count, threads, clock and the load average now (e.g. "Intel
    Xeon ..., 2 CPUs, 1 thread, process CPU clock, load 1.7")."""
    from nanoseek.bench.peers import this_cpu

    parts = [this_cpu()[1], f"{os.cpu_count()} CPUs"]
    if threads is not None:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    if clock:
        parts.append(clock)
    parts.append(f"load {os.getloadavg()[0]:.1f}")
    return ", ".join(parts)


def _finish(fig, title: str, footnote: str) -> None:
    fig.suptitle(title)
    if footnote:
        fig.text(0.01, 0.01, footnote, fontsize=8, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.03 + 0.03 * (footnote.count("\n") + 1 if footnote else 0), 1, 0.95))


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
