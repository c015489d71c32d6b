import json
import os
import random

import pytest

from nanoseek.tasks import get_task
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.tokenizer import SPECIAL_TOKENS, train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _texts(n=3000):
    rng = random.Random(0)
    tasks = [get_task(name) for name in ("add2", "sort", "linear", "countdown")]
    out = []
    for _ in range(n):
        ex = rng.choice(tasks).generate(rng)
        out.append(ex.prompt + ex.answer)
    return out + ["The quick brown fox jumps over the lazy dog. " * 3] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_texts(), vocab_size=400)


def test_special_ids_digits_and_roundtrip(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == tok.special_ids() == (0, 1, 2)
    assert tok.stop_token_ids == [1]  # a reply ends at <|eos|>
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 400
    for marker in ("<think>", "</think>", "<answer>", "</answer>", "<|user|>", "<|assistant|>"):
        assert len(tok.encode(marker)) == 1
    ids = tok.encode("1234567890")
    assert [tok.decode([i]) for i in ids] == list("1234567890")  # digits are single tokens
    for text in ("12+345=", "s:53819=", "héllo wörld ✓ 日本", "<think>a b</think><answer>7</answer>", "  x\n\ty"):
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox")  # BPE merged something


def test_save_load_and_transformers_reference(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|bos|>" and cfg["eos_token"] == "<|eos|>" and "chat_template" in cfg
    again = load_tokenizer(tmp_path)
    text = "<|user|>cd:3,5,7>22=<|assistant|><think>x</think><answer>3*5+7</answer> plain text 42"
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    assert again.special_ids() == (0, 1, 2) and again.stop_token_ids == tok.stop_token_ids
    assert (again.chat_template, again.model_max_length) == (tok.chat_template, tok.model_max_length)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.decode(tok.encode(text)) == text
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "12+34="},
                {"role": "assistant", "content": "64"}]  # fmt: skip
    assert hf.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(
        messages, add_generation_prompt=False
    )
    assert tok.apply_chat_template(messages[1:2], add_generation_prompt=True) == "<|bos|><|user|>12+34=<|assistant|>"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast.encode(text, add_special_tokens=False) == tok.encode(text)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=200 is too small"):
        train_tokenizer(["a"], vocab_size=200)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(iter([]), vocab_size=300)
    with pytest.raises(FileNotFoundError, match="tokenizer.json: missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer.json: not a valid"):
        load_tokenizer(tmp_path)
