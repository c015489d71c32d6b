"""GRPO: reinforcement learning with rule-based rewards (the R1-Zero recipe, REFERENCE §2).

    result = run_grpo("runs/x/model", ["add3"], "runs/x/grpo", ["loss_type=dapo", "optim.lr=5e-5"])
    result.model_dir, result.steps, result.history          # history: one record per step (reward, kl, ...)
    torchrun --nproc-per-node 8 -m nanoseek grpo runs/x/model --tasks add3 --out runs/x/grpo --parallel fsdp

The math (advantages, the KL, token weights, the clipped surrogate, log-probs) is in grpo_loss.py, the prompts,
rollouts and held-out evaluation in grpo_rollouts.py; this file holds the settings and the run.

One step:
  1. draw `prompts_per_step` training-split problems of the tasks (a pure function of seed and step);
  2. rollouts: `num_generations` (G) completions per prompt, sampled at `temperature` through the inference
     engine in one batched call (per-request seeds; the model is in eval mode there, so the router's
     balancing statistics do not move); a fresh engine each step, so its prefix cache never serves
     keys and values of older weights;
  3. rewards from the reward functions (rewards.py), summed with their weights; advantages normalised
     per group: A = (r - mean) / std (grpo, dapo) or r - mean (dr_grpo);
  4. `mu` inner iterations of the clipped surrogate per token, ratio = pi / pi_old, with the log-probs of
     the rollout policy as pi_old (for mu = 1 the ratio is 1 and only its gradient matters), plus
     beta x KL(pi || pi_ref) with the k3 estimator exp(ref - pi) - (ref - pi) - 1 against a frozen copy of
     the starting model (none is kept when beta = 0);
  5. AdamW step, then the router-bias update (router_bias_gamma, 0 by default: routing stays as trained).

A DeepSeek-V3 model's MTP module is trained along (`mtp_weight`, 0.3 by default; 0 leaves it as it was): on
one rollout of each of a step's prompts it learns to predict token t+2 from the trunk's hidden state at t and
token t+1, as in pretraining, with the trunk, embedding and head detached. The policy moves by the policy
gradient alone, and the module stays the drafter of the policy it ships with (speculative decoding,
engine/speculative.py): without it, the speedrun's final model had its MTP drafts accepted 1-2% of the time
(its module was last trained in pretraining, on another format).

Loss types (how token losses are summed, which advantages, which clip):
  grpo     mean over each completion's tokens, then over completions; std-normalised advantages; eps 0.2
  dr_grpo  sum over tokens / (completions x max_new_tokens), no std (Dr. GRPO: no length or std bias)
  dapo     sum over tokens / all tokens of the batch; clip-higher (eps_low 0.2, eps_high 0.28); groups whose
           rewards are all equal are dropped (they carry no signal)

Each step logs reward (and each reward function), accuracy, completion length, KL, clip fraction and
entropy into the meter (metrics.jsonl). Checkpoints (atomic, train/checkpoint.py) every `ckpt_every` steps;
`resume=True` continues from the newest one with the same weights (MTP module included), optimizer state and
step, and rebuilds the reference model from the starting model (a digest in the checkpoint checks it is the
same). Nothing of the sampling needs saving: a step's prompts and rollouts are a pure function of (seed, step),
so a resumed run repeats the uninterrupted one bit for bit.

Under torchrun (`parallel="ddp" | "fsdp"`, `nanoseek grpo --parallel`), the curve is that of one process:
  - every rank draws the same step's prompts and takes every world_size-th of them with all its G completions
    (a group stays on one rank: its advantages, and DAPO's decision to drop it, are made there);
  - completion j of the step's prompt k is sampled with a seed of (seed, step, k, j) (rollout_seed), so a
    prompt gets the same completions whichever rank samples it;
  - the loss is normalised by the whole step's counts (completions and tokens, all-reduced; the MTP loss by
    its targets), so the gradients the ranks sum are the single-process gradient; metrics are all-reduced;
  - DDP and FSDP2 need the same forwards and backwards on every rank, so a rank with fewer micro-batches runs
    a dummy row whose loss is multiplied by 0, and the policy's log-probs and the MTP loss share one forward
    of the wrapped model (parallel.LossModule's `call`), so DDP sees every trained parameter in each backward;
  - rollouts and evaluation run on a plain module with the full weights (engine_for needs one): under DDP the
    policy itself; under FSDP2 a copy, refreshed after each update by gathering the shards (one all-gather of
    the weights per step, and one more model's memory per rank: simpler than generating through the sharded
    module, whose every decode step would need a collective that all ranks join in step);
  - the frozen reference model is a full copy on every rank; rank 0 alone writes metrics, checkpoints (the
    optimizer state keyed by parameter name, so one resumes under any mode) and the model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.engine.generate import context_length
from nanoseek.parallel.distributed import DistInfo, all_reduce_sum
from nanoseek.tasks import R1_SYSTEM_PROMPT, Example, Task, extract_r1_answer, get_task
from nanoseek.train import checkpoint as ckpt_io
from nanoseek.train.checkpoint import save_model, weights_digest
from nanoseek.train.config import OptimConfig
from nanoseek.train.evaluate import TaskScore
from nanoseek.train.grpo_loss import (
    LOSS_TYPES,
    Batch,
    clipped_loss,
    completion_logprobs,
    group_advantages,
    make_batch,
    mtp_distillation_loss,
    mtp_target_count,
    token_weights,
)
from nanoseek.train.grpo_rollouts import (
    Rollouts,
    decode_completion,
    draw_examples,
    evaluate_r1,
    render_prompt,
    rollout,
)
from nanoseek.train.rewards import RewardFn, get_rewards, score_completions

log = logging.getLogger("nanoseek.grpo")


# ---- configuration ----------------------------------------------------------------------------------------
@dataclass
class GRPOConfig:
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo
    num_generations: int = 8  # G: completions per prompt
    prompts_per_step: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    max_steps: int = 200
    time_budget_min: float | None = None  # stop at whichever comes first
    mu: int = 1  # inner optimisation iterations per rollout batch
    beta: float = 0.0  # KL weight; 0: no reference model is kept
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None: epsilon_low, or 0.28 for dapo (clip-higher)
    micro_batch_size: int = 0  # completions per forward/backward; 0: all of a step at once
    rewards: list[str] = field(default_factory=lambda: ["format", "accuracy"])
    reward_weights: list[float] = field(default_factory=list)  # default: 1 each
    task_weights: list[float] = field(default_factory=list)  # mixture of the tasks; default uniform
    system_prompt: str = R1_SYSTEM_PROMPT  # "" for none
    chat: bool = True  # the model's chat template when it has one (else <bos> + prompt)
    router_bias_gamma: float = 0.0
    mtp_weight: float = 0.3  # the MTP module's loss on the rollouts (models with MTP modules; 0: left as is)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant", weight_decay=0.0)
    )
    eval_examples: int = 200  # held-out problems per task, evaluated before and after (0: none)
    eval_every: int = 0  # steps; also evaluate along the way (0: before and after only)
    heldout_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    ckpt_every: int = 50  # 0: only the final checkpoint
    keep_last: int = 2
    log_every: int = 1

    def validate(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        for name in ("num_generations", "prompts_per_step", "max_new_tokens", "mu", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: advantages compare completions of the same prompt")
        if min(self.max_steps, self.micro_batch_size, self.ckpt_every, self.eval_examples, self.eval_every) < 0:
            raise ValueError("max_steps, micro_batch_size, ckpt_every, eval_examples and eval_every must be >= 0")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0 (rollouts sample), got {self.temperature}")
        if self.beta < 0 or self.epsilon_low < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError("beta, epsilon_low and epsilon_high must be >= 0")
        if not (self.mtp_weight >= 0 and math.isfinite(self.mtp_weight)):
            raise ValueError(f"mtp_weight must be >= 0, got {self.mtp_weight}")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"{len(self.rewards)} rewards but {len(self.reward_weights)} reward_weights")
        if self.optim.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule for GRPO must be constant or cosine, got {self.optim.schedule!r}")
        get_rewards(self.rewards)

    @property
    def eps_high(self) -> float:
        if self.epsilon_high is not None:
            return self.epsilon_high
        return 0.28 if self.loss_type == "dapo" else self.epsilon_low

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_grpo_config(overrides: Sequence[str] = ()) -> GRPOConfig:
    """GRPOConfig from `key=value` strings (as `nanoseek train --set`), checked and coerced per field."""
    from nanoseek.train.config import apply_overrides

    cfg = GRPOConfig()
    apply_overrides(cfg, overrides, example="loss_type=dapo")
    cfg.validate()
    return cfg


# ---- the run ---------------------------------------------------------------------------------------------
@dataclass
class GRPOResult:
    model_dir: Path | None  # None when stopped early (stop_after)
    steps: int
    tokens: int  # token positions processed: sampled in the rollouts plus trained on (prompt + completion each)
    energy_j: float
    wall_s: float
    history: list[dict[str, Any]]  # one record per step: reward, accuracy, completion_len, kl, clip_frac...
    eval_before: dict[str, TaskScore] = field(default_factory=dict)
    eval_after: dict[str, TaskScore] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # the meter's summary


def _lr(cfg: GRPOConfig, step: int) -> float:
    o = cfg.optim
    warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
    if o.schedule == "cosine" and cfg.max_steps > 0:
        progress = min(1.0, step / cfg.max_steps)
        return o.lr * warm * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return o.lr * warm


class GRPOTrainer:
    def __init__(
        self,
        model: nn.Module,
        tok,
        tasks: Sequence[Task],
        cfg: GRPOConfig,
        out: Path,
        *,
        reward_fns: Sequence[RewardFn] | None = None,
        show_progress: bool = True,
        metrics_path: Path | None = None,
        resume: bool = False,
        parallel: str = "auto",
        info: DistInfo | None = None,
        stop_after: int | None = None,
    ):
        """parallel: auto (ddp under torchrun, none otherwise) | none | ddp | fsdp. info: the process group
        (default: init_distributed). stop_after: end after this many steps in total without the end-of-run work
        (final checkpoint, evaluation, export), as a run stopped there would (for resume tests)."""
        from nanoseek.parallel import init_distributed, parallelize
        from nanoseek.train.trainer import param_groups

        cfg.validate()
        if not tasks:
            raise ValueError("GRPO needs at least one task (--tasks add3,...)")
        if cfg.task_weights and len(cfg.task_weights) != len(tasks):
            raise ValueError(f"{len(tasks)} tasks but {len(cfg.task_weights)} task_weights")
        self.cfg, self.tok, self.tasks = cfg, tok, list(tasks)
        self.info = info or init_distributed(cfg.device)
        self.parallel = parallel_mode(parallel, self.info)
        self.out = Path(out)
        self.ckpt_dir = self.out / "checkpoints"
        self.device = self.info.device
        self.stop_after = stop_after
        self.reward_fns = list(reward_fns) if reward_fns is not None else get_rewards(cfg.rewards)
        self.reward_weights = list(cfg.reward_weights) or [1.0] * len(self.reward_fns)
        if len(self.reward_weights) != len(self.reward_fns):
            raise ValueError(f"{len(self.reward_fns)} reward functions but {len(self.reward_weights)} weights")
        self.show_progress, self.metrics_path = show_progress, metrics_path
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        ckpt = self._latest_checkpoint(resume)  # a checkpoint of other settings fails before anything is built
        self.model = model.to(self.device)
        # The frozen reference is the starting policy (a resume rebuilds it from the same starting model, which
        # its digest checks); none is kept when beta = 0 (memory).
        self.ref, self.start_digest = None, None
        if cfg.beta > 0:
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.start_digest = weights_digest(self.ref)
        self.trains_mtp = self._set_trainable()
        if ckpt is not None:
            self.model.load_state_dict(ckpt.model_state, strict=True)
        # Rollouts and evaluation run on a plain module holding the full weights: the policy itself, except
        # under FSDP2, whose parameters are shards (a copy, refreshed from them after every update).
        self.rollout_model = self.model
        if self.parallel == "fsdp" and self.info.distributed:
            self.rollout_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self._rollout_synced = True
        self.step_module = parallelize(self.model, self.parallel, info=self.info)
        # Taken after parallelize (FSDP2 replaces the parameters by sharded ones). The MTP modules' parameters
        # and the policy's (the rest): their gradients are clipped apart.
        self.mtp_params = [p for p in getattr(self.model, "mtp", nn.ModuleList()).parameters() if p.requires_grad]
        in_mtp = {id(p) for p in self.mtp_params}
        self.policy_params = [p for p in self.model.parameters() if id(p) not in in_mtp and p.requires_grad]
        o = cfg.optim
        kernel = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kernel
        )
        self.start_step, self.elapsed_before = 0, 0.0
        if ckpt is not None:
            self._restore(ckpt)

    # -- set-up --------------------------------------------------------------------------------------------
    def _set_trainable(self) -> bool:
        """Every parameter trains, except the MTP modules' when no loss reaches them (mtp_weight = 0): DDP
        would wait for their gradients. True when the MTP modules learn."""
        mtp = getattr(self.model, "mtp", None) or nn.ModuleList()
        for p in self.model.parameters():
            p.requires_grad_(True)
        if self.cfg.mtp_weight == 0:
            mtp.requires_grad_(False)
        return self.cfg.mtp_weight > 0 and len(mtp) > 0

    def _latest_checkpoint(self, resume: bool):
        existing = ckpt_io.list_checkpoints(self.ckpt_dir)
        if existing and not resume:
            raise ValueError(
                f"{self.ckpt_dir} already holds checkpoints ({existing[-1].name}); resume, or choose another out"
            )
        if not resume:
            return None
        may = ckpt_io.RESUME_MAY_CHANGE | {"max_steps", "time_budget_min", "device", "ckpt_every", "eval_examples"}
        return ckpt_io.load_latest(self.ckpt_dir, train_config=self.cfg.to_dict(), may_change=may)

    def _restore(self, ckpt) -> None:
        """The optimizer, step and clock of a checkpoint (its weights are loaded before parallelize). Nothing of
        the sampling needs restoring: a step's prompts and rollouts are a pure function of (seed, step)."""
        saved = ckpt.extra.get("start_digest")
        if self.start_digest is not None and saved is not None and saved != self.start_digest:
            raise ValueError(
                f"{ckpt.path} was trained from another starting model; with beta > 0 the KL's reference is the "
                f"starting model, so resume with the MODEL the run started from"
            )
        ckpt_io.load_optimizer_state(self.model, self.optimizer, ckpt.optimizer_state)
        if ckpt.rng_state is not None:
            ckpt_io.restore_rng_state(ckpt.rng_state)
        self.start_step = ckpt.step
        self.elapsed_before = float(ckpt.extra.get("train_s", 0.0))
        if self.info.is_main:
            log.info("resumed from %s at step %d", ckpt.path, ckpt.step)

    def _optimizer_state(self) -> Any:
        """The complete optimizer state on rank 0 (gathered from the shards under FSDP2; every rank calls)."""
        sharded = self.rollout_model is not self.model
        if sharded:  # FSDP2 keeps the root's parameters gathered after a forward without backward
            self.step_module.reshard()
        return ckpt_io.full_optimizer_state(self.model, self.optimizer, sharded=sharded)

    def _sync_rollout_model(self) -> None:
        """Under FSDP2, copy the policy's current weights (gathered from the shards) and buffers (router biases)
        into the rollout copy, once per update; every rank calls. A no-op otherwise."""
        from torch.distributed.tensor import DTensor

        if self._rollout_synced:
            return
        self.step_module.reshard()  # the root's parameters may still be gathered after a forward
        params, buffers = dict(self.rollout_model.named_parameters()), dict(self.rollout_model.named_buffers())
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                params[name].copy_(p.full_tensor() if isinstance(p, DTensor) else p)
            for name, b in self.model.named_buffers():
                buffers[name].copy_(b)
        self._rollout_synced = True

    def _any_rank(self, flag: bool) -> bool:
        """True when `flag` is on any rank, so every rank takes the same branch (a time budget's stop)."""
        return all_reduce_sum([float(flag)], self.device)[0] > 0

    # -- one step --------------------------------------------------------------------------------------
    def step_prompts(self, step: int) -> tuple[list[Example], list[list[int]]]:
        """The step's problems and prompt ids, the same on every rank (drawn from (seed, step)); prompts that
        do not fit the model's context are left out (rank 0 warns)."""
        cfg = self.cfg
        weights = cfg.task_weights or [1.0] * len(self.tasks)
        examples = draw_examples(self.tasks, weights, cfg.prompts_per_step, cfg.seed, step)
        limit = context_length(self.rollout_model)
        kept, prompts = [], []
        for ex in examples:
            ids = render_prompt(self.tok, ex, cfg)
            if limit is not None and len(ids) >= limit:
                if self.info.is_main:
                    log.warning("skipping a prompt of %d tokens: the model's context is %d (%r)", len(ids), limit,
                                ex.prompt[:60])  # fmt: skip
                continue
            kept.append(ex)
            prompts.append(ids)
        return kept, prompts

    def collect(self, step: int) -> Rollouts:
        """This rank's rollouts: every world_size-th prompt of the step with all its G completions (a group stays
        on one rank, so its advantages are computed there), each sampled with the seed of its prompt index."""
        cfg, info, G = self.cfg, self.info, self.cfg.num_generations
        kept, prompts = self.step_prompts(step)
        mine = list(range(info.rank, len(prompts), info.world_size))
        completions, reasons, lps = ([], [], []) if not mine else rollout(
            self.rollout_model, self.tok, [prompts[k] for k in mine], G, cfg, seed=cfg.seed * 100_003 + step,
            prompt_indices=mine,
        )  # fmt: skip
        by_name = {t.name: t for t in self.tasks}
        flat_ex = [kept[k] for k in mine for _ in range(G)]
        return Rollouts(
            flat_ex, [by_name[ex.task] for ex in flat_ex], [prompts[k] for k in mine for _ in range(G)], completions,
            [decode_completion(self.tok, c) for c in completions], reasons, lps, n_prompts=len(prompts),
        )  # fmt: skip

    def score(self, ro: Rollouts) -> tuple[torch.Tensor, torch.Tensor, list[int], dict[str, Any]]:
        """This rank's advantages [n] and kept completions [n] (DAPO drops groups with equal rewards: decided
        per group, on the rank that holds it), and the step's reward metrics over all ranks."""
        cfg, G = self.cfg, self.cfg.num_generations
        totals, parts = score_completions(self.reward_fns, self.reward_weights, ro.texts, ro.examples, ro.tasks)
        rewards = torch.tensor(totals, dtype=torch.float32).view(-1, G)
        adv, keep = torch.zeros(0), torch.zeros(0, dtype=torch.bool)  # a rank without prompts (fewer than ranks)
        if totals:
            adv = group_advantages(rewards, scale=cfg.loss_type != "dr_grpo").view(-1)
            keep = torch.ones(len(totals), dtype=torch.bool)
            if cfg.loss_type == "dapo":  # groups with equal rewards carry no signal: drop them
                keep = (rewards.max(1).values > rewards.min(1).values).repeat_interleave(G)
        lengths = [len(c) for c in ro.completion_ids]
        correct = [
            float(extract_r1_answer(t) is not None and task.check(extract_r1_answer(t), ex))
            for t, ex, task in zip(ro.texts, ro.examples, ro.tasks)
        ]
        local = [
            len(totals), sum(totals), float(rewards.std(1).sum()) if len(totals) else 0.0, sum(correct),
            sum(lengths), sum(r != "stop" for r in ro.finish_reasons), float(keep.view(-1, G)[:, 0].sum()),
            *(sum(v) for v in parts.values()),
        ]  # fmt: skip
        n, reward, std, right, length, truncated, groups, *by_fn = all_reduce_sum(local, self.device)
        metrics = dict(
            reward=reward / n, reward_std=std / (n / G), accuracy=right / n, completion_len=length / n,
            truncated=truncated / n, groups_kept=int(groups),
            **{f"reward_{name.removesuffix('_reward')}": v / n for name, v in zip(parts, by_fn)},
        )  # fmt: skip
        return adv, keep, lengths, metrics

    def train_step(self, step: int) -> dict[str, Any]:
        cfg, G = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        self.model.eval()
        self._sync_rollout_model()
        ro = self.collect(step)
        rollout_s = time.perf_counter() - t0
        record: dict[str, Any] = {"rollout_s": rollout_s}
        if not ro.n_prompts:  # no prompt fits (the same on every rank)
            return {**record, "loss": 0.0, "reward": 0.0, "skipped": True, "_tokens": 0}
        adv, keep, lengths, metrics = self.score(ro)
        record.update(metrics)
        rows = [i for i in keep.nonzero().view(-1).tolist() if lengths[i] > 0]
        # the MTP module learns from one completion of each prompt (a draw of the policy like the others), the
        # groups DAPO drops included (all-correct ones, late on): all G would cost the speedrun's GRPO ~1/4 more
        # time (its steps are time-budgeted) for a drafter that needs far fewer examples
        mtp_rows = [i for i in range(0, len(lengths), G) if lengths[i] > 0] if self.trains_mtp else []
        batch = self._batch(ro, rows)
        mtp_batch = self._batch(ro, mtp_rows)
        mtp_targets = mtp_target_count(mtp_batch) if mtp_batch is not None else 0
        # token positions processed: the rollouts' (prompt + completion), then the training forwards'
        rolled = sum(len(p) + len(c) for p, c in zip(ro.prompt_ids, ro.completion_ids))
        counts = per_rank([len(rows), sum(lengths[i] for i in rows), len(mtp_rows), mtp_targets, rolled], self.info)
        n_rows, n_tokens, _, n_mtp_targets, rolled = (sum(c[k] for c in counts) for k in range(5))
        if not n_rows:
            record.update(loss=0.0, kl=0.0, clip_frac=0.0, entropy=0.0, skipped=True, _tokens=0,
                          rollout_tokens=int(rolled))  # fmt: skip
            return record
        weights = None
        if batch is not None:
            weights = token_weights(batch.mask, cfg.loss_type, cfg.max_new_tokens, rows=n_rows, tokens=n_tokens)
            weights = weights.to(self.device)
        total = all_reduce_sum([float(weights.sum()) if weights is not None else 0.0], self.device)[0]
        plan = self._micro_plan(batch, adv[rows].to(self.device), weights, mtp_batch, counts)
        lr = _lr(cfg, step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        stats, grad_norm = self._optimize(plan, total, n_mtp_targets)
        self._router_update()
        self.model.eval()
        trained = int(batch.attention_mask.sum()) * cfg.mu if batch is not None else 0
        *summed, trained = all_reduce_sum([*stats.values(), trained], self.device)
        stats = dict(zip(stats, summed))
        if not n_mtp_targets:
            del stats["mtp_loss"]
        # The meter's tokens (and so its tokens/s and MFU) are the positions trained on; the sampled tokens are
        # logged apart. Counted together at training FLOPs per token, the MFU read past 100%.
        record.update(stats, lr=lr, grad_norm=grad_norm, _tokens=int(trained), rollout_tokens=int(rolled))
        return record

    def _batch(self, ro: Rollouts, rows: list[int]) -> Batch | None:
        if not rows:
            return None
        return make_batch([ro.prompt_ids[i] for i in rows], [ro.completion_ids[i] for i in rows], self.pad_id)

    def _micro_plan(
        self, batch: Batch | None, adv: torch.Tensor, weights: torch.Tensor | None, mtp_batch: Batch | None,
        counts: list[list[float]],
    ) -> list[MicroStep]:  # fmt: skip
        """The micro-batches of one optimizer step: policy rows (with their advantages and token weights) and
        MTP rows side by side, each pair one forward and backward. Under torchrun every rank runs as many as the
        rank with the most (counts: every rank's), filling its gaps with a dummy row whose loss is multiplied by
        0: DDP and FSDP2 need the same forwards and backwards on every rank (FSDP2 gathers each block's weights
        in them; DDP waits for every trained parameter's gradient)."""
        micro = self.cfg.micro_batch_size

        def slices(n: float) -> list[slice]:
            size = micro or max(1, int(n))
            return [slice(s, s + size) for s in range(0, int(n), size)]

        policy = slices(batch.mask.shape[0]) if batch is not None else []
        mtp = slices(mtp_batch.input_ids.shape[0]) if mtp_batch is not None else []
        steps = max(len(policy), len(mtp))
        distributed = self.info.distributed
        if distributed:
            steps = max(max(len(slices(rows)), len(slices(m_rows))) for rows, _, m_rows, _, _ in counts)
        dummy = make_batch([[self.pad_id, self.pad_id]], [[self.pad_id]], self.pad_id) if distributed else None
        plan = []
        for j in range(steps):
            part = MicroStep()
            if j < len(policy):
                part.policy, part.rows = batch.rows(policy[j]), policy[j]
                part.adv, part.weights = adv[policy[j]], weights[policy[j]]
            elif distributed:
                part.policy = dummy
            if j < len(mtp):
                part.mtp = mtp_batch.rows(mtp[j])
                part.mtp_targets = mtp_target_count(part.mtp)
            elif distributed and self.trains_mtp:
                part.mtp = dummy
            plan.append(part)
        return plan

    def _optimize(self, plan: list[MicroStep], total: float, n_mtp: float) -> tuple[dict[str, float], float]:
        """mu optimizer steps on the step's rollouts. Every loss is normalised by the whole step's counts (all
        ranks; total: the sum of all token weights), so the summed gradient is the single-process one. Returns
        this rank's shares of the logged loss, KL, clip fraction, entropy and MTP loss (the caller sums them
        over ranks) and the gradient norm."""
        from nanoseek.parallel import no_grad_sync

        cfg, world = self.cfg, self.info.world_size
        with torch.no_grad():
            for part in plan:
                # pi_old: the rollout policy; recomputed once only when several inner iterations follow (for mu=1
                # the first iteration's own log-probs, detached, are identical). Through the wrapper (FSDP2
                # gathers), so dummies too.
                if cfg.mu > 1 and part.policy is not None:
                    part.old = self._forward(MicroStep(part.policy, part.rows))[0]
                if self.ref is not None and part.rows is not None:
                    part.ref = completion_logprobs(self.ref, part.policy, cfg.temperature)[0]
        self.model.train()
        stats = dict.fromkeys(("loss", "kl", "clip_frac", "entropy", "mtp_loss"), 0.0)
        grad_norm = 0.0
        for _ in range(cfg.mu):
            for j, part in enumerate(plan):
                with no_grad_sync(self.step_module, skip=j < len(plan) - 1):
                    logp, entropy, mtp = self._forward(part)
                    loss = self._policy_loss(part, logp, entropy, total, stats)
                    if mtp is not None:
                        loss = loss + self._mtp_loss(part, mtp, n_mtp, stats)
                    (loss * world if world > 1 else loss).backward()  # DDP and FSDP2 average over ranks
            grad_clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
            # clipped apart: the MTP module's gradient must not scale the policy's down
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.policy_params, grad_clip, foreach=True))
            if n_mtp:
                torch.nn.utils.clip_grad_norm_(self.mtp_params, grad_clip, foreach=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._rollout_synced = self.rollout_model is self.model
        return stats, float(grad_norm)

    def _forward(self, part: MicroStep):
        """(log-probs [B, L], entropy [B, L]) of the part's policy rows and the MTP loss of its MTP rows, in one
        forward of the wrapped model (None for what the part lacks)."""
        temperature = self.cfg.temperature

        def compute(model: nn.Module):
            logp = entropy = mtp = None
            if part.policy is not None:
                with _not_counted(model, part.rows is None):
                    logp, entropy = completion_logprobs(
                        model, part.policy, temperature, with_entropy=torch.is_grad_enabled()
                    )  # fmt: skip
                logp = logp.clone()  # not a view: FSDP2 warns of views among a forward's outputs
            if part.mtp is not None:
                with _not_counted(model, part.mtp_targets == 0):
                    mtp = mtp_distillation_loss(model, part.mtp)
            return logp, entropy, mtp

        return self.step_module(call=compute)

    def _policy_loss(
        self, part: MicroStep, logp: torch.Tensor | None, entropy: torch.Tensor | None, total: float, stats: dict
    ) -> torch.Tensor:
        """The clipped surrogate of a micro-batch's rows (its logged shares added to `stats`; a dummy's is 0)."""
        cfg = self.cfg
        if logp is None:
            return torch.zeros((), device=self.device)
        if part.rows is None:  # a dummy: its forward ran for the collectives, its loss must not count
            return logp.sum() * 0.0
        out = clipped_loss(
            logp, part.old if part.old is not None else logp.detach(), part.adv, part.weights,
            eps_low=cfg.epsilon_low, eps_high=cfg.eps_high, beta=cfg.beta, ref_logp=part.ref,
        )  # fmt: skip
        w = part.weights
        share = float(w.sum()) / total  # this micro-batch's share of the whole step's weight
        stats["loss"] += float(out.loss.detach()) / cfg.mu
        stats["kl"] += out.kl * share / cfg.mu
        stats["clip_frac"] += out.clip_fraction * share / cfg.mu
        stats["entropy"] += float((entropy * w).sum() / w.sum().clamp(min=1e-12)) * share / cfg.mu
        return out.loss

    def _mtp_loss(self, part: MicroStep, mtp: torch.Tensor, n_mtp: float, stats: dict) -> torch.Tensor:
        """The MTP loss of a micro-batch's rows: its mean over their targets, weighted by their share of the
        whole step's MTP targets (a mean over all of them, however the rows are split)."""
        if part.mtp_targets == 0:  # a dummy
            return mtp * 0.0
        share = part.mtp_targets / n_mtp
        stats["mtp_loss"] += float(mtp.detach()) * share / self.cfg.mu
        return self.cfg.mtp_weight * mtp * share

    def _router_update(self) -> None:
        from nanoseek.model.moe import update_router_bias

        update_router_bias(self.model, gamma=self.cfg.router_bias_gamma)  # also resets the load counters

    # -- evaluation and saving -----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, TaskScore]:
        """Held-out accuracy (greedy), on rank 0; the others only help gather the weights under FSDP2."""
        self._sync_rollout_model()
        if not self.info.is_main:
            return {}
        return evaluate_r1(self.rollout_model, self.tok, self.tasks, self.cfg.eval_examples, self.cfg)

    def save(self, step: int, train_s: float) -> Path | None:
        """An atomic checkpoint (every rank calls: FSDP2 gathers; rank 0 writes)."""
        self._sync_rollout_model()
        optimizer_state = self._optimizer_state()
        if not self.info.is_main:
            return None
        extra = {"train_s": train_s, "world_size": self.info.world_size, "parallel": self.parallel,
                 "start_digest": self.start_digest}  # fmt: skip
        return ckpt_io.save_checkpoint(
            self.ckpt_dir, step, model_state=self.rollout_model.state_dict(), optimizer_state=optimizer_state,
            data_state={"step": step}, rng_state=ckpt_io.capture_rng_state(), train_config=self.cfg.to_dict(),
            extra=extra, write_files=lambda d: save_model(self.rollout_model, self.tok, d),
            keep_last=self.cfg.keep_last,
        )  # fmt: skip

    def export(self) -> Path:
        """The final policy as <out>/model (rank 0 writes)."""
        self._sync_rollout_model()
        folder = self.out / "model"
        if self.info.is_main:
            save_model(self.rollout_model, self.tok, folder)
        return folder

    # -- the loop ------------------------------------------------------------------------------------------
    def _eval_and_log(self, meter, step: int, **extra) -> dict[str, TaskScore]:
        scores = self.evaluate()
        if scores:
            meter.log(event="eval", step=step, **extra, **{n: s.to_dict() for n, s in scores.items()})
        return scores

    def train(self) -> GRPOResult:
        from nanoseek.train.meter import Meter

        cfg, info = self.cfg, self.info
        start_wall = time.perf_counter()
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        mc = self.rollout_model.config
        flops = mc.flops_per_token(cfg.max_new_tokens) if hasattr(mc, "flops_per_token") else 6 * sum(
            p.numel() for p in self.rollout_model.parameters()
        )  # fmt: skip
        meter = Meter(
            self.out if info.is_main else None, flops_per_token=flops, device=str(self.device),
            n_devices=info.world_size, total_steps=cfg.max_steps, log_every=cfg.log_every,
            show=self.show_progress and info.is_main,
        )  # fmt: skip
        before = self._eval_and_log(meter, self.start_step) if cfg.eval_examples else {}
        history: list[dict[str, Any]] = []
        step = self.start_step
        loop_start = time.perf_counter()
        budget = cfg.time_budget_min * 60 if cfg.time_budget_min is not None else math.inf
        after: dict[str, TaskScore] = {}
        model_dir = None
        try:
            while step < cfg.max_steps and not (self.stop_after is not None and step >= self.stop_after):
                t_step = time.perf_counter()
                rec = self.train_step(step)
                step += 1
                tokens = rec.pop("_tokens")
                logged = {k: v for k, v in rec.items() if k != "loss"}
                meter.step(step, loss=rec["loss"], tokens=tokens, **logged)
                history.append({"step": step, **rec})
                train_s = self.elapsed_before + time.perf_counter() - loop_start
                with meter.paused():
                    if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                        self.save(step, train_s)
                    if cfg.eval_every and cfg.eval_examples and step % cfg.eval_every == 0 and step < cfg.max_steps:
                        scores = self._eval_and_log(meter, step)
                        said = ", ".join(f"{n} {100 * s.accuracy:.1f}%" for n, s in scores.items())
                        if scores:
                            log.info("step %d: held-out %s", step, said)
                # stop before a step that would overrun the budget (the last step's time as the estimate)
                if budget < math.inf and self._any_rank(train_s + (time.perf_counter() - t_step) > budget):
                    break
            train_s = self.elapsed_before + time.perf_counter() - loop_start
            stopped_early = self.stop_after is not None and self.stop_after <= step < cfg.max_steps
            if not stopped_early:
                with meter.paused():
                    if step > self.start_step and not (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                        self.save(step, train_s)
                    if cfg.eval_examples:
                        after = self._eval_and_log(meter, step, final=True)
                    model_dir = self.export()
        finally:
            summary = meter.close(print_summary=self.show_progress and info.is_main)
        if self.metrics_path is not None and meter.path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(meter.path.read_text())
        for name, s in after.items():
            lo, hi = s.ci95
            b = before.get(name)
            was = f" (before {100 * b.accuracy:.1f}%)" if b else ""
            log.info("GRPO held-out %s: %.1f%% (95%% CI %.1f-%.1f%%, n=%d)%s", name, 100 * s.accuracy, 100 * lo,
                     100 * hi, s.n, was)  # fmt: skip
        return GRPOResult(
            model_dir, step, int(summary["tokens"]) + sum(int(r.get("rollout_tokens", 0)) for r in history),
            float(summary["energy_j"]), time.perf_counter() - start_wall,
            history, before, after, summary,
        )  # fmt: skip


@dataclass
class MicroStep:
    """One forward and backward of an optimizer step: policy rows (`rows` of the step's batch; None: a dummy
    or nothing) with their advantages [B], token weights, old and reference log-probs [B, L], and MTP rows
    with their target count (0: a dummy or nothing)."""

    policy: Batch | None = None
    rows: slice | None = None
    adv: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    old: torch.Tensor | None = None  # pi_old when mu > 1 (else the log-probs themselves, detached)
    ref: torch.Tensor | None = None  # the reference policy's when beta > 0
    mtp: Batch | None = None
    mtp_targets: int = 0


def parallel_mode(parallel: str, info: DistInfo) -> str:
    from nanoseek.parallel import MODES

    if parallel == "auto":
        return "ddp" if info.distributed else "none"
    if parallel not in MODES:
        raise ValueError(f"parallel must be auto or one of {', '.join(MODES)}, got {parallel!r}")
    return parallel


def per_rank(values: list[float], info: DistInfo) -> list[list[float]]:
    """Every rank's `values` (one all-reduce: each rank fills its own slot of a zeroed table)."""
    table = [0.0] * (len(values) * info.world_size)
    table[info.rank * len(values) : (info.rank + 1) * len(values)] = values
    summed = all_reduce_sum(table, info.device)
    return [summed[r * len(values) : (r + 1) * len(values)] for r in range(info.world_size)]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2's gradient norm), any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextlib.contextmanager
def _not_counted(model: nn.Module, dummy: bool):
    """A dummy micro-batch runs in eval mode: the MoE counts expert loads (which move the router bias) in
    training mode only, and a dummy's tokens must not count. Nothing else differs between the modes."""
    if not dummy or not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


def run_grpo(
    model: str | Path | nn.Module,
    tasks: Sequence[str | Task],
    out: str | Path,
    overrides: Sequence[str] = (),
    *,
    tokenizer=None,
    reward_fns: Sequence[RewardFn] | None = None,
    show_progress: bool = True,
    device: str = "cpu",
    metrics_path: str | Path | None = None,
    resume: bool = False,
    parallel: str = "auto",
    stop_after: int | None = None,
) -> GRPOResult:
    """GRPO on `tasks` starting from `model` (anything nanoseek.load reads, a known name such as smollm2, or a
    module with its `tokenizer`); writes <out>/model (HF folder + tokenizer), <out>/metrics.jsonl and
    <out>/checkpoints. Settings and task names are checked before the model is loaded.

    parallel: auto | none | ddp | fsdp under torchrun (auto: ddp there, none in one process). stop_after: end
    after that many steps without the final checkpoint, evaluation and export, as an interrupted run would."""
    import nanoseek
    from nanoseek.parallel import init_distributed
    from nanoseek.tokenizer import load_tokenizer

    cfg = load_grpo_config([f"device={device}", *overrides])
    task_objs = [t if isinstance(t, Task) else get_task(t, cfg.heldout_fraction) for t in tasks]
    info = init_distributed(cfg.device)
    parallel_mode(parallel, info)  # a bad mode fails before the model is loaded
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("run_grpo with a model object needs its tokenizer (tokenizer=...)")
        module, tok = model, tokenizer
    else:
        from nanoseek.assets import resolve_model

        path = resolve_model(str(model))  # a known name such as smollm2, or a path
        module = nanoseek.load(path, dtype="float32", device=str(info.device))  # GGUF weights come back dequantized
        tok = tokenizer or load_tokenizer(path)
    trainer = GRPOTrainer(
        module, tok, task_objs, cfg, Path(out), reward_fns=reward_fns, show_progress=show_progress,
        metrics_path=Path(metrics_path) if metrics_path is not None else None, resume=resume, parallel=parallel,
        info=info, stop_after=stop_after,
    )  # fmt: skip
    return trainer.train()
