import math

import pytest
import torch

from nanoseek.model.config import ConfigError
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.model.moe import GroupedExperts
from nanoseek.train.config import PRESETS, TrainConfig, load_train_config, lr_at


def real_param_counts(mc) -> tuple[int, float]:
    """(total, active per token) counted on the built model (on the meta device: no memory), not from the
    config's formula: every parameter once (tied ones too), minus the routed experts a token does not use."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(mc, init=False)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    routed = sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in model.modules() if isinstance(m, GroupedExperts))
    unused = (mc.n_routed_experts - mc.num_experts_per_tok) / mc.n_routed_experts
    return total, total - routed * unused


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_are_the_models_real_counts(name):
    """The counts the trainer prints and the report states (config.param_counts) are the built model's."""
    cfg = load_train_config(preset=name)
    for vocab in (cfg.tokenizer.vocab_size, 300):  # a trained tokenizer may come out smaller than asked
        mc = cfg.model_config(vocab_size=vocab)
        total, active = real_param_counts(mc)
        counts = mc.param_counts()
        assert (counts["total"], counts["active"]) == (total, active)
        assert counts["embedding"] == vocab * mc.hidden_size


def test_presets_build_valid_model_configs():
    tiny = load_train_config(preset="tiny")
    assert tiny.device == "cpu" and tiny.dtype == "float32"
    assert 0.5e6 < tiny.model_config(384).param_counts()["total"] < 5e6  # a few-minute CPU model
    assert load_train_config(preset="gpt2-small-moe").dtype == "bfloat16"


def test_toml_yaml_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'preset = "tiny"\nbatch_size = 64\n[model]\nhidden_size = 96\n[optim]\nlr = 1e-3\nschedule = "wsd"\n'
        '[data]\ntasks = ["add2", "sort"]\n'
    )
    cfg = load_train_config(toml, overrides=["optim.lr=3e-4", "seq_len=48", "compile=true", "data.tasks=[add3]"])
    assert cfg.batch_size == 64 and cfg.seq_len == 48 and cfg.compile is True
    assert cfg.optim.lr == 3e-4 and cfg.optim.schedule == "wsd"
    assert cfg.data.tasks == ["add3"]
    assert cfg.model.overrides["hidden_size"] == 96
    assert cfg.model_config(384).hidden_size == 96
    yaml = tmp_path / "run.yaml"
    yaml.write_text("batch_size: 8\ntime_budget_min: 2\noptim:\n  warmup_steps: 5\n")
    cfg = load_train_config(yaml, overrides=["time_budget_min=none"])
    assert cfg.batch_size == 8 and cfg.optim.warmup_steps == 5 and cfg.time_budget_min is None
    assert isinstance(load_train_config(yaml).time_budget_min, float)
    # YAML numbers in exponent form are numbers, as in TOML (PyYAML alone reads `1e-08` as a string)
    yaml.write_text("optim:\n  eps: 1e-08\n  lr: 3e-4\n  warmup_steps: 5\nseed: 12\n")
    cfg = load_train_config(yaml)
    assert (cfg.optim.eps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.seed) == (1e-08, 3e-4, 5, 12)


def test_unknown_keys_name_the_key_and_suggest(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.lrr'.*did you mean 'lr'"):
        load_train_config(overrides=["optim.lrr=1"])
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_sise = 4\n")
    with pytest.raises(ValueError, match=r"bad\.toml: unknown config key 'batch_sise'.*'batch_size'"):
        load_train_config(bad)
    with pytest.raises(ValueError, match=r"unknown model field 'model\.hidden_sise'.*'hidden_size'"):
        load_train_config(overrides=["model.hidden_sise=4"])
    with pytest.raises(ValueError, match="unknown preset 'tinny'.*'tiny'"):
        load_train_config(preset="tinny")


def test_type_errors_and_bad_values():
    with pytest.raises(ValueError, match="batch_size must be an integer, got 'abc'"):
        load_train_config(overrides=["batch_size=abc"])
    with pytest.raises(ValueError, match="compile must be true or false"):
        load_train_config(overrides=["compile=maybe"])
    with pytest.raises(ValueError, match="optim.schedule must be one of cosine, wsd, constant"):
        load_train_config(overrides=["optim.schedule=linear"])
    with pytest.raises(ValueError, match="batch_size must be positive"):
        load_train_config(overrides=["batch_size=0"])
    with pytest.raises(ValueError, match="must look like key=value"):
        load_train_config(overrides=["batch_size"])
    with pytest.raises(ValueError, match="unknown task 'add'"):
        load_train_config(overrides=["data.tasks=[add]"])
    with pytest.raises(ValueError, match="seq_len=4096 exceeds"):
        load_train_config(preset="tiny", overrides=["seq_len=4096"])


def test_impossible_model_shapes_are_clear():
    with pytest.raises(ConfigError, match=r"model config.*n_group=3 must divide n_routed_experts=8"):
        load_train_config(preset="tiny", overrides=["model.n_group=3"])
    with pytest.raises(ConfigError, match=r"num_experts_per_tok=9 must lie in \[1, n_routed_experts=8\]"):
        load_train_config(preset="tiny", overrides=["model.num_experts_per_tok=9"])
    with pytest.raises(ConfigError, match="qk_rope_head_dim must be even"):
        load_train_config(preset="tiny", overrides=["model.qk_rope_head_dim=15"])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml: config file not found"):
        load_train_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("batch_size = = 3")
    with pytest.raises(ValueError, match="broken.toml: not valid TOML"):
        load_train_config(broken)


def test_lr_schedules():
    cfg = TrainConfig()
    cfg.max_steps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio = 100, 1.0, 10, 0.1
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    cfg.optim.schedule, cfg.optim.decay_fraction = "wsd", 0.2
    assert lr_at(50, cfg) == 1.0 and lr_at(79, cfg) == 1.0
    assert lr_at(90, cfg) == pytest.approx(1.0 - 0.9 * 0.5)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(50, cfg, total_steps=50) == pytest.approx(0.1)


def test_to_dict_roundtrip():
    import json

    from nanoseek.train.config import train_config_from_dict

    cfg = load_train_config(preset="tiny", overrides=["model.hidden_size=96", "optim.lr=1e-3"])
    again = train_config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown config key 'bogus'"):
        train_config_from_dict({**cfg.to_dict(), "bogus": 1})


def test_run_config_one_grammar_for_every_command():
    """The run's tree (train/run_config.py): each command reads its section's keys bare or prefixed, and the
    stages' keys are checked when the run's settings are read (a typo fails before pretraining)."""
    from nanoseek.train.grpo import load_grpo_config
    from nanoseek.train.run_config import load_run_config
    from nanoseek.train.sft import sft_config

    assert load_grpo_config(["grpo.max_steps=20", "grpo.optim.lr=1e-4"]) == load_grpo_config(
        ["max_steps=20", "optim.lr=1e-4"]
    )
    bare, prefixed = (
        sft_config(["optim.lr=1e-3", "epochs=2"], "o", "cpu", 128),
        sft_config(["sft.optim.lr=1e-3", "sft.epochs=2"], "o", "cpu", 128),
    )
    assert bare[:2] == prefixed[:2]
    run = load_run_config(preset="tiny", overrides=["seed=3", "sft.optim.lr=2e-3", "grpo.max_steps=20"])
    assert run.train == load_train_config(preset="tiny", overrides=["seed=3"])
    assert (run.sft, run.grpo) == (["optim.lr=2e-3"], ["max_steps=20"])
    assert run.grpo_config().max_steps == 20
    with pytest.raises(ValueError, match=r"unknown config key 'max_stepz' \(did you mean 'max_steps'\?\)"):
        load_run_config(overrides=["grpo.max_stepz=20"])
    with pytest.raises(ValueError, match=r"optim\.lr must be a number"):
        load_run_config(overrides=["sft.optim.lr=fast"])
    with pytest.raises(ValueError, match=r"model\.\* settings do not apply to fine-tuning"):
        load_run_config(overrides=["sft.model.hidden_size=8"])
    with pytest.raises(ValueError, match=r"unknown config key 'grpoo' \(did you mean 'grpo'\?\)"):
        load_run_config(overrides=["grpoo.max_steps=20"])


def test_presets_are_package_files():
    """Presets ship as YAML files in the package (pyproject's package-data takes train/presets/*.yaml)."""
    import tomllib
    from pathlib import Path

    import nanoseek.train

    folder = Path(nanoseek.train.__file__).parent / "presets"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(PRESETS)
    root = Path(__file__).parents[1]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "presets/*.yaml" in package_data["nanoseek.train"]


def test_eval_section_and_its_old_spellings(tmp_path):
    """`eval.*` is one typed section of the tree (pretraining's and GRPO's), checked when the settings are read;
    the old keys (data.eval_examples and eval_every; GRPO's eval_examples and eval_every) are aliases of it, on the
    command line and in files, and an old checkpoint's config record still loads."""
    from nanoseek.train.config import train_config_from_dict
    from nanoseek.train.grpo import load_grpo_config
    from nanoseek.train.run_config import load_run_config

    new = load_train_config(preset="tiny", overrides=["eval.examples=50", "eval.every=20"])
    assert (new.eval.examples, new.eval.every) == (50, 20)
    old = load_train_config(preset="tiny", overrides=["data.eval_examples=50", "eval_every=20"])
    assert old == new and "eval_examples" not in old.to_dict()["data"] and "eval_every" not in old.to_dict()
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  tasks: [add2, sort]\n  eval_examples: 50\neval_every: 20\n")
    from_file = load_train_config(path, preset="tiny")
    assert (from_file.eval.examples, from_file.eval.every, from_file.data.tasks) == (50, 20, ["add2", "sort"])
    record = new.to_dict()
    record["data"]["eval_examples"], record["eval_every"] = record.pop("eval")["examples"], 20
    assert train_config_from_dict(record) == new
    run = load_run_config(preset="tiny", overrides=["eval.examples=7", "eval_every=5", "grpo.eval.examples=0"])
    assert (run.train.eval.examples, run.train.eval.every, run.grpo_config().eval.examples) == (7, 5, 0)
    old_grpo = load_grpo_config(["eval_examples=3", "eval_every=2"])
    assert old_grpo == load_grpo_config(["eval.examples=3", "eval.every=2"])
    with pytest.raises(ValueError, match=r"unknown config key 'eval\.exampels' \(did you mean 'examples'\?\)"):
        load_run_config(overrides=["eval.exampels=3"])
    with pytest.raises(ValueError, match=r"eval\.every must be >= 0"):
        load_train_config(overrides=["eval_every=-1"])
    with pytest.raises(ValueError, match=r"eval\.temperature must be > 0"):
        load_grpo_config(["grpo.eval.temperature=0"])
    with pytest.raises(ValueError, match=r"unknown config key 'eval_examples'"):  # GRPO's alias, not pretraining's
        load_train_config(overrides=["eval_examples=3"])


def test_stage_defaults_are_package_files():
    """SFT's defaults are a preset file (train/presets/stages/sft.yaml, package data), not a preset of its own."""
    import tomllib
    from pathlib import Path

    from nanoseek.train.sft import SFT_PRESET, sft_config

    assert SFT_PRESET.is_file() and "sft" not in PRESETS
    root = Path(__file__).parents[1]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "presets/stages/*.yaml" in package_data["nanoseek.train"]
    cfg, epochs, _ = sft_config([], "out", "cpu", 128)
    o = cfg.optim
    assert (cfg.batch_size, o.lr, o.weight_decay, o.min_lr_ratio, o.schedule) == (8, 2e-5, 0.0, 0.1, "cosine")
    assert (cfg.ckpt_every, cfg.log_every, cfg.mtp_weight, epochs) == (100, 1, 0.3, 3)
