"""Which requests run in the next step, and how many of their tokens: continuous batching with chunked
prefill under a token budget, prefix-cache hits, and preemption when the cache runs out of blocks.

Each step, running requests go first, oldest first: a decoding request needs one token, a request still in
its prompt needs the next chunk of it (at most what is left of the step's token budget). Then waiting
requests join while the budget and the free blocks allow, after sharing whatever prefix of their prompt
the cache already holds. A request's blocks are one table per layer group (engine/kv_groups.py): it
joins or grows only when the pool has what every group needs together. When a running request cannot get
its blocks, the newest running request is preempted: its blocks (every group's) go back to the pool and it
waits again, to be recomputed from its prompt and the tokens it already produced (its output so far is
kept). Nothing is corrupted and nothing crashes; a request that alone does not fit in the whole cache is
refused when it is added.

A paused request (`Request.paused`, set while its reader is behind: AsyncEngine's max_unread) keeps its place and
its blocks but is not scheduled, so it costs the others no compute; it is not counted as work (an engine with only
paused requests sleeps until one is resumed), and it may still be preempted like any running request.

Speculative decoding: a decoding request may carry draft tokens (`Request.draft_ids`, proposed at the end
of the previous step). It then takes 1 + len(drafts) tokens, so the target model scores them all in one
forward; when the budget or the free blocks are short, the drafts are cut (down to none) before anything
is preempted for them.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from nanoseek.engine.constraint import ConstraintState
from nanoseek.engine.kv_cache import BlockPool
from nanoseek.engine.kv_groups import SequenceBlocks
from nanoseek.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    table: SequenceBlocks  # its cache blocks: one table per layer group
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # leading tokens of prompt + output whose keys/values are in the cache
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    generator: torch.Generator | None = None
    logprobs: list[dict] = field(default_factory=list)
    num_cached_prompt: int = 0  # prompt tokens served by the prefix cache (first admission)
    num_preemptions: int = 0
    draft_ids: list[int] = field(default_factory=list)  # speculative tokens to verify in the next step
    constraint: ConstraintState | None = None  # its own state of params.constraint, advanced token by token
    paused: bool = False  # not scheduled while set (its reader is behind); keeps its blocks and place

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class Scheduled:
    request: Request
    num_new: int  # tokens computed this step, from request.num_computed on (drafts included)
    draft_ids: list[int] = field(default_factory=list)  # the last len(draft_ids) of them are drafts

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the request's last token, so the step yields its next token(s)."""
        return self.request.num_computed + self.num_new - len(self.draft_ids) == self.request.num_tokens

    @property
    def token_ids(self) -> list[int]:
        req, start = self.request, self.request.num_computed
        return req.all_ids[start : start + self.num_new - len(self.draft_ids)] + self.draft_ids


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int = 64, max_step_tokens: int = 256):
        if max_num_seqs < 1 or max_step_tokens < 1:
            raise ValueError("max_num_seqs and max_step_tokens must be >= 1")
        self.pool = pool
        self.max_num_seqs, self.max_step_tokens = max_num_seqs, max_step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        """Whether a step would compute anything: a request that is not paused."""
        return any(not r.paused for r in self.running) or any(not r.paused for r in self.waiting)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues and give its blocks back (finished or aborted)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.table.release()

    def schedule(self) -> list[Scheduled]:
        budget = self.max_step_tokens
        out: list[Scheduled] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.paused:
                i += 1
                continue
            take = min(req.num_tokens - req.num_computed, budget)
            drafts, req.draft_ids = req.draft_ids[: budget - take], []  # (drafts only come with take == 1)
            if drafts and not req.table.reserve(req.num_computed + take + len(drafts), req.num_computed):
                drafts = []  # speculation never costs a preemption
            if not req.table.reserve(req.num_computed + take, req.num_computed):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
                continue
            out.append(Scheduled(req, take + len(drafts), drafts))
            budget -= take + len(drafts)
            i += 1
        ready = [r for r in self.waiting if not r.paused]  # in order; paused ones keep their place
        while ready and budget > 0 and len(self.running) < self.max_num_seqs:
            req = ready[0]
            if req.num_computed == 0 and req.table.empty:
                cached = req.table.match_prefix(req.all_ids)
                req.num_computed = cached
                if req.num_preemptions == 0:
                    req.num_cached_prompt = cached
            take = min(req.num_tokens - req.num_computed, budget)
            if not req.table.reserve(req.num_computed + take, req.num_computed):
                req.table.release()  # wait for blocks without holding any
                req.num_computed = 0
                break
            self.waiting.remove(ready.pop(0))
            req.status = Status.RUNNING
            self.running.append(req)
            out.append(Scheduled(req, take))
            budget -= take
        return out

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        req.table.release()
        req.num_computed = 0
        req.draft_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
