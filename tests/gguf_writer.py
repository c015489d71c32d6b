"""Test helper: write a transformers model as a small GGUF the way llama.cpp's converter does.

Applies llama.cpp's conventions (q/k row permutation for Llama, +1 on Gemma norms, GGUF names) so the
loader's job of undoing them is really tested, and adds a tiny byte-level BPE tokenizer with chat
special tokens and a chat template.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nanoseek.weights.gguf_tokenizer import bytes_to_unicode

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def tiny_vocab() -> list[str]:
    """256 byte tokens, 3 merged tokens, 3 specials: 262 tokens."""
    return list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"] + SPECIALS


def tiny_spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary (llama.cpp "llama" tokenizer): specials, 256 byte tokens, pieces
    with scores (merge priority); 266 tokens."""
    pieces = ["▁", "t", "h", "e", "▁t", "he", "▁the"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # unknown, control, byte, normal
    return tokens, scores, types


VOCAB_SIZE = len(tiny_vocab())
ENDOFTEXT, IM_START, IM_END = (tiny_vocab().index(t) for t in SPECIALS)

_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _gguf_name(name: str, gemma: bool) -> str | None:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
    if name in top:
        return top[name]
    _, _, layer, rest = name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    if module == "post_attention_layernorm":
        kind = "post_attention_norm" if gemma else "ffn_norm"
    elif module == "pre_feedforward_layernorm":
        kind = "ffn_norm"
    else:
        kind = _NAMES[module]
    return f"blk.{layer}.{kind}.{suffix}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """llama.cpp's converter: Llama 3.1 rope scaling as per-frequency divisors (the `rope_freqs` tensor)."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(
    path: Path,
    model,
    arch: str,
    qtype: str = "F32",
    chat_template: str | None = CHATML,
    name: str = "tiny",
    tokenizer: bool | str = True,
    kquant: dict[str, str] | None = None,
) -> Path:
    """Write `model` (a transformers CausalLM) as GGUF `arch` with 2-D weights in `qtype`.

    `kquant` maps GGUF tensor names to a K-quant type to fill with random valid blocks (numpy gguf cannot
    quantize K-quants), for loader layout tests.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    cfg = model.config
    gemma = arch.startswith("gemma")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    if getattr(cfg, "attn_logit_softcapping", None):
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    if getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if tokenizer == "spm":
        tokens, scores, types = tiny_spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    elif tokenizer:
        vocab = tiny_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab)
        w.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
        w.add_token_merges(MERGES)
        w.add_bos_token_id(IM_START)
        w.add_eos_token_id(IM_END)
        w.add_add_bos_token(False)
        if chat_template is not None:
            w.add_chat_template(chat_template)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, cfg.head_dim))
    rng = np.random.default_rng(0)
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        arr = t.detach().float().numpy().copy()
        if gemma and hf.endswith("norm.weight"):
            arr = arr + 1.0
        if arch == "llama" and ".self_attn.q_proj." in hf:
            arr = _permute(arr, cfg.num_attention_heads)
        if arch == "llama" and ".self_attn.k_proj." in hf:
            arr = _permute(arr, cfg.num_key_value_heads)
        gname = _gguf_name(hf, gemma)
        if kquant and gname in kquant:
            kind = Q[kquant[gname]]
            block, size = gguf.GGML_QUANT_SIZES[kind]
            raw = rng.integers(0, 256, (arr.shape[0], arr.shape[1] // block * size), dtype=np.uint8)
            scale_at = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [size - 2], Q.Q2_K: [size - 4, size - 2],
                        Q.Q3_K: [size - 2]}.get(kind, [])  # fmt: skip
            blocks = raw.reshape(arr.shape[0], -1, size)
            for off in scale_at:  # small, finite f16 scales so the weights stay sane
                blocks[..., off : off + 2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
            w.add_tensor(gname, raw, raw_dtype=kind)
        elif arr.ndim == 2 and qtype != "F32":
            w.add_tensor(gname, quants.quantize(arr, Q[qtype]), raw_dtype=Q[qtype])
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(context: int = 64):
    """A tiny random transformers Llama over this vocabulary, with weights large enough that greedy
    tokens vary (the CLI and server tests' chat model)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                                   tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model
