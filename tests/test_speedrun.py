"""The speedrun: a run folder with model/, metrics.jsonl, summary.json (in the shape other tools read) and a
report card; the default run reaches high held-out accuracy within the time limit (slow test)."""

from __future__ import annotations

import json

import pytest
import torch

from nanoseek.cli import main
from test_trainer import TINY


def check_summary_shape(summary: dict) -> None:
    assert isinstance(summary["stages"], list) and summary["stages"]
    for stage in summary["stages"]:
        assert isinstance(stage["name"], str)
        assert isinstance(stage["wall_s"], float) and stage["wall_s"] > 0
        assert isinstance(stage["tokens"], int) and stage["tokens"] > 0
        assert isinstance(stage["energy_j"], float) and stage["energy_j"] >= 0
        for task, e in stage["eval"].items():
            assert isinstance(task, str)
            assert 0.0 <= e["accuracy"] <= 1.0 and isinstance(e["n"], int) and e["n"] > 0
            lo, hi = e["ci95"]
            assert 0.0 <= lo <= e["accuracy"] <= hi <= 1.0
    assert isinstance(summary["energy_estimated"], bool)
    assert isinstance(summary["cost"], float)
    assert isinstance(summary["device"], str)


def final_evaluations(monkeypatch) -> list[int]:
    """The samples per problem of each nanoseek.eval call that final_evaluation makes (filled as the run goes)."""
    import nanoseek.eval
    import nanoseek.train.speedrun as speedrun_module

    calls, inside = [], []
    real_evaluate, real_final = nanoseek.eval.evaluate, speedrun_module.final_evaluation

    def evaluate(model, tok, specs, **kw):
        if inside:
            calls.append(kw.get("samples", 1))
        return real_evaluate(model, tok, specs, **kw)

    def final_evaluation(*args, **kw):
        inside.append(True)
        try:
            return real_final(*args, **kw)
        finally:
            inside.clear()

    monkeypatch.setattr(nanoseek.eval, "evaluate", evaluate)
    monkeypatch.setattr(speedrun_module, "final_evaluation", final_evaluation)
    return calls


def test_smoke_speedrun_writes_run_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    sets = [x for s in TINY if not s.startswith(("device=", "log_every=")) for x in ("--set", s)]
    # The step count, not the clock, ends the run (a 30-minute budget is never reached by 30 tiny steps), so a
    # busy machine runs the same steps and writes the same files as an idle one.
    later = ["sft.max_steps=4", "sft.batch_size=16", "grpo.max_steps=3", "grpo.prompts_per_step=4",
             "grpo.num_generations=4", "seed=7"]  # fmt: skip
    # seq_len 48: an add2 problem worked out in the thought (pretraining's data.thinking_tasks) takes ~40 tokens
    final_calls = final_evaluations(monkeypatch)
    rc = main(["speedrun", "--out", str(out), "--minutes", "30", "--quiet", *sets, "--set", "max_steps=30",
               "--set", "seq_len=48", "--set", "eval.every=20", *[x for s in later for x in ("--set", s)],
               "--sft-control"])  # fmt: skip
    assert rc == 0
    assert final_calls == [8]  # sampled only: the final model's greedy answers are the GRPO stage's, not redone
    printed = capsys.readouterr().out
    for name in ("report.md", "metrics.jsonl", "summary.json", "loss.png", "accuracy.png", "throughput.png",
                 "energy.png", "grpo.png", "model/config.json", "model/tokenizer.json",
                 "model/model.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    check_summary_shape(summary)
    names = [s["name"] for s in summary["stages"]]
    assert names == ["pretrain", "sft", "grpo", "sft-control"] and not summary["skipped_stages"]
    # one scoring contract: every stage on the same tasks and problems, each in its named format
    assert all(set(s["eval"]) == {"add2", "sort", "add3", "countdown"} for s in summary["stages"])
    assert [s["format"] for s in summary["stages"]] == ["r1", "r1", "r1", "r1"]
    assert [s["parent"] for s in summary["stages"]] == [None, "pretrain", "sft", "sft"]
    assert [s["steps"] for s in summary["stages"][:3]] == [30, 4, 3]
    r1_command = "nanoseek eval MODEL --tasks add2 sort add3 countdown --format r1 --system-prompt '' --limit 20"
    assert summary["scoring"]["commands"]["r1"] == r1_command
    # the SFT control: more SFT from the SFT model, on the same data, for as long as GRPO trained
    control = summary["stages"][3]
    assert control["steps"] >= 1 and (out / "sft-control/model/config.json").is_file()
    control_settings = json.loads((out / "sft-control/settings.json").read_text())
    assert control_settings["grpo_train_s"] == summary["stages"][2]["train_s"]
    assert f"time_budget_min={summary['stages'][2]['train_s'] / 60:.6g}" in control_settings["overrides"]
    # the demonstrations and settings are in the run folder, and seed=7 reached every stage
    demos = (out / "sft/data.jsonl").read_text().splitlines()
    assert len(demos) == summary["demonstrations"] and json.loads(demos[0])["messages"][1]["role"] == "assistant"
    sft_settings = json.loads((out / "sft/settings.json").read_text())
    assert "seed=7" in sft_settings["overrides"] and "max_steps=4" in sft_settings["overrides"]
    assert sft_settings["command"].startswith(f"nanoseek sft {out / 'pretrain'}")
    assert "seed=7" in json.loads((out / "grpo/settings.json").read_text())["overrides"]
    assert json.loads((out / "train_config.json").read_text())["seed"] == 7
    pairs = {(c["stage"], c["against"]) for c in summary["comparisons"]}
    assert pairs == {("sft", "pretrain"), ("grpo", "sft"), ("sft-control", "sft"), ("grpo", "pretrain"),
                     ("grpo", "sft-control")}  # fmt: skip
    grpo = summary["stages"][2]
    assert [h["step"] for h in grpo["history"]] == [1, 2, 3]
    assert all(k in grpo["history"][0] for k in ("reward", "accuracy", "completion_len", "kl", "clip_frac", "entropy"))
    assert summary["device"] == "cpu" and summary["energy_estimated"] is True
    # the final model's report card (nanoseek.eval): greedy pass@1 is the GRPO stage's held-out accuracy, on its own
    # problems and format; sampled pass@1 and pass@8 carry bootstrap intervals
    final = summary["final_eval"]
    assert final["stage"] == "grpo" and final["wall_s"] > 0 and final["energy_j"] >= 0
    assert set(final["greedy"]) == set(final["sampled"]) == set(grpo["tasks"]) == {"add2", "sort", "add3", "countdown"}
    for task, greedy in final["greedy"].items():
        stage_eval, pass1 = grpo["eval"][task], greedy["metrics"]["pass@1"]
        assert greedy["settings"]["format"] == "r1" and greedy["settings"]["system_prompt"] == ""
        assert greedy["n"] == stage_eval["n"] == 20 and greedy["skipped"] == 0
        assert pass1["value"] == stage_eval["accuracy"] and pass1["ci95"] == stage_eval["ci95"], (task, final)
        sampled = final["sampled"][task]
        assert sampled["samples"] == 8 and sampled["settings"]["temperature"] == 1.0 and sampled["n"] == 20
        assert set(sampled["metrics"]) == {"pass@1", "pass@8"}
        assert sampled["metrics"]["pass@1"]["value"] <= sampled["metrics"]["pass@8"]["value"]
        for m in sampled["metrics"].values():
            assert m["ci_method"] == "bootstrap" and m["ci95"][0] <= m["value"] <= m["ci95"][1]
    # the MTP module as the final model's drafter: measured, and speculation leaves the greedy tokens as they were
    spec = final["speculation"]
    assert spec["same_output"] and spec["drafted"] > 0 and 0 <= spec["accepted"] <= spec["drafted"]
    assert len(spec["plain_tok_s"]) == len(spec["mtp_tok_s"]) == 3 and spec["speedup"] > 0
    assert "Speculative decoding with the model's own MTP module" in (out / "report.md").read_text()
    # each stage's scores are what `nanoseek eval` says of its model with the summary's command (at the CLI's
    # own batch size)
    for stage in summary["stages"]:
        command = summary["scoring"]["commands"][stage["format"]].split()
        args = [str(out / stage["name"] / "model") if w == "MODEL" else w.strip("'") for w in command[1:]]
        capsys.readouterr()
        assert main([*args, "--json"]) == 0
        scored = json.loads(capsys.readouterr().out)
        for task, e in stage["eval"].items():
            assert scored[task]["metrics"]["pass@1"]["value"] == e["accuracy"], (stage["name"], task)
    report = (out / "report.md").read_text()
    assert "## Final model" in report and "| task | pass@1 greedy | n | pass@1 sampled | pass@8 | n |" in report
    assert "| task | pretrain (r1) | sft (r1) | grpo (r1) | sft-control (r1) | chance |" in report
    assert "- **grpo** against **sft-control**:" in report
    assert "![Training loss](loss.png)" in report and "![GRPO rewards, lengths, KL](grpo.png)" in report
    assert "energy per correct answer" in report and "| stage | format | correct / asked |" in report
    said = "Trained from scratch (random initial weights, seed 7), on synthetic tasks: add2, sort, add3, countdown"
    assert said + ", with a byte-level BPE trained in the run." in report
    events = {json.loads(x)["event"] for x in (out / "metrics.jsonl").read_text().splitlines()}
    assert {"stage", "step", "eval", "summary"} <= events
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    stages = [r["name"] for r in records if r["event"] == "stage"]
    assert stages == ["pretrain", "sft", "grpo", "sft-control"]
    assert "report:" in printed and "sft-control (   r1)   add3:" in printed
    # the final model loads in nanoseek and in transformers, and both compute the same logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nanoseek

    ours = nanoseek.load(out / "model")
    ref = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(out / "model").encode("12+34=")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
    # a finished run folder is not overwritten
    assert main(["speedrun", "--out", str(out), "--minutes", "0.1", "--quiet"]) == 2


def test_report_says_what_data_and_tokenizer_the_run_used(tmp_path):
    from nanoseek.eval.report import describe_training
    from nanoseek.train.config import load_train_config
    from nanoseek.train.speedrun import training_facts

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    cfg = load_train_config(overrides=[f"data.files=[{corpus}]", f"tokenizer.path={tmp_path / 'tok'}", "seed=7"])
    assert describe_training({"training": training_facts(cfg)}) == (
        f"Trained from scratch (random initial weights, seed 7), on the given text files: corpus.txt, "
        f"with the given tokenizer ({tmp_path / 'tok'})."
    )
    tasks = load_train_config(overrides=["data.tasks=[add2,sort]"])
    assert "on synthetic tasks: add2, sort, with a byte-level BPE trained in the run" in describe_training(
        {"training": training_facts(tasks)}
    )


@pytest.mark.slow
def test_default_speedrun_every_stage_earns_its_place(tmp_path):
    """The default recipe (with the SFT control): no stage worse than the one before it on any task, the final
    model better than the pretrained one on a task pretraining leaves well short, GRPO better than more SFT for
    the same time on some task (each beyond the 95% intervals), and the run without the control within 15 min."""
    assert main(["speedrun", "--out", str(tmp_path / "full"), "--quiet", "--sft-control"]) == 0
    summary = json.loads((tmp_path / "full/summary.json").read_text())
    check_summary_shape(summary)
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["pretrain", "sft", "grpo", "sft-control"]
    verdicts = {(c["stage"], c["against"], c["task"]): c["verdict"] for c in summary["comparisons"]}
    for (stage, against, task), verdict in verdicts.items():
        if (stage, against) in (("sft", "pretrain"), ("grpo", "sft"), ("grpo", "pretrain")):
            assert verdict != "worse", (stage, against, task, stages[stage]["eval"], stages[against]["eval"])
    short = [t for t, e in stages["pretrain"]["eval"].items() if e["accuracy"] < 0.5]
    assert any(verdicts[("grpo", "pretrain", t)] == "better" for t in short), summary["comparisons"]
    assert any(v == "better" for (a, b, _), v in verdicts.items() if (a, b) == ("grpo", "sft-control"))
    assert summary["wall_s"] - stages["sft-control"]["wall_s"] <= 15 * 60, summary["wall_s"]


def test_stage_settings_and_verdicts_are_pure_functions():
    from nanoseek.train.scoring import stage_comparisons, verdict
    from nanoseek.train.speedrun import split_overrides

    pretrain, stages = split_overrides(["optim.lr=2e-3", "sft.max_steps=3", "grpo.optim.lr=1e-4", "seed=5"])
    assert pretrain == ["optim.lr=2e-3", "seed=5"]
    assert stages == {"sft": ["max_steps=3"], "grpo": ["optim.lr=1e-4"]}
    with pytest.raises(ValueError, match=r"sft.KEY=VALUE"):
        split_overrides(["sft.=3"])

    def score(k: int, n: int = 400) -> dict:
        from nanoseek.tasks import wilson_ci95

        return {"accuracy": k / n, "ci95": list(wilson_ci95(k, n)), "n": n}

    assert verdict(score(390), score(300)) == "better" and verdict(score(300), score(390)) == "worse"
    assert verdict(score(393), score(400)) == "same"  # 98.25% against 100%: the intervals touch
    stages = [
        {"name": "pretrain", "parent": None, "eval": {"add3": score(4)}},
        {"name": "sft", "parent": "pretrain", "eval": {"add3": score(380)}},
        {"name": "grpo", "parent": "sft", "eval": {"add3": score(390)}},
        {"name": "sft-control", "parent": "sft", "eval": {"add3": score(300)}},
    ]
    assert [(c["stage"], c["against"], c["verdict"]) for c in stage_comparisons(stages)] == [
        ("sft", "pretrain", "better"), ("grpo", "sft", "same"), ("sft-control", "sft", "worse"),
        ("grpo", "pretrain", "better"), ("grpo", "sft-control", "better"),
    ]  # fmt: skip
    # with per-problem verdicts, each pair is also compared problem by problem: 160 against 136 of the same 400
    # (74 solved only by grpo, 50 only by the control) overlaps as intervals but is a paired gain
    from nanoseek.eval.report import accuracy_lines

    grpo, control = score(160), score(136)
    grpo["solved"], control["solved"] = "1" * 160 + "0" * 240, "1" * 86 + "0" * 74 + "1" * 50 + "0" * 190
    rows = stage_comparisons(
        [{"name": "grpo", "eval": {"countdown": grpo}}, {"name": "sft-control", "eval": {"countdown": control}}]
    )
    assert rows[0]["verdict"] == "same" and rows[0]["paired"]["verdict"] == "better"
    assert (rows[0]["paired"]["only_stage"], rows[0]["paired"]["only_against"]) == (74, 50)
    pair = [{"name": "grpo", "format": "r1", "eval": {"countdown": grpo}},
            {"name": "sft-control", "format": "r1", "eval": {"countdown": control}}]  # fmt: skip
    text = "\n".join(accuracy_lines({"stages": pair, "comparisons": rows}))
    said = "no different on countdown (problem by problem better: 74 solved only by grpo, 50 only by sft-control"
    assert said + "; +6.0 points, 95% +0.6 to +11.4)" in text
    control["solved"] = control["solved"][:-1]  # not the same problems: no paired comparison
    assert (
        "paired"
        not in stage_comparisons(
            [{"name": "grpo", "eval": {"countdown": grpo}}, {"name": "sft-control", "eval": {"countdown": control}}]
        )[0]
    )


def test_grpo_draws_its_prompts_outside_the_runs_held_out_split():
    # a run scored on a wider held-out split (data.heldout_fraction) must not let GRPO train on those problems
    from types import SimpleNamespace

    from nanoseek.train.grpo import GRPOConfig
    from nanoseek.train.overrides import apply_overrides
    from nanoseek.train.speedrun import STAGE_PLANS, grpo_settings

    cfg = SimpleNamespace(seed=3, data=SimpleNamespace(heldout_fraction=0.25))
    ctx = SimpleNamespace(plan=STAGE_PLANS["tiny"], train_config=cfg)
    settings = grpo_settings(ctx)
    assert "heldout_fraction=0.25" in settings and "seed=3" in settings
    grpo = GRPOConfig()
    apply_overrides(grpo, settings)
    assert grpo.heldout_fraction == 0.25
