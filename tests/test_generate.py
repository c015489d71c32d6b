"""generate_tokens / generate_batch (engine/generate.py, on the engine): every row gets exactly the tokens a
plain full-forward greedy decode gives it, for DeepSeek-V3 and the dense families; held-out evaluation goes
through the same engine."""

from __future__ import annotations

import random

import pytest
import torch

from greedy_reference import greedy_reference
from nanoseek.engine.generate import GenerationResult, generate_batch, generate_tokens
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.config import from_name
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.model.dense import DenseForCausalLM, dense_config_from_hf

GREEDY = SamplingParams(temperature=0)
# Different lengths, so the batch is left-padded by 0 to 8 slots.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3], [9, 8, 7, 6], [40, 41], [100, 7, 100, 7, 100]]
NEW = 10

_DENSE = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
DENSE_FAMILIES = {
    "llama": {"model_type": "llama", "num_hidden_layers": 2},
    # local/global layers with a window shorter than the sequence, soft-capping, sandwich norms
    "gemma2": {"model_type": "gemma2", "num_hidden_layers": 2, "head_dim": 8, "sliding_window": 4,
               "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0, "query_pre_attn_scalar": 8},
    "qwen2+window": {"model_type": "qwen2", "num_hidden_layers": 2, "use_sliding_window": True,
                     "sliding_window": 4, "max_window_layers": 1},
}  # fmt: skip


def _randomized(model: torch.nn.Module, norm_center: float) -> torch.nn.Module:
    """Weights large enough that greedy tokens vary from step to step (default inits give flat logits)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(0.1 * noise + norm_center if "norm" in name else 0.3 * noise)
    return model.eval()


def deepseek_v3() -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(from_name("test-tiny")).eval()


def dense(family: str) -> DenseForCausalLM:
    cfg = dense_config_from_hf({**_DENSE, **DENSE_FAMILIES[family]})
    return _randomized(DenseForCausalLM(cfg), 0.0 if family.startswith("gemma") else 1.0)


MODELS = {"deepseek_v3": deepseek_v3, **{f: (lambda f=f: dense(f)) for f in DENSE_FAMILIES}}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def test_batched_greedy_equals_one_prompt_at_a_time(model):
    alone = [greedy_reference(model, p, NEW) for p in PROMPTS]
    assert len({tuple(a) for a in alone}) > 1, "degenerate model: every prompt gives the same tokens"
    assert any(len(set(a)) > 1 for a in alone), "degenerate model: no row changes token"
    assert [list(generate_tokens(model, p, NEW, GREEDY)) for p in PROMPTS] == alone
    batch = generate_batch(model, PROMPTS, NEW, GREEDY)
    assert [r.token_ids for r in batch] == alone
    assert all(r.finish_reason == "length" for r in batch)


def test_rows_stop_on_their_own(model):
    """A stop token ends its row only; the other rows go on, as they would alone."""
    free = [greedy_reference(model, p, NEW) for p in PROMPTS]
    stop = {free[0][3]}  # row 0 stops at its 4th token; other rows may meet it elsewhere or never
    alone = []
    for p in PROMPTS:
        res = GenerationResult([], "")
        list(generate_tokens(model, p, NEW, GREEDY, stop, result=res))
        assert res.token_ids == greedy_reference(model, p, NEW, stop)
        alone.append((res.token_ids, res.finish_reason))
    batch = [(r.token_ids, r.finish_reason) for r in generate_batch(model, PROMPTS, NEW, GREEDY, stop)]
    assert batch == alone
    assert alone[0][1] == "stop" and len(alone[0][0]) <= 3


def test_empty_and_zero_length_requests():
    model = deepseek_v3()
    assert generate_batch(model, [], 4) == []
    assert [r.token_ids for r in generate_batch(model, PROMPTS[:2], 0)] == [[], []]
    assert list(generate_tokens(model, PROMPTS[0], 0)) == []
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_batch(model, [[1], []], 4, GREEDY)
    with pytest.raises(ValueError, match="prompt is empty"):
        next(generate_tokens(model, [], 4, GREEDY))


def test_evaluation_decodes_through_the_engine_and_a_loss_module():
    """evaluate_examples scores what the engine's greedy batch decodes, also through parallelize()'s wrapper."""
    from nanoseek.eval.held_out import evaluate_examples
    from nanoseek.parallel import parallelize
    from nanoseek.tasks import get_task, prompt_ids
    from nanoseek.train.tokenizer import train_tokenizer

    task = get_task("add2")
    rng = random.Random(0)
    tok = train_tokenizer([e.prompt + e.answer for e in (task.generate(rng) for _ in range(300))], vocab_size=300)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(from_name("test-tiny", vocab_size=tok.vocab_size)).eval()
    examples = task.eval_examples(6, seed=0)
    want = [
        tok.decode(greedy_reference(model, prompt_ids(tok, ex), 5, tok.stop_token_ids), skip_special_tokens=True)
        for ex in examples
    ]
    for wrapped in (model, parallelize(model, "none")):
        score, pairs = evaluate_examples(wrapped, tok, task, examples, max_new_tokens=5, batch_size=4)
        assert [pred for _, pred in pairs] == want
        assert score.n == 6 and score.correct == sum(task.check(p, ex) for ex, p in zip(examples, want))


def test_autocast_runs_every_forward_in_the_given_dtype():
    """What evaluation on CUDA asks for (bf16 autocast): the forwards run in bf16 while the latent cache
    stays fp32, and the loop still decodes every row to the end."""
    model = deepseek_v3()
    seen: list[torch.dtype] = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    try:
        rows = generate_batch(model, PROMPTS, 4, GREEDY, autocast_dtype=torch.bfloat16)
        assert len(seen) >= 4 and set(seen) == {torch.bfloat16}
        assert [len(r.token_ids) for r in rows] == [4] * len(PROMPTS)
        seen.clear()
        generate_batch(model, PROMPTS, 4, GREEDY)
        assert len(seen) >= 4 and set(seen) == {torch.float32}
    finally:
        hook.remove()
