"""Intra-op threads chosen per step by the step's work (engine/threads.py, issue 23): the choice is a pure
function of the work and the plan; a step runs with the chosen count on the thread that runs it (and only there);
a calibration measures the plan on its thread and puts that thread's count back; a request's tokens do not depend
on the thread count, so choosing it by the batch's size keeps greedy output independent of other traffic."""

from __future__ import annotations

import threading

import pytest
import torch

from nanoseek.engine.threads import ThreadPlan, calibrate, crossover, off_main_thread, threads_for


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---- the choice (pure) --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("work", "cap", "all_from", "expected"),
    [(1, 2, 8, 1), (7, 2, 8, 1), (8, 2, 8, 2), (256, 2, 8, 2), (1, 4, 1, 4), (300, 1, 8, 1), (3, 16, 4, 1)],
)
def test_threads_for_work_cap_and_crossover(work, cap, all_from, expected):
    assert threads_for(work, cap, all_from) == expected
    assert ThreadPlan(cap, all_from).threads(work) == expected


def test_the_cap_is_the_most():
    plan = ThreadPlan(cap=3, all_from=2)
    assert max(plan.threads(w) for w in range(1, 1000)) == 3
    with pytest.raises(ValueError):
        threads_for(5, 0, 1)
    with pytest.raises(ValueError):
        ThreadPlan(cap=2, all_from=0)


def test_crossover_from_timings():
    # (rows, seconds on 1 thread, seconds on the cap)
    assert crossover([(1, 0.013, 0.024), (2, 0.015, 0.020), (4, 0.02, 0.018), (8, 0.03, 0.02)]) == 4
    assert crossover([(1, 0.010, 0.008), (2, 0.012, 0.009)]) == 1  # the cap always wins
    # one thread wins everywhere measured: the cap only beyond (long prompt chunks)
    assert crossover([(1, 0.01, 0.02), (32, 0.05, 0.06)]) == 64
    # a win at a small size that the next size takes back does not count: no flip-flopping plan
    assert crossover([(1, 0.01, 0.02), (2, 0.02, 0.01), (4, 0.03, 0.035), (8, 0.05, 0.04)]) == 8
    assert crossover([]) == 1


# ---- the engine -----------------------------------------------------------------------------------------------


def _engine(**config):
    from nanoseek.engine.engine import Engine, EngineConfig
    from nanoseek.model.dense import DenseConfig, DenseForCausalLM

    torch.manual_seed(0)
    model = DenseForCausalLM(DenseConfig("llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                                         max_position_embeddings=128)).eval()  # fmt: skip
    return Engine(model, EngineConfig(block_size=16, **config), eos_ids=[])


def test_a_step_runs_on_the_plans_count():
    from nanoseek.engine.sampling import SamplingParams

    torch.set_num_threads(2)
    engine = _engine()
    assert engine.thread_cap == 2 and engine.thread_plan is None  # no plan: the caller's setting is left alone
    engine.thread_plan = ThreadPlan(cap=2, all_from=3)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    rid = engine.add_request([1, 2, 3, 4, 5], params)
    engine.step()  # a 5-token prompt: the cap
    assert engine.step_threads == 2
    engine.step()  # one row decoding: 1 thread
    assert engine.step_threads == 1 and torch.get_num_threads() == 1
    others = [engine.add_request([7, 8], params) for _ in range(2)]
    engine.step()  # 1 decode + 2 two-token prompts = 5 tokens
    assert engine.step_threads == 2
    engine.step()  # three rows decoding
    assert engine.step_threads == 2
    for i in [rid, *others]:
        engine.abort(i)


def test_threads_given_without_calibration_run_every_step_on_them():
    from nanoseek.engine.sampling import SamplingParams

    torch.set_num_threads(2)
    engine = _engine(threads=1)
    assert engine.thread_plan == ThreadPlan(1)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    assert engine.step_threads == 1


def test_calibration_measures_and_restores_the_callers_count():
    torch.set_num_threads(2)
    engine = _engine(max_num_seqs=8)
    plan = calibrate(engine, reps=1)
    assert torch.get_num_threads() == 2 and engine.thread_plan is None
    assert plan.cap == 2 and plan.all_from >= 1
    rows = [r for r, _, _ in plan.timings]
    assert rows == sorted(rows) and rows[0] == 1 and rows[-1] <= 8
    assert all(one > 0 and cap > 0 for _, one, cap in plan.timings)
    assert not engine.has_work() and not engine.requests  # its requests are gone
    assert "intra-op threads" in plan.describe()
    assert calibrate(engine, cap=1) == ThreadPlan(1)


def test_the_engine_threads_count_is_its_own():
    """AsyncEngine with adaptive threads calibrates on its own thread: the plan is in effect there (a lone stream's
    steps run on the plan's count), and the thread that built it keeps its count (OpenMP's is per thread)."""
    from nanoseek.engine.async_engine import AsyncEngine
    from nanoseek.engine.sampling import SamplingParams

    torch.set_num_threads(2)
    engine = _engine(max_num_seqs=4, adaptive_threads=True)
    async_engine = AsyncEngine(engine)
    try:
        assert async_engine.ready.wait(60)
        plan = engine.thread_plan
        assert plan is not None and plan.cap == 2
        seen = []
        real_step = engine.step

        def step():
            out = real_step()
            seen.append((threading.current_thread().name, engine.step_threads, torch.get_num_threads()))
            return out

        engine.step = step
        outs = list(async_engine.stream([1, 2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
        assert len(outs) == 4
        decode = seen[-1]  # a one-row decode step
        assert decode == ("nanoseek-engine", plan.threads(1), plan.threads(1))
        assert torch.get_num_threads() == 2  # this thread's count did not move
    finally:
        async_engine.shutdown()


@pytest.mark.parametrize("mode", ["int4", "int8", "fp16"])
def test_tokens_do_not_depend_on_the_thread_count(mode):
    """A greedy request's tokens and logprobs are the same bits on 1 thread and on 2, in every quantized run
    format: the thread count follows the batch's size, so otherwise other traffic would change an answer."""
    from nanoseek.engine.engine import Engine, EngineConfig
    from nanoseek.engine.sampling import SamplingParams
    from test_batch_invariance import PROMPT, _model

    if mode == "int4":
        from nanoseek.quant import int4_kernel_available

        if not int4_kernel_available():
            pytest.skip("nanoseek's int4 kernel needs AVX2")
    if mode == "fp16" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("fp16 weights need fbgemm")
    model = _model("llama", mode)
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3, ignore_eos=True)

    def run(threads: int):
        engine = Engine(model, EngineConfig(block_size=16, threads=threads), eos_ids=[])
        rid = engine.add_request(PROMPT, params)
        others = [engine.add_request(PROMPT[i : i + 40], params) for i in (3, 9)]
        while engine.has_work():
            engine.step()
        assert engine.step_threads == threads
        del others
        return engine.requests[rid].output_ids, engine.requests[rid].logprobs

    assert run(1) == run(2)


def test_off_main_thread_returns_raises_and_leaves_the_callers_count():
    """`nanoseek serve` loads its model this way (threads.off_main_thread says why): the work runs on another
    thread with the threads asked for, its result or exception comes back, the caller's count is untouched."""
    before = torch.get_num_threads()
    seen = {}

    def work():
        seen["thread"], seen["threads"] = threading.current_thread(), torch.get_num_threads()
        return torch.ones(3).sum().item()

    try:
        assert off_main_thread(work, 1) == 3.0
        assert seen["thread"] is not threading.current_thread() and seen["threads"] == 1
        assert torch.get_num_threads() == before

        def fail():
            raise ValueError("no such model")

        with pytest.raises(ValueError, match="no such model"):
            off_main_thread(fail, 1)
    finally:
        torch.set_num_threads(before)


def test_a_plan_from_the_first_row_says_every_step():
    assert ThreadPlan(2, 1).describe() == "intra-op threads: 2 on every step"
    assert ThreadPlan(2, 16).describe() == "intra-op threads: 1 below 16 tokens a step, 2 from there"


def test_the_engine_warms_up_on_its_own_thread_and_a_failure_reaches_the_server(monkeypatch):
    """A compiled decode step compiles on the thread that runs the steps (on another, that thread kept an OpenMP
    pool of its own and both paid libgomp's throttled wake-ups); if warming up fails, the server's start fails
    with its error instead of waiting forever."""
    from nanoseek.engine.async_engine import AsyncEngine
    from nanoseek.engine.engine import Engine
    from nanoseek.serve.serving import make_server

    where = []
    monkeypatch.setattr(Engine, "warm_up", lambda self: where.append(threading.current_thread().name))
    async_engine = AsyncEngine(_engine(max_num_seqs=2))
    try:
        assert async_engine.ready.wait(60) and async_engine.startup_error is None
        assert where == ["nanoseek-engine"]
    finally:
        async_engine.shutdown()

    def broken(self):
        raise RuntimeError("compilation failed (test)")

    monkeypatch.setattr(Engine, "warm_up", broken)
    engine = _engine(max_num_seqs=2)
    tok = type("Tok", (), {"stop_token_ids": [], "decode": staticmethod(lambda ids: "")})()
    with pytest.raises(RuntimeError, match="compilation failed"):
        make_server(engine.runner.model, tok, "tiny")
