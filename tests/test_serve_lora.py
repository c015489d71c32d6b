"""LoRA adapters served by name (issue 25 §3): PEFT folders read as peft writes them, nanoseek's logits with an
adapter equal transformers + peft's, each row of a batch runs its own adapter (or none) and gets the tokens, and
over int8/int4 weights the logits bit for bit, it gets alone, and `nanoseek serve --lora NAME=PATH` serves them
beside the base (chat, completions, Anthropic messages, /v1/models).

Adapters are made by peft itself on tiny random transformers models, with random B matrices (peft starts B at 0,
which would make every adapter the base)."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
import torch

import nanoseek
from nanoseek.engine import paged_attention
from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.lora import TILE, LoraLinear, lora_delta
from nanoseek.engine.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_model(family: str, seed: int = 0, hidden: int = 64, layers: int = 2):
    sizes = dict(vocab_size=160, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    cfg = {
        "llama": lambda: transformers.LlamaConfig(**sizes, tie_word_embeddings=True),  # SmolLM2's shape
        "qwen2": lambda: transformers.Qwen2Config(**sizes),
        "mistral": lambda: transformers.MistralConfig(**sizes, sliding_window=None),
    }[family]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _adapter(base_factory, folder, seed: int, targets=ALL, **config):
    """A peft LoRA adapter on a fresh copy of the base, with random B, saved to `folder`; returns the peft model."""
    model = peft.get_peft_model(base_factory(), peft.LoraConfig(target_modules=list(targets), **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama folder and two adapters: A on every projection (rsLoRA), B on q/v only (rank 8)."""
    root = tmp_path_factory.mktemp("lora")
    _hf_model("llama").save_pretrained(root / "base")
    a = _adapter(lambda: _hf_model("llama"), root / "a", 1, r=4, lora_alpha=8, use_rslora=True)
    b = _adapter(lambda: _hf_model("llama"), root / "b", 2, targets=["q_proj", "v_proj"], r=8, lora_alpha=16)
    return root, a, b


# ---- against transformers + peft ------------------------------------------------------------------------------

# measured max |logit difference| (fp32, these tiny models, both rows with the adapter): 1.2e-5 to 1.7e-5 (logits up
# to ~10); the bound leaves
# room for other BLAS builds while a wrong scale, a missing module or a swapped A/B is off by > 0.1
PEFT_TOLERANCE = 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_logits_equal_transformers_plus_peft(family, tmp_path):
    _hf_model(family).save_pretrained(tmp_path / "base")
    reference = _adapter(lambda: _hf_model(family), tmp_path / "ad", 3, r=4, lora_alpha=12,
                         alpha_pattern={"down_proj": 4})  # fmt: skip
    model = nanoseek.load(tmp_path / "base", lora={"ad": tmp_path / "ad"})
    ids = torch.randint(0, 160, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids).logits
        with reference.disable_adapter():
            base_want = reference(ids).logits
        with model.lora_adapters.rows(["ad", None]):
            got = model(ids)
    assert (got[0] - want[0]).abs().max() < PEFT_TOLERANCE
    assert (got[1] - base_want[1]).abs().max() < PEFT_TOLERANCE  # the row without an adapter is the base's
    assert (want - base_want).abs().max() > 0.1  # the adapter matters


def test_adapter_changes_only_its_rows_and_base_rows_stay_bitwise(llama):
    root, _, _ = llama
    plain = nanoseek.load(root / "base", quant="int8")
    model = nanoseek.load(root / "base", quant="int8", lora={"a": root / "a", "b": root / "b"})
    ids = torch.randint(0, 160, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = plain(ids)
        assert torch.equal(model(ids), base)  # no rows set: the base alone
        with model.lora_adapters.rows([None, "a", None]):
            mixed = model(ids)
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[2], base[2])
    assert not torch.equal(mixed[1], base[1])
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())  # no adapter: no wrapper, no extra work


def test_fused_projections_get_each_parts_update(llama):
    """int8 fuses q/k/v and gate/up; adapter B targets q and v only: the fused update is q's, exactly 0 for k, v's."""
    root, _, b = llama
    model = nanoseek.load(root / "base", quant="int8", lora={"b": root / "b"})
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, LoraLinear)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), model.lora_adapters.rows(["b"] * 5):
        delta = qkv(x) - qkv.base(x)
    attn = b.base_model.model.model.layers[0].self_attn
    with torch.no_grad():
        q = attn.q_proj.lora_B["default"](attn.q_proj.lora_A["default"](x)) * attn.q_proj.scaling["default"]
        v = attn.v_proj.lora_B["default"](attn.v_proj.lora_A["default"](x)) * attn.v_proj.scaling["default"]
    assert (delta[:, :64] - q).abs().max() < 1e-5
    assert torch.equal(delta[:, 64:96], torch.zeros(5, 32))
    assert (delta[:, 96:] - v).abs().max() < 1e-5


def test_lora_delta_of_a_row_does_not_depend_on_the_others():
    """The delta's matmuls run on fixed [TILE, k] shapes: a row's value is the same bit for bit alone, at any place
    among any number of other rows (a plain fp32 matmul is not: MKL changes its order with the row count)."""
    gen = torch.Generator().manual_seed(3)
    for d_in, rank, d_out in [(576, 16, 960), (576, 24, 3072), (1536, 16, 576), (64, 8, 64)]:
        a, b = torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen)
        x = torch.randn(100, d_in, generator=gen)
        alone = torch.cat([lora_delta(x[i : i + 1], a, b) for i in range(100)])
        for n in (2, TILE - 1, TILE, TILE + 3, 37, 100):
            order = torch.randperm(100, generator=gen)[:n]
            assert torch.equal(lora_delta(x[order], a, b), alone[order]), (d_in, rank, d_out, n)


# ---- the engine: mixed batches ---------------------------------------------------------------------------------


def _modes():
    from nanoseek.quant import int4_kernel_available

    int4 = pytest.mark.skipif(not int4_kernel_available(), reason="nanoseek's int4 kernel needs AVX2")
    return [pytest.param("int4", marks=int4), "int8", None]


PROMPTS = [[(5 * i + 7 * k) % 160 for i in range(n)] for k, n in enumerate([23, 9, 40, 17])]
ADAPTERS = [None, "a", "b", "a"]


@pytest.mark.parametrize("quant", _modes())
def test_mixed_batch_gives_each_row_what_it_gets_alone(llama, quant):
    """Base, A, B and A again (another prompt) in one engine, with prompt chunks split by a small step budget,
    against each alone: the same greedy tokens, and over int8/int4 the same logprobs bit for bit."""
    root, _, _ = llama
    model = nanoseek.load(root / "base", quant=quant, lora={"a": root / "a", "b": root / "b"})
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0, lora=a) for a in ADAPTERS]
    together = Engine(model, EngineConfig(max_step_tokens=24), eos_ids=[]).generate(PROMPTS, params)
    for prompt, p, got in zip(PROMPTS, params, together):
        alone = Engine(model, EngineConfig(), eos_ids=[]).generate([prompt], p)[0]
        assert got.token_ids == alone.token_ids, p.lora
        if quant is not None and paged_attention.available():
            assert [x["logprob"] for x in got.logprobs] == [x["logprob"] for x in alone.logprobs], p.lora
    # the adapters do change the answers (else this test would pass with adapters ignored)
    assert len({tuple(c.token_ids) for c in together[:3]}) == 3 or together[0].token_ids != together[1].token_ids


def test_engine_tokens_follow_peft_greedy(llama):
    """The engine's greedy tokens with adapter A equal transformers + peft's greedy decode."""
    root, a, _ = llama
    model = nanoseek.load(root / "base", lora={"a": root / "a"})
    prompt = PROMPTS[0]
    got = Engine(model, eos_ids=[]).generate([prompt], SamplingParams(temperature=0, max_tokens=8, lora="a"))[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, a(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got.token_ids == ids[0, len(prompt) :].tolist()


def test_prefix_cache_is_kept_per_adapter(llama):
    root, _, _ = llama
    model = nanoseek.load(root / "base", lora={"a": root / "a"})
    engine = Engine(model, EngineConfig(block_size=4), eos_ids=[])
    prompt, params = PROMPTS[2], SamplingParams(temperature=0, max_tokens=2)
    engine.generate([prompt], params)
    with_a = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=2, lora="a"))[0]
    assert with_a.num_cached_prompt == 0  # the base's keys and values are not the adapter's
    again = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=2, lora="a"))[0]
    assert again.num_cached_prompt > 0 and again.token_ids == with_a.token_ids


def test_unknown_adapter_in_a_request_is_refused(llama):
    root, _, _ = llama
    engine = Engine(nanoseek.load(root / "base", lora={"a": root / "a"}), eos_ids=[])
    with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'"):
        engine.add_request([1, 2], SamplingParams(lora="nope"))


# ---- adapters that do not fit ----------------------------------------------------------------------------------


def test_adapter_for_another_base_is_refused_naming_the_module(llama, tmp_path):
    root, _, _ = llama
    _adapter(lambda: _hf_model("llama", hidden=32), tmp_path / "narrow", 4, r=2)
    wrong = r"'narrow'.*layers\.0\.mlp\.down_proj maps 64 -> 32 features, the base model's 128 -> 64: .*another base"
    with pytest.raises(ValueError, match=wrong):
        nanoseek.load(root / "base", lora={"narrow": tmp_path / "narrow"})
    _adapter(lambda: _hf_model("llama", layers=3), tmp_path / "deep", 5, r=2)
    with pytest.raises(ValueError, match=r"'deep'.*model.layers.2.*does not have"):
        nanoseek.load(root / "base", lora={"deep": tmp_path / "deep"})


def test_unsupported_and_missing_adapter_folders_are_refused(llama, tmp_path):
    from nanoseek import WeightsError

    root, _, _ = llama
    _adapter(lambda: _hf_model("llama"), tmp_path / "dora", 6, r=2, use_dora=True)
    with pytest.raises(WeightsError, match="use_dora"):
        nanoseek.load(root / "base", lora={"d": tmp_path / "dora"})
    with pytest.raises(FileNotFoundError, match="no such adapter folder"):
        nanoseek.load(root / "base", lora={"x": tmp_path / "missing"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        nanoseek.load(root / "base", lora={"x": tmp_path / "empty"})


def test_serve_command_refuses_bad_lora_flags_before_serving(llama, capsys):
    from nanoseek.cli import main

    root, _, _ = llama
    assert main(["serve", str(root / "base"), "--lora", "noequals"]) == 2
    assert "--lora takes NAME=PATH" in capsys.readouterr().err
    assert main(["serve", str(root / "base"), "--lora", "base=" + str(root / "a")]) == 2  # the base's own name
    assert "is taken" in capsys.readouterr().err
    assert main(["serve", str(root / "base"), "--lora", f"x={root / 'nowhere'}"]) == 2
    assert "no such adapter folder" in capsys.readouterr().err


# ---- the server ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server tests' tiny chat model (GGUF with a ChatML tokenizer) with adapters A and B made by peft."""
    from gguf_writer import CHATML, tiny_llama, write_gguf
    from serve_helpers import serve

    root = tmp_path_factory.mktemp("served")
    gguf = write_gguf(root / "tiny.gguf", tiny_llama(128), "llama", chat_template=CHATML)
    _adapter(lambda: tiny_llama(128), root / "a", 7, r=4, lora_alpha=8)
    _adapter(lambda: tiny_llama(128), root / "b", 8, targets=["q_proj", "v_proj", "up_proj"], r=2, lora_alpha=4)
    adapters = {"ad-a": str(root / "a"), "ad-b": str(root / "b")}
    model = nanoseek.load(gguf, quant="int8", lora=adapters)
    with serve(gguf, model=model) as running:
        yield running, gguf, model, adapters


def _alone(model, gguf, messages, adapter, max_tokens=8, ids=None) -> list[int]:
    """The engine's greedy tokens for the conversation (or the prompt `ids`) with `adapter`, alone."""
    tok = nanoseek.load_tokenizer(gguf)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, lora=adapter)
    ids = tok.encode_chat(messages) if ids is None else ids
    return Engine(model, eos_ids=tok.stop_token_ids).generate([ids], params)[0].token_ids


def test_models_list_the_base_and_its_adapters(served):
    import httpx

    running, _, _, adapters = served
    cards = httpx.get(running.url + "/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["tiny", "ad-a", "ad-b"]
    assert cards[0]["parent"] is None
    assert [(c["parent"], c["root"]) for c in cards[1:]] == [("tiny", adapters["ad-a"]), ("tiny", adapters["ad-b"])]
    assert httpx.get(running.url + "/v1/models/ad-b").json()["parent"] == "tiny"
    missing = httpx.get(running.url + "/v1/models/ad-c")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_requests_pick_adapters_by_name_and_mixed_concurrent_ones_equal_alone(served):
    """Base, A and B requests at once over chat, completions and Anthropic messages: each gets its adapter's tokens
    alone (greedy; the base is int8, so the batch cannot change them) and its own name back."""
    import httpx

    running, gguf, model, _ = served
    tok = nanoseek.load_tokenizer(gguf)
    messages = [{"role": "user", "content": "the theme"}]
    prompt = tok.decode(tok.encode_chat(messages))  # /v1/completions tokenizes it as a text prompt
    names = {"tiny": None, "ad-a": "ad-a", "ad-b": "ad-b"}
    want = {name: tok.decode(_alone(model, gguf, messages, a)) for name, a in names.items()}
    ids = tok.encode(prompt)
    want_completion = {name: tok.decode(_alone(model, gguf, None, a, ids=ids)) for name, a in names.items()}
    assert len(set(want.values())) == 3  # each adapter answers differently

    def chat(name):
        body = {"model": name, "messages": messages, "max_tokens": 8, "temperature": 0}
        reply = httpx.post(running.url + "/v1/chat/completions", json=body, timeout=60).json()
        return reply["model"], reply["choices"][0]["message"]["content"]

    def anthropic(name):
        body = {"model": name, "messages": messages, "max_tokens": 8, "temperature": 0}
        reply = httpx.post(running.url + "/v1/messages", json=body, timeout=60).json()
        return reply["model"], reply["content"][0]["text"]

    def completion(name):
        body = {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        reply = httpx.post(running.url + "/v1/completions", json=body, timeout=60).json()
        return reply["model"], reply["choices"][0]["text"]

    jobs = [(f, name) for name in ("tiny", "ad-a", "ad-b") for f in (chat, anthropic, completion)] * 2
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: job[0](job[1]), jobs))
    for (f, name), (model_name, text) in zip(jobs, results):
        assert model_name == name and text == (want_completion if f is completion else want)[name], (f.__name__, name)


def test_streamed_chat_with_an_adapter_carries_its_name(served):
    import httpx

    running, gguf, model, _ = served
    messages = [{"role": "user", "content": "hello"}]
    body = {"model": "ad-b", "messages": messages, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert {c["model"] for c in chunks} == {"ad-b"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == nanoseek.load_tokenizer(gguf).decode(_alone(model, gguf, messages, "ad-b", 6))


def test_unknown_model_is_a_404_in_the_apis_shapes(served):
    import httpx

    running = served[0]
    body = {"model": "ad-z", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(running.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and "'ad-a'" in r.text
    r = httpx.post(running.url + "/v1/messages", json=body, timeout=60)
    assert r.status_code == 404 and r.json()["type"] == "error"
