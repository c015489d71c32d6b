"""Numbers written in prose (README, docstrings, comments) are computed here from the code they describe,
so a change to a config or a preset that makes one stale fails a test instead of misleading a reader."""

from __future__ import annotations

from pathlib import Path

from nanoseek.model.config import DeepseekV3Config

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
MLA_DOC = (ROOT / "src/nanoseek/model/mla.py").read_text()
# the tiny preset (presets/tiny.yaml) states its parameter counts
TRAIN_CONFIG = (ROOT / "src/nanoseek/train/presets/tiny.yaml").read_text()


def mla_cache_values_per_token_layer(cfg: DeepseekV3Config) -> tuple[int, int]:
    """(latent cache: c_kv + k_pe, expanded per-head keys and values an MHA cache would hold)."""
    H = cfg.num_attention_heads
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    expanded = H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + H * cfg.v_head_dim
    return latent, expanded


def test_mla_cache_sizes_in_readme_and_docstring_are_v3s():
    latent, expanded = mla_cache_values_per_token_layer(DeepseekV3Config())  # the defaults are V3's
    assert (latent, expanded) == (576, 40960)
    assert f"{latent} for V3, against {expanded:,} for the expanded keys and values" in README
    assert f"V3: {latent} values instead" in MLA_DOC and f"= {expanded:,})" in MLA_DOC


def test_tiny_preset_and_speedrun_parameter_counts_in_prose():
    from nanoseek.train.build import tokenizer_texts
    from nanoseek.train.config import load_train_config
    from nanoseek.train.speedrun import SpeedrunOptions, speedrun_config
    from nanoseek.train.tokenizer import train_tokenizer

    tiny = load_train_config(preset="tiny")
    at_preset_vocab = tiny.model_config(vocab_size=tiny.tokenizer.vocab_size).param_counts()["total"]
    assert f"{at_preset_vocab / 1e6:.2f}M params with a {tiny.tokenizer.vocab_size}-token vocab" in TRAIN_CONFIG
    # The speedrun's model is sized by the tokenizer it trains (fewer tokens than asked: few merges).
    run = speedrun_config(SpeedrunOptions(out=Path("unused")), Path("unused"))
    tok = train_tokenizer(tokenizer_texts(run, run.tokenizer.train_texts), vocab_size=run.tokenizer.vocab_size)
    speedrun_params = run.model_config(vocab_size=tok.vocab_size).param_counts()["total"]
    assert f"stops at {tok.vocab_size} tokens, giving {speedrun_params / 1e6:.2f}M" in TRAIN_CONFIG
    assert f"pretrains a {speedrun_params / 1e6:.2f}M-parameter" in README
