"""Batch invariance with quantized weights (issue 23, item 5): a greedy request gets the same tokens, and the same
logits bit for bit, alone, in any batch, and wherever its prompt chunks start, in every quantized run format.

The linears already computed each row on its own (int8: exact integer products; int4: one fixed order per row;
fp16: fbgemm's per-row order). What moved was attention: prompt chunks ran SDPA, whose last bits change with the
chunk's length and where it starts (its blocked matmuls change shape), and rounding activations to int8 turned
such a bit into a different token (measured on SmolLM2 Q4_1: chunks starting at 82/208/221/240 changed the
answer). Now every forward of a dense model attends in the paged attention kernel, which computes each query
from its own keys in one fixed order (native/csrc/paged_attention.cpp).

fp32 weights are not covered: MKL's sgemm sums a row in another order depending on the number of rows.
"""

from __future__ import annotations

import pytest
import torch

from nanoseek.engine import paged_attention
from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.runner import Row
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.dense import DenseConfig, DenseForCausalLM

pytestmark = pytest.mark.skipif(not paged_attention.available(), reason="the paged attention kernel cannot run here")


def _int4_available() -> bool:
    from nanoseek.quant import int4_kernel_available

    return int4_kernel_available()


MODES = [
    pytest.param("int4", marks=pytest.mark.skipif(not _int4_available(), reason="nanoseek's int4 kernel needs AVX2")),
    "int8",
    pytest.param(
        "fp16",
        marks=pytest.mark.skipif(
            "fbgemm" not in torch.backends.quantized.supported_engines, reason="fp16 weights need fbgemm"
        ),
    ),
]


def _model(family: str, mode: str):
    """A small model shaped like the real ones: inputs multiples of 32 (int4's groups), GQA, 3 layers."""
    from nanoseek.quant import quantize_model

    torch.manual_seed(0)
    sizes = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=256)  # fmt: skip
    extra = {"llama": dict(tie_word_embeddings=True), "qwen2": dict(qkv_bias=True)}[family]
    model = DenseForCausalLM(DenseConfig(family, num_hidden_layers=3, **sizes, **extra))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen) + (1.0 if "norm" in name else 0))
    return quantize_model(model.eval(), mode)


PROMPT = [(7 * i + 3) % 509 for i in range(90)]


def _prefill_logits(engine: Engine, prompt: list[int], chunks: list[int], others: list[list[int]] = ()) -> torch.Tensor:
    """The logits after `prompt`, fed to the runner in chunks of the given lengths; each forward also carries the
    next chunk (up to the same length) of every prompt in `others`, as rows of the same batch."""
    from nanoseek.engine.kv_groups import SequenceBlocks

    runner, pool = engine.runner, engine.pool
    seqs = [SequenceBlocks(pool, runner.layout) for _ in range(1 + len(others))]
    for seq, ids in zip(seqs, [prompt, *others]):
        assert seq.reserve(len(ids), 0)
    start = [0] * len(seqs)
    try:
        for n in chunks:
            rows = [Row(seqs[0], start[0], prompt[start[0] : start[0] + n])]
            for i, ids in enumerate(others, 1):
                if start[i] < len(ids):
                    rows.append(Row(seqs[i], start[i], ids[start[i] : start[i] + n]))
            result = runner.forward(rows)
            for row in rows:
                start[seqs.index(row.table)] += len(row.token_ids)
            last = result.row_logits(0, 1)[0].clone()
        assert start[0] == len(prompt)
        return last
    finally:
        for seq in seqs:
            seq.release()


def _splits(length: int) -> list[list[int]]:
    """Chunkings of a prompt: whole, chunks of 7/16/33/64, and two chunks split at each of several points."""
    out = [[length]]
    for size in (7, 16, 33, 64):
        out.append([size] * (length // size) + ([length % size] if length % size else []))
    out += [[cut, length - cut] for cut in (1, 5, 31, 32, 45, 82, length - 1)]
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", MODES)
def test_prompt_logits_do_not_depend_on_chunks_or_batch(family, mode):
    model = _model(family, mode)
    engine = Engine(model, EngineConfig(block_size=16, num_blocks=64), eos_ids=[])
    alone = _prefill_logits(engine, PROMPT, [len(PROMPT)])
    for chunks in _splits(len(PROMPT)):
        assert torch.equal(_prefill_logits(engine, PROMPT, chunks), alone), chunks
    # beside other rows: shorter and longer prompts, started at other positions, padded into the same forwards
    others = [PROMPT[3:20], [11] * 70, PROMPT[::-1]]
    for chunks in ([len(PROMPT)], [33, 57], [16] * 5 + [10]):
        assert torch.equal(_prefill_logits(engine, PROMPT, chunks, others), alone), chunks


@pytest.mark.parametrize("mode", MODES)
def test_greedy_tokens_do_not_depend_on_step_budget_or_traffic(mode):
    """Through the engine: the step's token budget moves the chunk starts, and other requests (arriving before,
    with and after it, decoding beside it) share its forwards; the tokens and their logprobs stay the same bits."""
    model = _model("llama", mode)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=3, ignore_eos=True)
    others = [PROMPT[5:60], [3, 1, 4, 1, 5], PROMPT[::-1] + PROMPT[:30], list(range(40, 140))]

    def run(budget: int, traffic: bool):
        engine = Engine(model, EngineConfig(block_size=16, max_step_tokens=budget), eos_ids=[])
        if traffic:  # two requests ahead of it, and the rest joining while it prefills and decodes
            for p in others[:2]:
                engine.add_request(p, params)
            engine.step()
        rid = engine.add_request(PROMPT, params)
        later = list(others[2:]) if traffic else []
        while engine.has_work():
            engine.step()
            if later:
                engine.add_request(later.pop(0), params)
        completion = engine.requests[rid]
        return list(completion.output_ids), [dict(lp) for lp in completion.logprobs]

    alone = run(1000, traffic=False)
    assert len(alone[0]) == 16
    for budget, traffic in ((1000, True), (7, False), (33, True), (82, True)):
        assert run(budget, traffic) == alone, (budget, traffic)
