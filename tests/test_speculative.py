"""Speculative decoding on tiny models: greedy output equals plain greedy decoding token for token (n-gram
drafts on every kind of model, MTP drafts on DeepSeek-V3), batched, chunked, with small blocks and under
preemption; stops inside an accepted run; MTP drafts equal a cache-free recomputation of the same rule;
acceptance counters."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch

from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.sampling import SamplingParams, accept_drafts, process_logits, target_probs
from nanoseek.engine.speculative import accept_greedy, propose_ngram
from nanoseek.model.config import from_name
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.model.rope import rope_cos_sin
from test_engine import PROMPTS, _alone, _model

REPEATING = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]  # prompt lookup finds its own pattern at once
# for the trained model (counts up by 3 mod 64): the walk restarts, so prompt lookup proposes its continuation
WALK = [(10 + 3 * i) % 64 for i in range(20)] + [10, 13, 16]
GREEDY = SamplingParams(temperature=0, max_tokens=16)
CHUNKED = dict(block_size=4, max_step_tokens=8)


def _mtp_model(vocab_size: int = 256) -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    cfg = dataclasses.replace(from_name("test-tiny"), num_nextn_predict_layers=1, vocab_size=vocab_size)
    return DeepseekV3ForCausalLM(cfg).eval()


@functools.cache  # (deterministic; the engine never changes the weights)
def _trained_mtp_model() -> DeepseekV3ForCausalLM:
    """A few steps on sequences that count up by 3 (mod 64): the main model and the MTP module both learn
    the rule, so MTP drafts get accepted."""
    model = _mtp_model(vocab_size=64).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        ids = (torch.randint(0, 64, (16, 1), generator=gen) + 3 * torch.arange(17)) % 64
        out = model.compute_loss(ids[:, :-1], ids[:, 1:], mtp_weight=1.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


def _plain(model, prompts, params=GREEDY, **config):
    return [c.token_ids for c in Engine(model, EngineConfig(**config), eos_ids=[]).generate(prompts, params)]


# ---- the pieces ---------------------------------------------------------------------------------------------
def test_propose_ngram_takes_the_longest_most_recent_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2) == [7, 8]  # "1 2 3" last seen before 7 8
    assert propose_ngram([4, 1, 2, 5, 6, 2], 3) == [5, 6, 2]  # only the 1-gram "2" occurs earlier
    assert propose_ngram([1, 2, 3, 4], 3) == []  # nothing repeats
    assert propose_ngram([7, 7, 7], 4) == [7]  # the suffix itself is never its own match
    assert propose_ngram([1, 2, 1, 2, 3, 2], 3, max_n=1) == [3, 2]  # 1-grams only: the last earlier "2"
    assert propose_ngram([1, 2, 1, 2], 0) == [] and propose_ngram([5], 3) == []


def test_accept_greedy_keeps_the_agreeing_prefix_and_the_targets_next_token():
    assert accept_greedy([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]  # all drafts and the bonus token
    assert accept_greedy([4, 5, 6], [4, 9, 6, 7]) == [4, 9]  # the target's correction ends the run
    assert accept_greedy([4, 5, 6], [8, 5, 6, 7]) == [8]
    assert accept_greedy([], [3]) == [3]
    with pytest.raises(ValueError, match="target"):
        accept_greedy([1, 2], [1, 2])


def test_bad_speculative_settings_are_refused():
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(speculative="medusa")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="MTP"):
        Engine(_model("llama"), EngineConfig(speculative="mtp"))
    with pytest.raises(ValueError, match="MTP"):
        Engine(_model("deepseek_v3"), EngineConfig(speculative="mtp"))  # test-tiny has no MTP module


# ---- greedy output is unchanged ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "deepseek_v3"])
def test_ngram_greedy_equals_plain_greedy(family):
    """Batched rows of different lengths, chunked prompts, 4-token blocks (mistral: every layer slides, so
    blocks are freed as they fall out of the window while drafts are verified)."""
    model = _model(family)
    prompts = [*PROMPTS, REPEATING]
    engine = Engine(model, EngineConfig(speculative="ngram", **CHUNKED), eos_ids=[])
    got = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    assert got == _plain(model, prompts, **CHUNKED)
    assert got[-1] == _alone(model, REPEATING, 16)
    stats = engine.stats()
    assert 0 < stats["num_accepted"] <= stats["num_drafted"]
    assert engine.pool.num_free == engine.pool.num_blocks - 1  # every block back, drafts' included


@pytest.mark.parametrize("trained", [False, True])
def test_mtp_greedy_equals_plain_greedy(trained):
    model = _trained_mtp_model() if trained else _mtp_model()
    prompts = [[10, 13, 16], [40], list(range(1, 50, 3)), [7, 10, 13, 16, 19, 22, 25]]
    engine = Engine(model, EngineConfig(speculative="mtp", num_speculative_tokens=3, **CHUNKED), eos_ids=[])
    got = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    assert got == _plain(model, prompts, **CHUNKED)
    stats = engine.stats()
    assert stats["num_drafted"] > 0
    if trained:  # the module learned the rule: most drafts are right
        assert stats["acceptance_rate"] > 0.5
    assert engine.pool.num_free == engine.pool.num_blocks - 1


def test_penalties_and_logprobs_with_drafts():
    """Penalties see the drafts before each verified position as output; logprobs come per token."""
    model = _model("llama")
    params = SamplingParams(temperature=0, max_tokens=16, frequency_penalty=0.5, logprobs=2)
    engine = Engine(model, EngineConfig(speculative="ngram", **CHUNKED), eos_ids=[])
    spec = engine.generate([REPEATING, PROMPTS[0]], params)
    plain = Engine(model, EngineConfig(**CHUNKED), eos_ids=[]).generate([REPEATING, PROMPTS[0]], params)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    for a, b in zip(spec, plain):
        assert [x["token"] for x in a.logprobs] == a.token_ids
        assert [x["logprob"] for x in a.logprobs] == pytest.approx([x["logprob"] for x in b.logprobs], abs=1e-4)
    assert engine.stats()["num_accepted"] > 0


# ---- sampled requests: rejection sampling ------------------------------------------------------------------
def test_accept_drafts_by_hand():
    """Position by position the target draws its own token (argmax of p / Exp(1) noise, the request's next
    [V] exponentials) and keeps the draft while they agree; the first disagreement is the replacement."""
    noise = torch.empty(3, 3).exponential_(generator=torch.Generator().manual_seed(3))  # the draws, in order
    p = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3], [0.3, 0.3, 0.4]])
    y = (p / noise).argmax(-1).tolist()  # the target's draw at each position
    assert accept_drafts(p, [y[0], y[1]], torch.Generator().manual_seed(3)) == ([y[0], y[1], y[2]], 2)
    wrong = (y[1] + 1) % 3
    assert accept_drafts(p, [y[0], wrong], torch.Generator().manual_seed(3)) == ([y[0], y[1]], 1)
    assert accept_drafts(p, [(y[0] + 1) % 3, 0], torch.Generator().manual_seed(3)) == ([y[0]], 0)
    # a draft with no mass is never kept; the only other token with mass is then certain
    certain = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert accept_drafts(certain, [0], torch.Generator().manual_seed(3)) == ([1], 0)
    assert accept_drafts(certain, [1], torch.Generator().manual_seed(3)) == ([1, 2], 1)
    with pytest.raises(ValueError, match="drafts"):
        accept_drafts(p, [1], None)


def _within(counts: torch.Tensor, p: torch.Tensor, n: int) -> bool:
    """Empirical frequencies within 5 standard errors of p (binomial, per token; never fails by chance at
    these seeds, and a 5-sigma band still catches a rule that, say, always keeps the draft)."""
    band = 5 * (p * (1 - p) / n).sqrt() + 1e-9
    return bool(((counts / n - p).abs() <= band).all())


@pytest.mark.parametrize("draft_kind", ["right", "wrong", "filtered"])
def test_rejection_sampling_reproduces_the_target_distribution(draft_kind):
    """The first token of a speculative step is distributed as p (the processed target distribution: here
    temperature 0.7, top-k 5 and a repetition penalty on token 1), whatever the draft: the target's most likely
    token, a wrong one, or one top-k removed (p = 0, never kept). The second token, after a kept first draft,
    is distributed as the second row's p."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, generator=gen) * 2
    params = SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.3)
    counts = torch.zeros(3, 8)
    counts[:, 1] = 1
    probs = target_probs(process_logits(logits, [params] * 3, None, counts), [params] * 3)
    first = int(probs[0].argmax()) if draft_kind == "right" else int(probs[0].argsort()[-3])
    if draft_kind == "filtered":
        first = int(probs[0].argmin())
        assert probs[0, first] == 0
    drafts = [first, int(probs[1].argmax())]
    n = 6000
    firsts, seconds = torch.zeros(8), torch.zeros(8)
    draws = torch.Generator().manual_seed(1)
    for _ in range(n):
        tokens, kept = accept_drafts(probs, drafts, draws)
        firsts[tokens[0]] += 1
        if kept:
            seconds[tokens[1]] += 1
    assert _within(firsts, probs[0], n)
    if seconds.sum() > 100:
        assert _within(seconds, probs[1], int(seconds.sum()))


def test_sampled_speculation_is_seeded_per_request_and_uses_the_processed_distribution():
    """A seeded sampled request speculates (drafts are accepted) and gives the same tokens alone, beside other
    requests (seeded and not) with its prompt chunked differently, and without speculation: each token spends
    the same draw either way. Penalties and top-k/p apply at every verified position with the kept drafts
    before it counted as output (else the penalised request would part from plain sampling)."""
    model = _model("llama")
    prompts = [PROMPTS[2], REPEATING, [5, 6, 5, 6]]
    others = [SamplingParams(temperature=0.9, max_tokens=10), SamplingParams(temperature=0.5, seed=1, max_tokens=14)]
    for seeded in (
        SamplingParams(temperature=0.3, seed=7, max_tokens=12),
        SamplingParams(temperature=0.5, seed=3, max_tokens=16, frequency_penalty=0.4, top_k=20, top_p=0.9),
    ):
        engine = Engine(model, EngineConfig(speculative="ngram"), eos_ids=[])
        (alone,) = engine.generate([REPEATING], seeded)
        assert engine.stats()["num_accepted"] > 0
        batch = Engine(model, EngineConfig(speculative="ngram", **CHUNKED), eos_ids=[]).generate(
            prompts, [others[0], seeded, others[1]]
        )
        assert batch[1].token_ids == alone.token_ids
        assert alone.token_ids == _plain(model, [REPEATING], seeded)[0]


def test_sampled_speculation_returns_the_target_models_logprobs():
    """Logprobs of a sampled speculative request (kept drafts, replacements and bonus tokens alike) are the
    model's own log-softmax at each position, as a full forward over prompt + output computes them."""
    model = _model("llama")
    params = SamplingParams(temperature=0.3, seed=7, max_tokens=12, logprobs=2)
    engine = Engine(model, EngineConfig(speculative="ngram"), eos_ids=[])
    (c,) = engine.generate([REPEATING], params)
    assert engine.stats()["num_accepted"] > 0
    with torch.no_grad():
        logp = model(torch.tensor([REPEATING + c.token_ids]))[0, len(REPEATING) - 1 : -1].log_softmax(-1)
    assert [x["token"] for x in c.logprobs] == c.token_ids
    want = logp.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
    assert [x["logprob"] for x in c.logprobs] == pytest.approx(want.tolist(), abs=1e-4)
    assert [sorted(x["top"]) for x in c.logprobs] == [sorted(row) for row in logp.topk(2).indices.tolist()]


# ---- cache consistency of MTP drafts ------------------------------------------------------------------------
def _reference_mtp_drafts(model: DeepseekV3ForCausalLM, tokens: list[int], k: int) -> list[int]:
    """The drafting rule without any cache: depth 1 over the whole sequence (main hidden states of the
    computed tokens, each next token's embedding), then again on its own last output and the last draft."""
    c = len(tokens) - 1  # tokens[c] is sampled but not computed yet
    with torch.no_grad():
        h_prev = model.forward_hidden(torch.tensor([tokens[:c]]))
        following = list(tokens[1:])
        drafts = []
        for _ in range(k):
            T = h_prev.shape[1]
            cos, sin = rope_cos_sin(model.inv_freq, torch.arange(T)[None], model.rope_attention_factor)
            emb = model.model.embed_tokens(torch.tensor([following[:T]]))
            out = model.mtp[0](h_prev, emb, cos[:, None], sin[:, None], None)
            drafts.append(int(model.mtp_logits(0, out[:, -1]).argmax()))
            h_prev = torch.cat([h_prev, out[:, -1:]], dim=1)
            following.append(drafts[-1])
    return drafts


@pytest.mark.parametrize("trained", [False, True])
def test_mtp_drafts_equal_a_cache_free_recomputation(trained):
    """After every step (prompt chunks, accepted and rejected drafts, rows joining), each request's drafts
    are what the same rule gives computed from scratch: the MTP cache holds exactly the right entries."""
    model = _trained_mtp_model() if trained else _mtp_model()
    engine = Engine(model, EngineConfig(speculative="mtp", num_speculative_tokens=3, **CHUNKED), eos_ids=[])
    ids = [engine.add_request(p, GREEDY) for p in ([10, 13, 16, 19], list(range(2, 40, 3)), [33, 36])]
    checked = 0
    while engine.has_work():
        engine.step()
        for rid in ids:
            req = engine.get(rid)
            if req.draft_ids:
                assert req.draft_ids == _reference_mtp_drafts(model, req.all_ids, len(req.draft_ids))
                checked += 1
    assert checked > 10
    if trained:
        assert engine.stats()["num_accepted"] > 0


# ---- stops, counters, preemption, streaming ------------------------------------------------------------
def _multi_token_step(model, prompt, params, **config):
    """Per step, the tokens one speculating request yields."""
    engine = Engine(model, EngineConfig(speculative="ngram", **config), eos_ids=[])
    engine.add_request(prompt, params)
    steps = []
    while engine.has_work():
        steps.append([o.token_id for o in engine.step()])
    return steps, engine


def test_stops_apply_token_by_token_inside_an_accepted_run():
    """The trained model continues the walk, which prompt lookup drafts from the prompt: several tokens per
    step, none of them seen in the output before, so any of them can be the stop."""
    model = _trained_mtp_model()
    steps, _ = _multi_token_step(model, WALK, GREEDY)
    free_run = [t for s in steps for t in s]
    assert free_run == _alone(model, WALK, 16) and len(set(free_run)) == 16
    assert max(len(s) for s in steps) == 5
    runs = [sum(len(s) for s in steps[:i]) for i in range(len(steps) + 1)]  # where each step's tokens start
    stop_at = next(runs[i] + 1 for i, s in enumerate(steps) if len(s) >= 3)  # 2nd token of a multi-token step
    stop_token = free_run[stop_at]
    (c,) = Engine(model, EngineConfig(speculative="ngram"), eos_ids=[stop_token]).generate([WALK], GREEDY)
    assert c.token_ids == free_run[:stop_at] and c.finish_reason == "stop" and c.stop_reason == stop_token
    params = SamplingParams(temperature=0, max_tokens=16, stop_token_ids=(stop_token,))
    spec_steps, _ = _multi_token_step(model, WALK, params)
    # nothing after the stop; the stop token itself is no output (token_id None, named by stop_reason)
    assert [t for s in spec_steps for t in s] == [*free_run[:stop_at], None]
    text = Engine(model, EngineConfig(speculative="ngram"), eos_ids=[], detokenize=lambda ids: " ".join(map(str, ids)))
    (c,) = text.generate([WALK], SamplingParams(temperature=0, max_tokens=16, stop=(f" {stop_token} ",)))
    assert c.finish_reason == "stop" and c.token_ids == free_run[: stop_at + 2]  # it ends with the token after
    for n in (1, stop_at + 1, 7):  # max_tokens anywhere: drafts never overshoot it
        (c,) = Engine(model, EngineConfig(speculative="ngram"), eos_ids=[]).generate(
            [WALK], SamplingParams(temperature=0, max_tokens=n)
        )
        assert c.token_ids == free_run[:n] and c.finish_reason == "length"


def test_counters_add_up():
    """Every step yields one target token plus the accepted drafts."""
    steps, engine = _multi_token_step(_trained_mtp_model(), WALK, GREEDY)
    stats = engine.stats()
    produced = sum(len(s) for s in steps)
    sampling_steps = sum(1 for s in steps if s)
    assert produced == 16 == sampling_steps + stats["num_accepted"]
    assert stats["acceptance_rate"] == stats["num_accepted"] / stats["num_drafted"]
    assert max(len(s) for s in steps) <= 1 + engine.config.num_speculative_tokens


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_preemption_with_speculation_keeps_outputs_exact(method):
    model = _trained_mtp_model() if method == "mtp" else _model("llama")
    prompts = [WALK[j:] + WALK[:j] for j in range(0, 10, 2)] + [REPEATING]
    params = SamplingParams(temperature=0, max_tokens=12)
    config = dict(block_size=4, num_blocks=13, max_step_tokens=16)
    engine = Engine(model, EngineConfig(speculative=method, **config), eos_ids=[])
    got = [c.token_ids for c in engine.generate(prompts, params)]
    assert got == [_alone(model, p, 12) for p in prompts]
    assert engine.scheduler.num_preemptions > 0 and engine.stats()["num_accepted"] > 0
    assert engine.pool.num_free == engine.pool.num_blocks - 1


def test_streaming_carries_every_token_of_a_run():
    from nanoseek.engine.async_engine import AsyncEngine

    model = _model("llama")
    server = AsyncEngine(Engine(model, EngineConfig(speculative="ngram"), eos_ids=[]))
    try:
        outs = list(server.stream(REPEATING, GREEDY))
    finally:
        server.shutdown()
    assert [o.token_id for o in outs] == _alone(model, REPEATING, 16)
    assert [o.finished for o in outs] == [False] * 15 + [True]


# ---- int8 and fp16: bit for bit ------------------------------------------------------------------------------------
def _quantized(model, mode: str = "int8"):
    from nanoseek.quant import quantize_model

    return quantize_model(copy.deepcopy(model), mode)


@pytest.mark.parametrize(
    "family, method, mode",
    [("llama", "ngram", "int8"), ("gemma2", "ngram", "int8"), ("deepseek_v3", "ngram", "int8"),
     ("deepseek_v3", "mtp", "int8"), ("llama", "ngram", "fp16")],
)  # fmt: skip
def test_quantized_speculative_greedy_is_bit_identical_to_plain_greedy(family, method, mode):
    """int8 activations are rounded per row, so a ~1e-7 difference between a one-token decode and the same
    position inside a verification can become a different token after a near-tie (the last session saw it on
    SmolLM2). Speculating, decodes and verifications compute every query as if alone, so a request's logprobs,
    not only its tokens, equal plain int8 decoding's bit for bit while drafts are accepted (chunked prompts,
    sliding layers, a prompt shorter than a verification). Each request runs alone on both sides: a batched
    prefill, or a prompt chunked differently because a batch mate shared the token budget, moves the cache's
    low bits with or without speculation. fp16 weights (fbgemm) are row-invariant too, and so exact as well."""
    if mode == "fp16" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("fp16 weights need fbgemm (x86)")
    model = _quantized(_trained_mtp_model() if method == "mtp" else _model(family), mode)
    prompts = [REPEATING, WALK, [5, 6, 5], [9, 4, 9, 4, 9, 4, 9], list(range(20, 47))]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=0)
    accepted = 0
    for prompt in prompts:
        engine = Engine(model, EngineConfig(speculative=method, num_speculative_tokens=4, **CHUNKED), eos_ids=[])
        (spec,) = engine.generate([prompt], params)
        (plain,) = Engine(model, EngineConfig(**CHUNKED), eos_ids=[]).generate([prompt], params)
        assert spec.token_ids == plain.token_ids
        assert [x["logprob"] for x in spec.logprobs] == [x["logprob"] for x in plain.logprobs]  # exact
        accepted += engine.stats()["num_accepted"]
    assert accepted > 0
