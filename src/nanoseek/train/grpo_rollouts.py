"""GRPO's prompts and rollouts: the prompt a policy sees, G completions per prompt sampled through the engine
with per-prompt seeds, a step's problems, and the loop's batch source (RolloutSource: this rank's rollouts of a
step, scored).

    prompts = [render_prompt(tok, ex, cfg) for ex in draw_examples(tasks, weights, 16, seed, step)]
    completions, reasons, _ = rollout(model, tok, prompts, G, cfg, seed)
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nanoseek.engine.generate import context_length, engine_for
from nanoseek.engine.sampling import SamplingParams
from nanoseek.parallel.distributed import all_reduce_sum
from nanoseek.tasks import Example, Task, extract_r1_answer
from nanoseek.tasks.rewards import score_completions
from nanoseek.train.grpo_loss import group_advantages

log = logging.getLogger("nanoseek.grpo")

if TYPE_CHECKING:
    from nanoseek.train.grpo import GRPOConfig


def render_prompt(tok, example: Example, cfg: GRPOConfig) -> list[int]:
    """The ids a policy sees: the chat template (system prompt + the problem as a user turn) when the
    tokenizer has one and cfg.chat, else <bos> + the problem."""
    if cfg.chat and tok.chat_template:
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        messages.append({"role": "user", "content": example.prompt})
        return tok.encode_chat(messages, add_generation_prompt=True)
    bos = tok.bos_token_id
    return [*([bos] if bos is not None else []), *tok.encode(example.prompt, add_special_tokens=False)]


def decode_completion(tok, ids: Sequence[int]) -> str:
    """Completion text with special tokens kept (a tokenizer may make <think>/<answer> special) except the
    bos/eos/pad markers themselves."""
    text = tok.decode(ids, skip_special_tokens=False)
    for marker in (tok.bos_token, tok.eos_token, tok.pad_token):
        if marker:
            text = text.replace(marker, "")
    return text


@dataclass
class Rollouts:
    examples: list[Example]  # one per completion (each prompt's example repeated G times)
    tasks: list[Task]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # sampled tokens, plus the stop token when the completion stopped
    texts: list[str]
    finish_reasons: list[str]
    rollout_logprobs: list[list[float]]  # the engine's log-probs of the sampled tokens (temperature 1)
    n_prompts: int = 0  # the step's prompts on all ranks together


def rollout_seed(seed: int, prompt_index: int, j: int, G: int) -> int:
    """The sampling seed of completion j of the step's prompt `prompt_index` (seed: the step's): a pure
    function of them, so a prompt's completions are the same whichever rank samples it in whatever batch."""
    return (seed * 1_000_003 + prompt_index * G + j) % (1 << 62)


def rollout(
    model: nn.Module,
    tok,
    prompts: Sequence[list[int]],
    G: int,
    cfg: GRPOConfig,
    seed: int,
    *,
    logprobs: bool = False,
    prompt_indices: Sequence[int] | None = None,
) -> tuple[list[list[int]], list[str], list[list[float]]]:
    """G sampled completions of every prompt, all in one engine call. Returns (completion ids with the stop
    token appended when one ended it, finish reasons, per-token log-probs when asked). prompt_indices: each
    prompt's index among the step's prompts (default 0, 1, ...), which seeds its completions."""
    flat = [p for p in prompts for _ in range(G)]
    limit = context_length(model)
    span = max(len(p) for p in flat) + cfg.max_new_tokens
    engine = engine_for(
        model, span if limit is None else min(span, limit), max_num_seqs=len(flat), stop_ids=tok.stop_token_ids
    )
    params = [
        SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
            seed=rollout_seed(seed, k, j, G), logprobs=0 if logprobs else None,
        )
        for k in (prompt_indices if prompt_indices is not None else range(len(prompts)))
        for j in range(G)
    ]  # fmt: skip
    done = engine.generate(flat, params)
    completions, reasons, lps = [], [], []
    for c in done:
        ids = list(c.token_ids)
        if c.finish_reason == "stop" and isinstance(c.stop_reason, int):
            ids.append(c.stop_reason)  # the policy chose to stop: that choice is trained too
        completions.append(ids)
        reasons.append(c.finish_reason)
        lps.append([e["logprob"] for e in c.logprobs])
    return completions, reasons, lps


def draw_examples(tasks: Sequence[Task], weights: Sequence[float], n: int, seed: int, step: int) -> list[Example]:
    """n training-split problems for `step`: a pure function of (seed, step), so a resumed run draws the same."""
    rng = random.Random(f"grpo/{seed}/{step}")
    return [rng.choices(list(tasks), weights=list(weights))[0].generate(rng, "train") for _ in range(n)]


# ---- the loop's batch source -----------------------------------------------------------------------------------
class RolloutSource:
    """A step's batch for GRPO: the step's prompts (the same on every rank, drawn from (seed, step)), this rank's
    share of them sampled through the engine (every world_size-th prompt with all its G completions, each seeded
    by its prompt's index), and scored. Nothing needs saving: a step's rollouts are a pure function of (seed,
    step) and the weights."""

    def __init__(self, tasks: Sequence[Task], tok, cfg: GRPOConfig, info, reward_fns, reward_weights):
        self.tasks, self.tok, self.cfg, self.info = list(tasks), tok, cfg, info
        self.reward_fns, self.reward_weights = list(reward_fns), list(reward_weights)

    def step_prompts(self, step: int, model: nn.Module) -> tuple[list[Example], list[list[int]]]:
        """The step's problems and prompt ids; prompts that do not fit the model's context are left out (rank 0
        warns)."""
        cfg = self.cfg
        weights = cfg.task_weights or [1.0] * len(self.tasks)
        limit = context_length(model)
        kept, prompts = [], []
        for ex in draw_examples(self.tasks, weights, cfg.prompts_per_step, cfg.seed, step):
            ids = render_prompt(self.tok, ex, cfg)
            if limit is not None and len(ids) >= limit:
                if self.info.is_main:
                    log.warning("skipping a prompt of %d tokens: the model's context is %d (%r)", len(ids), limit,
                                ex.prompt[:60])  # fmt: skip
                continue
            kept.append(ex)
            prompts.append(ids)
        return kept, prompts

    def collect(self, step: int, model: nn.Module) -> Rollouts:
        """This rank's rollouts of the step, sampled from `model` (a plain module with the full weights)."""
        cfg, info, G = self.cfg, self.info, self.cfg.num_generations
        kept, prompts = self.step_prompts(step, model)
        mine = list(range(info.rank, len(prompts), info.world_size))
        completions, reasons, lps = ([], [], []) if not mine else rollout(
            model, self.tok, [prompts[k] for k in mine], G, cfg, seed=cfg.seed * 100_003 + step, prompt_indices=mine,
        )  # fmt: skip
        by_name = {t.name: t for t in self.tasks}
        flat_ex = [kept[k] for k in mine for _ in range(G)]
        return Rollouts(
            flat_ex, [by_name[ex.task] for ex in flat_ex], [prompts[k] for k in mine for _ in range(G)], completions,
            [decode_completion(self.tok, c) for c in completions], reasons, lps, n_prompts=len(prompts),
        )  # fmt: skip

    def score(self, ro: Rollouts) -> tuple[torch.Tensor, torch.Tensor, list[int], dict[str, Any]]:
        """This rank's advantages [n] and kept completions [n] (DAPO drops groups with equal rewards: decided
        per group, on the rank that holds it), completion lengths, and the step's reward metrics (all ranks)."""
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
        n, reward, std, right, length, truncated, groups, *by_fn = all_reduce_sum(local, self.info.device)
        metrics = dict(
            reward=reward / n, reward_std=std / (n / G), accuracy=right / n, completion_len=length / n,
            truncated=truncated / n, groups_kept=int(groups),
            **{f"reward_{name.removesuffix('_reward')}": v / n for name, v in zip(parts, by_fn)},
        )  # fmt: skip
        return adv, keep, lengths, metrics

    def state_dict(self) -> Any:
        return {"kind": "rollouts"}

    def load_state_dict(self, state: Any) -> None:
        pass  # the position is the step itself


def per_rank(values: list[float], info) -> list[list[float]]:
    """Every rank's `values` (one all-reduce: each rank fills its own slot of a zeroed table)."""
    table = [0.0] * (len(values) * info.world_size)
    table[info.rank * len(values) : (info.rank + 1) * len(values)] = values
    summed = all_reduce_sum(table, info.device)
    return [summed[r * len(values) : (r + 1) * len(values)] for r in range(info.world_size)]
