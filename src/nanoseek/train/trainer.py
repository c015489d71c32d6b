"""The training loop: a DeepSeek-V3 model from a TrainConfig, trained on synthetic tasks or text files.

    result = Trainer(cfg, parallel="auto", resume=False).train()
    result.losses, result.eval, result.summary, result.model

One optimizer step:
  1. lr from the schedule (warmup + cosine | WSD; a time-budgeted run fixes its step count after a few
     measured steps and keeps it in the checkpoint, so a resumed run follows the same schedule),
  2. grad_accum micro-batches, forward + backward; the gradient all-reduce runs on the last one only,
  3. gradient clipping, AdamW (foreach on CPU, fused on CUDA; no weight decay on norms, biases, embeddings),
  4. the aux-loss-free router-bias update from the step's expert loads (summed over ranks), whose load
     statistics go to the meter,
  5. periodic evaluation and atomic checkpoints.

Losses are normalised by the number of target tokens in the whole step (all micro-batches, all ranks)
rather than averaged per micro-batch, so the gradient is the same for any split of the same global batch:
1 process x 8 rows, 2 processes x 4 rows, or 1 process x 4 rows x 2 accumulation steps.

For synthetic tasks every rank draws the same global batch (a pure function of seed and step) and takes
its own slice; the loss curve then does not depend on the number of processes. Rows are cut to the
longest example of the global batch (one example per row leaves most of seq_len as padding).

Exact resume: the checkpoint holds model and optimizer state, router biases (model buffers), the data
position, RNG states and the planned step count; a resumed run reproduces the uninterrupted losses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.eval.held_out import TaskScore, evaluate_in_format, evaluate_tasks
from nanoseek.meter import Meter
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.model.fused import clear_fused_weights
from nanoseek.model.moe import load_imbalance, update_router_bias
from nanoseek.parallel import (
    MODES,
    DistInfo,
    all_reduce_sum,
    init_distributed,
    no_grad_sync,
    parallelize,
    print0,
)
from nanoseek.tasks import Task
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import checkpoint as ckpt_io
from nanoseek.train.batches import BatchSource
from nanoseek.train.budget import StepBudget
from nanoseek.train.build import build_model, build_optimizer, build_tasks, prepare_tokenizer
from nanoseek.train.config import TrainConfig, lr_at
from nanoseek.train.objective import NextTokenLoss, diverged_message
from nanoseek.train.thread_tuner import ThreadTuner


@dataclass
class TrainResult:
    model: DeepseekV3ForCausalLM  # unwrapped, on the training device (rank 0: complete weights)
    tokenizer: Tokenizer
    losses: list[float]  # training loss of each step run by this process (global, identical on all ranks)
    steps: int  # optimizer steps completed in total (including those before a resume)
    summary: dict[str, Any]  # the meter's summary
    eval: dict[str, TaskScore] = field(default_factory=dict)
    out_dir: Path | None = None
    model_dir: Path | None = None


# ---- building blocks ------------------------------------------------------------------------------------
def _on_device(batch: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A micro-batch (x, y) or (x, y, extra forward kwargs) on `device`, as (x, y, kwargs)."""
    x, y, *rest = batch
    extra = {k: v.to(device) for k, v in (rest[0] if rest else {}).items()}
    return x.to(device), y.to(device), extra


# ---- the trainer ----------------------------------------------------------------------------------------
class Trainer:
    """Pretraining from a config. The set-up is split into hooks (`_prepare_tokenizer`, `_build_model`,
    `_make_source`, `_make_objective`, `_make_tasks`, `_describe_model`, `_flops_per_token`, `_config_record`,
    `_resume_may_change`, `_checkpoint_extra`, `_load_model_state`, `_write_model_files`) that fine-tuning
    (train/sft.py), logit distillation, GRPO and LoRA (train/lora_training.py) override to start from a loaded
    model with their own batches and loss; GRPO also replaces `_train_step` (rollouts, then mu updates, each
    through `_backward` and `_update`) and `evaluate`."""

    builds_model = True  # the model comes from cfg.model (False: from elsewhere; cfg.model is not checked)
    evaluates_first = False  # also evaluate before the first step (eval_before)
    metrics_mirror: Path | None = None  # also append the meter's records to this file

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        parallel: str = "auto",
        resume: bool = False,
        show_progress: bool = True,
        info: DistInfo | None = None,
        stop_after: int | None = None,
        tune_threads: bool = False,
        evaluate_at_end: bool = True,
    ):
        """parallel: auto (ddp under torchrun, none otherwise) | none | ddp | fsdp.
        stop_after: end the run after this many steps in total without the end-of-run work (final checkpoint,
        evaluation, export), as if the process were stopped there (for resume tests).
        tune_threads: on CPU, keep switching to the faster of 1 thread and all threads (ThreadTuner); float
        results then depend on timing, so it is off unless asked for (the speedrun asks).
        evaluate_at_end=False: no held-out evaluation after the last step (the speedrun scores the exported model
        itself, as `nanoseek eval` does: train/scoring.py)."""
        cfg.validate(check_model=self.builds_model)
        self.cfg = cfg
        self.info = info or init_distributed(cfg.device)
        if parallel == "auto":
            parallel = "ddp" if self.info.distributed else "none"
        if parallel not in MODES:
            raise ValueError(f"parallel must be auto or one of {', '.join(MODES)}, got {parallel!r}")
        self.parallel = parallel
        self.resume = resume
        self.show_progress = show_progress
        self.stop_after = stop_after
        self.evaluate_at_end = evaluate_at_end
        self.tuner = ThreadTuner() if tune_threads and self.info.device.type == "cpu" else None
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        device = self.info.device
        self.autocast_dtype = None
        if device.type == "cuda" and cfg.dtype != "float32":
            self.autocast_dtype = getattr(torch, cfg.dtype)
        elif device.type == "cpu" and cfg.dtype != "float32":
            print0(f"dtype {cfg.dtype} ignored on CPU: low-precision matmuls are far slower there; using float32")

    # -- set-up ------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, info = self.cfg, self.info
        existing = ckpt_io.list_checkpoints(self.ckpt_dir)
        if existing and not self.resume:
            raise ValueError(
                f"{self.ckpt_dir} already holds checkpoints ({existing[-1].name}); pass --resume to continue "
                f"that run or choose another out_dir"
            )
        self.checkpoint = None
        if self.resume:
            # Checked before anything is built: a checkpoint of another config is an error, not a surprise.
            self.checkpoint = ckpt_io.load_latest(
                self.ckpt_dir, train_config=self._config_record(), may_change=self._resume_may_change()
            )
            if self.checkpoint is None:
                print0(f"no checkpoint in {self.ckpt_dir}: starting from scratch")
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tok = self._prepare_tokenizer()
        model = self._build_model()
        if self.checkpoint is not None:
            self._load_model_state(model, self.checkpoint.model_state)
        self.model = model.to(info.device)
        if hasattr(self.model, "init_buffers"):
            self.model.init_buffers(info.device)
        self.step_module = parallelize(self.model, self.parallel, info=info, compile=cfg.compile)
        self.optimizer = build_optimizer(self.model, cfg, info.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.source = self._make_source()
        self.objective = self._make_objective()
        self.tasks = self._make_tasks()
        self.start_step = 0
        self.planned_steps = cfg.max_steps if cfg.time_budget_min is None else None
        self.elapsed_before = 0.0
        if self.checkpoint is not None:
            c = self.checkpoint
            ckpt_io.load_optimizer_state(self.model, self.optimizer, c.optimizer_state)
            self.source.load_state_dict(c.data_state)
            if c.rng_state is not None:
                ckpt_io.restore_rng_state(c.rng_state)
            if c.scheduler_state and cfg.time_budget_min is not None:  # keep the plan the run made
                self.planned_steps = c.scheduler_state.get("planned_steps")
            self.elapsed_before = float(c.extra.get("train_s", 0.0))
            self.start_step = c.step
            print0(f"resumed from {c.path} at step {c.step}")
            if c.step >= cfg.max_steps:
                print0(f"the run already reached max_steps={cfg.max_steps}; raise it (--set max_steps=N) to go on")

    # -- hooks (overridden by fine-tuning) -------------------------------------------------------------------
    def _prepare_tokenizer(self) -> Tokenizer:
        return prepare_tokenizer(self.cfg, self.out_dir, self.info)

    def _build_model(self) -> nn.Module:
        return build_model(self.cfg, self.tok)

    def _make_source(self):
        """This rank's batches: `.batches(step)` -> micro-batches (x, y) or (x, y, extra forward kwargs)."""
        return BatchSource(self.cfg, self.tok, self.info)

    def _make_objective(self):
        """The loss of a micro-batch (NextTokenLoss's interface)."""
        depth = len(getattr(self.model, "mtp", ())) if self.cfg.mtp_weight > 0 else 0
        return NextTokenLoss(self.cfg.mtp_weight, self.cfg.balance_alpha, depth)

    def _make_tasks(self) -> list[Task]:
        return build_tasks(self.cfg) if not self.cfg.data.files else []

    def _describe_model(self) -> str:
        counts = self.model.config.param_counts()
        return f"{counts.get('total', 0) / 1e6:.2f}M params ({counts.get('active', 0) / 1e6:.2f}M active)"

    def _flops_per_token(self) -> float:
        return self.model.config.flops_per_token(self.cfg.seq_len)

    def _config_record(self) -> dict[str, Any]:
        """What a checkpoint records as the run's config, and what a resume must match."""
        return self.cfg.to_dict()

    def _resume_may_change(self) -> frozenset[str]:
        """The config fields a resume may change."""
        return ckpt_io.RESUME_MAY_CHANGE

    def _checkpoint_extra(self) -> dict[str, Any]:
        """More for a checkpoint's extra record (what a resume checks besides the config)."""
        return {}

    def _load_model_state(self, model: nn.Module, state: dict) -> None:
        """Put a checkpoint's model state into the freshly built model (LoRA: the adapter's tensors only)."""
        model.load_state_dict(state, strict=True)

    def _write_model_files(self, model: nn.Module, folder: Path) -> None:
        """What makes a checkpoint folder usable on its own: the model as a HF folder (LoRA: the adapter)."""
        ckpt_io.save_model(model, self.tok, folder)

    def _full_states(self) -> tuple[dict | None, Any]:
        """Complete model and optimizer states on rank 0 (gathered from the shards under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sharded = self.parallel == "fsdp" and self.info.distributed
        if sharded:  # FSDP2 keeps the root's parameters gathered after a forward without backward (evaluation)
            self.step_module.reshard()
        opts = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
        optim_state = ckpt_io.full_optimizer_state(self.model, self.optimizer, sharded=sharded)
        model_state = get_model_state_dict(self.model, options=opts) if sharded else self.model.state_dict()
        return model_state, optim_state

    def _export_model(self, model_state: dict | None) -> nn.Module:
        """A plain model with the complete weights (the live one, unless sharded)."""
        if self.parallel == "fsdp" and self.info.distributed:
            if isinstance(self.model, DeepseekV3ForCausalLM):
                plain = DeepseekV3ForCausalLM(self.model.config, init=False)
            else:
                plain = type(self.model)(self.model.config)
            plain.load_state_dict(model_state, strict=True)
            return plain
        return self.model

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save(self, step: int, train_s: float) -> Path | None:
        """Atomic checkpoint of everything a resume needs (collective under FSDP; rank 0 writes)."""
        model_state, optim_state = self._full_states()
        data_state = self.source.state_dict()
        if not self.info.is_main:
            return None
        export = self._export_model(model_state)

        return ckpt_io.save_checkpoint(
            self.ckpt_dir,
            step,
            model_state=model_state,
            optimizer_state=optim_state,
            scheduler_state={"planned_steps": self.planned_steps},
            data_state=data_state,
            rng_state=ckpt_io.capture_rng_state(),
            train_config=self._config_record(),
            extra={
                "train_s": train_s,
                "world_size": self.info.world_size,
                "parallel": self.parallel,
                **self._checkpoint_extra(),
            },
            write_files=lambda folder: self._write_model_files(export, folder),  # each is a HF folder too
            keep_last=self.cfg.keep_last,
        )

    # -- evaluation --------------------------------------------------------------------------------------
    def evaluate(self, n: int | None = None) -> dict[str, TaskScore]:
        if not self.tasks:
            return {}
        sharded = self.parallel == "fsdp" and self.info.distributed
        if not (sharded or self.info.is_main):
            return {}
        # Sharded weights are gathered by the wrapper's forward, so every rank decodes; otherwise rank 0 alone.
        model = self.step_module if sharded else self.model
        n = n if n is not None else self.cfg.eval.examples
        if self.cfg.data.format == "r1":
            scores = evaluate_in_format(model, self.tok, self.tasks, n, "r1", autocast_dtype=self.autocast_dtype)
        else:
            scores = evaluate_tasks(model, self.tok, self.tasks, n, autocast_dtype=self.autocast_dtype)
        if sharded:  # back to shards: the optimizer holds the sharded parameters
            clear_fused_weights(self.model)  # (they hold gathered weights)
            self.step_module.reshard()
        return scores

    # -- the loop ----------------------------------------------------------------------------------------
    def _backward(self, n: int, loss_of) -> None:
        """n micro-batches: loss_of(i)'s forward and backward each, the gradient all-reduce (or reduce-scatter)
        on the last one only. The loss is a share of the step's global sum, and DDP and FSDP average gradients
        over ranks: hence the factor world_size."""
        info = self.info
        for i in range(n):
            with no_grad_sync(self.step_module, skip=i < n - 1):  # (FSDP2 reads it in the backward)
                with torch.autocast(info.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                    enabled=self.autocast_dtype is not None):  # fmt: skip
                    loss = loss_of(i)
                self.scaler.scale(loss * info.world_size).backward()

    def _update(self, groups: list[list[torch.Tensor]]) -> torch.Tensor:
        """Clip each group of parameters' gradient apart to optim.grad_clip, take the optimizer step, zero the
        gradients. Returns the first group's gradient norm (before clipping)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        norms = [torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True) for params in groups]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norms[0].full_tensor() if hasattr(norms[0], "full_tensor") else norms[0]  # a DTensor under FSDP

    def _train_step(self, step: int, lr: float) -> dict[str, float]:
        cfg, info = self.cfg, self.info
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = [_on_device(batch, info.device) for batch in self.source.batches(step)]
        local_counts = [self.objective.counts(x, y) for x, y, _ in micro]
        local_rows = sum(x.shape[0] for x, _, _ in micro)
        summed = [sum(c[i] for c in local_counts) for i in range(len(local_counts[0]))]
        totals = all_reduce_sum([*summed, local_rows], info.device)
        total_rows = totals.pop()
        if totals[0] == 0:
            raise ValueError(f"step {step}: the batch has no target tokens (empty rows?)")
        logged: dict[str, torch.Tensor] = {}
        term_sums: dict[str, torch.Tensor] = {}

        def loss_of(i: int) -> torch.Tensor:
            x, y, extra = micro[i]
            loss, parts, terms = self.objective.loss(
                self.step_module, x, y, extra, local_counts[i], totals, x.shape[0], total_rows
            )  # fmt: skip
            for k, v in parts.items():
                logged[k] = logged.get(k, 0.0) + v
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v
            return loss

        self._backward(len(micro), loss_of)
        grad_norm = self._update([[p for g in self.optimizer.param_groups for p in g["params"]]])
        loads = update_router_bias(self.model, gamma=cfg.router_bias_gamma)
        names, term_names = sorted(logged), list(term_sums)
        values = all_reduce_sum(
            [float(logged[k]) for k in names] + [float(term_sums[k]) for k in term_names] + [float(grad_norm)],
            info.device,
        )
        record = dict(zip(names, values[: len(names)]))
        record["_terms"] = dict(zip(term_names, values[len(names) : -1]))
        record["grad_norm"] = values[-1] / info.world_size  # every rank computed the same global norm
        record["load_imbalance"] = load_imbalance(loads)
        record["_loads"] = loads
        record["_tokens"] = int(sum(x.numel() for x, _, _ in micro)) * info.world_size
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(diverged_message(step, record["loss"], record["_terms"]))
        return record

    def _any_rank(self, flag: bool) -> bool:
        """True when `flag` holds on any rank, so that every rank takes the same branch (a time budget's stop)."""
        if not self.info.distributed:
            return flag
        return all_reduce_sum([float(flag)], self.info.device)[0] > 0

    def train(self) -> TrainResult:
        self._setup()
        cfg, info = self.cfg, self.info
        mc = self.model.config
        print0(
            f"model: {self._describe_model()}, "
            f"vocab {mc.vocab_size}, device {info.device}, world {info.world_size} ({self.parallel})"
        )
        meter = Meter(
            self.out_dir if info.is_main else None,
            flops_per_token=self._flops_per_token(), mirror=self.metrics_mirror if info.is_main else None,
            device=str(info.device), dtype=cfg.dtype, peak_flops=cfg.peak_flops, n_devices=info.world_size,
            price_per_device_hour=cfg.price_per_device_hour, currency=cfg.currency,
            watts_per_core=cfg.watts_per_core, total_steps=self.planned_steps or cfg.max_steps,
            log_every=cfg.log_every, show=self.show_progress and info.is_main,
        )  # fmt: skip
        losses: list[float] = []
        self.history: list[dict[str, Any]] = []  # each step's logged record, with its step
        self.eval_before: dict[str, TaskScore] = {}
        if self.evaluates_first:
            with meter.paused():
                self.eval_before = self.evaluate()
            if self.eval_before:
                meter.log(event="eval", step=self.start_step, **{n: s.to_dict() for n, s in self.eval_before.items()})
        step = self.start_step
        loop_start = time.perf_counter()
        paused = 0.0  # seconds of evaluation and checkpointing inside the loop
        budget = None if cfg.time_budget_min is None else StepBudget(cfg, step, self.elapsed_before, info)
        eval_history: list[dict[str, Any]] = []
        try:
            while step < (self.planned_steps or cfg.max_steps):
                if self.stop_after is not None and step >= self.stop_after:
                    break
                total = self.planned_steps or cfg.max_steps
                lr = lr_at(step, cfg, total)
                if self.tuner is not None:
                    self.tuner.before_step(step)
                t_step = time.perf_counter()
                rec = self._train_step(step, lr)
                if self.tuner is not None:
                    self.tuner.after_step(step, time.perf_counter() - t_step)
                step += 1
                losses.append(rec["loss"])
                train_s = time.perf_counter() - loop_start - paused
                extra = {k: v for k, v in rec.items() if not k.startswith("_") and k != "loss"}
                if self.tuner is not None:
                    extra["threads"] = torch.get_num_threads()
                self.history.append({"step": step, "loss": rec["loss"], "lr": lr, **extra})
                if cfg.log_every and step % cfg.log_every == 0 and "_loads" in rec:
                    extra["expert_load"] = rec["_loads"]
                meter.step(step, loss=rec["loss"], tokens=rec["_tokens"], lr=lr, **extra)
                planned = budget.replan(step, train_s, self.planned_steps) if budget is not None else None
                if planned is not None:  # measured a few steps: (re)plan the schedule's length
                    first = self.planned_steps is None
                    self.planned_steps = planned
                    if meter._bar is not None:
                        meter._bar.total = self.planned_steps
                    if first:
                        print0(f"time budget {cfg.time_budget_min:g} min: {self.planned_steps} steps planned")
                t_pause = time.perf_counter()
                with meter.paused():
                    if cfg.eval.every and step % cfg.eval.every == 0 and step < (self.planned_steps or 0):
                        scores = self.evaluate()
                        if scores:
                            row = {name: s.to_dict() for name, s in scores.items()}
                            eval_history.append({"step": step, **row})
                            meter.log(event="eval", step=step, **row)
                    if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                        self.save(step, self.elapsed_before + train_s)
                paused += time.perf_counter() - t_pause
                if cfg.time_budget_min is not None and self._any_rank(
                    self.elapsed_before + train_s >= cfg.time_budget_min * 60
                ):  # fmt: skip
                    break  # safety net when the machine slows down after the plan was made
            train_s = time.perf_counter() - loop_start - paused
            stopped_early = self.stop_after is not None and step >= self.stop_after and step < cfg.max_steps
            scores: dict[str, TaskScore] = {}
            model_dir = None
            if not stopped_early:
                with meter.paused():
                    if step > self.start_step and not (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                        self.save(step, self.elapsed_before + train_s)
                    scores = self.evaluate() if self.evaluate_at_end else {}
                    if scores:
                        meter.log(event="eval", step=step, final=True, **{n: s.to_dict() for n, s in scores.items()})
                    model_dir = self.export(self.out_dir / "model")
        finally:
            if self.tuner is not None:
                self.tuner.restore()
            summary = meter.close(print_summary=info.is_main and self.show_progress)
        if scores and info.is_main:
            for name, s in scores.items():
                lo, hi = s.ci95
                print0(
                    f"held-out {name}: {100 * s.accuracy:.1f}% exact (95% CI {100 * lo:.1f}-{100 * hi:.1f}%, n={s.n})"
                )
        summary["eval_history"] = eval_history
        return TrainResult(self.model, self.tok, losses, step, summary, scores, self.out_dir, model_dir)

    def export(self, folder: Path) -> Path | None:
        """The final model as a HF folder with its tokenizer (what nanoseek.load and transformers read)."""
        model_state = None
        if self.parallel == "fsdp" and self.info.distributed:
            model_state, _ = self._full_states()
        if not self.info.is_main:
            return None
        return ckpt_io.save_model(self._export_model(model_state), self.tok, folder)
