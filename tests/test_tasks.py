import random
import re

import pytest

from nanoseek.tasks import (
    TASKS,
    Countdown,
    Example,
    evaluate_arithmetic,
    extract_r1_answer,
    get_task,
    is_heldout,
    r1_reward,
    wilson_ci95,
)


def solve(prompt: str) -> str | None:
    """The correct answer computed from the prompt text alone, independently of the task code (None for
    countdown, where many expressions are right: its answers are checked by evaluating them)."""
    if m := re.fullmatch(r"(\d+)\+(\d+)=", prompt):
        return str(int(m[1]) + int(m[2]))[::-1]
    if m := re.fullmatch(r"(\d+)\*(\d)=", prompt):
        return str(int(m[1]) * int(m[2]))[::-1]
    if m := re.fullmatch(r"s:(\d+)=", prompt):
        return "".join(sorted(m[1]))
    if m := re.fullmatch(r"(\d)x\+(\d)=(\d+);x=", prompt):
        a, b, c = int(m[1]), int(m[2]), int(m[3])
        return str((c - b) // a) if (c - b) % a == 0 else "unsolvable"
    assert prompt.startswith("cd:"), f"unknown prompt format {prompt!r}"
    return None


def countdown_is_solved(prompt: str, expr: str) -> bool:
    numbers, target = prompt[3:-1].split(">")
    value, used = evaluate_arithmetic(expr)
    return value == int(target) and sorted(used) == sorted(int(n) for n in numbers.split(","))


@pytest.mark.parametrize("name", list(TASKS) + ["add5", "sort3"])
def test_reference_answers_are_right_and_the_checker_rejects_wrong_ones(name):
    task = get_task(name)
    rng = random.Random(1)
    examples = [task.generate(rng) for _ in range(300)] + task.eval_examples(100, seed=3)
    for ex in examples:
        want = solve(ex.prompt)
        assert want == ex.answer if want is not None else countdown_is_solved(ex.prompt, ex.answer), ex
        assert task.check(ex.answer, ex) and task.check(f" {ex.answer}\n", ex)
        # one digit changed, a digit too many, a digit missing, nothing: all wrong
        i = len(ex.answer) // 2
        changed = ex.answer[:i] + ("1" if ex.answer[i] != "1" else "2") + ex.answer[i + 1 :]
        for wrong in (changed, ex.answer + "0", ex.answer[:-1], ""):
            if want is None and countdown_is_solved(ex.prompt, wrong):
                continue  # countdown: a changed expression can happen to be another right answer
            assert not task.check(wrong, ex), (ex, wrong)


@pytest.mark.parametrize("name", list(TASKS) + ["add5", "sort3"])
def test_splits_are_disjoint_and_depend_only_on_the_seed(name):
    task = get_task(name)
    rng = random.Random(1)
    train = [task.generate(rng) for _ in range(2000)]
    held = task.eval_examples(300, seed=3)
    assert held and len({e.prompt for e in held}) == len(held)
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert all(is_heldout(e.prompt, task.heldout_fraction) for e in held)
    assert not any(is_heldout(e.prompt, task.heldout_fraction) for e in train)
    # the problems drawn are a function of the seed: equal for equal seeds, different for different ones
    draw = lambda seed: [task.generate(r).prompt for r in [random.Random(seed)] for _ in range(20)]  # noqa: E731
    assert draw(7) == draw(7) and draw(7) != draw(8)
    assert [e.prompt for e in task.eval_examples(50, seed=3)] == [e.prompt for e in held[:50]]
    assert [e.prompt for e in task.eval_examples(50, seed=4)] != [e.prompt for e in held[:50]]


def test_exact_answers():
    add = get_task("add2")
    ex = Example("47+85=", "231", "add2")  # 132 reversed
    assert add.check("231", ex) and add.check(" 231\n", ex)
    assert not add.check("132", ex) and not add.check("2310", ex) and not add.check("", ex)
    assert get_task("sort").check("12449", Example("s:42194=", "12449", "sort"))
    rng = random.Random(0)
    for _ in range(50):
        e = get_task("linear").generate(rng)
        a, rest = e.prompt.split("x+")
        b, rest = rest.split("=", 1)
        c = int(rest.split(";")[0])
        assert int(a) * int(e.answer) + int(b) == c
        m = get_task("mul").generate(rng)
        x, y = m.prompt[:-1].split("*")
        assert int(m.answer[::-1]) == int(x) * int(y)


def test_countdown_checker_accepts_any_valid_expression_only():
    task = Countdown(3)
    ex = Example("cd:3,5,7>22=", "3*5+7", "countdown", {"numbers": [3, 5, 7], "target": 22})
    assert task.check("3*5+7", ex) and task.check("7+5*3", ex) and task.check("(5*3)+7", ex)
    assert not task.check("3*5+7+0", ex)  # 0 is not one of the numbers
    assert not task.check("22", ex)  # numbers must each be used once
    assert not task.check("3*5*7", ex) and not task.check("3*5+", ex) and not task.check("__import__('os')", ex)
    assert not task.check("7/(5-5)+3", ex)
    # recovers numbers and target from the prompt when meta is missing
    assert task.check("7+3*5", Example("cd:3,5,7>22=", "3*5+7", "countdown"))
    assert evaluate_arithmetic("8/3*3")[0] == 8


def test_r1_format_and_reward():
    ex = Example("47+85=", "231", "add2")
    assert extract_r1_answer("<think>carry</think><answer>231</answer>") == "231"
    assert extract_r1_answer(" <think>\na\n</think>\n<answer> 231 </answer>\n") == "231"
    assert extract_r1_answer("<answer>231</answer>") is None
    assert extract_r1_answer("<think>x</think><answer>231") is None
    assert extract_r1_answer("<think>x</think><answer>1</answer><answer>231</answer>") is None
    assert r1_reward("<think>.</think><answer>231</answer>", ex) == 1.0
    assert r1_reward("<think>.</think><answer>232</answer>", ex) == 0.1
    assert r1_reward("231", ex) == 0.0


def test_wilson_ci95():
    lo, hi = wilson_ci95(94, 100)
    assert lo == pytest.approx(0.8752, abs=1e-4) and hi == pytest.approx(0.9722, abs=1e-4)
    assert wilson_ci95(0, 10)[0] == 0.0 and wilson_ci95(10, 10)[1] == 1.0
    assert wilson_ci95(0, 0) == (0.0, 1.0)
    lo, hi = wilson_ci95(50, 100)
    assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo)
    with pytest.raises(ValueError):
        wilson_ci95(5, 3)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'srot'.*did you mean 'sort'"):
        get_task("srot")


def test_sample_texts_and_score():
    from nanoseek.tasks import sample_texts, score

    tasks = [get_task("add2"), get_task("sort")]
    texts = list(sample_texts(tasks, 20, seed=1))
    assert len(texts) == 20 and texts == list(sample_texts(tasks, 20, seed=1))
    assert any("<answer>" in t for t in texts) and any(t.startswith("s:") for t in texts)
    task = get_task("add2")
    exs = task.eval_examples(10, seed=0)
    result = score(task, exs, [e.answer for e in exs[:7]] + ["x"] * 3)
    assert result["accuracy"] == 0.7 and result["n"] == 10
    assert result["ci95"] == list(wilson_ci95(7, 10))


def test_paired_difference_interval_covers_and_is_narrower_than_separate_intervals():
    import random

    from nanoseek.tasks import paired_difference_ci95, wilson_ci95

    # two models that agree on most problems (the speedrun's GRPO and its SFT control, both from one SFT model):
    # 25% both right, 15% only a, 9% only b; the true difference is +6 points
    rng, covered, trials, n = random.Random(0), 0, 400, 400
    for _ in range(trials):
        u = [rng.random() for _ in range(n)]
        a, b = [x < 0.40 for x in u], [x < 0.25 or 0.40 <= x < 0.49 for x in u]
        d, lo, hi = paired_difference_ci95(a, b)
        assert abs(d - (sum(a) - sum(b)) / n) < 1e-12 and lo <= d <= hi
        covered += lo <= 0.06 <= hi
    assert 0.92 <= covered / trials <= 0.98  # a 95% interval
    # the seed-1 speedrun's countdown (400 problems): GRPO 160 right, its control 136, 74 solved only by GRPO, 50
    # only by the control. The separate Wilson intervals overlap; the paired one lies above 0.
    a = [True] * 86 + [True] * 74 + [False] * 50 + [False] * 190
    b = [True] * 86 + [False] * 74 + [True] * 50 + [False] * 190
    d, lo, hi = paired_difference_ci95(a, b)
    assert wilson_ci95(160, 400)[0] < wilson_ci95(136, 400)[1]
    assert round(d, 3) == 0.06 and 0.0 < lo < 0.01 and 0.11 < hi < 0.12
    same = [True, False] * 100
    assert (
        paired_difference_ci95(same, same)[0] == 0.0
        and paired_difference_ci95(same, same)[1] < 0 < paired_difference_ci95(same, same)[2]
    )
    with pytest.raises(ValueError, match="same problems"):
        paired_difference_ci95([True], [True, False])
