"""The inference engine on tiny random models: batched continuous decoding equals one-at-a-time decoding,
prefix caching, seeds, abort, a full cache, preemption, stops and bad input."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from greedy_reference import greedy_reference
from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.config import from_name
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.model.dense import FULL, SLIDING, DenseConfig, DenseForCausalLM

DENSE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=96,
)  # fmt: skip


def _dense(family: str) -> DenseConfig:
    if family == "llama":
        return DenseConfig("llama", num_hidden_layers=2, tie_word_embeddings=True, **DENSE)
    if family == "mistral":  # every layer slides: the engine frees blocks that fall out of the window
        return DenseConfig("mistral", num_hidden_layers=2, sliding_window=6, layer_types=[SLIDING] * 2, **DENSE)
    if family == "qwen2":
        return DenseConfig("qwen2", num_hidden_layers=2, qkv_bias=True, **DENSE)
    gemma = dict(norm_offset=1.0, sandwich_norm=True, embed_scale=True, hidden_act="gelu_pytorch_tanh",
                 query_pre_attn_scalar=24, sliding_window=5)  # fmt: skip
    if family == "gemma2":
        return DenseConfig("gemma2", num_hidden_layers=2, layer_types=[SLIDING, FULL], attn_logit_softcapping=2.0,
                           final_logit_softcapping=5.0, **gemma, **DENSE)  # fmt: skip
    return DenseConfig("gemma3", num_hidden_layers=3, layer_types=[SLIDING, SLIDING, FULL], qk_norm=True,
                       rope_local_theta=10000.0, rope_theta=1e6, **gemma, **DENSE)  # fmt: skip


def _model(family: str):
    torch.manual_seed(0)
    if family == "deepseek_v3":
        return DeepseekV3ForCausalLM(from_name("test-tiny")).eval()
    model = DenseForCausalLM(_dense(family))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                0.1 * torch.randn(p.shape, generator=gen) + (1.0 if "norm" in name and "gemma" not in family else 0)
            )
    return model.eval()


FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gemma3", "deepseek_v3"]
PROMPTS = [[5, 6, 7, 8, 9], [17, 3], list(range(20, 47)), [42], list(range(100, 113))]
GREEDY = SamplingParams(temperature=0, max_tokens=10)


def _alone(model, prompt, n=10):
    return greedy_reference(model, prompt, n)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, _model(request.param)


def test_batched_greedy_equals_one_at_a_time(family_model):
    """Small blocks and a small token budget: prompts are chunked, rows join and leave mid-run."""
    _, model = family_model
    engine = Engine(model, EngineConfig(block_size=4, max_step_tokens=8), eos_ids=[])
    first = engine.generate(PROMPTS[:2], GREEDY)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS[2:]]
    engine.step()
    late = engine.add_request(PROMPTS[0], GREEDY)  # joins while others decode
    while engine.has_work():
        engine.step()
    got = [c.token_ids for c in first] + [engine.get(i).output_ids for i in [*ids, late]]
    want = [_alone(model, p) for p in [*PROMPTS, PROMPTS[0]]]
    assert got == want
    assert engine.pool.num_free == engine.pool.num_blocks - 1  # every block back


def test_prefix_cache_hit_gives_identical_output():
    model = _model("deepseek_v3")
    engine = Engine(model, EngineConfig(block_size=4), eos_ids=[])
    system = list(range(30, 50))  # a shared 20-token prefix
    (a,) = engine.generate([system + [7, 8]], GREEDY)
    (b,) = engine.generate([system + [9]], GREEDY)
    assert a.num_cached_prompt == 0 and b.num_cached_prompt == 20  # the second prefilled only its tail
    assert a.token_ids == _alone(model, system + [7, 8]) and b.token_ids == _alone(model, system + [9])
    (again,) = engine.generate([system + [7, 8]], GREEDY)
    assert again.num_cached_prompt == 20 and again.token_ids == a.token_ids


def test_seed_reproduces_the_sample_in_any_batch():
    model = _model("llama")
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    (alone,) = Engine(model, eos_ids=[]).generate([PROMPTS[0]], seeded)
    others = [SamplingParams(temperature=0.7, seed=None, max_tokens=5), SamplingParams(temperature=0, max_tokens=8)]
    crowded = Engine(model, eos_ids=[]).generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]], [others[0], seeded, others[1]])
    assert crowded[1].token_ids == alone.token_ids
    (other_seed,) = Engine(model, eos_ids=[]).generate(
        [PROMPTS[0]], SamplingParams(temperature=1.0, seed=99, max_tokens=12)
    )
    assert other_seed.token_ids != alone.token_ids


def test_abort_frees_its_blocks_and_others_continue():
    model = _model("qwen2")
    engine = Engine(model, EngineConfig(block_size=4), eos_ids=[])
    keep = engine.add_request(PROMPTS[0], GREEDY)
    gone = engine.add_request(PROMPTS[2], SamplingParams(temperature=0, max_tokens=50))
    engine.step()
    engine.step()
    held, blocks = engine.pool.num_free, engine.get(gone).table.num_live
    assert blocks > 0
    assert engine.abort(gone) and not engine.abort(gone)
    assert engine.pool.num_free == held + blocks
    assert engine.get(gone).finish_reason == "abort"
    while engine.has_work():
        engine.step()
    assert engine.get(keep).output_ids == _alone(model, PROMPTS[0])
    assert engine.pool.num_free == engine.pool.num_blocks - 1


def test_full_cache_makes_requests_wait_and_preempts_without_corruption():
    """12 blocks of 4 tokens hold ~2 of these requests at a time: the rest wait, running ones get preempted
    and recomputed, and every output still equals its one-at-a-time decode."""
    model = _model("deepseek_v3")
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=13, max_step_tokens=16), eos_ids=[])
    prompts = [list(range(10 + i, 24 + i)) for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=12)
    done = engine.generate(prompts, params)
    assert [c.token_ids for c in done] == [_alone(model, p, 12) for p in prompts]
    assert all(c.finish_reason == "length" for c in done)
    assert engine.scheduler.num_preemptions > 0  # the path was exercised


def test_preemption_keeps_output_so_far():
    model = _model("llama")
    engine = Engine(model, EngineConfig(block_size=2, num_blocks=12, max_step_tokens=4), eos_ids=[])
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    done = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    assert [c.token_ids for c in done] == [_alone(model, p, 12) for p in prompts]
    assert engine.scheduler.num_preemptions > 0


def test_stops_and_max_tokens():
    model = _model("mistral")
    free_run = _alone(model, PROMPTS[0])
    engine = Engine(model, eos_ids=[free_run[3]])
    (c,) = engine.generate([PROMPTS[0]], GREEDY)
    assert c.token_ids == free_run[:3] and c.finish_reason == "stop" and c.stop_reason == free_run[3]
    (c,) = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert c.token_ids == free_run and c.finish_reason == "length"
    (c,) = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                        stop_token_ids=(free_run[5],)))  # fmt: skip
    assert c.token_ids == free_run[:5] and c.stop_reason == free_run[5]
    text = Engine(model, eos_ids=[], detokenize=lambda ids: " ".join(map(str, ids)))
    (c,) = text.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, stop=(f"{free_run[2]}",)))
    assert c.finish_reason == "stop" and c.token_ids == free_run[:3] and c.stop_reason == str(free_run[2])


def test_context_limit_ends_with_length():
    model = _model("llama")
    prompt = list(range(1, 90))  # context 96
    (c,) = Engine(model, eos_ids=[]).generate([prompt], SamplingParams(temperature=0, max_tokens=50))
    assert len(c.token_ids) == 96 - 89 and c.finish_reason == "length"


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "empty"),
        (list(range(96)), SamplingParams(), "context"),
        ([1, 300], SamplingParams(), "vocabulary"),
    ],
)
def test_bad_requests_raise_and_the_engine_keeps_serving(prompt, params, message):
    model = _model("llama")
    engine = Engine(model, eos_ids=[])
    good = engine.add_request(PROMPTS[0], GREEDY)
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    while engine.has_work():
        engine.step()
    assert engine.get(good).output_ids == _alone(model, PROMPTS[0])


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0),
     ("presence_penalty", 3.0), ("frequency_penalty", float("nan")), ("repetition_penalty", 0.0),
     ("logprobs", 50), ("logit_bias", {5: 1000.0})],
)  # fmt: skip
def test_out_of_range_sampling_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_logprobs_are_the_models_distribution():
    model = _model("qwen2")
    engine = Engine(model, eos_ids=[])
    (c,) = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=3, logprobs=3))
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[1]]))[0, -1].log_softmax(-1)
    first = c.logprobs[0]
    assert first["token"] == c.token_ids[0] == int(logits.argmax())
    assert first["logprob"] == pytest.approx(float(logits.max()), abs=1e-5)
    top = torch.topk(logits, 3)
    assert list(first["top"]) == top.indices.tolist()
    assert list(first["top"].values()) == pytest.approx(top.values.tolist(), abs=1e-5)


def test_penalties_and_logit_bias_change_choices():
    model = _model("llama")
    plain = _alone(model, PROMPTS[0], 10)
    engine = Engine(model, eos_ids=[])
    (biased,) = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, logit_bias={77: 100.0}))
    assert biased.token_ids == [77] * 10
    (pen,) = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, frequency_penalty=2.0,
                                                          logit_bias={77: 5.0}))  # fmt: skip
    assert len(set(pen.token_ids)) > 1 and pen.token_ids != plain


def test_async_streams_share_steps_and_cancel_frees_blocks():
    import asyncio

    from nanoseek.engine.async_engine import AsyncEngine

    model = _model("deepseek_v3")
    engine = Engine(model, EngineConfig(block_size=4), eos_ids=[])
    steps = []
    real_step = engine.step
    engine.step = lambda: steps.append(1) or real_step()  # count the batched steps
    server = AsyncEngine(engine)

    async def collect(prompt, n, stop_after=None):
        tokens = []
        async for out in server.generate(prompt, SamplingParams(temperature=0, max_tokens=n)):
            if out.token_id is not None:
                tokens.append(out.token_id)
            if stop_after is not None and len(tokens) == stop_after:
                break  # the client goes away: the request is aborted
        return tokens

    async def main():
        return await asyncio.gather(collect(PROMPTS[0], 10), collect(PROMPTS[2], 10), collect(PROMPTS[4], 40, 3))

    try:
        a, b, c = asyncio.run(main())
        assert a == _alone(model, PROMPTS[0]) and b == _alone(model, PROMPTS[2]) and c == _alone(model, PROMPTS[4], 3)
        assert len(steps) < 20  # 2 x 10 tokens (+ 3) in shared steps, not one request after another
        streamed = [o.token_id for o in server.stream(PROMPTS[1], GREEDY) if o.token_id is not None]
        assert streamed == _alone(model, PROMPTS[1])
    finally:
        server.shutdown()
    assert engine.pool.num_free == engine.pool.num_blocks - 1 and not engine.requests
    with pytest.raises(RuntimeError, match="shut down"):
        server.submit(PROMPTS[0], GREEDY, print)


def test_async_outputs_reach_an_event_loop_once_per_step_in_order():
    """A step's outputs for every request of one event loop cross over in one call_soon_threadsafe, each request's
    tokens in order and the same as alone; a sink without a loop is called on the engine thread per output."""
    import asyncio
    import threading

    from nanoseek.engine.async_engine import AsyncEngine

    model = _model("deepseek_v3")
    engine = Engine(model, EngineConfig(block_size=4), eos_ids=[])
    steps = []
    real_step = engine.step
    engine.step = lambda: steps.append(1) or real_step()
    server = AsyncEngine(engine)
    prompts, lengths = [PROMPTS[0], PROMPTS[2], PROMPTS[4]], [6, 9, 4]

    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        real_call = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: calls.append(len(a[1])) or real_call(*a, **k)  # items per call
        got: dict[int, list] = {}
        done = asyncio.Event()
        loop_thread = threading.get_ident()

        def sink_for(i):
            def sink(out):
                assert threading.get_ident() == loop_thread  # run on the loop, not the engine thread
                got.setdefault(i, []).append(out)
                if sum(1 for outs in got.values() if outs[-1].finished) == len(prompts):
                    done.set()

            return sink

        for i, (prompt, n) in enumerate(zip(prompts, lengths)):
            server.submit(prompt, SamplingParams(temperature=0, max_tokens=n), sink_for(i), loop)
        await done.wait()
        return got, calls

    try:
        steps.clear()
        got, calls = asyncio.run(main())
        on_engine = []
        server.submit(PROMPTS[1], SamplingParams(temperature=0, max_tokens=5), on_engine.append)  # no loop
        while not (on_engine and on_engine[-1].finished):
            threading.Event().wait(0.01)
    finally:
        server.shutdown()
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        assert [o.token_id for o in got[i]] == _alone(model, prompt, n)
        assert [o.finished for o in got[i]] == [False] * (n - 1) + [True] and got[i][-1].finish_reason == "length"
    # one crossing per step with outputs, carrying every request's token of that step
    assert sum(calls) == sum(lengths) and len(calls) <= len(steps) and max(calls) == len(prompts)
    assert [o.token_id for o in on_engine] == _alone(model, PROMPTS[1], 5)


@pytest.mark.parametrize("mode, tol", [("fp16", 2e-3), ("int8", 5e-2)])
@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_quantized_logits_stay_close_and_batch_invariant(family, mode, tol):
    """Relative to the largest logit: fp16 weights ~1e-3, int8 weights and activations ~1e-2."""
    from nanoseek.quant import quantize_model

    model = _model(family)
    ids = torch.tensor([PROMPTS[2][:12], PROMPTS[4][:12]])
    with torch.no_grad():
        ref = model(ids)
        quantize_model(model, mode)
        got = model(ids)
        alone = model(ids[1:])
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    # a row's numbers do not depend on the other rows (up to fp32 summation order in the MoE and attention;
    # one activation scale per call, as fbgemm's dynamic int8 has, would move them by ~1e-2)
    assert (got[1:] - alone).abs().max() <= 1e-5 * ref.abs().max()
    engine = Engine(model, EngineConfig(block_size=4), eos_ids=[])
    batch = engine.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in batch] == [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]


def test_quantize_refuses_unknown_modes():
    from nanoseek.quant import quantize_model

    with pytest.raises(ValueError, match="int3"):
        quantize_model(_model("llama"), "int3")


def _int4_available() -> bool:
    from nanoseek.quant import int4_kernel_available

    return int4_kernel_available()


needs_int4_kernel = pytest.mark.skipif(not _int4_available(), reason="nanoseek's int4 kernel needs AVX2")


@needs_int4_kernel
@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_int4_logits_match_the_dequantized_model_and_are_batch_invariant(family):
    """int4 against the same model with each 4-bit weight replaced by the fp32 weight its grid stands for
    (lm_head stays fp32 there): what is left is the int8 rounding of activations (per block of 32 inputs in
    the 4-bit linears and in the Q8_0-block lm_head; before that, per row in an int8 lm_head), measured at
    up to 4.8e-2 (llama) and 1.5e-2 (DeepSeek) of the largest logit at a position. DeepSeek's routed experts
    are picked by top-k: where two experts' scores nearly tie, rounding can pick the other one, and that
    position moves by ~1e-1 (measured: 1 of the 24). On SmolLM2's Q4_1 file, int4 is closer to the file's
    model than int8 (mean KL 0.0025 against 0.0334 over one 512-token chunk, benchmarks/RESULTS.md)."""
    from nanoseek import quant

    model, reference = _model(family), quant.fuse_projections(_model(family))
    four_bit = [(m, name) for m, name, _ in quant.quantizable_linears(reference) if name not in quant.INT8_IN_INT4]
    with torch.no_grad():
        for module, name in four_bit:
            linear = getattr(module, name)  # a new parameter: a tied lm_head leaves the embeddings as they are
            linear.weight = torch.nn.Parameter(quant.int4_dequantize(*quant.int4_grid(linear.weight)))
    ids = torch.tensor([PROMPTS[2][:12], PROMPTS[4][:12]])
    with torch.no_grad():
        ref, fp32 = reference(ids), model(ids)
        quant.quantize_model(model, "int4")
        got = model(ids)
        alone = model(ids[1:])
    assert sum(isinstance(m, quant.Int4Linear) for m in model.modules()) == len(four_bit)
    assert isinstance(model.lm_head, quant.Int8BlockLinear)
    off = (got - ref).abs().amax(-1) / ref.abs().max()  # per position
    assert (off > 6e-2).sum() <= (1 if family == "deepseek_v3" else 0), off
    # 4-bit weights themselves move these random models' logits by up to ~30% of the largest
    assert (got - fp32).abs().max() <= 0.5 * fp32.abs().max()
    assert (got[1:] - alone).abs().max() <= 1e-5 * ref.abs().max()  # attention's batched math, not int4's
    # The engine: each batched request follows its lone run (a fresh engine each: no prefix-cache hits)
    # until, if ever, a near tie. Batched decode attention reduces a padded history in another order than a
    # lone row does (differences in the last bit), and rounding activations to int8 in blocks of 32 can
    # turn such a bit into a different token where the top two are within hundredths of a nat (measured on
    # this random llama: 0.011). A kernel whose rows depended on each other would diverge without a tie.
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=2)
    engine = lambda: Engine(model, EngineConfig(block_size=4), eos_ids=[])  # noqa: E731
    for batched, prompt in zip(engine().generate(PROMPTS, params), PROMPTS):
        alone = engine().generate([prompt], params)[0]
        assert len(batched.token_ids) == len(alone.token_ids) == 10
        diverged = [j for j, (a, b) in enumerate(zip(alone.token_ids, batched.token_ids)) if a != b]
        if diverged:
            top2 = sorted(alone.logprobs[diverged[0]]["top"].values(), reverse=True)
            assert top2[0] - top2[1] < 0.05, (prompt, diverged[0], alone.logprobs[diverged[0]])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_int4_grid_keeps_gguf_4_bit_weights_exactly(qtype):
    """Weights as a Q4_0 or Q4_1 file holds them (gguf's own quantizer and dequantizer) come back bit for
    bit; any other weight is within half a step of its group's min-max grid (or closer)."""
    from gguf import GGMLQuantizationType, quants

    from nanoseek.quant import int4_dequantize, int4_grid

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 96, generator=gen)
    kind = GGMLQuantizationType[qtype]
    from_file = torch.from_numpy(quants.dequantize(quants.quantize(weight.numpy(), kind), kind))
    assert torch.equal(int4_dequantize(*int4_grid(from_file)), from_file)
    groups = weight.view(40, 3, 32)
    half_step = (groups.amax(-1) - groups.amin(-1)) / 30
    error = (int4_dequantize(*int4_grid(weight)).view(40, 3, 32) - groups).abs()
    assert (error <= half_step[..., None] * 1.01 + 1e-3 * groups.abs().amax(-1, keepdim=True)).all()  # fp16 d, m


def _int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: rounded to int8 per block of 32 inputs (scale = the block's max |x| / 127)."""
    blocks = x.view(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / scale.clamp(min=1e-30)) * scale).view(x.shape)


@needs_int4_kernel
def test_int4_linear_rows_are_independent_and_match_the_grid():
    """Any output size (padded to the kernel's panels of 16 inside), a bias, 1 to 37 rows: each row equals
    its int8-rounded activations times the dequantized weight (the block minimums multiply the sum of each
    block's ROUNDED activations, as llama.cpp's Q8_1 blocks do: with the exact sum, the rounding error was
    left multiplied by d * q alone, not centred, and SmolLM2 Q4_1's KL to the file's model was 2.5x); and the
    same row alone or in any batch, bit for bit."""
    from nanoseek.quant import Int4Linear, int4_dequantize, int4_grid

    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 96, generator=gen), torch.randn(40, generator=gen)
    x = torch.randn(37, 96, generator=gen)
    x[3, 32:64] = 0  # an all-zero block
    q, d, m = int4_grid(weight)
    linear = Int4Linear(weight, bias)
    full = linear(x)
    xq = _int8_blocks(x).double()
    scaled = q.view(40, 3, 32).double() * d.double()[..., None]  # d * q: multiplies the rounded activations
    sums = xq.view(37, 3, 32).sum(-1)  # m: multiplies each block's sum of rounded activations
    expected = xq @ scaled.view(40, 96).T + sums @ m.double().T + bias.double()
    assert full.shape == (37, 40) and full.dtype == torch.float32
    assert (full.double() - expected).abs().max() <= 1e-5 * expected.abs().max()  # fp32 accumulation
    dequantized = x @ int4_dequantize(q, d, m).T + bias  # the rounding of activations costs ~5e-3
    assert (full - dequantized).abs().max() <= 3e-2 * dequantized.abs().max()
    # the weight times the rounded activations, to fp32 rounding: the kernel adds no error of its own
    weight_times_rounded = xq @ int4_dequantize(q, d, m).double().T + bias
    assert (full.double() - weight_times_rounded).abs().max() <= 1e-5 * expected.abs().max()
    for start, rows in [(0, 1), (5, 1), (3, 4), (0, 16), (20, 17)]:
        assert torch.equal(linear(x[start : start + rows]), full[start : start + rows])
    assert torch.equal(linear(x.view(1, 37, 96))[0], full)


@needs_int4_kernel
def test_int8_block_linear_keeps_q8_0_weights_exactly_and_rounds_activations_per_block():
    """The int4 format's lm_head (Int8BlockLinear): a Q8_0 file's weights (gguf's own quantizer) come back
    exactly from `int8_blocks`, the two 4-bit planes the kernel runs sum to them, and each output row is those
    weights times the row's activations rounded to int8 per block of 32 (as llama.cpp's Q8_0 x Q8_0), not per
    row: a row with one large channel keeps its small ones (Int8Linear's per-row scale loses them)."""
    from gguf import GGMLQuantizationType, quants

    from nanoseek.quant import Int8BlockLinear, Int8Linear, int4_dequantize, int8_blocks, int8_blocks_as_planes

    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 256, generator=gen)
    kind = GGMLQuantizationType.Q8_0
    from_file = torch.from_numpy(quants.dequantize(quants.quantize(weight.numpy(), kind), kind))
    q, d = int8_blocks(from_file)
    assert torch.equal((q.view(40, 8, 32).float() * d.float()[..., None]).view(40, 256), from_file)
    planes = int4_dequantize(*int8_blocks_as_planes(q, d))
    assert torch.equal(planes[:, :256] + planes[:, 256:], from_file)
    x = torch.randn(9, 256, generator=gen)
    x[:, 5] = 300.0  # one large channel, as a final hidden state has
    head = Int8BlockLinear(from_file)
    got = head(x).double()
    expected = _int8_blocks(x).double() @ from_file.double().T
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    exact = x.double() @ from_file.double().T
    per_row = Int8Linear(from_file)(x).double()
    assert (got - exact).norm() < 0.5 * (per_row - exact).norm()
    assert torch.equal(head(x[4:5]), head(x)[4:5])  # a row alone or in a batch, bit for bit


@needs_int4_kernel
def test_int4_linear_compiles():
    """torch.compile calls the kernel as an opaque op (its Meta kernel gives the output shape)."""
    from nanoseek.quant import Int4Linear

    gen = torch.Generator().manual_seed(1)
    linear = Int4Linear(torch.randn(24, 64, generator=gen))
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        compiled = torch.compile(lambda t: torch.relu(linear(t * 2)), fullgraph=True, dynamic=True)
        for rows in (3, 5, 2, 17):
            x = torch.randn(rows, 64, generator=gen)
            assert torch.equal(compiled(x), torch.relu(linear(x * 2)))
        # its fake kernel keeps the row count symbolic: one graph for every batch size (of 2 or more rows:
        # dynamo specializes 1 itself); a concrete size would compile each batch size again
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    finally:
        torch._dynamo.reset()


def test_int4_kernel_without_a_compiler_says_why(monkeypatch, tmp_path):
    from nanoseek import native
    from nanoseek.quant import q4_kernel

    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        pytest.skip("the kernel is built on x86-64 Linux only")
    source, what = q4_kernel.KERNEL.source, q4_kernel.KERNEL.what
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    reason = native.build_and_load(source, tmp_path / "q4.so", what)
    assert reason.startswith("the 4-bit kernel could not be built or loaded") and "no-such-compiler" in reason
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    assert "could not be built" in native.build_and_load(source, tmp_path / "q4.so", what)
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


@needs_int4_kernel
def test_int4_kernels_avx2_path_gives_the_avx512_paths_bits():
    """A CPU without AVX512 runs the kernel's AVX2 path: the same integer dot products and the same floating-point
    operations in the same order, so the same bits, for every row count (tiles of 4 and the rest) and for output
    sizes that end inside a panel's first or second half."""
    from nanoseek.quant import Int4Linear, int4_dequantize, int4_grid, q4_kernel

    best = q4_kernel.isa()
    gen = torch.Generator().manual_seed(3)
    for out_features, in_features in [(40, 96), (13, 64), (8, 32), (9, 32), (48, 160)]:
        weight, bias = torch.randn(out_features, in_features, generator=gen), torch.randn(out_features, generator=gen)
        linear = Int4Linear(weight, bias if out_features % 2 else None)
        for rows in (1, 2, 3, 4, 5, 7, 9):
            x = torch.randn(rows, in_features, generator=gen) * 3
            x[0, :32] = 0  # an all-zero block
            with q4_kernel.use_isa("avx2"):
                assert q4_kernel.isa() == "avx2"
                avx2 = linear(x)
            assert q4_kernel.isa() == best  # restored
            if best == "avx512vnni":
                assert torch.equal(avx2, linear(x)), (out_features, in_features, rows)
            dequantized = x @ int4_dequantize(*int4_grid(weight)).T + (bias if out_features % 2 else 0)
            assert (avx2 - dequantized).abs().max() <= 3e-2 * dequantized.abs().max()
    with pytest.raises(ValueError, match="unknown code path 'sse'"), q4_kernel.use_isa("sse"):
        pass
    assert q4_kernel.isa() == best


@needs_int4_kernel
def test_int4_kernels_prefetch_distance_is_a_setting_that_changes_no_bit():
    """benchmarks/int4_kernels.py --prefetch-blocks measures other distances than the kernel's 8: the outputs are
    the same bits at any distance (none included), and the default comes back after the block."""
    from nanoseek.quant import Int4Linear, q4_kernel

    gen = torch.Generator().manual_seed(5)
    linear = Int4Linear(torch.randn(48, 320, generator=gen), None)
    x = torch.randn(5, 320, generator=gen)
    default = linear(x)
    for blocks in (0, 1, 4, 16, 64):
        with q4_kernel.use_prefetch(blocks):
            assert torch.equal(linear(x), default), blocks
    assert torch.ops.nanoseek.q4_use_prefetch(8) == 8  # restored (and left at the default)
    for bad in (-1, 65):
        with pytest.raises(ValueError, match="0..64"), q4_kernel.use_prefetch(bad):
            pass


@needs_int4_kernel
def test_nanoseek_q4_isa_picks_the_kernels_path_for_a_process(tmp_path):
    """NANOSEEK_Q4_ISA=avx2 runs a whole process on the AVX2 path (what benchmarks use to show a CPU without
    AVX512); an unknown value makes int4 unavailable, saying why. In subprocesses: the setting is per process."""
    import subprocess

    code = "from nanoseek.quant import q4_kernel as k; print(k.unavailable_reason(), k.isa())"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    for value, want in [("avx2", "None avx2"), ("sse", "NANOSEEK_Q4_ISA='sse': choose avx512vnni or avx2")]:
        done = subprocess.run([sys.executable, "-c", code], env={**env, "NANOSEEK_Q4_ISA": value},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(want), done.stdout


def test_int4_needs_its_kernel_and_a_group_sized_input(monkeypatch):
    from nanoseek import quant
    from nanoseek.quant import q4_kernel

    if quant.int4_kernel_available():
        with pytest.raises(ValueError, match="divisible by 32"):
            quant.Int4Linear(torch.randn(64, 48))
        assert isinstance(quant.int4_or_int8(torch.randn(64, 48)), quant.Int8Linear)  # left to int8
        assert isinstance(quant.int4_or_int8(torch.randn(64, 64)), quant.Int4Linear)
        linear = quant.Int4Linear(torch.randn(40, 64))  # 48 rows packed: 4 bits a weight, 2 fp16 per 32 weights
        assert quant.linear_weight_bytes(linear) == 48 * 64 // 2 + 48 * 2 * 2 * 2
    monkeypatch.setattr(q4_kernel, "unavailable_reason", lambda: "the 4-bit kernel needs AVX2")
    with pytest.raises(ValueError, match="int4 weights cannot run here: the 4-bit kernel needs AVX2; use int8"):
        quant.quantize_model(_model("llama"), "int4")
    with pytest.raises(ValueError, match="needs AVX2"):
        quant.Int4Linear(torch.randn(64, 64))


def test_engine_returns_freed_memory_once_when_a_burst_ends():
    """A burst's freed temporaries go back to the OS when the engine runs out of work, once per idle
    transition, not on every step, and only after a step with at least `return_memory_after_rows`
    requests (the trim costs milliseconds: single streams skip it); None turns it off."""
    from nanoseek.memory import return_freed_memory

    if not return_freed_memory(collect=False):
        pytest.skip("no glibc malloc_trim here")
    model = _model("llama")
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    def engine(rows):
        return Engine(model, EngineConfig(num_blocks=16, block_size=4, return_memory_after_rows=rows), eos_ids=[])

    burst = engine(2)
    burst.generate([[1, 2, 3], [4, 5]], params)
    assert burst.num_memory_returns == 1
    burst.generate([[6, 7]], params)  # one request: no burst since the last return
    assert burst.num_memory_returns == 1
    burst.add_request([1, 2, 3], params)
    burst.add_request([4, 5], params)
    burst.step()  # both requests in one step, more work remains
    assert burst.num_memory_returns == 1
    while burst.has_work():
        burst.step()
    assert burst.num_memory_returns == 2
    never = engine(None)
    never.generate([[1, 2, 3], [4, 5]], params)
    assert never.num_memory_returns == 0


def test_heap_stats_see_an_allocation():
    from nanoseek.memory import heap_stats

    before = heap_stats()
    if before is None:
        pytest.skip("no glibc mallinfo2 here")
    block = torch.ones(16 << 20, dtype=torch.uint8)  # 16 MiB, held
    assert heap_stats().in_use - before.in_use >= 16 << 20
    del block


@pytest.mark.parametrize("shape", [(960, 576), (576, 1536)])
def test_fp16_weight_bytes_are_what_fbgemm_holds(shape):
    """The benchmark's run-format bytes for fp16 are fbgemm's padded size, checked against malloc's count."""
    from nanoseek.memory import heap_stats
    from nanoseek.quant import Fp16Linear

    if "fbgemm" not in torch.backends.quantized.supported_engines or heap_stats() is None:
        pytest.skip("needs fbgemm and glibc's mallinfo2")
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    before = heap_stats().in_use
    linear = Fp16Linear(weight)
    held = heap_stats().in_use - before
    assert linear.packed_bytes == pytest.approx(held, rel=0.02)


def test_a_large_cache_is_resident_only_where_written():
    """A server sizes its cache for its largest load; the memory is the OS's zero pages until written
    (kv_cache._zeros), so a 64 MB cache adds almost nothing to RSS until used, and reads as zeros."""
    from pathlib import Path

    from nanoseek.engine.kv_cache import _zeros

    statm = Path("/proc/self/statm")
    if not statm.exists():
        pytest.skip("needs Linux's /proc/self/statm")
    page = os.sysconf("SC_PAGE_SIZE")
    before = int(statm.read_text().split()[1]) * page
    cache = _zeros(1024, 16, 1024, dtype=torch.float32, device="cpu")  # 64 MB
    grew = int(statm.read_text().split()[1]) * page - before
    assert cache.shape == (1024, 16, 1024) and grew < 8 << 20, grew
    assert not cache[::97].any()  # reads as zeros (a sample of rows)
    cache[5] = 1.0  # and is an ordinary writable tensor
    assert cache[5].sum().item() == 16 * 1024 and not cache[4].any()
