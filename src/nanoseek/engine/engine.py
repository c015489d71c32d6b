"""The inference engine: one object behind generate, chat, evaluation, GRPO rollouts and the server.

    engine = Engine(model, eos_ids=tok.stop_token_ids)
    rid = engine.add_request(prompt_ids, SamplingParams(temperature=0.7, max_tokens=64))
    while engine.has_work():
        for out in engine.step():          # every running request's new token(s), in one batched forward
            print(out.request_id, out.token_id, out.finished)
    engine.abort(rid)                      # any time; its cache blocks are freed

    completions = engine.generate([ids1, ids2], SamplingParams(max_tokens=32))   # offline batch

`AsyncEngine` (engine/async_engine.py) runs `step()` on a thread and streams to asyncio code.

A step: the scheduler picks the running requests and the prompt chunks that fit the token budget; every
request that is decoding goes through one batched forward (one token each), each prompt chunk through its
own; the rows that reached their last token are sampled together, each with its own settings and seed.

With speculative decoding on (`EngineConfig.speculative`, engine/speculative.py), a request without a token
constraint may carry drafts into the step (greedy ones are verified by argmax, sampled ones by rejection
sampling); it then yields one `StepOutput` per accepted token (1..k+1), in order, the last one
carrying `finished` when a stop, max_tokens or the context ends it. `stats()` reports how many drafts
were proposed and accepted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.engine.embeddings import check_embedding_input, embedding_batches, gather, pooled_embeddings
from nanoseek.engine.kv_cache import BlockPool, KVLayout
from nanoseek.engine.kv_groups import SequenceBlocks
from nanoseek.engine.runner import KV_CACHE_DTYPES, ForwardResult, ModelRunner, Row, cache_layout, kv_cache_dtype
from nanoseek.engine.sampling import (
    SampleOutput,
    SamplingParams,
    accept_drafts,
    choose,
    make_generator,
    process_logits,
    target_probs,
    with_logprobs,
)
from nanoseek.engine.scheduler import Request, Scheduled, Scheduler, Status
from nanoseek.engine.speculative import METHODS, accept_greedy, make_drafter
from nanoseek.engine.threads import ThreadPlan, cap_threads
from nanoseek.memory import return_freed_memory


@dataclass
class StepOutput:
    """One new token of one request (a speculating request gets several per step, in order)."""

    request_id: int
    token_id: int | None  # None when the step added no token: a stop token (not part of the output), abort
    finished: bool
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass
class Completion:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]  # generated, without the stop token
    finish_reason: str
    stop_reason: int | str | None = None
    logprobs: list[dict] = field(default_factory=list)
    num_cached_prompt: int = 0  # prompt tokens the prefix cache served


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: enough for max_num_seqs full contexts, capped by cache_bytes
    cache_bytes: int = 1 << 30  # upper bound for the cache when num_blocks is None
    max_num_seqs: int = 64  # requests decoding together
    max_step_tokens: int = 256  # tokens per step (decodes + prompt chunks): bounds a step's latency
    autocast_dtype: torch.dtype | None = None  # e.g. bf16 on CUDA: every forward runs under torch.autocast
    speculative: str | None = None  # None, "ngram" (prompt lookup, any model) or "mtp" (DeepSeek MTP modules)
    num_speculative_tokens: int = 4  # drafts per step and request (requests without a constraint)
    ngram_max: int = 3  # prompt lookup matches the last ngram_max .. ngram_min tokens, longest first
    ngram_min: int = 1
    # torch.compile the decode forward (runner.CompiledDecode): faster tokens once compiled, at the price of
    # a compilation on the first decode step; prompt chunks and draft verification stay eager, and so does
    # every forward of a speculating engine (its decodes are computed query by query)
    compile: bool = False
    # When a step leaves the engine with no work after a burst (a step of at least this many requests since
    # the last time), hand the heap's free pages back to the OS (glibc malloc_trim; nanoseek/memory.py): a
    # burst's freed temporaries otherwise keep the process at its peak size while idle (measured, SmolLM2
    # int8, engine alive after 64 streams x 32 tokens: RSS 822-835 -> 752 MB). The trim costs 15-22 ms, so
    # single streams and small batches (below the threshold) skip it. None: never.
    return_memory_after_rows: int | None = 8
    # Dense models on CPU: every forward (decodes, verifications, prompt chunks) attends in nanoseek's paged
    # attention kernel, reading the cache in place (engine/paged_attention.py; decodes 4-6.5x faster than
    # gathering the history for SDPA, and a query's result depends neither on its batch nor on its prompt
    # chunk's start). False: gather + SDPA (for comparison).
    fused_attention: bool = True
    # The KV cache's dtype (runner.kv_cache_dtype): "auto" fp16 for quantized dense models attending in the paged
    # kernel (half the cache's bytes and memory; llama.cpp's default f16 cache), the weights' dtype otherwise;
    # "model" the weights' dtype; "fp16" wherever the kernel runs.
    kv_cache_dtype: str = "auto"
    # Intra-op threads (engine/threads.py): `threads` is the most a step may use (None: torch's count on the
    # thread that builds the engine). With `adaptive_threads`, AsyncEngine measures where a second thread starts to
    # pay (threads.calibrate, on its own thread) and each step then runs on 1 thread or the cap by its work: a
    # lone stream's decode step on 2 cores is ~2x faster on one thread; without it, steps run on the cap when
    # `threads` is given and are left alone otherwise.
    threads: int | None = None
    adaptive_threads: bool = False

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.speculative not in (None, *METHODS):
            raise ValueError(f"speculative must be None or one of {METHODS}, got {self.speculative!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.return_memory_after_rows is not None and self.return_memory_after_rows < 1:
            raise ValueError(f"return_memory_after_rows must be None or >= 1, got {self.return_memory_after_rows}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be None or >= 1, got {self.threads}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")


class Engine:
    def __init__(
        self,
        model,
        config: EngineConfig | None = None,
        *,
        eos_ids: Iterable[int] | None = None,
        detokenize: Callable[[list[int]], str] | None = None,
    ):
        self.config = config = config or EngineConfig()
        # Ids that end a request (unless it sets ignore_eos); None: the model config's eos ids.
        self.eos_ids = set(_eos_of(model.config) if eos_ids is None else eos_ids)
        self.detokenize = detokenize  # needed for stop strings only
        context = model.config.max_position_embeddings
        mtp = config.speculative == "mtp"
        if mtp and not len(getattr(model, "mtp", ())):
            raise ValueError(
                "speculative='mtp' needs a DeepSeek model with MTP modules (num_nextn_predict_layers >= 1)"
            )
        kv_dtype = kv_cache_dtype(model, config.kv_cache_dtype, fused_attention=config.fused_attention)
        num_blocks = config.num_blocks
        if num_blocks is None:  # a block holds layout.num_slots layers' keys and values of block_size tokens
            spec, windows = cache_layout(model, mtp=mtp)
            per_token = spec.bytes_per_layer_token(kv_dtype) * KVLayout.of(windows).num_slots
            wanted = cache_blocks(model, config, config.max_num_seqs, context)
            num_blocks = max(2, min(wanted, config.cache_bytes // (per_token * config.block_size)))
        self.pool = BlockPool(num_blocks, config.block_size)
        self.runner = ModelRunner(
            model,
            self.pool,
            autocast_dtype=config.autocast_dtype,
            mtp=mtp,
            compile_decode=config.compile,
            fused_attention=config.fused_attention,
            kv_dtype=kv_dtype,
        )
        # Speculating, a request's tokens must not depend on how many drafts a step verifies: decodes and
        # verifications compute every query as if alone (kv_cache.PagedView.query_spans).
        self.runner.row_wise = config.speculative is not None
        self.drafter = make_drafter(
            config.speculative, self.runner, config.num_speculative_tokens, config.ngram_max, config.ngram_min
        )
        self.num_drafted = self.num_accepted = 0  # speculative drafts proposed / accepted by the target
        self.num_memory_returns = 0  # times the engine went idle and returned freed memory to the OS
        self._burst_rows = 0  # the most requests in one step since memory was last returned
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_step_tokens)
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self.vocab_size = model.config.vocab_size
        self.thread_cap = cap_threads(config.threads)
        # None: steps leave the calling thread's count alone; AsyncEngine sets a calibrated plan when asked
        self.thread_plan: ThreadPlan | None = None if config.threads is None else ThreadPlan(self.thread_cap)
        self.step_threads = 0  # torch's intra-op threads in effect during the last step's forwards

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: int | None = None
    ) -> int:
        """Queue a request; returns its id. Bad input raises ValueError and leaves the engine as it was."""
        params = params or SamplingParams()
        prompt = self.validate(prompt_ids, params)
        rid = next(self._ids) if request_id is None else request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid} is in use")
        # an adapter's keys and values differ from the base's for the same tokens: its prefixes are its own
        root = None if params.lora is None else hash(("lora", params.lora))
        blocks = SequenceBlocks(self.pool, self.runner.layout, root=root)
        req = Request(rid, prompt, params, blocks, generator=make_generator(params, self.runner.device))
        if params.constraint is not None:
            req.constraint = params.constraint.start()
        self.requests[rid] = req
        self.scheduler.add(req)
        return rid

    def new_request_id(self) -> int:
        return next(self._ids)

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ints, or ValueError naming what is wrong. Reads no mutable state."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        context = self.runner.context_length
        if len(prompt) >= context:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {context}")
        longest = min(len(prompt) + params.max_tokens, context)
        needed = self.runner.layout.blocks_per_sequence(longest, self.pool.block_size, self.config.max_step_tokens)
        if needed > self.pool.num_blocks - 1:
            raise ValueError(
                f"prompt + max_tokens = {longest} tokens do not fit the KV cache "
                f"(they need {needed} blocks of {self.pool.block_size} tokens, it has {self.pool.num_blocks - 1})"
            )
        if params.stop and self.detokenize is None:
            raise ValueError("stop strings need an engine built with a detokenize function")
        self.adapter_id(params.lora)
        return prompt

    def adapter_id(self, name: str | None) -> int:
        """The id of the LoRA adapter `name` attached to the model (engine/lora.py); 0 for None, the base model.
        ValueError for a name the model does not have."""
        if name is None:
            return 0
        adapters = getattr(self.runner.model, "lora_adapters", None)
        if adapters is None:
            raise ValueError(f"unknown LoRA adapter {name!r}: the model has no adapters attached")
        return adapters.id_of(name)

    def abort(self, request_id: int) -> bool:
        """Stop a request and free its blocks; False when it is unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        self._finish(req, "abort")
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def get(self, request_id: int) -> Request:
        return self.requests[request_id]

    def stats(self) -> dict[str, float]:
        """Counters since the engine was built: speculative drafts and their acceptance rate, preemptions."""
        return {
            "num_drafted": self.num_drafted,
            "num_accepted": self.num_accepted,
            "acceptance_rate": self.num_accepted / self.num_drafted if self.num_drafted else 0.0,
            "num_preemptions": self.scheduler.num_preemptions,
        }

    def release(self, request_id: int) -> None:
        """Forget a finished request (the engine keeps finished ones until asked, for their results)."""
        req = self.requests.get(request_id)
        if req is not None and req.finished:
            del self.requests[request_id]

    # ---- one step -------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        # rows of similar length share a forward (decodes, with their drafts if any, always do)
        if self.thread_plan is not None:
            wanted = self.thread_plan.threads(sum(s.num_new for s in scheduled))
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)  # this thread's count only (OpenMP's is per thread)
        self.step_threads = torch.get_num_threads()
        passes: list[tuple[list[Scheduled], ForwardResult]] = []
        to_sample: list[tuple[Scheduled, torch.Tensor]] = []
        for group in self._groups(scheduled):
            rows = [Row(s.request.table, s.request.num_computed, s.token_ids, 1 + len(s.draft_ids),
                        self.adapter_id(s.request.params.lora)) for s in group]  # fmt: skip
            result = self.runner.forward(rows, hidden=self.drafter is not None and self.drafter.needs_hidden)
            passes.append((group, result))
            to_sample.extend((s, result.row_logits(i, 1 + len(s.draft_ids))) for i, s in enumerate(group) if s.samples)
        for s in scheduled:
            if not s.samples:  # a prompt chunk short of the last token (sampled rows advance in _sample)
                s.request.num_computed += s.num_new
                s.request.table.register_full_blocks(s.request.all_ids, s.request.num_computed)
                s.request.table.drop_out_of_window(s.request.num_computed)
        outputs = self._sample(to_sample)
        if self.drafter is not None:
            self.drafter.after_step(passes)  # the drafts each request brings to the next step
        self._burst_rows = max(self._burst_rows, len(scheduled))
        threshold = self.config.return_memory_after_rows
        if threshold is not None and self._burst_rows >= threshold and not self.scheduler.has_work():
            del passes, to_sample  # this step's logits are garbage now, not only after we return
            self.num_memory_returns += return_freed_memory(collect=False)
            self._burst_rows = 0
        return outputs

    def _groups(self, scheduled: list[Scheduled]) -> list[list[Scheduled]]:
        """The step's forwards. Row-wise (speculating), decodes and verifications never share a forward with a
        prompt chunk, so theirs run query by query (ModelRunner.row_wise) and the chunks' run batched."""
        if not self.runner.row_wise:
            return _forward_groups(scheduled)
        decoding: list[Scheduled] = []
        chunks: list[Scheduled] = []
        for s in scheduled:
            (decoding if s.samples and s.num_new == 1 + len(s.draft_ids) else chunks).append(s)
        return _forward_groups(decoding) + _forward_groups(chunks)

    def _sample(self, items: list[tuple[Scheduled, torch.Tensor]]) -> list[StepOutput]:
        """Sample every row that reached its last token. A row with drafts has logits [1 + drafts, V], each
        position processed as the request's own next-token distribution (penalties see the drafts before it as
        output); a greedy request keeps the tokens `accept_greedy` yields, a sampled one those `accept_drafts`
        yields (rejection sampling with its own generator). Stops apply token by token."""
        if not items:
            return []
        # one flat row per position: (request, output it follows)
        flat = [(s.request, s.request.output_ids + s.draft_ids[:j]) for s, lg in items for j in range(lg.shape[0])]
        reqs = [r for r, _ in flat]
        params = [r.params for r in reqs]
        logits = torch.cat([lg for _, lg in items])
        prompt_counts = output_counts = None
        if any(p.penalized for p in params):
            prompt_counts = self._counts([r.prompt_ids for r in reqs], logits.shape[1])
            output_counts = self._counts([out for _, out in flat], logits.shape[1])
        allowed = self._allowed(reqs, logits.shape[1]) if any(r.constraint is not None for r in reqs) else None
        processed = process_logits(logits, params, prompt_counts, output_counts, allowed)
        # every position's token: the target's own choice, except for sampled rows with drafts (below), whose
        # positions must not spend draws from the request's generator here
        of_row = [s for s, lg in items for _ in range(lg.shape[0])]
        plain = [i for i, s in enumerate(of_row) if not s.draft_ids or s.request.params.greedy]
        tokens = torch.zeros(len(flat), dtype=torch.long, device=processed.device)
        if plain:
            rows = torch.tensor(plain, device=processed.device)
            tokens[rows] = choose(processed[rows], [params[i] for i in plain], [reqs[i].generator for i in plain])
        chosen = tokens.tolist()
        runs = []
        first = 0  # flat row of the item's first position
        for s, lg in items:
            n = lg.shape[0]
            if s.draft_ids and not s.request.params.greedy:
                probs = target_probs(processed[first : first + n], params[first : first + n])
                run, _ = accept_drafts(probs, s.draft_ids, s.request.generator)
                tokens[first : first + len(run)] = torch.tensor(run, device=tokens.device)
            else:
                run = accept_greedy(s.draft_ids, chosen[first : first + n])
            runs.append(run)
            first += n
        sampled = with_logprobs(SampleOutput(tokens), logits, params)
        outputs = []
        first = 0
        for (s, lg), run in zip(items, runs):
            req = s.request
            self.num_drafted += len(s.draft_ids)
            self.num_accepted += len(run) - 1
            # the cache now holds the row's real tokens and the accepted drafts; rejected ones lie beyond
            req.num_computed += s.num_new - len(s.draft_ids) + len(run) - 1
            req.table.register_full_blocks(req.all_ids + run[:-1], req.num_computed)
            req.table.drop_out_of_window(req.num_computed)  # sliding groups: what no later query can see
            for j, token in enumerate(run):
                out = StepOutput(req.id, token, False)
                if req.params.logprobs is not None:
                    self._logprobs(req, out, sampled, first + j)
                self._append(req, token, out)
                outputs.append(out)
                if req.finished:
                    break
            first += lg.shape[0]
        return outputs

    def _allowed(self, reqs: list[Request], vocab: int) -> torch.Tensor:
        """[B, V] bool: each constrained row's next allowed tokens (a row with none left may only end: its
        end-of-sequence ids), every token for the others. (Constrained rows carry no drafts: one row each.)"""
        allowed = torch.ones(len(reqs), vocab, dtype=torch.bool)
        for i, req in enumerate(reqs):
            if req.constraint is not None:
                allowed[i] = req.constraint.allowed(vocab)
                if not allowed[i].any():
                    allowed[i, [t for t in self.eos_ids if t < vocab]] = True
        return allowed

    def _logprobs(self, req: Request, out: StepOutput, sampled, row: int) -> None:
        out.logprob = float(sampled.logprobs[row])
        n = req.params.logprobs
        out.top_logprobs = (
            dict(zip(sampled.top_ids[row, :n].tolist(), sampled.top_logprobs[row, :n].tolist())) if n else {}
        )
        req.logprobs.append({"token": out.token_id, "logprob": out.logprob, "top": out.top_logprobs})

    def _counts(self, seqs: list[list[int]], vocab: int) -> torch.Tensor:
        counts = torch.zeros(len(seqs), vocab, device=self.runner.device)
        for i, seq in enumerate(seqs):
            if seq:
                counts[i].index_add_(
                    0, torch.tensor(seq, device=counts.device), torch.ones(len(seq), device=counts.device)
                )
        return counts

    def _append(self, req: Request, token: int, out: StepOutput) -> None:
        p = req.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            req.stop_reason, out.token_id = token, None
            self._finish(req, "stop")
        else:
            req.output_ids.append(token)
            if req.constraint is not None:
                req.constraint.advance(token)
            stop = self._stop_string(req)
            if stop is not None:
                req.stop_reason = stop
                self._finish(req, "stop")
            elif len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.runner.context_length:
                self._finish(req, "length")
        out.finished, out.finish_reason = req.finished, req.finish_reason

    def _stop_string(self, req: Request) -> str | None:
        if not req.params.stop:
            return None
        longest = max(len(s) for s in req.params.stop)
        tail = self.detokenize(req.output_ids[-(longest + 8) :])  # a stop string spans at most this many tokens
        return next((s for s in req.params.stop if s in tail), None)

    def _finish(self, req: Request, reason: str) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.scheduler.remove(req)

    def warm_up(self) -> None:
        """Compile the decode step now, for one row and for several, rather than during the first requests (tens
        of seconds on a 2-core CPU the first time): a server calls it before it accepts requests. Does nothing
        without `compile`. Its blocks are freed (the prefix cache may keep its two-token prompt, evicted like
        any other entry)."""
        if self.runner.decode_model is None:
            return
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        self.generate([[1, 2]], params)
        self.generate([[1, 2], [2, 1]], params)

    # ---- embeddings -----------------------------------------------------------------------------------
    def embed(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Each prompt's embedding, [len(prompts), hidden_size] fp32 unit vectors in the prompts' order: mean-pooled
        final hidden states of one prefill forward, no decode (engine/embeddings.py). Forwards hold at most
        max_step_tokens padded tokens (a longer prompt goes alone). Runs on the calling thread; with an
        AsyncEngine, call its `embed`, which runs each forward on the engine's thread between steps."""
        inputs = [self.check_embedding_input(p) for p in prompts]
        if not inputs:
            raise ValueError("no inputs to embed")
        groups = embedding_batches([len(ids) for ids in inputs], self.config.max_step_tokens)
        return gather(groups, [self.embed_forward([inputs[i] for i in group]) for group in groups])

    def embed_forward(self, inputs: list[list[int]]) -> torch.Tensor:
        """The vectors of checked inputs from one forward, on the intra-op threads the thread plan gives a step of
        as many tokens (AsyncEngine.embed runs each forward so, as a job between steps)."""
        if self.thread_plan is not None:
            wanted = self.thread_plan.threads(len(inputs) * max(len(ids) for ids in inputs))
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)  # this thread's count only, as in step()
        return pooled_embeddings(self.runner, inputs, self.config.block_size)

    def check_embedding_input(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt as a list of ints, or ValueError naming what is wrong. Reads no mutable state."""
        return check_embedding_input(prompt_ids, self.vocab_size, self.runner.context_length)

    # ---- offline batch ------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[Completion]:
        """Run every prompt to completion (batched, continuously); completions in the prompts' order."""
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling settings")
        ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(self.add_request(prompt, p))
            while any(not self.requests[i].finished for i in ids):
                self.step()
        except BaseException:
            for i in ids:
                self.abort(i)
            raise
        out = []
        for i in ids:
            r = self.requests.pop(i)
            out.append(
                Completion(
                    i, r.prompt_ids, r.output_ids, r.finish_reason, r.stop_reason, r.logprobs, r.num_cached_prompt
                )
            )
        return out


def cache_blocks(model, config: EngineConfig, num_seqs: int, tokens_per_seq: int) -> int:
    """The num_blocks (the reserved block included) that hold num_seqs sequences of tokens_per_seq tokens at
    once: every layer group's blocks (a sliding group needs only its window and a step's tokens)."""
    _, windows = cache_layout(model, mtp=config.speculative == "mtp")
    per_seq = KVLayout.of(windows).blocks_per_sequence(tokens_per_seq, config.block_size, config.max_step_tokens)
    return num_seqs * per_seq + 1


def _eos_of(cfg) -> list[int]:
    eos = getattr(cfg, "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _forward_groups(scheduled: list[Scheduled], max_waste: float = 0.25) -> list[list[Scheduled]]:
    """Split a step's rows into right-padded forwards: rows of similar length share one (the decodes, one
    token each, always do), and a long prompt chunk gets its own rather than padding every other row to its
    length. A group's padding stays within `max_waste` of its real tokens."""
    groups: list[list[Scheduled]] = []
    real = 0
    for s in sorted(scheduled, key=lambda s: s.num_new):
        if groups and s.num_new * (len(groups[-1]) + 1) <= (1 + max_waste) * (real + s.num_new):
            groups[-1].append(s)
            real += s.num_new
        else:
            groups.append([s])
            real = s.num_new
    return groups
