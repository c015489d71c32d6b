"""Tokenizers from HF folders, sandboxed chat templates, sampling and the generate loop."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

import nanoseek
from nanoseek.engine.generate import TextStreamer, generate_tokens
from nanoseek.engine.sampling import SamplingParams, filter_logits, make_generator, sample_batch
from nanoseek.tokenizer import ChatTemplateError, render_chat_template

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _folder(tmp_path, template=CHATML, generation_eos=None):
    """A HF-style tokenizer folder: word-level vocab with chat specials."""
    words = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>", "hello", "world", "user", "assistant"]
    backend = BackendTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "<|im_start|>", "<|im_end|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    cfg = {"bos_token": {"content": "<s>"}, "eos_token": "<|im_end|>"}
    if template is not None:
        cfg["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if generation_eos is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return tmp_path


def test_folder_tokenizer_encodes_decodes_and_knows_its_special_ids(tmp_path):
    tok = nanoseek.load_tokenizer(_folder(tmp_path, generation_eos=[3, 1]))
    assert tok.encode("hello world") == [4, 5]
    assert tok.decode([2, 4, 5, 3]) == "hello world"  # specials skipped
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 3)
    assert tok.stop_token_ids == [3, 1]  # EOS first, then generation_config's extra ids, no repeats


def test_chat_template_renders_like_chatml(tmp_path):
    tok = nanoseek.load_tokenizer(_folder(tmp_path))
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode_chat([{"role": "user", "content": "hello"}]) == [2, 6, 4, 3, 2, 7]


def test_transformers_agrees_on_folder_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = _folder(tmp_path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=CHATML)
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    ours = nanoseek.load_tokenizer(folder).apply_chat_template(msgs, add_generation_prompt=False)
    assert ours == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)


@pytest.mark.parametrize(
    "evil",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{% set x = messages.append(1) %}",  # the immutable sandbox also refuses mutation
    ],
)
def test_template_reaching_python_internals_is_refused(tmp_path, evil):
    tok = nanoseek.load_tokenizer(_folder(tmp_path, template=evil))
    with pytest.raises(ChatTemplateError, match="refused|unsafe"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])


def test_template_features_real_templates_use():
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}{% endgeneration %}"
        "{% else %}{{ m['content'] | tojson }}{% endif %}{% if loop.last %}{% break %}{% endif %}{% endfor %}"
        "|{{ ns.n }}|{{ strftime_now('%Y') | length }}|{{ tools is defined }}"
    )
    msgs = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": " hi "}]
    assert render_chat_template(template, "t", messages=msgs) == '"héllo"hi|2|4|False'


def test_template_raise_exception_and_syntax_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="refused the conversation: roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", "t", messages=[])
    with pytest.raises(ChatTemplateError, match="t: the chat template is invalid"):
        render_chat_template("{% for %}", "t", messages=[])


def test_missing_template_and_missing_tokenizer_are_clear(tmp_path):
    tok = nanoseek.load_tokenizer(_folder(tmp_path, template=None))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/tokenizer.json: missing"):
        nanoseek.load_tokenizer(empty)


# ---- sampling and the generate loop -------------------------------------------------------------------------


def test_sampling_greedy_top_k_top_p_and_seed():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    assert sample_batch(logits, [SamplingParams(temperature=0)]).tokens.item() == 1
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_k=2))).nonzero()[:, 1].tolist()
    assert kept == [1, 2]
    # probabilities ~[.02,.46,.41,.01,.06]: top_p 0.5 keeps the two best (the first alone is under 0.5)
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.5))).nonzero()[:, 1].tolist()
    assert kept == [1, 2]

    def draws(seed):
        params = SamplingParams(seed=seed)
        generator = make_generator(params)
        return [sample_batch(logits, [params], [generator]).tokens.item() for _ in range(20)]

    assert draws(7) == draws(7)
    assert len(set(draws(7))) > 1  # it does sample (from the 3-4 likely tokens), not argmax
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


class _Counter(torch.nn.Module):
    """A stand-in with the model interface the engine drives, whose next token is always (last token + 1)
    mod V: known logits, so the engine's stops, budgets and context limit can be checked exactly."""

    def __init__(self, vocab=10, context=64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {
            "max_position_embeddings": context, "vocab_size": vocab, "num_hidden_layers": 1,
            "num_key_value_heads": 1, "head_dim": 1, "layer_types": ["full_attention"], "sliding_window": None,
            "eos_token_id": None,
        })()  # fmt: skip
        self.vocab = vocab

    def forward(self, ids, attention_mask=None, position_ids=None, cache=None, logits_index=None):
        kv = torch.zeros(*ids.shape, 1, 1)
        cache.update(0, k=kv, v=kv)  # the paged cache is written like a real model's
        logits = torch.nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float() * 10
        return logits if logits_index is None else logits[torch.arange(ids.shape[0]), logits_index]


def test_generate_stops_on_stop_ids_budget_and_context():
    from nanoseek.engine.generate import GenerationResult

    greedy = SamplingParams(temperature=0)
    res = GenerationResult([], "")
    assert list(generate_tokens(_Counter(), [3], 10, greedy, stop_ids=[6], result=res)) == [4, 5]
    assert res.finish_reason == "stop"
    assert list(generate_tokens(_Counter(), [3], 3, greedy, result=res)) == [4, 5, 6] and res.finish_reason == "length"
    out = list(generate_tokens(_Counter(context=5), [1, 2], 10, greedy, result=res))
    assert out == [3, 4, 5] and res.finish_reason == "context"
    with pytest.raises(ValueError, match="context is 5"):
        list(generate_tokens(_Counter(context=5), [1] * 5, 3, greedy))


def test_text_streamer_holds_back_split_utf8(tmp_path):
    # A byte-level tokenizer: "é" is two byte tokens; the first alone must not print a replacement char.
    from tokenizers import decoders

    from nanoseek.tokenizer import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = BackendTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()

    tok = Tokenizer(backend=backend, source="t")
    ids = tok.encode("aé")
    assert len(ids) == 3
    streamer = TextStreamer(tok)
    deltas = [streamer.push(i) for i in ids]
    assert deltas == ["a", "", "é"]


def test_generate_loop_serves_deepseek_v3_the_same_way():
    """The loop uses only the shared interface: the KV-cached DeepSeek-V3 decode equals full re-forwards."""
    ds = pytest.importorskip("nanoseek.model.deepseek_v3")
    from nanoseek.model.config import from_name

    torch.manual_seed(0)
    model = ds.DeepseekV3ForCausalLM(from_name("test-tiny")).eval()
    cached = list(generate_tokens(model, [1, 2, 3, 4], 8, SamplingParams(temperature=0)))
    ids = [1, 2, 3, 4]
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[4:]


def test_folder_saved_by_transformers_loads_with_its_template(tmp_path):
    """transformers 5 writes the template to chat_template.jinja and special tokens to tokenizer_config.json."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "src").mkdir()
    src = _folder(tmp_path / "src")
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(src / "tokenizer.json"), chat_template=CHATML, eos_token="<|im_end|>", bos_token="<s>"
    )
    out = tmp_path / "saved"
    ref.save_pretrained(out)
    tok = nanoseek.load_tokenizer(out)
    msgs = [{"role": "user", "content": "hello world"}]
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (
        tok.encode_chat(msgs) == ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
    )
    assert (tok.eos_token_id, tok.bos_token_id) == (3, 1)
