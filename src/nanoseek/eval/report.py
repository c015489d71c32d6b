"""The report card of a run: report.md with PNG plots, from summary.json and metrics.jsonl.

    write_report(run_dir, summary, cfg)         # report.md, loss.png, accuracy.png, throughput.png, energy.png

Plots: training loss per stage; held-out accuracy per task and stage with 95% CI error bars (and accuracy
along training where evaluations ran); tokens/s; cumulative energy. Stages are whatever summary["stages"]
lists, so new stages appear without changes here. `cfg` is the run's configuration (the speedrun's
TrainConfig: its price_per_device_hour, watts_per_core and to_json() are read), or None.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def chance_accuracy(task: str) -> float | None:
    """Exact-match accuracy of a uniform guess over the task's possible answers (None when unknown)."""
    import re
    from math import comb

    if m := re.fullmatch(r"add(\d+)", task):
        return 1 / (2 * 10 ** int(m.group(1)) - 1)  # sums 0 .. 2*(10^n - 1)
    if m := re.fullmatch(r"sort(\d*)", task):
        n = int(m.group(1) or 5)
        return 1 / comb(n + 9, 9)  # sorted digit strings = multisets of n digits
    if task == "linear":
        return 1 / 10
    if m := re.fullmatch(r"mul(\d*)", task):
        return 1 / (9 * (10 ** int(m.group(1) or 2) - 1) + 1)
    return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records, each tagged with the stage it belongs to ({"event": "stage"} lines)."""
    records, stage = [], "pretrain"
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if rec.get("event") == "stage":
            stage = rec.get("name", stage)
            continue
        rec["stage"] = stage
        records.append(rec)
    return records


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Lay out, write (the report's 110 dpi) and free a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_loss(records, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for stage in dict.fromkeys(r["stage"] for r in records):
        if stage == "grpo":  # a policy-gradient surrogate, not a cross-entropy: plotted by plot_grpo
            continue
        steps = [r for r in records if r["stage"] == stage and r.get("event") == "step"]
        if not steps:
            continue
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=f"{stage}: loss")
        if "lm" in steps[0]:
            ax.plot([r["step"] for r in steps], [r["lm"] for r in steps], label=f"{stage}: next-token", alpha=0.7)
        if "mtp" in steps[0]:
            ax.plot([r["step"] for r in steps], [r["mtp"] for r in steps], label=f"{stage}: MTP", alpha=0.7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Training loss")
    _save(fig, path)


def plot_accuracy(summary: dict[str, Any], records, path: Path) -> None:
    plt = _plt()
    stages = summary["stages"]
    tasks = sorted({t for s in stages for t in s["eval"]})
    history = [r for r in records if r.get("event") == "eval" and not r.get("final") and r["stage"] == "pretrain"]
    fig, axes = plt.subplots(1, 2 if history else 1, figsize=(11 if history else 6, 4), squeeze=False)
    ax = axes[0][0]
    width = min(0.35, 0.8 / max(1, len(stages)))
    for i, s in enumerate(stages):
        xs, ys, lo, hi = [], [], [], []
        for j, t in enumerate(tasks):
            if t in s["eval"]:
                e = s["eval"][t]
                xs.append(j + i * width)
                ys.append(100 * e["accuracy"])
                lo.append(100 * (e["accuracy"] - e["ci95"][0]))
                hi.append(100 * (e["ci95"][1] - e["accuracy"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=4, label=f"{s['name']} ({s.get('format', '?')})")
    for j, t in enumerate(tasks):
        c = chance_accuracy(t)
        if c is not None:
            ax.hlines(100 * c, j - width / 2, j + width * (len(stages) - 0.5), colors="k", linestyles=":")
    ax.set_xticks([j + width * (len(stages) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set_ylim(0, 100)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("Accuracy per task and stage (95% CI; dotted: chance)")
    ax.legend()
    if history:
        ax = axes[0][1]
        for t in tasks:
            pts = [(r["step"], r[t]) for r in history if t in r]
            if not pts:
                continue
            ax.errorbar(
                [p[0] for p in pts], [100 * p[1]["accuracy"] for p in pts],
                yerr=[[100 * (p[1]["accuracy"] - p[1]["ci95"][0]) for p in pts],
                      [100 * (p[1]["ci95"][1] - p[1]["accuracy"]) for p in pts]],
                marker="o", capsize=3, label=t,
            )  # fmt: skip
        ax.set_xlabel("pretraining step")
        ax.set_ylabel("held-out exact match (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("Accuracy during pretraining")
    _save(fig, path)


def plot_series(records, key: str, ylabel: str, title: str, path: Path, scale: float = 1.0) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    offset = 0.0
    for stage in dict.fromkeys(r["stage"] for r in records):
        steps = [r for r in records if r["stage"] == stage and r.get("event") == "step" and key in r]
        if not steps:
            continue
        ax.plot([offset + r["wall_s"] for r in steps], [scale * r[key] for r in steps], label=stage)
        offset += steps[-1]["wall_s"]
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    _save(fig, path)


def plot_grpo(records, path: Path) -> None:
    """GRPO over its steps: mean reward and rollout accuracy; completion length; KL, clip fraction, entropy."""
    plt = _plt()
    steps = [r for r in records if r["stage"] == "grpo" and r.get("event") == "step" and "reward" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    x = [r["step"] for r in steps]
    axes[0].plot(x, [r["reward"] for r in steps], label="mean reward")
    axes[0].plot(x, [r["accuracy"] for r in steps], label="rollout accuracy")
    # each reward function's mean (reward_accuracy is the rollout accuracy again: not drawn twice)
    for key in sorted(k for k in steps[0] if k.startswith("reward_") and k not in ("reward_std", "reward_accuracy")):
        axes[0].plot(x, [r[key] for r in steps], label=key.replace("_", " "), alpha=0.6)
    axes[0].set_title("Rewards of the sampled completions")
    axes[1].plot(x, [r["completion_len"] for r in steps], color="C3")
    axes[1].set_ylabel("tokens")
    axes[1].set_title("Mean completion length")
    for key, label in (("kl", "KL (k3)"), ("clip_frac", "clip fraction"), ("entropy", "entropy (nats)")):
        axes[2].plot(x, [r.get(key, 0.0) for r in steps], label=label)
    axes[2].set_title("KL to the reference, clipping, entropy")
    for ax in axes:
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    _save(fig, path)


def lineage(stages: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The stages that made stage `name`'s model, from the first (each stage's `parent`), `name` last."""
    by_name = {s["name"]: s for s in stages}
    chain, node = [], by_name.get(name)
    while node is not None and node not in chain:
        chain.insert(0, node)
        node = by_name.get(node.get("parent"))
    return chain


def stage_costs(summary: dict[str, Any], price_per_hour: float) -> list[dict[str, Any]]:
    """Per stage: correct held-out answers (all in that stage's one format), the energy and cost of the stages
    that made its model (its lineage: the SFT control's excludes GRPO), and energy per correct answer (J)."""
    rows = []
    for s in summary["stages"]:
        chain = lineage(summary["stages"], s["name"])
        energy, wall = sum(c["energy_j"] for c in chain), sum(c["wall_s"] for c in chain)
        correct = sum(round(e["accuracy"] * e["n"]) for e in s["eval"].values())
        n = sum(e["n"] for e in s["eval"].values())
        rows.append({
            "name": s["name"], "format": s.get("format", "?"), "correct": correct, "n": n, "energy_j": energy,
            "cost": wall / 3600 * price_per_hour, "j_per_correct": energy / correct if correct else None,
        })  # fmt: skip
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def describe_training(summary: dict[str, Any]) -> str:
    """What the run did, from summary["training"] (written by the speedrun): its initial weights, and the
    data and tokenizer, each as given by the user or as made by the run."""
    t = summary["training"]
    start = f"Trained from scratch (random initial weights, seed {t['seed']})"
    if t["data_files"]:
        data = f"on the given text files: {', '.join(Path(f).name for f in t['data_files'])}"
    else:
        data = f"on synthetic tasks: {', '.join(t['tasks'])}"
    tok = (
        f"the given tokenizer ({t['tokenizer_path']})" if t["tokenizer_path"] else "a byte-level BPE trained in the run"
    )
    return f"{start}, {data}, with {tok}."


def _with_ci(metric: dict[str, Any]) -> str:
    lo, hi = metric["ci95"]
    return f"**{_pct(metric['value'])}** ({_pct(lo)} – {_pct(hi)})"


def final_eval_lines(final: dict[str, Any] | None) -> list[str]:
    """The final model's table (summary["final_eval"], from nanoseek.eval): greedy pass@1, sampled pass@1 and
    pass@k per task, each with its 95% interval."""
    if not final or not final.get("greedy"):
        return []
    some = next(iter(final["sampled"].values()))
    k, temperature, settings = some["samples"], some["settings"]["temperature"], some["settings"]
    fmt = "the bare prompt" if settings["format"] == "plain" else "the chat template and the R1 format"
    if settings.get("system_prompt") == "":
        fmt += " with no system prompt"
    lines = ["## Final model", ""]
    lines.append(
        f"`nanoseek eval` on the {final['stage']} model, in {fmt}: pass@1 of the greedy answer (Wilson interval), "
        f"and pass@1 and pass@{k} from {k} completions per problem sampled at temperature {temperature:g} "
        f"(unbiased estimator, bootstrap interval over problems; the first problems of the greedy ones); "
        f"{final['wall_s']:.0f} s."
    )
    lines.append("")
    lines += [f"| task | pass@1 greedy | n | pass@1 sampled | pass@{k} | n |", "|---|---|---|---|---|---|"]
    for task, greedy in sorted(final["greedy"].items()):
        sampled = final["sampled"][task]
        lines.append(f"| {task} | {_with_ci(greedy['metrics']['pass@1'])} | {greedy['n']} | "
                     f"{_with_ci(sampled['metrics']['pass@1'])} | {_with_ci(sampled['metrics'][f'pass@{k}'])} | "
                     f"{sampled['n']} |")  # fmt: skip
    lines.append("")
    spec = final.get("speculation")
    if spec:
        mtp, plain = statistics.median(spec["mtp_tok_s"]), statistics.median(spec["plain_tok_s"])
        same = "the same tokens as plain decoding." if spec["same_output"] else "**tokens differ from plain decoding**."
        lines.append(
            f"Speculative decoding with the model's own MTP module (one stream, greedy, {len(spec['plain_tok_s'])} "
            f"alternating rounds of the same problems): {mtp:.0f} tokens/s against {plain:.0f} plain "
            f"(**{spec['speedup']:.2f}x**); drafts accepted {spec['accepted']} of {spec['drafted']} "
            f"({_pct(spec['acceptance'])}); {same}"
        )
        lines.append("")
    return lines


FORMAT_WORDS = {
    "plain": "the bare problem (`47+85=`), the answer read as it comes",
    "r1": "the chat template with no system prompt, answering `<think>…</think><answer>…</answer>`, the answer "
    "read from `<answer>`",
}
VERDICT_WORDS = {"better": "better", "worse": "**worse**", "same": "no different"}


def _paired_words(c: dict[str, Any]) -> str:
    """' (problem by problem: ...)' when the paired verdict differs from the intervals' one, else ''."""
    p = c.get("paired")
    if not p or p["verdict"] == c["verdict"]:
        return ""
    lo, hi = (100 * x for x in p["ci95"])
    counts = f"{p['only_stage']} solved only by {c['stage']}, {p['only_against']} only by {c['against']}"
    return f" (problem by problem {p['verdict']}: {counts}; {100 * p['diff']:+.1f} points, 95% {lo:+.1f} to {hi:+.1f})"


def accuracy_lines(summary: dict[str, Any]) -> list[str]:
    """One table of task x stage (each stage's format in its header) on the same held-out problems, the formats
    and the commands that re-score them, then each comparison the run makes, in words."""
    stages, scoring = summary["stages"], summary.get("scoring", {})
    tasks = sorted({t for s in stages for t in s["eval"]})
    lines = ["## Held-out accuracy", ""]
    n = scoring.get("problems") or max((e["n"] for s in stages for e in s["eval"].values()), default=0)
    lines.append(
        f"Every stage's model answers the same {n} held-out problems per task (never drawn for training), greedy, "
        f"exact match, with 95% Wilson intervals. Formats:"
    )
    lines.append("")
    for fmt in dict.fromkeys(s.get("format", "?") for s in stages):
        who = ", ".join(s["name"] for s in stages if s.get("format", "?") == fmt)
        command = scoring.get("commands", {}).get(fmt)
        lines.append(f"- `{fmt}` ({who}): {FORMAT_WORDS.get(fmt, fmt)}" + (f"; `{command}`" if command else "."))
    lines.append("")
    header = " | ".join(f"{s['name']} ({s.get('format', '?')})" for s in stages)
    lines += [f"| task | {header} | chance |", "|---" * (len(stages) + 2) + "|"]
    for task in tasks:
        cells = []
        for s in stages:
            e = s["eval"].get(task)
            cells.append(f"**{_pct(e['accuracy'])}** ({_pct(e['ci95'][0])} – {_pct(e['ci95'][1])})" if e else "–")
        c = chance_accuracy(task)
        lines.append(f"| {task} | {' | '.join(cells)} | {f'{100 * c:.2g}%' if c is not None else 'n/a'} |")
    lines.append("")
    comparisons = summary.get("comparisons") or []
    if comparisons:
        lines.append(
            "Each comparison counts a difference only when the two 95% intervals do not overlap. Where comparing "
            "the same problems one by one says otherwise (the difference's paired 95% interval, Newcombe's, lies "
            "wholly above or below 0), the brackets say so:"
        )
        lines.append("")
        pairs = dict.fromkeys((c["stage"], c["against"]) for c in comparisons)
        for a, b in pairs:
            parts = [f"{VERDICT_WORDS[c['verdict']]} on {c['task']}{_paired_words(c)}" for c in comparisons
                     if (c["stage"], c["against"]) == (a, b)]  # fmt: skip
            lines.append(f"- **{a}** against **{b}**: {', '.join(parts)}.")
        lines.append("")
    return lines


def render_markdown(run_dir: Path, summary: dict[str, Any], cfg: Any, plots: list[str]) -> str:
    m = summary.get("model", {})
    lines = ["# nanoseek speedrun report", ""]
    control = next((s for s in summary["stages"] if s["name"] == "sft-control"), None)
    without = f" ({(summary['wall_s'] - control['wall_s']) / 60:.1f} min without the SFT control)" if control else ""
    lines.append(
        f"Device: **{summary['device']}** · wall time **{summary['wall_s'] / 60:.1f} min**{without} · "
        f"tokens {summary['tokens']:,} · energy {summary['energy_j'] / 3600:.2f} Wh"
        f"{' (estimated)' if summary['energy_estimated'] else ''} · cost {summary['cost']:.4f} "
        f"{summary.get('currency', 'USD')}"
    )
    lines.append("")
    if m:
        lines.append(
            f"Model: DeepSeek-V3 architecture, {m['params'] / 1e6:.2f}M parameters ({m['active_params'] / 1e6:.2f}M "
            f"active per token): hidden {m['hidden_size']}, {m['layers']} layers, MLA with kv_lora_rank "
            f"{m['kv_lora_rank']}, MoE {m['routed_experts']} routed experts (top-{m['experts_per_token']}) + "
            f"{m['shared_experts']} shared, MTP depth {m['mtp_depth']}, vocabulary {m['vocab_size']}. "
            f"{describe_training(summary)}"
        )
        lines.append("")
    lines += accuracy_lines(summary)
    lines += final_eval_lines(summary.get("final_eval"))
    lines += ["## Stages", "", "| stage | wall time | steps | tokens | tokens/s | MFU | energy | final loss |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for s in summary["stages"]:
        tok_s = f"{s['tok_s']:,.0f}" if s.get("tok_s") else "–"
        mfu = f"{100 * s['mfu']:.2f}%" if s.get("mfu") is not None else "–"
        loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "–"
        lines.append(
            f"| {s['name']} | {s['wall_s']:.0f} s | {s.get('steps', '–')} | {s['tokens']:,} | {tok_s} | {mfu} | "
            f"{s['energy_j'] / 3600:.2f} Wh | {loss} |"
        )
    lines.append("")
    price = cfg.price_per_device_hour if cfg else summary["cost"] * 3600 / max(summary["wall_s"], 1e-9)
    lines += ["## Energy per correct answer and cost", ""]
    lines.append(
        "Energy and cost of the stages that made each model (the SFT control's exclude GRPO's); correct answers are "
        "the held-out ones of the table above, each stage's in its own format (a bare answer and an R1 reply are "
        "different measurements, so stages in different formats are not added up)."
    )
    lines.append("")
    lines += ["| stage | format | correct / asked | energy | energy per correct answer | cost |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in stage_costs(summary, price):
        per = f"{r['j_per_correct']:.1f} J" if r["j_per_correct"] is not None else "–"
        lines.append(f"| {r['name']} | {r['format']} | {r['correct']} / {r['n']} | {r['energy_j'] / 3600:.2f} Wh | "
                     f"{per} | {r['cost']:.4f} {summary.get('currency', 'USD')} |")  # fmt: skip
    lines.append("")
    grpo = next((s for s in summary["stages"] if s["name"] == "grpo"), None)
    if grpo and grpo.get("history"):
        h = grpo["history"]
        k = max(1, len(h) // 10)
        first, last = h[:k], h[-k:]

        def mean(rows, key):
            return sum(r.get(key, 0.0) for r in rows) / len(rows)

        lines += ["## GRPO", ""]
        on = f" on {', '.join(grpo['tasks'])}" if grpo.get("tasks") else ""
        lines.append(
            f"{len(h)} steps{on}. Mean over the first and last {k} step(s): reward {mean(first, 'reward'):.3f} -> "
            f"{mean(last, 'reward'):.3f}, rollout accuracy {_pct(mean(first, 'accuracy'))} -> "
            f"{_pct(mean(last, 'accuracy'))}, completion length {mean(first, 'completion_len'):.1f} -> "
            f"{mean(last, 'completion_len'):.1f} tokens."
        )
        lines.append("")
    if summary.get("skipped_stages"):
        lines.append(
            f"Stages not run (not part of this build yet): {', '.join(summary['skipped_stages'])}. "
            f"The final model is the last stage's."
        )
        lines.append("")
    if summary["energy_estimated"]:
        lines.append(
            f"Energy is an **estimate**: this machine exposes no energy counter (NVML, RAPL), so the figure is "
            f"process CPU-seconds × {cfg.watts_per_core if cfg else '?'} W per busy core (an assumption)."
        )
        lines.append("")
    lines += ["## Plots", ""]
    titles = {"loss.png": "Training loss", "accuracy.png": "Accuracy", "throughput.png": "Tokens/s",
              "energy.png": "Energy", "grpo.png": "GRPO rewards, lengths, KL"}  # fmt: skip
    for p in plots:
        lines.append(f"![{titles.get(p, p)}]({p})")
        lines.append("")
    lines += ["## Files", ""]
    lines.append("- `model/`: the final model (HF folder with tokenizer); `nanoseek.load(\"model\")` or "
                 "transformers' `AutoModelForCausalLM.from_pretrained(\"model\")`")  # fmt: skip
    lines.append("- `metrics.jsonl`: every step and evaluation; `summary.json`: the numbers above")
    if cfg is not None:
        lines += ["", "## Configuration", "", "```json", cfg.to_json(), "```"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, summary: dict[str, Any], cfg: Any = None) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    plots = []
    if any(r.get("event") == "step" for r in records):
        plot_loss(records, run_dir / "loss.png")
        plots.append("loss.png")
    if any(s["eval"] for s in summary["stages"]):
        plot_accuracy(summary, records, run_dir / "accuracy.png")
        plots.append("accuracy.png")
    if any("tok_s" in r for r in records):
        plot_series(records, "tok_s", "tokens/s", "Training throughput", run_dir / "throughput.png")
        plots.append("throughput.png")
    if any("energy_j" in r for r in records):
        label = "energy (Wh, estimated)" if summary["energy_estimated"] else "energy (Wh)"
        plot_series(records, "energy_j", label, "Cumulative energy per stage", run_dir / "energy.png", 1 / 3600)
        plots.append("energy.png")
    if any(r["stage"] == "grpo" and r.get("event") == "step" and "reward" in r for r in records):
        plot_grpo(records, run_dir / "grpo.png")
        plots.append("grpo.png")
    path = run_dir / "report.md"
    path.write_text(render_markdown(run_dir, summary, cfg, plots))
    return path
