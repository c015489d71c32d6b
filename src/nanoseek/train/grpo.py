"""GRPO: reinforcement learning with rule-based rewards (the R1-Zero recipe, REFERENCE §2).

    result = run_grpo("runs/x/model", ["add3"], "runs/x/grpo", ["loss_type=dapo", "optim.lr=5e-5"])
    result.model_dir, result.steps, result.history          # history: one record per step (reward, kl, ...)
    torchrun --nproc-per-node 8 -m nanoseek grpo runs/x/model --tasks add3 --out runs/x/grpo --parallel fsdp

It runs on the training loop (trainer.py: its lr schedule, checkpoints and exact resume, the meter, DDP/FSDP2,
the HF-folder saver), with rollouts as the batch source (grpo_rollouts.RolloutSource) and the clipped surrogate
as the objective (grpo_loss.GRPOLoss); this file holds the settings and the step.

One step:
  1. draw `prompts_per_step` training-split problems of the tasks (a pure function of seed and step);
  2. rollouts: `num_generations` (G) completions per prompt, sampled at `temperature` through the inference
     engine in one batched call (per-request seeds; the model is in eval mode there, so the router's
     balancing statistics do not move); a fresh engine each step, so its prefix cache never serves
     keys and values of older weights;
  3. rewards from the reward functions (tasks/rewards.py), summed with their weights; advantages normalised
     per group: A = (r - mean) / std (grpo, dapo) or r - mean (dr_grpo);
  4. `mu` inner iterations of the clipped surrogate per token, ratio = pi / pi_old, with the log-probs of
     the rollout policy as pi_old (for mu = 1 the ratio is 1 and only its gradient matters), plus
     beta x KL(pi || pi_ref) with the k3 estimator exp(ref - pi) - (ref - pi) - 1 against a frozen copy of
     the starting model (none is kept when beta = 0); each an AdamW step at the loop's learning rate
     (train.config.lr_at: warmup, then constant or cosine over max_steps, or over the planned steps of a
     time-budgeted run), the policy's and the MTP module's gradients clipped apart;
  5. the router-bias update (router_bias_gamma, 0 by default: routing stays as trained).

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
entropy into the meter (metrics.jsonl). Held-out accuracy (before, every eval.every steps, after) is the shared
evaluation's (eval.held_out.evaluate_in_format, nanoseek.eval in the R1 format with GRPO's system prompt).
Checkpoints every `ckpt_every` steps; `resume=True` continues from the newest one with the same weights (MTP
module included), optimizer state and step, and rebuilds the reference model from the starting model (a digest
in the checkpoint checks it is the same). Nothing of the sampling needs saving: a step's prompts and rollouts
are a pure function of (seed, step), so a resumed run repeats the uninterrupted one bit for bit.

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

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.eval.held_out import TaskScore, evaluate_in_format
from nanoseek.parallel import MODES, all_reduce_sum, init_distributed
from nanoseek.tasks import R1_SYSTEM_PROMPT, Task, get_task
from nanoseek.tasks.rewards import RewardFn, get_rewards
from nanoseek.train import checkpoint as ckpt_io
from nanoseek.train.checkpoint import weights_digest
from nanoseek.train.config import EvalConfig, OptimConfig, TrainConfig, apply_eval_alias
from nanoseek.train.grpo_loss import LOSS_TYPES, Batch, GRPOLoss, make_batch, mtp_target_count, token_weights
from nanoseek.train.grpo_rollouts import Rollouts, RolloutSource, per_rank
from nanoseek.train.trainer import Trainer

# ---- configuration ----------------------------------------------------------------------------------------
GRPO_EVAL_ALIASES = {"eval_examples": "examples", "eval_every": "every"}  # the eval section's old keys


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
    # held-out problems per task (eval.examples; 0: none), evaluated before and after, and every eval.every steps
    eval: EvalConfig = field(default_factory=EvalConfig)
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
        if min(self.max_steps, self.micro_batch_size, self.ckpt_every) < 0:
            raise ValueError("max_steps, micro_batch_size and ckpt_every must be >= 0")
        self.eval.validate()
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

    def _apply_key(self, key: str, value: Any, dotted: str, where: str) -> bool:
        return apply_eval_alias(self, key, value, where, GRPO_EVAL_ALIASES)  # `eval_examples`, `eval_every`

    @property
    def eps_high(self) -> float:
        if self.epsilon_high is not None:
            return self.epsilon_high
        return 0.28 if self.loss_type == "dapo" else self.epsilon_low

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_grpo_config(overrides: Sequence[str] = ()) -> GRPOConfig:
    """GRPOConfig from `key=value` strings (as `nanoseek train --set`; `grpo.KEY` is KEY, as the run's settings
    tree names it, train/run_config.py), checked and coerced per field."""
    from nanoseek.train.overrides import apply_overrides, in_section

    cfg = GRPOConfig()
    apply_overrides(cfg, in_section(overrides, "grpo"), example="loss_type=dapo")
    cfg.validate()
    return cfg


def evaluate_r1(model: nn.Module, tok, tasks: Sequence[Task], n: int, cfg: GRPOConfig) -> dict[str, TaskScore]:
    """Greedy accuracy on up to n held-out problems per task in the prompt format GRPO trains with (the R1 format
    with cfg.system_prompt; <bos> + the problem without a chat template or with chat=false), the <answer> checked
    exactly: the shared evaluation (nanoseek.eval), as `nanoseek eval --format r1 --system-prompt S` scores."""
    if tok.chat_template and not cfg.chat:
        tok = copy.copy(tok)
        tok.chat_template = None
    return evaluate_in_format(model, tok, tasks, n, "r1", system_prompt=cfg.system_prompt,
                              max_new_tokens=cfg.max_new_tokens)  # fmt: skip


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


def loop_config(cfg: GRPOConfig, out: Path) -> TrainConfig:
    """The loop's settings of a GRPO run (its step count, schedule, budget, checkpoints and logging), fp32."""
    return TrainConfig(
        optim=cfg.optim, max_steps=cfg.max_steps, time_budget_min=cfg.time_budget_min, mtp_weight=cfg.mtp_weight,
        router_bias_gamma=cfg.router_bias_gamma, device=cfg.device, dtype="float32", seed=cfg.seed,
        out_dir=str(out), ckpt_every=cfg.ckpt_every, keep_last=cfg.keep_last, log_every=cfg.log_every,
        eval=cfg.eval, price_per_device_hour=0.0,
    )  # fmt: skip


class GRPOTrainer(Trainer):
    """The training loop with GRPO's step: rollouts (RolloutSource), then mu updates of GRPOLoss."""

    builds_model = False
    evaluates_first = True

    def __init__(self, model: nn.Module, tok, tasks: Sequence[Task], cfg: GRPOConfig, out: Path, *,
                 reward_fns: Sequence[RewardFn] | None = None, **kw):  # fmt: skip
        """kw: the Trainer's (parallel, resume, show_progress, info, stop_after)."""
        cfg.validate()
        if not tasks:
            raise ValueError("GRPO needs at least one task (--tasks add3,...)")
        if cfg.task_weights and len(cfg.task_weights) != len(tasks):
            raise ValueError(f"{len(tasks)} tasks but {len(cfg.task_weights)} task_weights")
        self.grpo, self._tok, self._tasks, self._initial_model = cfg, tok, list(tasks), model
        self.reward_fns = list(reward_fns) if reward_fns is not None else get_rewards(cfg.rewards)
        self.reward_weights = list(cfg.reward_weights) or [1.0] * len(self.reward_fns)
        if len(self.reward_weights) != len(self.reward_fns):
            raise ValueError(f"{len(self.reward_fns)} reward functions but {len(self.reward_weights)} weights")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        super().__init__(loop_config(cfg, Path(out)), **kw)

    # -- the loop's hooks ----------------------------------------------------------------------------------
    def _prepare_tokenizer(self):
        return self._tok

    def _make_tasks(self) -> list[Task]:
        return self._tasks

    def _config_record(self) -> dict[str, Any]:
        return self.grpo.to_dict()

    def _resume_may_change(self) -> frozenset[str]:
        return ckpt_io.RESUME_MAY_CHANGE | {"max_steps", "time_budget_min", "device", "ckpt_every", "eval_examples"}

    def _checkpoint_extra(self) -> dict[str, Any]:
        return {"start_digest": self.start_digest}

    def _build_model(self) -> nn.Module:
        """The policy, every parameter trained except the MTP modules' when no loss reaches them (mtp_weight = 0:
        DDP would wait for their gradients); the frozen reference (the starting policy; a resume rebuilds it from
        the same starting model, which its digest checks); under FSDP2 the rollout copy."""
        model = self._initial_model.to(self.info.device)
        self.ref, self.start_digest = None, None
        if self.grpo.beta > 0:  # none is kept when beta = 0 (memory)
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
            self.start_digest = weights_digest(self.ref)
            saved = self.checkpoint.extra.get("start_digest") if self.checkpoint is not None else None
            if saved is not None and saved != self.start_digest:
                raise ValueError(
                    f"{self.checkpoint.path} was trained from another starting model; with beta > 0 the KL's "
                    f"reference is the starting model, so resume with the MODEL the run started from"
                )
        mtp = getattr(model, "mtp", None) or nn.ModuleList()
        model.requires_grad_(True)
        if self.grpo.mtp_weight == 0:
            mtp.requires_grad_(False)
        self.trains_mtp = self.grpo.mtp_weight > 0 and len(mtp) > 0
        # Rollouts and evaluation run on a plain module holding the full weights: the policy itself, except
        # under FSDP2, whose parameters are shards (a copy, refreshed from them after every update).
        self.rollout_model, self._rollout_synced = model, True
        if self.parallel == "fsdp" and self.info.distributed:
            self.rollout_model = copy.deepcopy(model).eval().requires_grad_(False)
            self._rollout_synced = False  # (the checkpoint's weights are loaded into the policy)
        return model

    def _make_source(self) -> RolloutSource:
        return RolloutSource(self._tasks, self.tok, self.grpo, self.info, self.reward_fns, self.reward_weights)

    def _make_objective(self) -> GRPOLoss:
        # Taken after parallelize (FSDP2 replaces the parameters by sharded ones): the MTP modules' parameters
        # and the policy's (the rest), whose gradients are clipped apart.
        self.mtp_params = [p for p in getattr(self.model, "mtp", nn.ModuleList()).parameters() if p.requires_grad]
        in_mtp = {id(p) for p in self.mtp_params}
        self.policy_params = [p for p in self.model.parameters() if id(p) not in in_mtp and p.requires_grad]
        return GRPOLoss(self.grpo, self.step_module, self.ref, self.info.device, self.pad_id, self.info.distributed,
                        self.trains_mtp)  # fmt: skip

    def _describe_model(self) -> str:
        n = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        return f"{type(self.model).__name__} {n / 1e6:.2f}M params (GRPO)"

    def _flops_per_token(self) -> float:
        mc = self.rollout_model.config
        if hasattr(mc, "flops_per_token"):
            return mc.flops_per_token(self.grpo.max_new_tokens)
        return 6 * sum(p.numel() for p in self.rollout_model.parameters())

    def _full_states(self) -> tuple[dict | None, Any]:
        """The complete weights (the rollout model's) and optimizer state on rank 0; every rank calls."""
        self._sync_rollout_model()
        sharded = self.rollout_model is not self.model
        if sharded:  # FSDP2 keeps the root's parameters gathered after a forward without backward
            self.step_module.reshard()
        optim_state = ckpt_io.full_optimizer_state(self.model, self.optimizer, sharded=sharded)
        return self.rollout_model.state_dict(), optim_state

    def _export_model(self, model_state: dict | None) -> nn.Module:
        return self.rollout_model

    def evaluate(self, n: int | None = None) -> dict[str, TaskScore]:
        """Held-out accuracy (greedy), on rank 0; the others only help gather the weights under FSDP2."""
        if not self.grpo.eval.examples:
            return {}
        self._sync_rollout_model()
        if not self.info.is_main:
            return {}
        return evaluate_r1(self.rollout_model, self.tok, self.tasks, n or self.grpo.eval.examples, self.grpo)

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

    # -- one step ------------------------------------------------------------------------------------------
    def _train_step(self, step: int, lr: float) -> dict[str, Any]:
        cfg, G, device = self.grpo, self.grpo.num_generations, self.info.device
        t0 = time.perf_counter()
        self.model.eval()
        self._sync_rollout_model()
        ro = self.source.collect(step, self.rollout_model)
        record: dict[str, Any] = {"rollout_s": time.perf_counter() - t0}
        if not ro.n_prompts:  # no prompt fits (the same on every rank)
            return {**record, "loss": 0.0, "reward": 0.0, "skipped": True, "_tokens": 0}
        adv, keep, lengths, metrics = self.source.score(ro)
        record.update(metrics)
        rows = [i for i in keep.nonzero().view(-1).tolist() if lengths[i] > 0]
        # the MTP module learns from one completion of each prompt (a draw of the policy like the others), the
        # groups DAPO drops included (all-correct ones, late on): all G would cost the speedrun's GRPO ~1/4 more
        # time (its steps are time-budgeted) for a drafter that needs far fewer examples
        mtp_rows = [i for i in range(0, len(lengths), G) if lengths[i] > 0] if self.trains_mtp else []
        batch, mtp_batch = self._batch(ro, rows), self._batch(ro, mtp_rows)
        mtp_targets = mtp_target_count(mtp_batch) if mtp_batch is not None else 0
        # token positions processed: the rollouts' (prompt + completion), then the training forwards'
        rolled = sum(len(p) + len(c) for p, c in zip(ro.prompt_ids, ro.completion_ids))
        counts = per_rank([len(rows), sum(lengths[i] for i in rows), len(mtp_rows), mtp_targets, rolled], self.info)
        n_rows, n_tokens, _, n_mtp, rolled = (sum(c[k] for c in counts) for k in range(5))
        if not n_rows:
            record.update(loss=0.0, kl=0.0, clip_frac=0.0, entropy=0.0, skipped=True, _tokens=0,
                          rollout_tokens=int(rolled))  # fmt: skip
            return record
        weights = None
        if batch is not None:
            weights = token_weights(batch.mask, cfg.loss_type, cfg.max_new_tokens, rows=n_rows, tokens=n_tokens)
            weights = weights.to(device)
        total = all_reduce_sum([float(weights.sum()) if weights is not None else 0.0], device)[0]
        plan = self.objective.plan(batch, adv[rows].to(device), weights, mtp_batch, counts)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        stats = dict.fromkeys(("loss", "kl", "clip_frac", "entropy", "mtp_loss"), 0.0)
        groups = [self.policy_params, *([self.mtp_params] if n_mtp else [])]  # clipped apart: the MTP module's
        for _ in range(cfg.mu):  # gradient must not scale the policy's down
            self._backward(len(plan), lambda j: self.objective.loss(plan[j], total, n_mtp, stats))
            grad_norm = self._update(groups)
            self._rollout_synced = self.rollout_model is self.model
        from nanoseek.model.moe import update_router_bias

        update_router_bias(self.model, gamma=cfg.router_bias_gamma)  # also resets the load counters
        self.model.eval()
        trained = int(batch.attention_mask.sum()) * cfg.mu if batch is not None else 0
        *summed, trained = all_reduce_sum([*stats.values(), trained], device)
        stats = dict(zip(stats, summed))
        if not n_mtp:
            del stats["mtp_loss"]
        # The meter's tokens (and so its tokens/s and MFU) are the positions trained on; the sampled tokens are
        # logged apart. Counted together at training FLOPs per token, the MFU read past 100%.
        record.update(stats, grad_norm=float(grad_norm), _tokens=int(trained), rollout_tokens=int(rolled))
        return record

    def _batch(self, ro: Rollouts, rows: list[int]) -> Batch | None:
        if not rows:
            return None
        return make_batch([ro.prompt_ids[i] for i in rows], [ro.completion_ids[i] for i in rows], self.pad_id)

    def train(self) -> GRPOResult:
        start = time.perf_counter()
        res = super().train()
        rolled = sum(int(r.get("rollout_tokens", 0)) for r in self.history)
        s = res.summary
        return GRPOResult(res.model_dir, res.steps, int(s["tokens"]) + rolled, float(s["energy_j"]),
                          time.perf_counter() - start, self.history, self.eval_before, res.eval, s)  # fmt: skip


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
    lora: bool = False,
    merge: bool = False,
) -> GRPOResult:
    """GRPO on `tasks` starting from `model` (anything nanoseek.load reads, a known name such as smollm2, or a
    module with its `tokenizer`); writes <out>/model (HF folder + tokenizer), <out>/metrics.jsonl and
    <out>/checkpoints. Settings and task names are checked before the model is loaded.

    parallel: auto | none | ddp | fsdp under torchrun (auto: ddp there, none in one process). stop_after: end
    after that many steps without the final checkpoint, evaluation and export, as an interrupted run would.
    lora: train a LoRA adapter on the frozen model (train/lora_training.py; `lora.*` settings) into <out>/adapter,
    a PEFT folder (model_dir); merge: also write <out>/model with the adapter folded in (model_dir then)."""
    import nanoseek
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.lora_training import GRPO_DEFAULTS, lora_settings, with_lora

    overrides, lora_cfg = lora_settings(overrides, "grpo", lora, GRPO_DEFAULTS)
    if merge and not lora:
        raise ValueError("--merge folds a LoRA adapter into the model: it needs --lora")
    cfg = load_grpo_config([f"device={device}", *overrides])
    task_objs = [t if isinstance(t, Task) else get_task(t, cfg.heldout_fraction) for t in tasks]
    if parallel != "auto" and parallel not in MODES:  # fails before the model is loaded
        raise ValueError(f"parallel must be auto or one of {', '.join(MODES)}, got {parallel!r}")
    info = init_distributed(cfg.device)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("run_grpo with a model object needs its tokenizer (tokenizer=...)")
        module, tok = model, tokenizer
    else:
        from nanoseek.assets import resolve_model

        path = resolve_model(str(model))  # a known name such as smollm2, or a path
        module = nanoseek.load(path, dtype="float32", device=str(info.device))  # GGUF weights come back dequantized
        tok = tokenizer or load_tokenizer(path)
    kw = dict(reward_fns=reward_fns, show_progress=show_progress, resume=resume, parallel=parallel, info=info,
              stop_after=stop_after)  # fmt: skip
    if lora_cfg is None:
        trainer = GRPOTrainer(module, tok, task_objs, cfg, Path(out), **kw)
    else:
        base = str(Path(model).resolve()) if isinstance(model, str | Path) and Path(model).exists() else str(model)
        if isinstance(model, nn.Module):
            base = type(model).__name__
        trainer = with_lora(GRPOTrainer)(module, tok, task_objs, cfg, Path(out), lora=lora_cfg, merge=merge,
                                         base_name=base, **kw)  # fmt: skip
    trainer.metrics_mirror = Path(metrics_path) if metrics_path is not None else None
    return trainer.train()
