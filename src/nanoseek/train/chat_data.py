"""Chat data for supervised fine-tuning: reading, rendering with the model's template, packing.

    convs = read_conversations("chats.jsonl")          # or a folder of .jsonl files, or a list of dicts
    ex = tokenize_conversation(tok, convs[0])          # ids + which tokens are the assistant's
    rows = pack([ex1, ex2, ...], capacity=512)         # x, y, position_ids, document_ids [R, T]

Data is OpenAI-style: one JSON object per line, {"messages": [{"role": ..., "content": ...}, ...]}.

Assistant spans. Templates differ (ChatML, Llama 3 headers, Gemma turns, BOS or not, a newline after the
end-of-turn token or not), so the spans are found by rendering, not by pattern: for the assistant message i,
    before = render(messages[:i], add_generation_prompt=True)    # ... up to the assistant header
    after  = render(messages[:i+1], add_generation_prompt=False)  # ... through the reply and its end-of-turn
and the reply's span is the characters [len(before), len(after)) of the whole rendering, which must start with
both prefixes. The loss then falls on the reply and the end-of-turn marker that follows it (what teaches
the model to stop), never on the header, the user's or the system's text. A template that renders earlier
turns differently once later ones exist (it must then fail the prefix check) falls back to locating each
reply's text in the rendering, in order, with the end-of-turn token after it.

Packing. A step's conversations are packed into rows (first-fit, longest first) of `capacity` tokens, the
longest conversation of the step: no row is longer than in a padded batch and there is almost no padding.
Each row carries position ids that restart at 0 per conversation and document ids, from which the model
builds a block-diagonal causal mask (model/packing.py): a conversation never attends to its neighbours, so
a packed row computes exactly what the conversations would alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.tokenizer import END_OF_TURN_TEXTS, Tokenizer


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    where: str  # "file:line" or "item N", for messages


@dataclass
class Example:
    """One tokenized conversation: ids, and for each id whether it is the assistant's (a loss target)."""

    ids: list[int]
    assistant: list[bool]
    where: str

    @property
    def length(self) -> int:
        return len(self.ids) - 1  # positions as model input: the last token is only ever a target

    @property
    def n_targets(self) -> int:
        return sum(self.assistant[1:])


# ---- reading -------------------------------------------------------------------------------------------
def read_conversations(data: str | os.PathLike | Sequence[dict]) -> list[Conversation]:
    """Conversations from a .jsonl file, a folder of .jsonl files (sorted, recursively), or a list of dicts.
    Every conversation is checked here; the error names the file and line (or list item)."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"{path}: data file or folder not found")
        files = sorted(f for f in path.rglob("*.jsonl") if f.is_file()) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"{path}: the folder holds no .jsonl files")
        out: list[Conversation] = []
        for f in files:
            out.extend(_read_jsonl(f))
    else:
        out = [Conversation(_check_messages(item, f"item {i}"), f"item {i}") for i, item in enumerate(data)]
    if not out:
        raise ValueError(f"{data if isinstance(data, (str, os.PathLike)) else 'the data'}: no conversations")
    return out


def _read_jsonl(path: Path) -> list[Conversation]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            out.append(Conversation(_check_messages(obj, where), where))
    return out


def _check_messages(obj: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise ValueError(f'{where}: expected an object with a non-empty "messages" list')
    for j, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f'{where}: message {j} needs a string "role" and a string "content"')
    if not any(m["role"] == "assistant" for m in obj["messages"]):
        raise ValueError(f"{where}: the conversation has no assistant turn (nothing to learn from)")
    return obj["messages"]


# ---- rendering -----------------------------------------------------------------------------------------
def assistant_char_spans(tok: Tokenizer, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """(the whole rendering, the character spans of the assistant replies with their end-of-turn)."""
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        after = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(after) and len(after) > len(before)):
            return full, _spans_by_search(tok, full, messages)
        spans.append((len(before), len(after)))
    return full, spans


def _spans_by_search(tok: Tokenizer, full: str, messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Fallback: each reply's text found in order, extended over the end-of-turn token right after it."""
    spans, cursor = [], 0
    ends = [tok.eos_token, *(tok.backend.id_to_token(i) for i in tok.stop_token_ids), *END_OF_TURN_TEXTS]
    for m in messages:
        text = m["content"].strip()
        if m["role"] != "assistant" or not text:
            continue
        start = full.find(text, cursor)
        if start < 0:
            raise ValueError("the chat template drops or rewrites an assistant reply; cannot place its loss")
        end = start + len(text)
        for marker in ends:
            if marker and full.startswith(marker, end):
                end += len(marker)
                break
        spans.append((start, end))
        cursor = end
    return spans


def tokenize_conversation(tok: Tokenizer, conv: Conversation | dict | list[dict[str, Any]]) -> Example:
    """Render with the model's template, tokenize once, mark the tokens whose text starts in a reply span.
    conv: a Conversation, a {"messages": [...]} dict, or the messages list."""
    if isinstance(conv, dict):
        conv = Conversation(_check_messages(conv, "conversation"), "conversation")
    elif isinstance(conv, list):
        conv = Conversation(_check_messages({"messages": conv}, "conversation"), "conversation")
    try:
        full, spans = assistant_char_spans(tok, conv.messages)
    except ValueError as exc:
        raise ValueError(f"{conv.where}: {exc}") from exc
    enc = tok.backend.encode(full, add_special_tokens=False)  # the template writes BOS where the model wants it
    flags, s = [], 0
    for start, _ in enc.offsets:
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        flags.append(s < len(spans) and spans[s][0] <= start < spans[s][1])
    return Example(list(enc.ids), flags, conv.where)


# ---- packing -------------------------------------------------------------------------------------------
@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, T]
    targets: torch.Tensor  # [R, T], IGNORE_INDEX off the assistant tokens and on padding
    position_ids: torch.Tensor  # [R, T], restarting at 0 in each conversation
    document_ids: torch.Tensor  # [R, T], the conversation's index in its row; -1 for padding

    def as_micro_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """What Trainer._train_step takes: (x, y, extra forward kwargs)."""
        return self.input_ids, self.targets, {"position_ids": self.position_ids, "document_ids": self.document_ids}


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= capacity: first fit, longest first (ties by index, so the
    packing is deterministic)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack(examples: Sequence[Example], capacity: int | None = None, pad_id: int = 0) -> PackedBatch:
    """Pack examples into rows of `capacity` positions (default: the longest example), trimmed to the
    fullest row. Input is ids[:-1], targets ids[1:] where the target token is the assistant's."""
    if not examples:
        raise ValueError("nothing to pack")
    lengths = [e.length for e in examples]
    capacity = max(lengths) if capacity is None else capacity
    if max(lengths) > capacity:
        raise ValueError(f"a conversation of {max(lengths)} tokens does not fit rows of {capacity}")
    bins = first_fit(lengths, capacity)
    width = max(sum(lengths[i] for i in b) for b in bins)
    shape = (len(bins), width)
    x = torch.full(shape, pad_id, dtype=torch.long)
    y = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    doc = torch.full(shape, -1, dtype=torch.long)
    for r, b in enumerate(bins):
        col = 0
        for d, i in enumerate(sorted(b)):  # conversations in data order within a row
            e, n = examples[i], lengths[i]
            ids = torch.tensor(e.ids, dtype=torch.long)
            keep = torch.tensor(e.assistant[1:], dtype=torch.bool)
            x[r, col : col + n] = ids[:-1]
            y[r, col : col + n] = torch.where(keep, ids[1:], IGNORE_INDEX)
            pos[r, col : col + n] = torch.arange(n)
            doc[r, col : col + n] = d
            col += n
    return PackedBatch(x, y, pos, doc)
