"""nanoseek.eval.speculation: the MTP drafter's figure, with an injected clock (no timing in tests)."""

from __future__ import annotations

import itertools

import pytest
import torch

from nanoseek.eval.speculation import measure_mtp_speculation
from nanoseek.model.config import from_name
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM


def _clock(step: float):
    ticks = itertools.count()
    return lambda: next(ticks) * step  # every call one `step` later: each side's round lasts one step


def test_measures_both_sides_with_the_same_tokens_and_counts_drafts():
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(from_name("test-tiny", num_nextn_predict_layers=1)).eval()
    prompts = [[5, 9, 14], [7, 3, 11, 2]]
    result = measure_mtp_speculation(model, prompts, eos_ids=[], max_new_tokens=6, rounds=2, clock=_clock(0.5))
    assert result.same_output and result.tokens == 12  # greedy speculation gives plain decoding's tokens
    assert result.plain_tok_s == result.mtp_tok_s == [24.0, 24.0]  # 12 tokens per half-second round
    assert result.speedup == 1.0
    assert result.drafted > 0 and 0 <= result.accepted <= result.drafted
    assert result.to_dict()["acceptance"] == result.accepted / result.drafted


def test_a_model_without_mtp_modules_gives_none_and_bad_input_is_refused():
    model = DeepseekV3ForCausalLM(from_name("test-tiny")).eval()
    assert measure_mtp_speculation(model, [[1, 2]], [], 4) is None
    with_mtp = DeepseekV3ForCausalLM(from_name("test-tiny", num_nextn_predict_layers=1)).eval()
    with pytest.raises(ValueError, match="at least one round and one prompt"):
        measure_mtp_speculation(with_mtp, [], [], 4)
