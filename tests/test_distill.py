"""`nanoseek distill`: the teacher's traces through the engine, the verifiers' filter, the conversations written
for SFT, and the student trained on them when SFT is part of the build."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

import nanoseek
import procs
from nanoseek.cli import main
from nanoseek.eval.answers import extract_math_answer, math_equal
from nanoseek.model.config import from_name
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.tasks import R1_SYSTEM_PROMPT, get_task, is_heldout, sample_texts
from nanoseek.train.distill import Trace, conversation, generate_traces, select_traces, write_conversations
from nanoseek.train.tokenizer import train_tokenizer
from nanoseek.weights.hf_folder import save_pretrained

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "has", "apples", "how", "many"]
QUESTIONS = [f"the {a} has {n} apples, how many" for a in ("cat", "dog") for n in (3, 12, 7)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Teacher and student: tiny random DeepSeek-V3s sharing a trained tokenizer (with a chat template); the
    teacher's digit logits are scaled up."""
    rng = random.Random(0)
    texts = list(sample_texts([get_task("add2")], 400)) + [
        " ".join(rng.choices(WORDS, k=8)) + " 42" for _ in range(200)
    ]
    texts += [R1_SYSTEM_PROMPT] * 20  # merges, so the R1 prompt fits the context
    tok = train_tokenizer(texts, vocab_size=400, model_max_length=160)
    root = tmp_path_factory.mktemp("distill")
    folders = []
    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        model = DeepseekV3ForCausalLM(from_name("test-tiny", vocab_size=tok.vocab_size, max_position_embeddings=160))
        if name == "teacher":  # digits stand out, so its answers have numbers the math verifier can check
            with torch.no_grad():
                for digit in "0123456789":
                    model.lm_head.weight[tok.token_to_id(digit)] *= 50
        save_pretrained(model, root / name)
        tok.save(root / name)
        folders.append(root / name)
    return folders


def _math_file(path, teacher_folder) -> tuple[str, int]:
    """Questions whose reference answers are the teacher's own greedy answers (chat format): the verifier must
    accept exactly those traces. Returns (path, how many questions have an answer)."""
    tok, model = nanoseek.load_tokenizer(teacher_folder), nanoseek.load(teacher_folder)
    probe = path.parent / "probe.jsonl"
    probe.write_text("".join(json.dumps({"question": q, "answer": "#### 0"}) + "\n" for q in QUESTIONS))
    traces, _ = generate_traces(model, tok, [f"gsm8k:{probe}"], samples=1, temperature=0, fmt="chat",
                                max_new_tokens=24)  # fmt: skip
    answers = [extract_math_answer(t.completion) for t in traces]
    references = [a if a is not None else "none" for a in answers]
    references[0] = "99999"  # one wrong reference: the filter must drop that trace
    path.write_text(
        "".join(json.dumps({"question": q, "answer": f"#### {r}"}) + "\n" for q, r in zip(QUESTIONS, references))
    )
    return str(path), sum(a is not None and math_equal(a, r) for a, r in zip(answers, references))


def test_select_keeps_verified_distinct_traces_per_problem():
    t = [
        Trace("add2", "1+2=", "3", "<think>a</think><answer>3</answer>", True),
        Trace("add2", "1+2=", "3", " <think>a</think><answer>3</answer> ", True),  # the same, spaced
        Trace("add2", "1+2=", "3", "<think>b</think><answer>3</answer>", True),
        Trace("add2", "1+2=", "3", "<think>c</think><answer>4</answer>", False),
        Trace("add2", "5+5=", "01", "<think>d</think><answer>01</answer>", True),
        Trace("sort", "1+2=", "x", "<think>e</think><answer>x</answer>", True),  # another task, same text
    ]
    assert select_traces(t, per_problem=1) == [t[0], t[4], t[5]]
    assert select_traces(t, per_problem=5) == [t[0], t[2], t[4], t[5]]
    with pytest.raises(ValueError, match="per_problem"):
        select_traces(t, per_problem=0)
    assert conversation(t[1]) == {"messages": [
        {"role": "system", "content": R1_SYSTEM_PROMPT}, {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "<think>a</think><answer>3</answer>"},
    ]}  # fmt: skip
    assert [m["role"] for m in conversation(t[0], "chat")["messages"]] == ["user", "assistant"]
    assert conversation(t[0], "plain") == conversation(t[0], "chat")  # a base teacher's answer, as a chat reply
    assert [m["role"] for m in conversation(t[0], "r1", "")["messages"]] == ["user", "assistant"]
    assert conversation(t[0], "chat", "Be brief.")["messages"][0] == {"role": "system", "content": "Be brief."}


def test_teacher_traces_come_from_the_engine_and_the_training_split(models):
    teacher, _ = models
    tok, model = nanoseek.load_tokenizer(teacher), nanoseek.load(teacher)
    traces, skipped = generate_traces(model, tok, ["add2"], problems=5, samples=3, temperature=1.0, fmt="r1",
                                      max_new_tokens=8)  # fmt: skip
    assert skipped == 0 and len(traces) == 15
    assert len({t.question for t in traces}) == 5
    assert not any(is_heldout(t.question, 0.1) for t in traces)  # evaluation problems are never trained on
    assert not any(t.correct for t in traces)  # a random teacher does not write <think>…</think><answer>…</answer>
    again, _ = generate_traces(model, tok, ["add2"], problems=5, samples=3, temperature=1.0, fmt="r1",
                               max_new_tokens=8)  # fmt: skip
    assert [t.completion for t in again] == [t.completion for t in traces]  # seeded


def test_cli_traces_only_writes_the_verified_conversations(models, tmp_path, capsys):
    teacher, student = models
    path, answerable = _math_file(tmp_path / "math.jsonl", teacher)
    assert 1 <= answerable < 6
    out = tmp_path / "out"
    code = main(["distill", "--teacher", str(teacher), "--student", str(student), "--tasks", f"gsm8k:{path}",
                 "--out", str(out), "--format", "chat", "--samples", "1", "--temperature", "0", "--max-tokens", "24",
                 "--traces-only"])  # fmt: skip
    printed, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert len(rows) == answerable
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and user["content"] in QUESTIONS and assistant["role"] == "assistant"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated"] == 6 and summary["correct"] == summary["kept"] == answerable
    assert summary["per_task"][f"gsm8k:{path}"] == {"problems": 6, "generated": 6, "correct": answerable,
                                                   "kept": answerable}  # fmt: skip
    assert summary["sft"] is None and f"{answerable}/6 completions verified" in printed
    tok = nanoseek.load_tokenizer(student)  # the student's chat template renders every conversation
    assert all(tok.apply_chat_template(r["messages"], add_generation_prompt=False) for r in rows)


def test_no_verified_trace_is_a_clear_error_before_training(models, tmp_path, capsys):
    teacher, student = models
    code = main(["distill", "--teacher", str(teacher), "--student", str(student), "--tasks", "add2", "--out",
                 str(tmp_path / "o"), "--problems", "3", "--samples", "2", "--max-tokens", "6"])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 2 and "the teacher got none of its 6 completions right" in err
    code = main(["distill", "--teacher", str(teacher), "--student", str(student), "--tasks", "mc:x.jsonl",
                 "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "no such file" in capsys.readouterr()[1]


@pytest.mark.parametrize(
    ("options", "system", "good"),
    [
        (["--format", "r1", "--system-prompt", ""], None, "r1"),  # a speedrun model: R1 replies, no system prompt
        (["--format", "r1"], R1_SYSTEM_PROMPT, "r1"),
        (["--format", "chat", "--system-prompt", "Be brief."], "Be brief.", "bare"),
        (["--format", "chat"], None, "bare"),
    ],
)
def test_cli_prompts_and_scores_the_teacher_as_eval_does(models, tmp_path, capsys, monkeypatch, options, system,
                                                         good):  # fmt: skip
    """--format/--system-prompt mean what they mean to nanoseek eval: the teacher's prompt has the system message
    asked for (none with ''), r1 reads the answer from <answer> while chat checks the bare reply, and the
    conversations written carry the same system message the teacher saw."""
    import nanoseek.train.distill as distill_mod

    teacher, student = models
    seen = {}

    def fake_completions(model, tok, problems, *, samples, fmt, **_):
        seen["fmt"], seen["prompts"] = fmt, [p.prompt for p in problems]
        tagged = [f"<think>t</think><answer>{p.shown['reference']}</answer>" for p in problems]
        bare = [p.shown["reference"] for p in problems]
        return [[a, b] for a, b in zip(tagged, bare)]  # one reply in each form: the format's checker picks one

    monkeypatch.setattr(distill_mod, "generate_completions", fake_completions)
    out = tmp_path / "out"
    code = main(["distill", "--teacher", str(teacher), "--student", str(student), "--tasks", "add2", "--out",
                 str(out), "--problems", "4", "--samples", "2", "--traces-only", *options])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    tok = nanoseek.load_tokenizer(teacher)
    rows = [json.loads(line)["messages"] for line in (out / "traces.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and seen["fmt"] == options[1]
    head = [{"role": "system", "content": system}] if system else []
    for ids, messages in zip(seen["prompts"], rows):
        assert messages[:-1] == [*head, {"role": "user", "content": messages[-2]["content"]}]
        assert ids == tok.encode_chat(messages[:-1])  # the prompt the teacher saw is the conversation's
        reply = messages[-1]
        assert reply["role"] == "assistant" and reply["content"].startswith("<think>") == (good == "r1")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated"] == 8 and summary["correct"] == 4  # r1 rejects the bare reply, chat the tagged one
    assert summary["format"] == options[1] and summary["system_prompt"] == (system or "")


def test_a_system_prompt_with_the_plain_format_is_refused(models, tmp_path, capsys):
    from nanoseek.train.distill import distill

    teacher, student = models
    code = main(["distill", "--teacher", str(teacher), "--student", str(student), "--tasks", "add2", "--out",
                 str(tmp_path / "o"), "--format", "plain", "--system-prompt", "x"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--system-prompt needs --format chat or r1" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="needs the chat or r1 format"):  # before any model loads
        distill(tmp_path / "no-such-model", student, ["add2"], tmp_path / "o", fmt="plain", system_prompt="x")
    with pytest.raises(ValueError, match="needs the chat or r1 format"):
        conversation(Trace("add2", "1+2=", "3", "3", True), "plain", "x")
    # '' is no system prompt, which the plain format accepts (as nanoseek eval does)
    assert conversation(Trace("add2", "1+2=", "3", "3", True), "plain", "") == conversation(
        Trace("add2", "1+2=", "3", "3", True), "plain"
    )


def test_write_conversations_is_atomic(tmp_path):
    path = write_conversations(tmp_path / "t.jsonl", [Trace("add2", "1+2=", "3", "x", True)], "chat")
    assert path.read_text().count("\n") == 1 and not list(tmp_path.glob("*.tmp"))


def test_distill_trains_the_student_on_the_traces(models, tmp_path):
    pytest.importorskip("nanoseek.train.sft")
    from nanoseek.train.distill import distill

    teacher, student = models
    path, answerable = _math_file(tmp_path / "math.jsonl", teacher)
    result = distill(teacher, student, [f"gsm8k:{path}", "add2"], tmp_path / "out", ["max_steps=2", "batch_size=2"],
                     problems=6, samples=1, temperature=0, fmt="chat", max_new_tokens=24, eval_limit=5,
                     show_progress=False)  # fmt: skip
    assert result.kept == answerable and result.sft.steps == 2
    assert nanoseek.load(result.sft.model_dir) is not None
    assert set(result.eval_before) == set(result.eval_after) == {"add2"}  # the math file was trained on
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sft"]["steps"] == 2 and summary["eval_after"]["add2"]["n"] == 5


# ---- logit distillation -----------------------------------------------------------------------------------


def test_distillation_kl_is_the_forward_kl_at_the_masked_positions():
    from nanoseek.train.logit_distill import distillation_kl

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    for tau in (1.0, 2.0):
        terms = []
        for b, t in mask.nonzero().tolist():
            p = torch.softmax(teacher[b, t] / tau, -1)
            q = torch.softmax(student[b, t] / tau, -1)
            terms.append(float((p * (p.log() - q.log())).sum()))
        want = sum(terms) / len(terms) * tau**2
        assert float(distillation_kl(student, teacher, mask, tau)) == pytest.approx(want, rel=1e-5)
    assert float(distillation_kl(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-6)


def _conversations():
    return [conversation(Trace("add2", f"{a}+{b}=", "", f"<think>{a}+{b}</think><answer>{a + b}</answer>", True))
            for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]  # fmt: skip


def test_logit_distillation_moves_the_student_toward_the_teacher(models, tmp_path):
    from nanoseek.train.chat_data import tokenize_conversation
    from nanoseek.train.logit_distill import distillation_kl, logit_distill, padded

    teacher_dir, student_dir = models
    tok = nanoseek.load_tokenizer(student_dir)
    teacher, student = nanoseek.load(teacher_dir), nanoseek.load(student_dir)
    convs = _conversations()
    examples = [tokenize_conversation(tok, c) for c in convs]
    ids, mask = padded(examples, range(len(examples)), tok.pad_token_id)

    def kl_to_teacher(model) -> float:
        with torch.no_grad():
            return float(distillation_kl(model(ids), teacher(ids), mask))

    before = kl_to_teacher(student)
    result = logit_distill(student, teacher, tok, convs, tmp_path / "kl", steps=12, batch_size=4, lr=3e-3)
    assert result.steps == 12 and result.losses[0] == pytest.approx(before, rel=1e-4)  # step 0 sees every row
    trained = nanoseek.load(result.model_dir)
    assert kl_to_teacher(trained) < 0.5 * before
    assert nanoseek.load_tokenizer(result.model_dir).backend.get_vocab() == tok.backend.get_vocab()


def test_logit_distillation_refuses_different_vocabularies(models, tmp_path):
    from nanoseek.train.logit_distill import logit_distill

    teacher_dir, student_dir = models
    other = train_tokenizer(list(sample_texts([get_task("sort")], 200)), vocab_size=300)
    with pytest.raises(ValueError, match="same vocabulary"):
        logit_distill(nanoseek.load(student_dir), nanoseek.load(teacher_dir), nanoseek.load_tokenizer(student_dir),
                      _conversations(), tmp_path, teacher_tokenizer=other)  # fmt: skip


def test_distill_with_logit_kl_after_sft(models, tmp_path):
    pytest.importorskip("nanoseek.train.sft")
    from nanoseek.train.distill import distill

    teacher, student = models
    path, answerable = _math_file(tmp_path / "math.jsonl", teacher)
    result = distill(teacher, student, [f"gsm8k:{path}"], tmp_path / "out", ["max_steps=1", "batch_size=2"],
                     problems=6, samples=1, temperature=0, fmt="chat", max_new_tokens=24, logit_kl_steps=3,
                     show_progress=False)  # fmt: skip
    assert result.logit is not None and result.logit.steps == 3 and len(result.logit.losses) == 3
    assert nanoseek.load(result.logit.model_dir) is not None
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["logit"]["steps"] == 3


# ---- logit distillation on the training loop: torchrun (2 CPU gloo processes), resume after kill -9 ----------
def _worker(spec: dict):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    worker = str(Path(__file__).with_name("distill_worker.py"))
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if spec.get("parallel") else []
    return procs.run([sys.executable, *launch, worker, json.dumps(spec)], env=env)


@pytest.fixture
def one_thread():
    """Bit-exact comparisons with a worker process need its thread count here too (reductions split by it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("mode", "sets"), [("ddp", []), ("fsdp", ["grad_accum=2"])])
def test_logit_distillation_under_torchrun_matches_one_process(models, tmp_path, one_thread, mode, sets):
    """Two processes (each two of a step's four conversations; under FSDP2 one per micro-batch) give the losses
    and the weights of one: the KL is normalised by the whole step's assistant positions."""
    from distill_worker import distill
    from test_distributed import step_losses

    teacher, student = models
    spec = {"student": str(student), "teacher": str(teacher), "steps": 3, "overrides": sets}
    one = distill({**spec, "out": str(tmp_path / "one")})
    proc = _worker({**spec, "out": str(tmp_path / mode), "parallel": mode})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = step_losses(tmp_path / mode)
    assert len(two) == 3 and one.losses[-1] < one.losses[0]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one.losses), rtol=1e-5, atol=0)
    a, b = nanoseek.load(one.model_dir).state_dict(), nanoseek.load(tmp_path / mode / "model").state_dict()
    start = nanoseek.load(student).state_dict()
    assert any(not torch.equal(a[n], start[n]) for n in a)
    # the exported model (gathered from the shards under FSDP2) is the single-process one, up to rounding: Adam
    # divides a gradient by its running RMS, so an element whose gradient is near 0 moves by a good part of lr
    # whatever its size, and a different summation order shows there (one element of 0.2M by 1e-5 under DDP)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=name)


def test_logit_distillation_resumes_bit_exactly_after_kill_9(models, tmp_path, one_thread):
    """Killed with SIGKILL while saving the step-4 checkpoint, resumed from step 2: steps 3-5 and the final weights
    are the uninterrupted run's bit for bit (the rows of each step, in the second epoch too, and the optimizer
    state come back). A resume with another teacher is refused."""
    from distill_worker import distill
    from nanoseek.train.checkpoint import CheckpointError, list_checkpoints

    teacher, student = models
    spec = {"student": str(student), "teacher": str(teacher), "steps": 5, "overrides": ["ckpt_every=2"]}
    full = distill({**spec, "out": str(tmp_path / "full")})
    out = tmp_path / "killed"
    proc = _worker({**spec, "out": str(out), "kill_at": 4})
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    with pytest.raises(CheckpointError, match="distill.teacher"):
        distill({**spec, "out": str(out), "student": str(student), "teacher": str(student)}, resume=True)
    resumed = distill({**spec, "out": str(out)}, resume=True)
    assert resumed.steps == 5 and resumed.losses == full.losses[2:]
    a, b = nanoseek.load(resumed.model_dir).state_dict(), nanoseek.load(full.model_dir).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])][:5]


@pytest.mark.slow  # ~30 s on a loaded 2-core machine: two processes load, generate, train and evaluate
def test_cli_under_torchrun_waits_for_the_models_rank_0_writes(models, tmp_path):
    """`nanoseek distill --parallel ddp` in two processes (gloo): rank 1 reads OUT/sft/model (for the logit
    distillation) and OUT/kl/model (the evaluation after) only once rank 0 has written them, and rank 0 writes
    the summary of the whole recipe."""
    pytest.importorskip("nanoseek.train.sft")
    teacher, student = models
    path, answerable = _math_file(tmp_path / "math.jsonl", teacher)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "nanoseek",
           "distill", "--teacher", str(teacher), "--student", str(student), "--tasks", f"gsm8k:{path},add2",
           "--problems", "6", "--out", str(out), "--format", "chat", "--samples", "1", "--temperature", "0",
           "--max-tokens", "24", "--eval-limit", "4", "--set", "max_steps=1", "--set", "batch_size=2",
           "--logit-kl-steps", "1", "--no-progress", "--parallel", "ddp"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = procs.run(cmd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == answerable and summary["sft"]["steps"] == 1 and summary["logit"]["steps"] == 1
    assert summary["eval_after"]["add2"]["n"] == 4 and (out / "kl/model/config.json").is_file()


def test_cli_resume_and_parallel_reach_the_sft_and_logit_runs(models, tmp_path, capsys, monkeypatch):
    """`nanoseek distill --resume --parallel MODE`: both settings reach the SFT and logit-distillation runs; a rerun
    into the same folder is refused without --resume and continues (nothing left to train) with it."""
    pytest.importorskip("nanoseek.train.sft")
    import nanoseek.train.logit_distill as logit_mod
    import nanoseek.train.sft as sft_mod

    teacher, student = models
    path, _ = _math_file(tmp_path / "math.jsonl", teacher)
    seen = []
    for mod, name in ((sft_mod, "run_sft"), (logit_mod, "logit_distill")):
        real = getattr(mod, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen.append((_name, kw["parallel"], kw["resume"]))
            return _real(*a, **kw)

        monkeypatch.setattr(mod, name, spy)
    out = tmp_path / "out"
    argv = ["distill", "--teacher", str(teacher), "--student", str(student), "--tasks", f"gsm8k:{path}", "--out",
            str(out), "--format", "chat", "--samples", "1", "--temperature", "0", "--max-tokens", "24",
            "--set", "max_steps=1", "--set", "batch_size=2", "--logit-kl-steps", "2", "--no-progress",
            "--parallel", "none"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert seen == [("run_sft", "none", False), ("logit_distill", "none", False)]
    assert main(argv) == 2 and "already holds checkpoints" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    assert seen[-2:] == [("run_sft", "none", True), ("logit_distill", "none", True)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sft"]["steps"] == 1 and summary["logit"]["steps"] == 2
    with pytest.raises(SystemExit):
        main([*argv, "--parallel", "tp"])
