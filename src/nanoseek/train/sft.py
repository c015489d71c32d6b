"""Supervised fine-tuning: a loaded model trained on chat data, loss on the assistant's tokens only.

    result = run_sft("smollm2", "chats.jsonl", "runs/sft", ["max_steps=50", "optim.lr=5e-5"])
    result.model_dir       # <out>/model: a HF folder with tokenizer and chat template (nanoseek.load reads it)
    result.losses, result.summary

MODEL is anything `nanoseek.load` reads (a HF folder of DeepSeek-V3 or a dense family, a .gguf file, dequantized
to fp32 for training, a known name such as `smollm2`) or a model object. DATA is chat JSONL (train/chat_data.py).

It is the pretraining Trainer with three hooks replaced (the model and tokenizer come from MODEL, the batches
from the chat data, the checkpoint records what was fine-tuned on what), so checkpoints and exact resume, the
meter (tokens/s, MFU, energy, cost) and DDP/FSDP work as in pretraining. An optimizer step takes `batch_size`
conversations (all ranks and micro-batches together), packed without padding (chat_data.pack); its loss is
the mean over the step's assistant tokens. Epoch e visits the conversations in a seeded shuffled order; the
step's conversations are a pure function of (seed, step), so resuming reproduces the uninterrupted run.

`--set` takes the `nanoseek train` keys (max_steps, optim.lr, ckpt_every, seq_len, …) plus `epochs`, bare or
as the run's settings tree names them (`sft.optim.lr`, train/run_config.py); the model's own architecture is
fixed, so `model.*`, `data.*` and `tokenizer.*` keys are refused. seq_len is the longest conversation kept
(default: the model's context, at most 2048 tokens); a longer one is skipped
with a warning, never truncated (a cut reply would teach the model to stop mid-sentence).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.model.dense import DenseForCausalLM, dense_config_to_hf
from nanoseek.parallel import DistInfo, init_distributed, print0
from nanoseek.tokenizer import Tokenizer, load_tokenizer
from nanoseek.train.chat_data import Example, pack, read_conversations, tokenize_conversation
from nanoseek.train.config import PRESET_DIR, TrainConfig, load_train_config
from nanoseek.train.lora_training import SFT_DEFAULTS as LORA_DEFAULTS
from nanoseek.train.lora_training import lora_settings, with_lora
from nanoseek.train.overrides import read_config_file
from nanoseek.train.run_config import sft_split
from nanoseek.train.trainer import Trainer

DEFAULT_EPOCHS = 3
DEFAULT_MAX_CONTEXT = 2048
SFT_PRESET = PRESET_DIR / "stages" / "sft.yaml"  # fine-tuning's defaults, a layer under --set (package data)


@dataclass
class SFTResult:
    model_dir: Path  # <out>/model: HF folder with tokenizer + chat template (nanoseek.load reads it)
    steps: int
    tokens: int  # token positions processed
    energy_j: float
    wall_s: float
    losses: list[float]  # per optimizer step
    summary: dict  # the meter's summary (tok_s, mfu, energy_source, ...)
    adapter_dir: Path | None = None  # lora=True: <out>/adapter, the PEFT folder (model_dir is it unless merged)


@dataclass
class SFTPlan:
    """What a run needs besides the TrainConfig: the epochs and the kept, tokenized conversations."""

    epochs: int
    examples: list[Example]
    skipped: int
    data_digest: str  # identifies the tokenized data (a resume must see the same)


# ---- configuration ------------------------------------------------------------------------------------
def sft_config(overrides: Sequence[str], out: str | os.PathLike, device: str, model_max_len: int) -> tuple[
    TrainConfig, int, set[str]
]:  # fmt: skip
    """The TrainConfig of a fine-tuning run (SFT defaults < --set), its epochs, and the keys set by hand."""
    rest, epochs, keys = sft_split(overrides)  # `epochs` is SFT's own key; `sft.KEY` is KEY
    base = {
        **read_config_file(SFT_PRESET),
        "out_dir": str(out),
        "device": device,
        "seq_len": min(model_max_len, DEFAULT_MAX_CONTEXT),
        # bf16 autocast on a GPU; the CPU stays fp32 (low-precision matmuls are slower there)
        "dtype": "bfloat16" if device.startswith("cuda") else "float32",
    }
    cfg = load_train_config(None, overrides=rest, base=base, check_model=False)
    if cfg.seq_len > model_max_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's context ({model_max_len} positions)")
    return cfg, epochs if epochs is not None else DEFAULT_EPOCHS, keys


def plan_steps(cfg: TrainConfig, n_conversations: int, epochs: int, keys: set[str]) -> None:
    """max_steps from the epochs unless set; warmup 5% of the steps unless set (in place)."""
    if "max_steps" not in keys:
        cfg.max_steps = max(1, math.ceil(epochs * n_conversations / cfg.batch_size))
    if "optim.warmup_steps" not in keys:
        cfg.optim.warmup_steps = max(1, round(0.05 * cfg.max_steps))


# ---- data ---------------------------------------------------------------------------------------------
def prepare_examples(tok: Tokenizer, data, seq_len: int) -> tuple[list[Example], int]:
    """Read, check and tokenize every conversation (all errors before training starts); skip, with a
    warning, the ones longer than seq_len."""
    convs = read_conversations(data)
    examples, skipped = [], []
    for conv in convs:
        ex = tokenize_conversation(tok, conv)
        if ex.length > seq_len:
            skipped.append(f"{conv.where} ({ex.length} tokens)")
        elif ex.n_targets == 0:
            raise ValueError(f"{conv.where}: the assistant turns render to no tokens (nothing to learn from)")
        else:
            examples.append(ex)
    if skipped:
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        warnings.warn(
            f"skipped {len(skipped)} conversation(s) longer than seq_len={seq_len} tokens: {shown} "
            f"(raise --set seq_len=N, up to the model's context, to keep them)",
            stacklevel=2,
        )
    if not examples:
        raise ValueError(f"no conversation fits seq_len={seq_len} tokens; nothing to train on")
    return examples, len(skipped)


def data_digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.ids, e.assistant)).encode())
    return h.hexdigest()[:16]


class ChatBatchSource:
    """Step s takes conversations s*B … s*B+B-1 of the endless sequence epoch 0 order, epoch 1 order, …
    (each a seeded shuffle). Rank r takes every world_size-th of them, split round-robin over grad_accum
    micro-batches, each packed into rows as long as the step's longest conversation."""

    def __init__(self, examples: Sequence[Example], cfg: TrainConfig, info: DistInfo, pad_id: int):
        if cfg.batch_size < info.world_size * cfg.grad_accum:
            raise ValueError(
                f"batch_size={cfg.batch_size} conversations cannot feed {info.world_size} process(es) x "
                f"{cfg.grad_accum} micro-batch(es); raise batch_size"
            )
        self.examples, self.cfg, self.info, self.pad_id = list(examples), cfg, info, pad_id
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(f"sft/{self.cfg.seed}/{epoch}").shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time is all a step needs (plus the next)
        return self._orders[epoch]

    def step_indices(self, step: int) -> list[int]:
        n, bs = len(self.examples), self.cfg.batch_size
        out = []
        for k in range(step * bs, (step + 1) * bs):
            out.append(self._order(k // n)[k % n])
        return out

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        chosen = [self.examples[i] for i in self.step_indices(step)]
        capacity = max(e.length for e in chosen)  # the same on every rank
        mine = chosen[self.info.rank :: self.info.world_size]
        micro = [mine[m :: self.cfg.grad_accum] for m in range(self.cfg.grad_accum)]
        return [pack(group, capacity, self.pad_id).as_micro_batch() for group in micro]

    def state_dict(self) -> Any:
        return {"kind": "chat", "n_examples": len(self.examples)}  # the position is the step itself

    def load_state_dict(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("n_examples") != len(self.examples):
            raise ValueError("the checkpoint was trained on other chat data (different conversation count)")


# ---- the trainer --------------------------------------------------------------------------------------
def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class SFTTrainer(Trainer):
    """The Trainer, starting from a loaded model and training on packed chat batches."""

    builds_model = False

    def __init__(self, cfg: TrainConfig, model: nn.Module, tok: Tokenizer, plan: SFTPlan, source_name: str, **kw):
        self._initial_model, self._tok, self.plan, self.source_name = model, tok, plan, source_name
        super().__init__(cfg, **kw)

    def _prepare_tokenizer(self) -> Tokenizer:
        return self._tok

    def _build_model(self) -> nn.Module:
        model = self._initial_model
        if isinstance(model, DeepseekV3ForCausalLM) and self.cfg.mtp_weight == 0 and len(model.mtp):
            print0(f"mtp_weight=0: the model's {len(model.mtp)} MTP module(s) are not trained")
            for p in model.mtp.parameters():
                p.requires_grad_(False)
        return model.float().train()  # fp32 master weights (GGUF/bf16 sources are upcast); autocast on GPU

    def _make_source(self) -> ChatBatchSource:
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        return ChatBatchSource(self.plan.examples, self.cfg, self.info, pad)

    def _make_tasks(self) -> list:
        return []

    def _describe_model(self) -> str:
        return f"{type(self.model).__name__} {_param_count(self.model) / 1e6:.2f}M params (fine-tuning)"

    def _flops_per_token(self) -> float:
        mean_len = sum(e.length for e in self.plan.examples) / len(self.plan.examples)
        cfg = self.model.config
        if isinstance(self.model, DeepseekV3ForCausalLM):
            return cfg.flops_per_token(max(1, round(mean_len)))
        # 2 FLOPs per matmul weight (the embedding is a lookup; a tied head still multiplies) plus attention
        # scores and values over half the mean conversation on average (causal), x3 for forward + backward.
        matmul = _param_count(self.model) - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
        attn = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * 2 * cfg.head_dim * mean_len / 2
        return 3 * (2 * matmul + attn)

    def _config_record(self) -> dict[str, Any]:
        return {
            **self.cfg.to_dict(),
            "sft": {"model": self.source_name, "epochs": self.plan.epochs, "data": self.plan.data_digest},
        }


# ---- entry point --------------------------------------------------------------------------------------
def load_for_training(model: str | os.PathLike | nn.Module, tokenizer=None) -> tuple[nn.Module, Tokenizer, str]:
    """(model in fp32 on the CPU, its tokenizer, a name for the checkpoint record)."""
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer (tokenizer=...)")
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        return model, tok, type(model).__name__
    import nanoseek
    from nanoseek.assets import resolve_model

    path = resolve_model(str(model))
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer or path)
    loaded = nanoseek.load(path, dtype="float32")  # GGUF weights come back dequantized
    return loaded, tok, str(model)


def check_trainable(model: nn.Module, tok: Tokenizer) -> int:
    """The model's context length; clear errors for what fine-tuning cannot handle."""
    if not isinstance(model, DeepseekV3ForCausalLM | DenseForCausalLM):
        raise ValueError(f"cannot fine-tune a {type(model).__name__}: DeepSeek-V3 and the dense families only")
    if not tok.chat_template:
        raise ValueError(f"{tok.source}: the tokenizer has no chat template, which SFT renders the data with")
    if isinstance(model, DenseForCausalLM):
        dense_config_to_hf(model.config)  # a model that could not be exported fails now, not after training
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}")
    return int(model.config.max_position_embeddings)


def prepare_sft(
    model: str | os.PathLike | nn.Module,
    data: str | os.PathLike | Sequence[dict],
    out: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    tokenizer=None,
    show_progress: bool = True,
    device: str = "cpu",
    resume: bool = False,
    parallel: str = "auto",
    stop_after: int | None = None,
    tune_threads: bool = False,
    lora: bool = False,
    merge: bool = False,
) -> SFTTrainer:
    """Everything run_sft does before training: load and check the model, the settings and all the data
    (every error is raised here), and build the trainer. `.train()` runs it.

    resume: continue from out/checkpoints (same model, data and settings; max_steps may change).
    parallel: auto | none | ddp | fsdp, as `nanoseek train`. stop_after: end after that many steps without
    the final checkpoint and export, as an interrupted run would (for resume tests). tune_threads: on CPU,
    keep switching to the faster of 1 thread and all threads (the Trainer's ThreadTuner, as the speedrun does).
    lora: train a LoRA adapter on the frozen model (train/lora_training.py; `lora.*` settings) into
    <out>/adapter, a PEFT folder (model_dir is that folder); merge: also write <out>/model, the model with the
    adapter folded in (model_dir then)."""
    overrides, lora_cfg = lora_settings(overrides, "sft", lora, LORA_DEFAULTS)
    if merge and not lora:
        raise ValueError("--merge folds a LoRA adapter into the model: it needs --lora")
    net, tok, name = load_for_training(model, tokenizer)
    context = check_trainable(net, tok)
    cfg, epochs, keys = sft_config(overrides, out, device, context)
    examples, skipped = prepare_examples(tok, data, cfg.seq_len)
    plan_steps(cfg, len(examples), epochs, keys)
    plan = SFTPlan(epochs, examples, skipped, data_digest(examples))
    info = init_distributed(cfg.device)
    n_targets = sum(e.n_targets for e in examples)
    print0(
        f"sft: {len(examples)} conversations ({skipped} skipped), {n_targets} assistant tokens, "
        f"{cfg.max_steps} steps of {cfg.batch_size} conversations, lr {cfg.optim.lr:g}"
    )
    kw = dict(parallel=parallel, resume=resume, show_progress=show_progress, info=info, stop_after=stop_after,
              tune_threads=tune_threads)  # fmt: skip
    if lora_cfg is None:
        return SFTTrainer(cfg, net, tok, plan, name, **kw)
    base = str(Path(name).resolve()) if Path(name).exists() else name
    return with_lora(SFTTrainer)(cfg, net, tok, plan, name, lora=lora_cfg, merge=merge, base_name=base, **kw)


def run_sft(
    model: str | os.PathLike | nn.Module,
    data: str | os.PathLike | Sequence[dict],
    out: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    metrics_path: os.PathLike | None = None,
    **kw: Any,
) -> SFTResult:
    """Fine-tune `model` on `data` into `out` (see the module docstring; the keywords are prepare_sft's). A
    model object is trained in place. Bad input (data, --set keys, a model that cannot be fine-tuned) raises
    ValueError before training."""
    trainer = prepare_sft(model, data, out, overrides, **kw)
    trainer.metrics_mirror = Path(metrics_path) if metrics_path is not None else None
    result = trainer.train()
    s = result.summary
    return SFTResult(
        model_dir=result.model_dir or Path(out) / "model",
        steps=result.steps,
        tokens=int(s.get("tokens", 0)),
        energy_j=float(s.get("energy_j", 0.0)),
        wall_s=float(s.get("wall_s", 0.0)),
        losses=result.losses,
        summary=s,
        adapter_dir=getattr(trainer, "adapter_dir", None),
    )
