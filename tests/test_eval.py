"""`nanoseek eval` and `nanoseek.eval`: pass@k and its intervals, answer extraction, multiple choice by
log-likelihood against a brute-force forward, the engine's completions scored by the checkers, the CLI, bad input."""

from __future__ import annotations

import json
import random
from math import comb

import numpy as np
import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.engine.generate import generate_batch
from nanoseek.engine.sampling import SamplingParams
from nanoseek.eval import DataError, EvalWarning, bootstrap_ci95, evaluate, parse_spec, pass_at_k, wilson_ci95
from nanoseek.eval.answers import extract_math_answer, math_equal
from nanoseek.eval.data import gsm8k_reference, load_choices
from nanoseek.eval.runner import choice_loglikelihoods, encode_pair
from nanoseek.model.config import from_name
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.tasks import get_task, prompt_ids, sample_texts
from nanoseek.train.tokenizer import train_tokenizer
from nanoseek.weights.hf_folder import save_pretrained

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "Question", "Answer", "apples", "has"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random DeepSeek-V3 with a trained tokenizer (digits, R1 markers, chat template), as a HF folder."""
    rng = random.Random(0)
    texts = list(sample_texts([get_task("add2"), get_task("sort"), get_task("countdown")], 600))
    texts += [" ".join(rng.choices(WORDS, k=10)) + " 12,345.5 #### 7 \\boxed{x}" for _ in range(200)]
    tok = train_tokenizer(texts, vocab_size=330, model_max_length=96)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(from_name("test-tiny", vocab_size=tok.vocab_size, max_position_embeddings=96))
    folder = tmp_path_factory.mktemp("eval") / "model"
    save_pretrained(model, folder)
    tok.save(folder)
    return folder, nanoseek.load(folder), nanoseek.load_tokenizer(folder)


def _write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---- statistics -------------------------------------------------------------------------------------------


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3,2)/C(5,2) = 3/10 draws miss both correct
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0 and pass_at_k(3, 3, 3) == 1.0
    # the estimator is the exact probability over k-subsets: enumerate them for a small case
    from itertools import combinations

    n, c, k = 6, 2, 3
    hits = sum(any(i < c for i in subset) for subset in combinations(range(n), k))
    assert pass_at_k(n, c, k) == pytest.approx(hits / comb(n, k))
    for bad in [(3, 4, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_confidence_intervals():
    lo, hi = wilson_ci95(8, 10)  # hand computed: center 0.7167, half 0.2258
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    values = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci95(values)
    assert lo < 0.3 < hi and lo > 0.18 and hi < 0.42  # ~ 0.3 ± 1.96 * sqrt(0.21 / 100) = [0.21, 0.39]
    assert bootstrap_ci95(values) == bootstrap_ci95(values)  # seeded
    assert bootstrap_ci95([0.5, 0.5, 0.5]) == (0.5, 0.5) and bootstrap_ci95([]) == (0.0, 1.0)
    # the bootstrap's width follows the normal approximation of the mean's standard error
    rng = np.random.default_rng(1)
    data = rng.random(400)
    lo, hi = bootstrap_ci95(data)
    se = data.std() / np.sqrt(len(data))
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)


# ---- answers and data -------------------------------------------------------------------------------------


def test_gsm8k_answer_extraction_and_checking():
    assert gsm8k_reference("She has 3+4=<<3+4=7>>7 apples.\n#### 1,007") == "1007"
    assert gsm8k_reference("12") == "12"
    assert extract_math_answer("so 3 + 4 = 7.\n#### 7\nmore") == "7"
    assert extract_math_answer("The area is \\boxed{\\frac{1}{2}} square units") == "\\frac{1}{2}"
    assert extract_math_answer("first 3, then 12,500 dollars.") == "12500"
    assert extract_math_answer("no number here") is None
    assert math_equal("0.5", "\\frac{1}{2}") and math_equal("7.0", "7") and math_equal("1,007", "1007")
    assert not math_equal("8", "7") and not math_equal(None, "7") and not math_equal("", "7")


def test_multiple_choice_shapes(tmp_path):
    path = _write_jsonl(tmp_path / "mc.jsonl", [
        {"ctx": "the cat", "endings": ["sat", "ran"], "label": "1"},
        {"ctx_a": "the dog", "ctx_b": "ran far", "endings": ["away", "on"], "label": 0},
        {"question": "what sat?", "choices": {"text": ["cat", "mat", "dog"], "label": ["A", "B", "C"]},
         "answerKey": "C"},
        {"question": "what ran?", "choices": ["dog", "mat"], "answer": 0},
    ])  # fmt: skip
    items = load_choices(path)
    assert [i.gold for i in items] == [1, 0, 2, 0]
    assert items[0].context == "the cat" and items[0].continuations == (" sat", " ran")
    assert items[1].context == "the dog Ran far"
    assert items[2].context == "Question: what sat?\nAnswer:" and items[2].continuations[2] == " dog"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"mc\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"mc\.jsonl:2: expected a JSON object"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 5}', r"mc\.jsonl:2: the gold label 5 is out of range"),
        ('{"ctx": "a", "endings": ["b"], "label": 0}', r"mc\.jsonl:2: the choices must be a list of at least 2"),
        ('{"text": "a"}', r"mc\.jsonl:2: not a multiple-choice line"),
    ],
)
def test_malformed_multiple_choice_lines_name_file_and_line(tmp_path, line, message):
    path = _write_jsonl(tmp_path / "mc.jsonl", [{"ctx": "a", "endings": ["b", "c"], "label": 0}, line])
    with pytest.raises(DataError, match=message):
        load_choices(path)


def test_unknown_task_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'add_two'.*add2, add3.*gsm8k:PATH\.jsonl"):
        parse_spec("add_two")
    with pytest.raises(ValueError, match=r"prefix must be gsm8k:, math: or mc:"):
        parse_spec("hellaswag:x.jsonl")
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        parse_spec(f"mc:{tmp_path / 'missing.jsonl'}")


# ---- multiple choice scoring ------------------------------------------------------------------------------


def _brute_force_loglikelihood(model, context_ids, continuation_ids) -> float:
    """One full forward of context + continuation alone, summing log p(token | everything before it)."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(ids)[0].double().log_softmax(-1)
    total = 0.0
    for offset, token in enumerate(continuation_ids):
        total += float(logprobs[len(context_ids) + offset - 1, token])
    return total


def test_choice_scores_equal_a_brute_force_forward_per_choice(tiny, tmp_path):
    _, model, tok = tiny
    rows = [
        {"ctx": "the cat sat on the", "endings": ["mat", "dog ran far away", "cat"], "label": 0},
        {"question": "what has 12 apples?", "choices": {"text": ["the dog", "cat"], "label": ["A", "B"]},
         "answerKey": "B"},
    ]  # fmt: skip
    items = load_choices(_write_jsonl(tmp_path / "mc.jsonl", rows))
    want_acc = want_norm = 0
    for item in items:
        pairs = [encode_pair(tok, item.context, c) for c in item.continuations]
        context_ids = pairs[0][0]
        got = choice_loglikelihoods(model, context_ids, [c for _, c in pairs], tok.pad_token_id)
        brute = [_brute_force_loglikelihood(model, ctx, cont) for ctx, cont in pairs]
        assert got == pytest.approx(brute, abs=1e-4)
        want_acc += brute.index(max(brute)) == item.gold
        normed = [b / len(t.encode()) for b, t in zip(brute, item.continuations)]
        want_norm += normed.index(max(normed)) == item.gold
    result = evaluate(model, tok, [f"mc:{tmp_path / 'mc.jsonl'}"])[f"mc:{tmp_path / 'mc.jsonl'}"]
    assert result.kind == "multiple_choice" and result.n == 2 and result.skipped == 0
    assert result.metrics["acc"].value == want_acc / 2 and result.metrics["acc_norm"].value == want_norm / 2
    assert result.metrics["acc"].ci95 == wilson_ci95(want_acc, 2)


def test_multiple_choice_picks_the_model_s_most_likely_choice(tiny, tmp_path):
    """Gold set to the brute-force argmax: acc is 1; set to another choice: 0."""
    _, model, tok = tiny
    context, endings = "the dog ran", ["far away", "on the mat", "apples"]
    pairs = [encode_pair(tok, context, " " + e) for e in endings]
    brute = [_brute_force_loglikelihood(model, ctx, cont) for ctx, cont in pairs]
    best = brute.index(max(brute))
    rows = [{"ctx": context, "endings": endings, "label": best},
            {"ctx": context, "endings": endings, "label": (best + 1) % 3}]  # fmt: skip
    spec = f"mc:{_write_jsonl(tmp_path / 'mc.jsonl', rows)}"
    result = evaluate(model, tok, [spec])[spec]
    assert [d["pick"] for d in result.details] == [best, best]
    assert result.metrics["acc"].value == 0.5


# ---- generation tasks -------------------------------------------------------------------------------------


def test_synthetic_task_scores_the_engine_s_greedy_answers(tiny):
    _, model, tok = tiny
    task = get_task("add2")
    result = evaluate(model, tok, ["add2"], limit=12)["add2"]
    examples = task.eval_examples(12)
    want = generate_batch(model, [prompt_ids(tok, ex) for ex in examples], result.settings["max_new_tokens"],
                          SamplingParams(temperature=0), tok.stop_token_ids)  # fmt: skip
    texts = [tok.decode(w.token_ids) for w in want]
    assert [d["completions"] for d in result.details] == [[t] for t in texts]
    correct = sum(task.check(t, ex) for t, ex in zip(texts, examples))
    assert result.n == 12 and result.metrics["pass@1"].value == correct / 12
    assert result.metrics["pass@1"].ci_method == "wilson" and result.metrics["pass@1"].ci95 == wilson_ci95(correct, 12)


def test_math_answers_equal_to_the_reference_score_one(tiny, tmp_path):
    """The references are the model's own greedy answers (and one wrong): pass@1 counts exactly those right."""
    _, model, tok = tiny
    questions = ["the cat has 3 apples", "the dog has 12 apples", "on the mat 7"]
    probe = _write_jsonl(tmp_path / "probe.jsonl", [{"question": q, "answer": "#### 0"} for q in questions])
    first = evaluate(model, tok, [f"gsm8k:{probe}"], format="plain", max_new_tokens=12)[f"gsm8k:{probe}"]
    from nanoseek.eval.runner import _plain_math_answer

    answers = [_plain_math_answer(d["completions"][0]) for d in first.details]
    rows = [{"question": q, "answer": f"work\n#### {a if a is not None else 'none'}"}
            for q, a in zip(questions, answers)]  # fmt: skip
    rows[0]["answer"] = "#### 99999"  # wrong on purpose (unless the model said 99999)
    path = _write_jsonl(tmp_path / "math.jsonl", rows)
    result = evaluate(model, tok, [f"gsm8k:{path}"], format="plain", max_new_tokens=12)[f"gsm8k:{path}"]
    want = [a is not None and math_equal(a, r["answer"].split("####")[1].strip()) for a, r in zip(answers, rows)]
    assert [d["correct"][0] for d in result.details] == want
    assert result.metrics["pass@1"].value == sum(want) / 3


def test_sampled_pass_at_k_uses_the_estimator_and_a_bootstrap(tiny):
    _, model, tok = tiny
    kwargs = dict(limit=6, samples=4, k=(1, 4), temperature=1.0, max_new_tokens=4)
    result = evaluate(model, tok, ["sort"], **kwargs)["sort"]
    assert result.samples == 4 and all(len(d["completions"]) == 4 for d in result.details)
    counts = [sum(d["correct"]) for d in result.details]
    for k in (1, 4):
        m = result.metrics[f"pass@{k}"]
        per_problem = [pass_at_k(4, c, k) for c in counts]
        assert m.value == pytest.approx(sum(per_problem) / 6)
        assert m.ci_method == "bootstrap" and m.ci95 == bootstrap_ci95(per_problem)
    again = evaluate(model, tok, ["sort"], **kwargs)["sort"]
    assert [d["completions"] for d in again.details] == [d["completions"] for d in result.details]  # seeded
    assert len({c for d in result.details for c in d["completions"]}) > 1  # and actually sampled


def test_r1_format_reads_the_answer_tag(tiny):
    _, model, tok = tiny
    result = evaluate(model, tok, ["add2"], limit=3, format="r1", max_new_tokens=6)["add2"]
    assert result.settings["format"] == "r1"
    # a random model does not write <think>…</think><answer>…</answer>: every completion counts as wrong
    assert all(not any(d["correct"]) for d in result.details)
    from nanoseek.eval.runner import completion_text, synthetic_problems

    ex = get_task("add2").eval_examples(1)[0]
    problem = synthetic_problems(tok, get_task("add2"), "r1", [ex])[0]
    assert problem.check(f"<think>carry</think><answer>{ex.answer}</answer>")
    assert not problem.check(ex.answer) and not problem.check("<think>x</think><answer>0</answer>")
    assert tok.decode(problem.prompt, skip_special_tokens=False).startswith("<|bos|><|system|>The assistant first")
    # the trained tokenizer's R1 markers are special tokens: the r1 format keeps them in the checked text
    ids = tok.encode(f"<think>x</think><answer>{ex.answer}</answer>", add_special_tokens=False)
    assert problem.check(completion_text(tok, ids, "r1")) and not problem.check(completion_text(tok, ids, "plain"))


def test_r1_without_system_prompt_is_the_format_grpo_trains_with(tiny):
    # the speedrun trains and evaluates its small-context models in the R1 format with no system prompt
    from nanoseek.eval.runner import completion_text, synthetic_problems
    from nanoseek.train.grpo import load_grpo_config
    from nanoseek.train.grpo_rollouts import decode_completion, render_prompt

    _, model, tok = tiny
    task = get_task("add2")
    examples = task.eval_examples(5)
    cfg = load_grpo_config(["system_prompt="])
    problems = synthetic_problems(tok, task, "r1", examples, system_prompt="")
    assert [p.prompt for p in problems] == [render_prompt(tok, ex, cfg) for ex in examples]
    assert not tok.decode(problems[0].prompt, skip_special_tokens=False).startswith("<|bos|><|system|>")
    # the completion is read as GRPO's rewards read it: special tokens kept, bos/eos markers dropped
    ids = [tok.bos_token_id, *tok.encode(f"<think>x</think><answer>{examples[0].answer}</answer>",
                                         add_special_tokens=False), tok.eos_token_id]  # fmt: skip
    assert completion_text(tok, ids, "r1") == decode_completion(tok, ids)
    assert problems[0].check(completion_text(tok, ids, "r1"))
    result = evaluate(model, tok, ["add2"], limit=3, format="r1", system_prompt="", max_new_tokens=4)["add2"]
    assert result.settings["system_prompt"] == "" and result.n == 3
    default = evaluate(model, tok, ["add2"], limit=1, format="r1", max_new_tokens=1)["add2"]
    assert default.settings["system_prompt"].startswith("The assistant first")
    with pytest.raises(ValueError, match="system prompt needs the chat or r1 format"):
        evaluate(model, tok, ["add2"], format="plain", system_prompt="be brief")


def test_r1_without_a_chat_template_is_grpos_bare_prompt(tiny):
    # GRPO trains a model whose tokenizer has no chat template (or with chat=false) on <bos> + the problem: its
    # held-out evaluation, nanoseek.eval's r1 format, sends the same prompt then
    import copy

    from nanoseek.eval.runner import synthetic_problems
    from nanoseek.train.grpo import load_grpo_config
    from nanoseek.train.grpo_rollouts import render_prompt

    _, _, tok = tiny
    bare = copy.copy(tok)
    bare.chat_template = None
    examples = get_task("add2").eval_examples(3)
    want = [render_prompt(tok, ex, load_grpo_config(["chat=false"])) for ex in examples]
    assert [p.prompt for p in synthetic_problems(bare, get_task("add2"), "r1", examples)] == want
    assert want[0][0] == tok.bos_token_id and want != [render_prompt(tok, ex, load_grpo_config()) for ex in examples]


def test_r1_without_system_prompt_scores_as_grpo_evaluates(tiny):
    # a scripted model answers a third of the add2 problems right, a third wrong, a third outside the R1 format:
    # nanoseek.eval (greedy, and sampled at T=1 from its one-hot policy) and GRPO's own evaluation agree exactly
    import re

    from nanoseek.train.grpo import evaluate_r1, load_grpo_config
    from scripted_model import ScriptedConfig, ScriptedModel, script_policy

    _, _, tok = tiny

    def reply(prompt_text: str) -> str:
        a, b = map(int, re.search(r"(\d+)\+(\d+)=", prompt_text).groups())
        answer = str(a + b)[::-1]  # add2 answers least-significant digit first
        if (a + b) % 3 == 0:
            return f"<think>{a}+{b}</think><answer>{str(a + b + 1)[::-1]}</answer>"
        return f"<think>{a}+{b}</think><answer>{answer}</answer>" if (a + b) % 3 == 1 else answer

    model = ScriptedModel(ScriptedConfig(tok.vocab_size, tok.eos_token_id), script_policy(tok, "<|assistant|>", reply))
    task, n = get_task("add2"), 30
    expected = sum(int(ex.answer[::-1]) % 3 == 1 for ex in task.eval_examples(n)) / n
    assert 0 < expected < 1
    grpo = evaluate_r1(model, tok, [task], n, load_grpo_config(["system_prompt=", "max_new_tokens=24"]))["add2"]
    kwargs = dict(limit=n, format="r1", system_prompt="", max_new_tokens=24)
    greedy = evaluate(model, tok, ["add2"], **kwargs)["add2"]
    assert greedy.metrics["pass@1"].value == grpo.accuracy == expected and greedy.n == grpo.n == n
    assert greedy.metrics["pass@1"].ci95 == grpo.ci95
    sampled = evaluate(model, tok, ["add2"], samples=4, k=(1, 4), temperature=1.0, **kwargs)["add2"]
    assert sampled.metrics["pass@1"].value == sampled.metrics["pass@4"].value == expected


def test_prompt_longer_than_the_context_is_skipped_with_a_warning(tiny, tmp_path):
    _, model, tok = tiny
    long_question = " ".join(["the cat sat on the mat"] * 40)
    path = _write_jsonl(tmp_path / "m.jsonl", [{"question": long_question, "answer": "#### 1"},
                                               {"question": "the cat has 3", "answer": "#### 3"}])  # fmt: skip
    with pytest.warns(EvalWarning, match=r"skipped 1 problem\(s\) longer than the model's context of 96"):
        result = evaluate(model, tok, [f"gsm8k:{path}"], format="plain", max_new_tokens=4)[f"gsm8k:{path}"]
    assert result.n == 1 and result.skipped == 1
    mc = _write_jsonl(tmp_path / "mc.jsonl", [{"ctx": long_question, "endings": ["a", "b"], "label": 0}])
    with pytest.warns(EvalWarning):
        result = evaluate(model, tok, [f"mc:{mc}"])[f"mc:{mc}"]
    assert result.n == 0 and result.skipped == 1


def test_bad_settings_are_refused(tiny):
    _, model, tok = tiny
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate(model, tok, ["add2"], samples=4)
    with pytest.raises(ValueError, match=r"1 <= k <= samples \(2\)"):
        evaluate(model, tok, ["add2"], samples=2, k=(1, 4), temperature=1.0)
    with pytest.raises(ValueError, match="unknown format"):
        evaluate(model, tok, ["add2"], format="xml")


# ---- the command ------------------------------------------------------------------------------------------


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_table_and_json(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    mc = _write_jsonl(tmp_path / "mc.jsonl", [{"ctx": "the cat", "endings": ["sat", "ran"], "label": 0}])
    math = _write_jsonl(tmp_path / "m.jsonl", [{"question": "the cat has 3", "answer": "#### 3"}])
    args = ["eval", folder, "--tasks", "add2,sort", f"mc:{mc}", f"gsm8k:{math}", "--limit", 4, "--max-tokens", 6]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "95%", "CI", "CI", "n", "skipped", "samples"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["add2", "pass@1"], ["sort", "pass@1"], [f"mc:{mc}", "acc"], [f"mc:{mc}", "acc_norm"],
        [f"gsm8k:{math}", "pass@1"],
    ]  # fmt: skip
    code, out, _ = _run(capsys, *args, "--json", "--details", tmp_path / "details.jsonl")
    assert code == 0
    details = [json.loads(line) for line in (tmp_path / "details.jsonl").read_text().splitlines()]
    assert [d["task"] for d in details] == ["add2"] * 4 + ["sort"] * 4 + [f"mc:{mc}", f"gsm8k:{math}"]
    assert set(details[0]) == {"task", "prompt", "reference", "completions", "correct"}
    data = json.loads(out)
    assert list(data) == ["add2", "sort", f"mc:{mc}", f"gsm8k:{math}"]
    add2 = data["add2"]
    assert set(add2) == {"task", "kind", "n", "skipped", "samples", "settings", "metrics"}
    assert add2["kind"] == "generate" and add2["n"] == 4 and add2["skipped"] == 0
    assert set(add2["metrics"]["pass@1"]) == {"value", "ci95", "ci_method"}
    assert data[f"mc:{mc}"]["metrics"]["acc"]["ci_method"] == "wilson"
    code, out, _ = _run(capsys, "eval", folder, "--tasks", "sort", "--limit", 3, "--samples", 2, "--temperature",
                        1.0, "--max-tokens", 3, "--json")  # fmt: skip
    assert code == 0 and set(json.loads(out)["sort"]["metrics"]) == {"pass@1", "pass@2"}


def test_cli_bad_input_is_one_line_exit_2(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "#### 1"}, "{oops"])
    code, _, err = _run(capsys, "eval", folder, "--tasks", f"gsm8k:{bad}")
    assert code == 2 and f"{bad}:2: not valid JSON" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "eval", folder, "--tasks", "nope")
    assert code == 2 and "unknown task 'nope'" in err and "mc:PATH.jsonl" in err
    long_q = " ".join(["the cat sat on the mat"] * 40)
    longf = _write_jsonl(tmp_path / "long.jsonl", [{"question": long_q, "answer": "#### 1"}])
    code, out, err = _run(capsys, "eval", folder, "--tasks", f"gsm8k:{longf}", "--format", "plain", "--json")
    assert code == 0 and "warning: gsm8k:" in err and json.loads(out)[f"gsm8k:{longf}"]["skipped"] == 1
