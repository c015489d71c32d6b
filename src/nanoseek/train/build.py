"""Building blocks of a pretraining run: its tasks, tokenizer, model and optimizer, from a TrainConfig.

tok = prepare_tokenizer(cfg, out_dir, info)      # cfg.tokenizer.path, or one trained on the run's data
model = build_model(cfg, tok)                    # the DeepseekV3ForCausalLM of cfg.model, seeded
opt = build_optimizer(model, cfg, device)        # AdamW, no weight decay on norms, biases, embeddings
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.parallel import DistInfo, barrier, print0
from nanoseek.tasks import Task, get_task
from nanoseek.tokenizer import Tokenizer, load_tokenizer
from nanoseek.train.config import TrainConfig
from nanoseek.train.data import iter_texts
from nanoseek.train.tokenizer import train_tokenizer


def build_tasks(cfg: TrainConfig) -> list[Task]:
    return [get_task(name, heldout_fraction=cfg.data.heldout_fraction) for name in cfg.data.tasks]


def tokenizer_texts(cfg: TrainConfig, n: int):
    """Texts to train the tokenizer on: task samples (training split) or the first documents of the files."""
    if cfg.data.files:
        yield from iter_texts(cfg.data.files, cfg.data.text_field, limit=n)  # in corpus order
        return
    import random

    rng = random.Random(f"tokenizer/{cfg.seed}")
    tasks = build_tasks(cfg)
    for _ in range(n):
        ex = rng.choice(tasks).generate(rng, "train")
        yield ex.prompt + ex.answer


def prepare_tokenizer(cfg: TrainConfig, out_dir: Path, info: DistInfo) -> Tokenizer:
    """cfg.tokenizer.path, else the run's own tokenizer (out_dir/tokenizer), trained by rank 0 if missing."""
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
        tok.special_ids()  # a clear error now if it lacks bos/eos/pad, not a failure in the first batch
        return tok
    folder = out_dir / "tokenizer"
    if info.is_main and not (folder / "tokenizer.json").is_file():
        tok = train_tokenizer(tokenizer_texts(cfg, cfg.tokenizer.train_texts), vocab_size=cfg.tokenizer.vocab_size)
        tok.save(folder)
    barrier()
    return load_tokenizer(folder)


def build_model(cfg: TrainConfig, tok: Tokenizer) -> DeepseekV3ForCausalLM:
    bos, eos, pad = tok.special_ids()
    mc = cfg.model_config(vocab_size=tok.vocab_size).replace(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if cfg.seq_len > mc.max_position_embeddings:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds max_position_embeddings={mc.max_position_embeddings}")
    if cfg.mtp_weight == 0 and mc.num_nextn_predict_layers:
        # No loss would reach the MTP modules: DDP fails on parameters that get no gradient, and the exported
        # model would carry MTP weights that were never trained. So there are none.
        print0(f"mtp_weight=0: training without the {mc.num_nextn_predict_layers} MTP module(s)")
        mc = mc.replace(num_nextn_predict_layers=0)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run
    return DeepseekV3ForCausalLM(mc)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norms, biases or embeddings (nor a head tied to them)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kernel
    )
