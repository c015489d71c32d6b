"""Training a byte-level BPE tokenizer with HF `tokenizers`; the result is nanoseek's one `Tokenizer` class.

    tok = train_tokenizer(texts, vocab_size=512)   # texts: any iterable of str (task samples, user text)
    tok.save(folder)                                # tokenizer.json + tokenizer_config.json (+ chat_template)
    tok = nanoseek.load_tokenizer(folder)           # transformers' AutoTokenizer loads the same folder
    ids = tok.encode("12+34=")                      # no post-processor: no special tokens are added
    bos, eos, pad = tok.special_ids()
    prompt = tok.apply_chat_template([{"role": "user", "content": "12+34="}], add_generation_prompt=True)

Digits are split into single tokens before BPE (so "123" is always "1","2","3" and arithmetic stays
learnable), then bytes are mapped GPT-2 style so any text round-trips. The special tokens are
SPECIAL_TOKENS; the R1 markers <think> </think> <answer> </answer> are single tokens too. BOS/EOS are added
by the data pipeline, not by `encode`, so prompt and answer can be encoded separately and concatenated.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanoseek.tokenizer import Tokenizer

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
    return Tokenizer(
        backend=hf,
        source="trained tokenizer",
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
