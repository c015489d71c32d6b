"""The server's text handling without a model: <think> splitting and stop strings over streamed deltas."""

from __future__ import annotations

import pytest

from nanoseek.serve.reasoning import ReasoningParser, starts_in_reasoning
from nanoseek.serve.serving import ChoiceText


def _split(deltas: list[str], in_reasoning: bool = False) -> tuple[str, str]:
    parser = ReasoningParser(in_reasoning)
    parts = [parser.feed(d) for d in deltas] + [parser.finish()]
    return "".join(r for r, _ in parts), "".join(c for _, c in parts)


REPLY = "<think>\nfirst, 2+2</think>\n\nThe answer is 4."


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_think_split_is_the_same_however_the_text_is_cut(size):
    deltas = [REPLY[i : i + size] for i in range(0, len(REPLY), size)]
    assert _split(deltas) == ("\nfirst, 2+2", "The answer is 4.")


def test_prompt_that_opens_think_starts_in_reasoning():
    assert starts_in_reasoning("<|im_start|>assistant\n<think>\n")
    assert not starts_in_reasoning("<|im_start|>assistant\n")
    assert _split(["so", "me</th", "ink>done"], in_reasoning=True) == ("some", "done")
    assert _split(["never closed <"], in_reasoning=True) == ("never closed <", "")


def test_text_without_tags_and_late_tags_stay_content():
    assert _split(["hello ", "world"]) == ("", "hello world")
    assert _split(["a", "<think>b</think>"]) == ("", "a<think>b</think>")  # only a leading <think> opens reasoning
    assert _split(["<thi"]) == ("", "<thi")  # an unfinished tag at the end is text


class _CharTokenizer:
    """Token i is the character chr(i): enough to drive ChoiceText's incremental decoding."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def _stream(text: str, stop: list[str]) -> tuple[list[str], str | None]:
    choice = ChoiceText(_CharTokenizer(), stop)
    out = []
    for ch in text:
        choice.push(ord(ch))
        out.append(choice.take(final=False))
        if choice.stopped_by:
            break
    out.append(choice.take(final=True))
    return out, choice.stopped_by


def test_stop_string_is_cut_and_never_streamed_in_part():
    deltas, stopped = _stream("hello world, END here", ["END", "zzz"])
    assert "".join(deltas) == "hello world, " and stopped == "END"
    assert all("E" not in d for d in deltas)  # the held-back "E" was never sent before the stop was known


def test_earliest_stop_string_wins_and_text_without_stop_is_whole():
    assert _stream("abcXYdef", ["def", "XY"]) == (_stream("abcXYdef", ["def", "XY"])[0], "XY")
    assert "".join(_stream("abcXYdef", ["def", "XY"])[0]) == "abc"
    deltas, stopped = _stream("no stop here", ["STOP"])
    assert "".join(deltas) == "no stop here" and stopped is None
