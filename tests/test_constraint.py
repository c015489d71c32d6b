"""The engine's per-request token constraint (engine/constraint.py): a constrained request only takes allowed
tokens and ends when only end-of-sequence is allowed; its batch neighbours' tokens are unchanged (greedy and
seeded); speculative decoding leaves constrained requests alone; llguidance's grammar masks decode JSON."""

from __future__ import annotations

import json

import pytest
import torch

from nanoseek.engine.constraint import bitmask_to_bool
from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.sampling import SamplingParams, sample_batch
from nanoseek.model.dense import DenseConfig, DenseForCausalLM

EOS = 1


def _model(vocab: int = 64):
    torch.manual_seed(0)
    cfg = DenseConfig("llama", num_hidden_layers=2, vocab_size=vocab, hidden_size=32, intermediate_size=48,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      tie_word_embeddings=True)  # fmt: skip
    model = DenseForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape) + (1.0 if "norm" in name else 0))
    return model.eval()


class Ladder:
    """A test constraint: step k allows only the ids in `steps[k]`; after the last step only EOS."""

    def __init__(self, steps: list[list[int]]):
        self.steps = steps

    def start(self):
        return LadderState(self.steps)


class LadderState:
    def __init__(self, steps):
        self.steps, self.taken = steps, []

    def allowed(self, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        k = len(self.taken)
        mask[self.steps[k] if k < len(self.steps) else [EOS]] = True
        return mask

    def advance(self, token_id: int) -> None:
        self.taken.append(token_id)


STEPS = [[10, 11, 12], [20, 21], [30, 31, 32, 33], [40]]


@pytest.fixture(scope="module")
def model():
    return _model()


def _run(model, requests, config=None):
    engine = Engine(model, config or EngineConfig(block_size=4), eos_ids=[EOS])
    return [c.token_ids for c in engine.generate([p for p, _ in requests], [q for _, q in requests])], engine


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_request_takes_allowed_tokens_and_ends_when_only_eos_is_left(model, temperature):
    params = SamplingParams(temperature=temperature, seed=3, max_tokens=20, constraint=Ladder(STEPS))
    (tokens,), _ = _run(model, [([5, 6, 7], params)])
    assert len(tokens) == len(STEPS) and all(t in allowed for t, allowed in zip(tokens, STEPS))


def test_a_constrained_neighbour_leaves_other_rows_unchanged(model):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    constrained = SamplingParams(temperature=1.0, seed=1, max_tokens=12, constraint=Ladder(STEPS))
    alone, _ = _run(model, [([3, 4, 5], greedy), ([9, 8], seeded)])
    mixed, _ = _run(model, [([3, 4, 5], greedy), ([2, 2, 2, 2], constrained), ([9, 8], seeded)])
    assert mixed[0] == alone[0] and mixed[2] == alone[1]
    unconstrained, _ = _run(model, [([2, 2, 2, 2], SamplingParams(temperature=1.0, seed=1, max_tokens=12))])
    assert mixed[1] != unconstrained[0][: len(mixed[1])]  # the mask really changed what it sampled


def test_each_choice_gets_its_own_state(model):
    shared = Ladder(STEPS)  # one Constraint, two requests: each advances its own state
    outs, _ = _run(model, [([5, 6], SamplingParams(temperature=0, max_tokens=9, constraint=shared))] * 2)
    assert outs[0] == outs[1] and len(outs[0]) == len(STEPS)


def test_speculative_decoding_skips_constrained_requests(model):
    params = SamplingParams(temperature=0, max_tokens=20, constraint=Ladder(STEPS))
    plain, _ = _run(model, [([5, 6, 5, 6, 5], params)])
    spec, engine = _run(model, [([5, 6, 5, 6, 5], params)], EngineConfig(block_size=4, speculative="ngram"))
    assert spec == plain and engine.stats()["num_drafted"] == 0


def test_sample_batch_mask_applies_per_row():
    logits = torch.randn(3, 8)
    allowed = torch.ones(3, 8, dtype=torch.bool)
    allowed[1] = False
    allowed[1, 5] = True
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0), SamplingParams(temperature=1.0)]
    gens = [None, None, torch.Generator().manual_seed(0)]
    masked = sample_batch(logits, params, gens, allowed=allowed).tokens
    plain = sample_batch(logits, params, [None, None, torch.Generator().manual_seed(0)]).tokens
    assert masked[1] == 5 and masked[0] == plain[0] and masked[2] == plain[2]


def test_bitmask_to_bool_pads_a_larger_model_vocabulary():
    mask = bitmask_to_bool(bytes([0b00000101, 0b10000000]), 20)
    assert mask.nonzero().flatten().tolist() == [0, 2, 15] and mask.shape == (20,)


def test_json_schema_grammar_constrains_a_random_model(tmp_path):
    pytest.importorskip("llguidance")
    import nanoseek
    from nanoseek.engine.constraint import GrammarError, GrammarTokenizer
    from serve_helpers import tiny_llama_gguf

    gguf = tiny_llama_gguf(tmp_path / "tiny.gguf", context=256)
    tok, model = nanoseek.load_tokenizer(gguf), nanoseek.load(gguf)
    grammars = GrammarTokenizer(tok, tok.stop_token_ids)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
              "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": False}  # fmt: skip
    engine = Engine(model, EngineConfig(block_size=8), eos_ids=tok.stop_token_ids, detokenize=tok.decode)
    prompt = tok.encode("hello there")
    free, constrained = engine.generate(
        [prompt, prompt],
        [SamplingParams(temperature=0, max_tokens=40),
         SamplingParams(temperature=0, max_tokens=40, constraint=grammars.json_schema(schema))],
    )  # fmt: skip
    with pytest.raises(ValueError):
        json.loads(tok.decode(free.token_ids))  # the model alone writes no JSON
    value = json.loads(tok.decode(constrained.token_ids))
    assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 99 and isinstance(value["ok"], bool)
    assert constrained.finish_reason == "stop" and constrained.stop_reason in tok.stop_token_ids
    for bad in ({"type": "integer", "minimum": 5, "maximum": 3}, {"type": "nonsense"}, ["not", "a", "schema"]):
        with pytest.raises(GrammarError):
            grammars.json_schema(bad)
