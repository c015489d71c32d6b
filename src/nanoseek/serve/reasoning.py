"""Splitting a reply's reasoning (`<think>…</think>`) from its answer, incrementally.

Reasoning models (DeepSeek-R1, Qwen3, …) write their thinking between `<think>` and `</think>` and the answer
after it; the APIs return the two apart (OpenAI `reasoning_content`, Anthropic `thinking` blocks). Some chat
templates open the `<think>` themselves at the end of the prompt, so the reply starts inside the reasoning:
`starts_in_reasoning(prompt_text)` tells. The parser sees the reply as streamed text deltas, and a tag may be
split over deltas, so it holds back a tail that could still become a tag.

    parser = ReasoningParser(starts_in_reasoning(prompt_text))
    for delta in deltas:
        reasoning, content = parser.feed(delta)
    reasoning, content = parser.finish()
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"


def starts_in_reasoning(prompt_text: str) -> bool:
    """True when the prompt ends inside an open `<think>` block (the template opened it for the model)."""
    return prompt_text.rstrip().endswith(OPEN)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag` (it may complete later)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ReasoningParser:
    in_reasoning: bool = False
    _held: str = ""
    _answer_started: bool = False  # non-blank answer text seen: a later "<think>" is just text
    _after_close: bool = False  # right after "</think>": the answer's leading newlines are dropped

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) text that this delta completes."""
        buffer, self._held = self._held + text, ""
        reasoning, content = [], []
        while buffer:
            if self.in_reasoning:
                i = buffer.find(CLOSE)
                if i >= 0:
                    reasoning.append(buffer[:i])
                    buffer, self.in_reasoning, self._after_close = buffer[i + len(CLOSE) :], False, True
                    continue
                keep = _partial_tag(buffer, CLOSE)
                reasoning.append(buffer[: len(buffer) - keep])
                self._held = buffer[len(buffer) - keep :]
                break
            if self._after_close:
                buffer = buffer.lstrip("\n")
                if not buffer:
                    break
                self._after_close = False
            if not self._answer_started:
                stripped = buffer.lstrip()
                if stripped.startswith(OPEN):
                    buffer, self.in_reasoning = stripped[len(OPEN) :], True
                    continue
                if OPEN.startswith(stripped):  # could still become "<think>"
                    self._held = buffer
                    break
                self._answer_started = True
            content.append(buffer)
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What is still held back when the reply ends: a tag that never completed is plain text."""
        held, self._held = self._held, ""
        if self.in_reasoning:
            return held, ""
        return "", held.lstrip("\n") if self._after_close else held
