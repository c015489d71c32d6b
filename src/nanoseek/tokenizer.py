"""`Tokenizer`, the text side of every model, and `load_tokenizer(path)` for a HF folder or a .gguf file.

Encode/decode with the `tokenizers` library, chat templates rendered in Jinja2's immutable sandbox, the
token ids that end a reply (EOS plus end-of-turn tokens), and `save(folder)` as a HF tokenizer folder.
Loaded tokenizers and the ones the trainer makes (`nanoseek.train.tokenizer.train_tokenizer`) are the
same class.

Chat templates are programs shipped inside model files, i.e. untrusted input: a template in a GGUF
once executed code through llama-cpp-python (CVE-2024-34359). They are rendered only in
`ImmutableSandboxedEnvironment`, and any reach for an unsafe attribute (`__class__`, `__globals__`, …)
stops the render with a `ChatTemplateError` instead of quietly yielding an empty string.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

# Texts of end-of-turn tokens llama.cpp also treats as "end of generation" when the file's EOS differs
# (e.g. Gemma: EOS is <eos>, but a chat turn ends with <end_of_turn>). Only used if the token is special.
END_OF_TURN_TEXTS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>",
                     "<｜end▁of▁sentence｜>", "<|end_of_text|>")  # fmt: skip


class ChatTemplateError(ValueError):
    """A chat template that is missing, malformed, or tried something the sandbox forbids."""


@dataclass
class Tokenizer:
    """The one tokenizer class: loaded from a model (`load_tokenizer`) or trained (`train.tokenizer`).

    `stop_token_ids` are the ids that end a reply: EOS first, then the extra ids given (a folder's
    generation_config, a GGUF's end-of-turn ids), then any END_OF_TURN_TEXTS token that is special here.
    """

    backend: BackendTokenizer
    source: str  # where it came from, for error messages
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    model_max_length: int | None = None

    def __post_init__(self) -> None:
        self.stop_token_ids = _stop_ids(self, self.stop_token_ids)

    # ---- ids ----------------------------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    def special_ids(self) -> tuple[int, int, int]:
        """(bos, eos, pad) ids, which training rows and padded batches need; a clear error if one is missing."""
        ids = {"bos": self.bos_token_id, "eos": self.eos_token_id, "pad": self.pad_token_id}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(
                f"{self.source}: the tokenizer has no {'/'.join(missing)} token (training needs bos, eos, pad)"
            )
        return ids["bos"], ids["eos"], ids["pad"]  # type: ignore[return-value]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_token_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    # ---- text ---------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens` adds what the tokenizer's post-processor adds (e.g. BOS; a trained
        tokenizer has none: its BOS/EOS are placed by the data pipeline)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render `messages` ([{"role", "content"}, …]) with the model's chat template, in the sandbox. `extra`:
        more template variables (tools, enable_thinking, …), none of TEMPLATE_OWN_VARIABLES."""
        if not self.chat_template:
            raise ChatTemplateError(f"{self.source}: the model has no chat template; use a raw prompt instead")
        return render_chat_template(
            self.chat_template,
            self.source,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            **extra,
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The template writes BOS itself where the model wants it, as transformers assumes.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    # ---- files --------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Write a HF tokenizer folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json) that
        `load_tokenizer` and transformers' AutoTokenizer (PreTrainedTokenizerFast) both read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        added = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }  # fmt: skip
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        specials = {k: v for k, v in specials.items() if v is not None}
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "unk_token": None}
        if self.backend.post_processor is None:  # nothing is added around the text: say so to transformers
            config.update(add_bos_token=False, add_eos_token=False)
        config.update(clean_up_tokenization_spaces=False, added_tokens_decoder=added)
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


# The variables apply_chat_template gives every template itself (`extra` may not set them).
TEMPLATE_OWN_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "pad_token"})


# ---- the sandbox -----------------------------------------------------------------------------------------


def _make_environment():
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """transformers' `{% generation %}…{% endgeneration %}` (marks assistant text for training masks);
        for rendering it is just its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class StrictSandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox, but touching an unsafe attribute fails at once (the stock sandbox
        returns an undefined value that prints as an empty string)."""

        def unsafe_undefined(self, obj: Any, attribute: str):
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    env = StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationTag])

    def raise_exception(message: str):
        raise ChatTemplateError(f"the chat template refused the conversation: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled once (a sandboxed environment holds no per-render state); SFT renders every
    conversation's prefixes, and compiling each time cost ~15 ms per conversation."""
    return _make_environment().from_string(template)


def render_chat_template(template: str, source: str, **variables: Any) -> str:
    """Render an untrusted chat template; errors name the source and never show a traceback."""
    from jinja2.exceptions import SecurityError, TemplateError

    try:
        return _compiled(template).render(**variables)
    except SecurityError as exc:
        raise ChatTemplateError(
            f"{source}: the chat template tried to reach Python internals and was refused ({exc})"
        ) from exc
    except ChatTemplateError:
        raise
    except TemplateError as exc:
        raise ChatTemplateError(f"{source}: the chat template is invalid ({type(exc).__name__}: {exc})") from exc


# ---- loading ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a HF folder (tokenizer.json + tokenizer_config.json) or of a .gguf file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: not a model folder or a .gguf file")
        return _from_gguf(path)
    return _from_folder(path)


def _from_gguf(path: Path) -> Tokenizer:
    from nanoseek.weights.gguf_file import GGUFFile
    from nanoseek.weights.gguf_tokenizer import tokenizer_from_gguf

    info = tokenizer_from_gguf(GGUFFile(path).metadata, path)
    return Tokenizer(
        backend=info.tokenizer,
        source=str(path),
        bos_token=info.bos_token,
        eos_token=info.eos_token,
        pad_token=info.pad_token,
        chat_template=info.chat_template,
        stop_token_ids=info.stop_token_ids,
    )


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _from_folder(folder: Path) -> Tokenizer:
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise FileNotFoundError(f"{tj}: missing; nanoseek needs a tokenizer.json in the model folder")
    try:
        backend = BackendTokenizer.from_file(str(tj))
    except Exception as exc:  # tokenizers raises its own Exception type for malformed files
        raise ValueError(f"{tj}: not a valid tokenizers file ({exc})") from exc
    cfg = _read_json(folder / "tokenizer_config.json")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja_file = folder / "chat_template.jinja"  # transformers 5 saves it apart
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    extra: list[int] = []
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(folder / name).get("eos_token_id")
        extra += [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    max_len = cfg.get("model_max_length")
    return Tokenizer(
        backend=backend,
        source=str(folder),
        bos_token=_token_text(cfg.get("bos_token")),
        eos_token=_token_text(cfg.get("eos_token")),
        pad_token=_token_text(cfg.get("pad_token")),
        chat_template=template,
        stop_token_ids=extra,
        model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e18 else None,
    )


def _stop_ids(tok: Tokenizer, listed: list[int]) -> list[int]:
    """EOS, then `listed`, then the special end-of-turn tokens the vocabulary has; without repeats (so applying
    it twice changes nothing)."""
    ids = [i for i in [tok.eos_token_id, *listed] if i is not None]
    special = tok.special_token_ids
    for text in END_OF_TURN_TEXTS:
        i = tok.token_to_id(text)
        if i is not None and i in special:
            ids.append(i)
    return list(dict.fromkeys(ids))
