"""GGUF loading: tiny models written the way llama.cpp's converter writes them (permuted q/k, +1 Gemma
norms, quantized weights), loaded with `nanoseek.load`, compared with the original transformers model
(F32 files) and with transformers loading the same GGUF (quantized files); plus damaged files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nanoseek
from gguf_writer import IM_END, IM_START, VOCAB_SIZE, write_gguf
from nanoseek.quant import int4_kernel_available
from nanoseek.weights.safetensors_io import WeightsError

transformers = pytest.importorskip("transformers")
INT4 = pytest.param("int4", marks=pytest.mark.skipif(
    not int4_kernel_available(), reason="nanoseek's int4 kernel needs AVX2"))  # fmt: skip

# Measured max |diff|: 3.2e-6 for F32 files (logits of magnitude ~5), 0 for quantized ones (both sides
# dequantize with the same code). TOL leaves ~3x headroom.
TOL = 1e-5
COMMON = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
)  # fmt: skip


def _tiny(arch: str):
    if arch == "llama":  # SmolLM2-like: tied embeddings, GQA
        cfg = transformers.LlamaConfig(**COMMON, num_hidden_layers=2, tie_word_embeddings=True)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=False)
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(**COMMON, num_hidden_layers=2, query_pre_attn_scalar=16, sliding_window=4,
                                        attn_logit_softcapping=3.0, final_logit_softcapping=5.0)  # fmt: skip
    else:  # gemma3: llama.cpp's fixed layout (5 local layers, then a global one; local rope base 10k)
        cfg = transformers.Gemma3TextConfig(**COMMON, num_hidden_layers=6, query_pre_attn_scalar=16, sliding_window=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(0.1 * noise + (1.0 if "norm" in name and not arch.startswith("gemma") else 0.0))
    return model


IDS = torch.randint(0, VOCAB_SIZE, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3"])
def test_f32_gguf_matches_original_model(arch, tmp_path):
    """F32 weights: only the layout conventions stand between the file and the HF model, so logits must
    match the model the file was written from."""
    ref = _tiny(arch)
    path = write_gguf(tmp_path / f"{arch}.gguf", ref, arch)
    ours = nanoseek.load(path)
    with torch.no_grad():
        assert (ours(IDS) - ref(IDS).logits).abs().max().item() <= TOL
    assert ours.config.eos_token_ids == [IM_END]
    assert ours.config.tie_word_embeddings == ref.config.tie_word_embeddings


def test_llama3_rope_scaling_from_rope_freqs_tensor(tmp_path):
    """Llama 3.1+ GGUFs carry rope scaling as a `rope_freqs` tensor, not as metadata."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
    cfg = transformers.LlamaConfig(**COMMON, num_hidden_layers=2, rope_parameters=rope)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = nanoseek.load(write_gguf(tmp_path / "llama31.gguf", ref, "llama"))
    assert ours.config.rope_freq_factors is not None
    ids = torch.randint(0, VOCAB_SIZE, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= TOL


def _ref_from_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_gguf_matches_transformers_gguf_loader(qtype, tmp_path):
    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", _tiny("llama"), "llama", qtype=qtype)
    ours, ref = nanoseek.load(path), _ref_from_gguf(path)
    with torch.no_grad():
        assert (ours(IDS) - ref(IDS).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("mode", ["int8", "fp16", INT4])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied embeddings (lm_head packed from them) and untied
def test_packing_while_loading_equals_quantizing_after(arch, mode, tmp_path):
    """`load(quant=)` packs each projection as it is read (no fp32 model in between): same modules, same
    logits, bit for bit, as loading in fp32 and quantizing afterwards. (int4 reads an F16 file: from a
    Q8_0 file it would keep the 8-bit projections in int8, see the mixed-file test below.)"""
    from nanoseek.quant import KEEP, quantize_model

    qtype = "F16" if mode == "int4" else "Q8_0"
    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", _tiny(arch), arch, qtype=qtype)
    packed = nanoseek.load(path, quant=mode)
    after = quantize_model(nanoseek.load(path), mode)
    assert [type(m) for m in packed.modules()] == [type(m) for m in after.modules()]
    assert not [n for n, m in packed.named_modules() if type(m) is torch.nn.Linear and n.split(".")[-1] not in KEEP]
    with torch.no_grad():
        assert torch.equal(packed(IDS), after(IDS))
    assert packed.quantization == mode
    with pytest.raises(ValueError, match="int3"):
        nanoseek.load(path, quant="int3")


def test_k_quants_match_transformers_gguf_loader(tmp_path):
    kq = {"blk.0.ffn_down.weight": "Q4_K", "blk.1.ffn_down.weight": "Q6_K"}
    path = write_gguf(tmp_path / "tiny-k.gguf", _tiny("qwen2"), "qwen2", qtype="Q8_0", kquant=kq)
    ours, ref = nanoseek.load(path), _ref_from_gguf(path)
    with torch.no_grad():
        diff = (ours(IDS) - ref(IDS).logits).abs().max().item()
    assert diff <= TOL


def test_tokenizer_and_template_come_from_the_file(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", _tiny("llama"), "llama")
    tok = nanoseek.load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in ["the theme", "hello <|im_end|> there", "naïve 東京\n\n  x"]:
        assert tok.encode(text) == ref(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    assert tok.encode("<|im_start|>")[0] == IM_START  # special tokens stay whole
    assert IM_END in tok.stop_token_ids
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    from gguf_writer import tiny_spm_vocab

    cfg = transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tiny_spm_vocab()[0])}, num_hidden_layers=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    path = write_gguf(tmp_path / "spm.gguf", model, "llama", tokenizer="spm")
    tok = nanoseek.load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["the theme", " the", "héllo wörld", "the</s>the"]:
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    assert tok.encode("the")[0] == 1  # llama-style files add BOS unless they say otherwise


# ---- bad files ---------------------------------------------------------------------------------------------


def test_truncated_gguf_is_a_clear_error(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", _tiny("llama"), "llama")
    data = path.read_bytes()
    for cut in (10, 200, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match=r"cut\d+\.gguf: truncated"):
            nanoseek.load(bad)


def test_corrupt_gguf_header_is_a_clear_error(tmp_path):
    data = bytearray(write_gguf(tmp_path / "tiny.gguf", _tiny("llama"), "llama").read_bytes())
    data[16:24] = b"\xff" * 8  # metadata count: absurd
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt.gguf: truncated or corrupt GGUF header"):
        nanoseek.load(bad)
    with pytest.raises(WeightsError, match="corrupt.gguf"):
        nanoseek.load_tokenizer(bad)


def test_not_a_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(WeightsError, match="not a GGUF file"):
        nanoseek.load(bad)


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    path = write_gguf(tmp_path / "rwkv.gguf", _tiny("llama"), "rwkv6")
    with pytest.raises(WeightsError, match=r"unsupported GGUF architecture 'rwkv6'; supported: gemma, .*llama, qwen2"):
        nanoseek.load(path)


def test_deepseek2_gguf_says_not_supported_yet(tmp_path):
    path = write_gguf(tmp_path / "ds.gguf", _tiny("llama"), "deepseek2")
    with pytest.raises(WeightsError, match="DeepSeek-V2/V3 GGUF files are not supported yet"):
        nanoseek.load(path)


def test_unsupported_quant_type_is_named_with_the_supported_ones(tmp_path):
    path = write_gguf(tmp_path / "q81.gguf", _tiny("qwen2"), "qwen2", kquant={"blk.0.ffn_down.weight": "Q8_1"})
    with pytest.raises(WeightsError, match=r"'blk.0.ffn_down.weight' uses quantization Q8_1, .*supported: .*Q4_K"):
        nanoseek.load(path)


def test_loading_unmaps_the_gguf_file(tmp_path):
    """The file's pages count in RSS while it is mapped: once loaded, no mapping of it remains (and, with
    quant, the same). /proc/self/maps lists every mapping of the process, so this is exact."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps")
    model = _tiny("llama")
    path = write_gguf(tmp_path / "tiny.gguf", model, "llama")
    for quant in (None, "int8"):
        loaded = nanoseek.load(path, quant=quant)
        assert str(path.resolve()) not in maps.read_text(), quant
        del loaded


def test_gguf_file_close_unmaps_and_refuses_live_views(tmp_path):
    from nanoseek.weights.gguf_file import GGUFFile

    model = _tiny("llama")
    gf = GGUFFile(write_gguf(tmp_path / "tiny.gguf", model, "llama"))
    view = gf.raw(next(iter(gf.tensors.values())))  # aliases the mapping
    with pytest.raises(BufferError):
        gf.close()
    del view
    gf.close()
    if Path("/proc/self/maps").exists():
        assert str(gf.path.resolve()) not in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_1"])
def test_auto_run_format_keeps_a_4_bit_file_in_4_bits(qtype, tmp_path, monkeypatch):
    """--quant auto: a Q4_0 or Q4_1 file runs as int4 where the kernel runs (its own weights), as int8
    elsewhere; 5-8 bit files run as int8."""
    from nanoseek import quant
    from nanoseek.commands._textgen import run_format

    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", _tiny("llama"), "llama", qtype=qtype)
    four_bit = qtype in ("Q4_0", "Q4_1")
    assert run_format("auto", path, None) == ("int4" if four_bit and quant.int4_kernel_available() else "int8")
    monkeypatch.setattr(quant, "int4_kernel_available", lambda: False)
    assert run_format("auto", path, "cpu") == "int8"


def test_int4_runs_4_bit_tensors_from_their_blocks_and_wider_ones_as_int8(tmp_path):
    """int4 on a GGUF with mixed types: Q4_0 and Q4_K projections are packed from the file's own blocks (the
    kernel's output for unit inputs is the file's weights: exact for Q4_0, within fp16 rounding of the
    sub-block scales for Q4_K); a Q6_K projection runs in 8 bits rather than losing bits, in Q8_0's blocks
    of 32 with activations rounded per block (Int8BlockLinear: Gemma's large activations lost too much with
    one scale per row); auto picks int4."""
    if not int4_kernel_available():
        pytest.skip("nanoseek's 4-bit kernel cannot run here")
    from nanoseek.commands._textgen import run_format
    from nanoseek.quant import Int4Linear, Int8BlockLinear

    kq = {"blk.0.ffn_down.weight": "Q4_K", "blk.1.ffn_down.weight": "Q6_K"}
    path = write_gguf(tmp_path / "tiny-mixed.gguf", _tiny("llama"), "llama", qtype="Q4_0", kquant=kq)
    assert run_format("auto", path, None) == "int4"
    ref, packed = nanoseek.load(path), nanoseek.load(path, quant="int4")
    assert type(packed.model.layers[1].mlp.down_proj) is Int8BlockLinear
    with torch.no_grad():  # within Q8_0's rounding of the Q6_K weights (half a step of max|w| / 127 per block)
        down, wide = packed.model.layers[1].mlp.down_proj, ref.model.layers[1].mlp.down_proj.weight
        got = down(torch.eye(down.in_features)).T
    torch.testing.assert_close(got, wide, rtol=0, atol=wide.abs().max().item() / 254 * 1.01)
    for i, layer in enumerate(packed.model.layers):
        r = ref.model.layers[i]
        cases = [
            (layer.self_attn.qkv_proj, [r.self_attn.q_proj, r.self_attn.k_proj, r.self_attn.v_proj], 1e-6),
            (layer.self_attn.o_proj, [r.self_attn.o_proj], 1e-6),
            (layer.mlp.gate_up_proj, [r.mlp.gate_proj, r.mlp.up_proj], 1e-6),
        ]
        if i == 0:
            cases.append((layer.mlp.down_proj, [r.mlp.down_proj], 2**-10))  # Q4_K: fp16 scales
        for linear, parts, rel in cases:
            assert type(linear) is Int4Linear
            weight = torch.cat([p.weight for p in parts])
            with torch.no_grad():
                got = linear(torch.eye(linear.in_features)).T  # row j of the identity reads input j's weights
            torch.testing.assert_close(got, weight, rtol=0, atol=rel * weight.abs().max().item())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_four_bit_grid_reads_the_files_weights_exactly(qtype):
    """d * q + m over the decoded blocks equals gguf's own dequantization, bit for bit (fp32)."""
    import gguf
    import numpy as np
    from gguf import quants

    from nanoseek.weights.gguf_grid import four_bit_grid

    rng = np.random.default_rng(0)
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype == "Q4_K":  # numpy gguf cannot quantize K-quants: random blocks with small, finite fp16 d and dmin
        raw = rng.integers(0, 256, (6, 2 * 144), dtype=np.uint8)
        blocks = raw.reshape(6, 2, 144)
        blocks[..., 0:2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
        blocks[..., 2:4] = np.frombuffer(np.float16(0.003).tobytes(), dtype=np.uint8)
    else:
        raw = quants.quantize(rng.standard_normal((6, 512)).astype(np.float32), kind)
    q, d, m = four_bit_grid(raw, qtype, 512)
    assert q.shape == (6, 512) and d.shape == m.shape == (6, 16) and q.max() <= 15
    mine = (d[..., None] * q.reshape(6, 16, 32).astype(np.float32) + m[..., None]).reshape(6, 512)
    assert np.array_equal(mine, quants.dequantize(raw, kind))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied: one int8 matrix for both; untied: its own
def test_int8_formats_keep_the_embedding_as_int8_rows(arch, tmp_path):
    from nanoseek.quant import Int8Embedding, Int8Linear, linear_weight_bytes

    path = write_gguf(tmp_path / "tiny-Q8_0.gguf", _tiny(arch), arch, qtype="Q8_0")
    ref, packed = nanoseek.load(path), nanoseek.load(path, quant="int8")
    embedding, head = packed.model.embed_tokens, packed.lm_head
    assert type(embedding) is Int8Embedding and type(head) is Int8Linear
    shared = embedding.qweight.data_ptr() == head.qweight_t.data_ptr()
    assert shared == (arch == "llama")
    vocab, hidden = ref.model.embed_tokens.weight.shape
    held = linear_weight_bytes(packed) - linear_weight_bytes(packed.model.layers)
    head_bytes = vocab * hidden + 8 * vocab
    assert held == head_bytes + (0 if shared else vocab * hidden + 4 * vocab) + hidden * 4  # + the final norm
    table = ref.model.embed_tokens.weight
    # each row within half a step of its int8 grid
    got = embedding(torch.arange(vocab))
    assert ((got - table).abs() <= table.abs().amax(1, keepdim=True) / 254 + 1e-7).all()
    with torch.no_grad():  # the int8 table adds little to the int8 format's own distance from fp32
        expected = ref(IDS)
        with_int8_table = (packed(IDS) - expected).abs().mean().item()
        packed.model.embed_tokens = ref.model.embed_tokens
        with_fp32_table = (packed(IDS) - expected).abs().mean().item()
    assert with_int8_table < 1.25 * with_fp32_table, (with_int8_table, with_fp32_table)
