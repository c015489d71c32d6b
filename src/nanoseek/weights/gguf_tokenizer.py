"""Rebuilding a `tokenizers.Tokenizer` from a GGUF file's metadata.

A GGUF carries no tokenizer.json: it stores the vocabulary, token types, merges (or scores) and special
ids under llama.cpp's keys. The two vocabularies the supported families use are rebuilt here the way
transformers' GGUF converter does, so ids match the reference:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE (SmolLM2, Llama 3, Qwen2), the text pre-split with
  the regex named by `tokenizer.ggml.pre`.
- `tokenizer.ggml.model == "llama"`: SentencePiece-style BPE with byte fallback (Llama 2, Mistral,
  Gemma). Gemma files list no merges; they are recovered from the vocabulary order.

Control tokens (type 3) become special tokens and user-defined ones (type 4) plain added tokens, so
`<|im_end|>` or `<end_of_turn>` stay whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from nanoseek.weights.safetensors_io import WeightsError

CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regex that splits text before byte-level BPE (absent: GPT-2's own regex).
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}  # fmt: skip


@dataclass
class GGUFTokenizerInfo:
    tokenizer: Tokenizer
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    add_bos: bool
    chat_template: str | None
    stop_token_ids: list[int]  # EOS plus end-of-turn ids named in the metadata


def gguf_stop_ids(meta: dict[str, Any]) -> list[int]:
    """The ids a GGUF's metadata says end generation: EOS plus llama.cpp's end-of-turn / end-of-message ids,
    without repeats. The model config (eos_token_id) and the tokenizer (stop_token_ids) both take them from here."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (the alphabet byte-level vocabularies are spelled in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_from_gguf(meta: dict[str, Any], path: Path) -> GGUFTokenizerInfo:
    """Build the tokenizer a GGUF's metadata describes (see the module docstring)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise WeightsError(f"{path}: the GGUF has no tokenizer (tokenizer.ggml.model / tokens missing)")
    arch = meta.get("general.architecture", "")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tok = _byte_level(tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre"))
        add_bos_default = False
    elif kind == "llama" and arch.startswith("gemma"):
        tok = _gemma(tokens, meta)
        add_bos_default = True
    elif kind == "llama":
        tok = _sentencepiece(tokens, meta)
        add_bos_default = True
    else:
        raise WeightsError(
            f"{path}: tokenizer type {kind!r} is not supported; "
            "supported: gpt2 (byte-level BPE), llama (SentencePiece BPE)"
        )
    _add_special_tokens(tok, tokens, types, byte_level=kind == "gpt2")

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    return GGUFTokenizerInfo(
        tokenizer=tok,
        bos_token=bos,
        eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"),
        unk_token=token("unknown_token_id"),
        add_bos=add_bos,
        chat_template=meta.get("tokenizer.chat_template"),
        stop_token_ids=gguf_stop_ids(meta),
    )


def _byte_level(tokens: list[str], merges: list[str], pre: str | None) -> Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False))  # fmt: skip
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre == "smollm":
        # SmolLM's own tokenizer.json (and llama.cpp's "smollm" rule) splits every digit apart first.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _merges_from_vocab(tokens: list[str], rank: dict[str, float]) -> list[tuple[str, str]]:
    """Merges a SentencePiece-BPE vocabulary implies: every split of a token into two known tokens,
    best-ranked result first (transformers' `generate_merges` with scores)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in rank.items():
        local = [
            (piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece(tokens: list[str], meta: dict) -> Tokenizer:
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges")
    pairs = (
        [tuple(m.split(" ", 1)) for m in merges] if merges else _merges_from_vocab(tokens, dict(zip(tokens, scores)))
    )
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _gemma(tokens: list[str], meta: dict) -> Tokenizer:
    # Gemma files spell multi-space tokens with real spaces; the tokenizer looks them up as "▁▁…".
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    # No merges in the file, and Gemma's scores do not follow merge order: the vocabulary order does.
    pairs = _merges_from_vocab(tokens, {t: -i for i, t in enumerate(tokens)})
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else "<unk>"
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=True, unk_token=unk, dropout=None, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _add_special_tokens(tok: Tokenizer, tokens: list[str], types: list[int], byte_level: bool) -> None:
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types)
        # a control token outside a byte-level alphabet is a llama.cpp mislabel; adding it would grow the vocab
        if kind == CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types)
        if kind == USER_DEFINED and t in vocab
    ]
    if user:
        tok.add_tokens(user)
