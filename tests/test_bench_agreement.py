"""The agreement check every llama.cpp benchmark runs before timing (bench/agreement.py): the teacher-forced
prompts, the agreement fraction, the threshold's verdict and the refusal's message. The servers' side of it
runs in test_bench_serve's quick run (a real `nanoseek serve`)."""

from __future__ import annotations

import pytest

from nanoseek.bench.agreement import Agreement, agreement, check_threshold, picks, teacher_forced_prefixes


def test_prefixes_grow_one_token_at_a_time():
    ids = list(range(100, 110))
    assert teacher_forced_prefixes(ids, 3, context=4) == [ids[:4], ids[:5], ids[:6]]
    with pytest.raises(ValueError, match="needs 11"):
        teacher_forced_prefixes(ids, 7, context=4)


def test_picks_ask_once_per_prefix_in_order():
    asked = []

    def next_token(prefix):
        asked.append(len(prefix))
        return prefix[-1] + 1

    assert picks(next_token, [[1], [1, 2], [1, 2, 3]]) == [2, 3, 4]
    assert asked == [1, 2, 3]


def test_agreement_is_the_fraction_of_equal_picks():
    assert agreement(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == 0.75
    with pytest.raises(ValueError, match="different lengths"):
        agreement([1, 2], [1])


def test_threshold_decides_and_the_refusal_names_both_figures():
    ok = Agreement.of("nanoseek", "llama-server", list("abcdefgh"), list("abcdefgX"), threshold=0.75)
    assert ok.ok and ok.equal == 7 and ok.positions == 8
    assert "7 of 8 teacher-forced positions (88%; threshold 75%: ok)" in ok.line()
    low = Agreement.of("nanoseek-int4", "llama.cpp", list("abcdefgh"), list("aXcXeXgX"), threshold=0.75)
    assert not low.ok
    assert "4 of 8" in low.refusal() and "BELOW the threshold" in low.refusal() and "no ratio" in low.refusal()
    assert Agreement.of("a", "b", [1, 2, 3, 4], [1, 2, 3, 0], threshold=0.75).ok  # exactly at the bar passes
    with pytest.raises(ValueError, match="between 0 and 1"):
        check_threshold(1.5)
