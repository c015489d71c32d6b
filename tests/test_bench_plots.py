"""Every benchmark's --plot (bench/plots.py and each bench's plot function) writes a PNG, from tiny made-up
figures: no models, no timing."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import pytest

from benchmark_scripts import load_script as script


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TIMES = {"a (slow)": [2.0, 2.2, 1.9], "b (fast)": [1.0, 1.1, 1.0]}


def draw_ratio_plot(path: Path) -> None:
    from nanoseek.bench.plots import machine_note, ratio_plot, round_ratios

    assert round_ratios(TIMES, "a (slow)", "b (fast)") == pytest.approx([2.0, 2.2 / 1.1, 1.9])
    ratio_plot(path, "t", {"a / b": round_ratios(TIMES, "a (slow)", "b (fast)"), "one": [1.0]},
               absolute={"a": [1.0, 2.0]}, absolute_ylabel="ms", footnote=machine_note(1, "cpu clock"))  # fmt: skip


def draw_interval_plot(path: Path) -> None:
    from nanoseek.bench.plots import interval_plot

    interval_plot(path, "t", {"task": {"sft": [(30.0, 26.0, 35.0), (31.0, 27.0, 36.0)], "grpo": [(40.0, 35.0, 45.0)]},
                              "diff": {"task": [(5.0, 0.5, 11.0)]}},
                  members=["seed 1", "seed 2"], references={"diff": 0.0})  # fmt: skip


def draw_quality(path: Path) -> None:
    from nanoseek.bench import quality

    def side(kls):
        return {"chunk_mean_kl": kls, "chunk_mean_kl_16bit": kls}

    figures = {"nanoseek --quant auto (= int4)": side([0.0027, 0.0025]), "nanoseek --quant int8": side([0.03, 0.04]),
               "llama.cpp (llama-perplexity, same file)": side([0.0025, 0.0026])}  # fmt: skip
    note = "llama.cpp: `llama-perplexity -m x`; llama.cpp abc, GGML_NATIVE=ON"
    quality.plot(Namespace(threads=2, ctx=512), Path("m.gguf"), figures, path, [note])


def draw_speculation(path: Path) -> None:
    from nanoseek.bench import speculation

    times = {speculation.PLAIN: [1.0, 1.2], speculation.NGRAM: [0.5, 0.4]}
    speculation.plot(Namespace(threads=2), "m.gguf", "fp16", 128, times, "3 of 4 drafts accepted", path)


def draw_sft(path: Path) -> None:
    from nanoseek.bench import sft

    times = {sft.NANOSEEK: [5.0, 6.0], sft.PLAIN: [12.0, 14.0]}
    sft.plot(Namespace(plot=path, clock="cpu", batch=8, reps=2), "SFT", times, sft.PLAIN, sft.NANOSEEK, "1M params")


def draw_moe_step(path: Path) -> None:
    from nanoseek.bench import moe_step

    times = {moe_step.BACKENDS["grouped_mm"]: [1.0, 1.1], "transformers eager experts (loop)": [1.2, 1.3]}
    moe_step.plot(Namespace(plot=path, clock="cpu", config="tiny", reps=2), times, moe_step.BACKENDS["grouped_mm"], 64)


def draw_train_throughput(path: Path) -> None:
    from nanoseek.bench import train_throughput as tt

    names = [tt.TRAINER, tt.HF_SAME, tt.OURS_LOOP, tt.OURS_LOGITS, tt.OURS_FULL, tt.HF_FULL]
    times = {name: [1.0 + 0.1 * i, 1.1 + 0.1 * i] for i, name in enumerate(names)}
    ratios = [("same work: transformers loop / nanoseek Trainer step", tt.HF_SAME, tt.TRAINER)]
    tt.plot(Namespace(plot=path, clock="wall", batch=4, reps=2), times, ratios)


def draw_kv_cache_dtype(path: Path) -> None:
    args = Namespace(plot=path, quant="int4", depth=200, threads=2, tokens=64, rounds=2)
    script("kv_cache_dtype").plot(args, "m.gguf", [1.05, 1.1], {"fp16": [90.0, 95.0], "model": [85.0, 86.0]}, "ok")


def draw_int4_kernels(path: Path) -> None:
    args = Namespace(plot=path, prefetch_blocks=[0, 8], threads=1, rounds=2, shapes=["down 1536->576"])
    script("int4_kernels").plot(args, {"down x1: prefetch 0": [1.3, 1.2], "down x1: AVX2 path": [1.1, 1.0]})


def draw_loop_merge_speed(path: Path) -> None:
    args = Namespace(plot=path, threads=1, rounds=2, old=path.parent, new=path.parent)
    script("loop_merge_speed").plot(args, {"pretrain, wall": [0.9, 0.95]}, {"pretrain, old": [700.0, 710.0]})


def draw_speedrun_seeds(path: Path) -> None:
    from nanoseek.tasks import wilson_ci95
    from nanoseek.train.scoring import stage_comparisons

    def score(k: int, n: int = 40) -> dict:
        solved = "1" * k + "0" * (n - k)
        return {"accuracy": k / n, "ci95": list(wilson_ci95(k, n)), "n": n, "correct": k, "solved": solved}

    runs = {}
    for seed, (k_grpo, k_control) in {1: (20, 14), 2: (18, 15)}.items():
        stages = [{"name": "sft", "eval": {"countdown": score(12)}},
                  {"name": "grpo", "parent": "sft", "eval": {"countdown": score(k_grpo)}},
                  {"name": "sft-control", "parent": "sft", "eval": {"countdown": score(k_control)}}]  # fmt: skip
        scoring = {"tasks": ["countdown"], "problems": 40}
        runs[seed] = {"stages": stages, "comparisons": stage_comparisons(stages), "scoring": scoring}
    script("speedrun_seeds").plot(runs, path)


@pytest.mark.parametrize(
    "draw",
    [draw_ratio_plot, draw_interval_plot, draw_quality, draw_speculation, draw_sft, draw_moe_step,
     draw_train_throughput, draw_kv_cache_dtype, draw_int4_kernels, draw_loop_merge_speed, draw_speedrun_seeds],
    ids=lambda f: f.__name__.removeprefix("draw_"),
)  # fmt: skip
def test_plot_writes_a_png(draw, tmp_path):
    path = tmp_path / "plot.png"
    draw(path)
    assert is_png(path)
