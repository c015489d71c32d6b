"""Byte-level BPE tokenizer trained with HF `tokenizers`, saved as a HF-compatible folder.

    tok = train_tokenizer(texts, vocab_size=512)   # texts: any iterable of str (task samples, user text)
    tok.save(folder)                                # tokenizer.json + tokenizer_config.json (+ chat_template)
    tok = Tokenizer.from_folder(folder)             # transformers' AutoTokenizer loads the same folder
    ids = tok.encode("12+34=")                      # no special tokens are added implicitly
    text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "12+34="}], add_generation_prompt=True)

Digits are split into single tokens before BPE (so "123" is always "1","2","3" and arithmetic stays
learnable), then bytes are mapped GPT-2 style so any text round-trips. The special tokens are
SPECIAL_TOKENS; the R1 markers <think> </think> <answer> </answer> are single tokens too. BOS/EOS are added
by the data pipeline, not by `encode`, so prompt and answer can be encoded separately and concatenated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanoseek.tokenizer import load_tokenizer, render_chat_template

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [
    BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>", "<think>", "</think>", "<answer>", "</answer>",
]  # fmt: skip

# Rendered in a jinja2 sandbox (here and by transformers). An assistant turn ends with eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class Tokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` with the ids the trainer needs."""

    def __init__(self, hf: HFTokenizer, chat_template: str = CHAT_TEMPLATE, model_max_length: int = 2048):
        self.hf = hf
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        missing = [t for t in (BOS, EOS, PAD) if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.bos_id: int = hf.token_to_id(BOS)
        self.eos_id: int = hf.token_to_id(EOS)
        self.pad_id: int = hf.token_to_id(PAD)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        tid = self.hf.token_to_id(token)
        if tid is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return tid

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        # The same hardened sandbox that renders untrusted templates from model files.
        return render_chat_template(
            self.chat_template,
            "trained tokenizer",
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=BOS,
            eos_token=EOS,
        )

    # ---- files ---------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (HF PreTrainedTokenizerFast layout)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(folder / "tokenizer.json"))
        added = {
            str(self.hf.token_to_id(t)): {
                "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
            if self.hf.token_to_id(t) is not None
        }  # fmt: skip
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "added_tokens_decoder": added,
            "chat_template": self.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load a folder written by `save` (or any HF tokenizer folder with these special tokens)."""
        loaded = load_tokenizer(folder)  # shared loader: clear errors for missing/malformed files
        max_len = 2048
        cfg_path = Path(folder) / "tokenizer_config.json"
        if cfg_path.is_file():
            max_len = int(json.loads(cfg_path.read_text()).get("model_max_length", max_len))
        return cls(loaded.backend, chat_template=loaded.chat_template or CHAT_TEMPLATE, model_max_length=max_len)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2, model_max_length: int = 2048
) -> Tokenizer:
    """Train a byte-level BPE on `texts`. vocab_size counts the 256 byte tokens and the special tokens,
    so it must exceed 256 + len(SPECIAL_TOKENS); the result may be smaller when the texts have few merges."""
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs more than {floor}")
    hf = HFTokenizer(models.BPE(unk_token=None))
    hf.pre_tokenizer = _pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # ids 0..len-1, so bos=0, eos=1, pad=2 as in DeepseekV3Config
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    count = 0

    def counted() -> Iterable[str]:
        nonlocal count
        for t in texts:
            count += 1
            yield t

    hf.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise ValueError("cannot train a tokenizer on no text (the text iterator was empty)")
    return Tokenizer(hf, model_max_length=model_max_length)
