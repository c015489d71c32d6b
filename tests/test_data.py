import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanoseek.tasks import get_task, is_heldout, prompt_ids
from nanoseek.train.data import IGNORE_INDEX, PackedTextDataset, TaskBatcher
from nanoseek.train.tokenizer import train_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=12)) for _ in range(300)]
    for name in ("add2", "sort", "countdown"):
        t = get_task(name)
        texts += [e.prompt + e.answer for e in (t.generate(rng) for _ in range(500))]
    return train_tokenizer(texts, vocab_size=350)


def test_task_rows_layout_and_answer_mask(tok):
    tasks = [get_task("add2"), get_task("sort")]
    b = TaskBatcher(tasks, tok, batch_size=16, seq_len=24, seed=3)
    x, y = b.next_batch()
    assert x.shape == y.shape == (16, 24) and x.dtype == y.dtype == torch.long
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert row_x[0] == tok.bos_token_id
        text = tok.decode([t for t in row_x if t != tok.pad_token_id], skip_special_tokens=True)
        prompt, answer = text.split("=", 1)
        kept = [t for t in row_y if t != IGNORE_INDEX]
        assert kept[-1] == tok.eos_token_id
        assert tok.decode(kept[:-1]) == answer  # loss only on the answer and the eos after it
        assert not is_heldout(prompt + "=", 0.1)  # training rows never come from the held-out split
        n = row_x.index(tok.pad_token_id) if tok.pad_token_id in row_x else 24
        # target at position t is the token at t+1
        assert [t for t in row_y[:n] if t != IGNORE_INDEX] == row_x[n - len(kept) + 1 : n] + [tok.eos_token_id]
    full = TaskBatcher(tasks, tok, 16, 24, seed=3, loss_on_answer_only=False).batch_at(0)
    assert torch.equal(full[0], x)
    assert ((full[1] != IGNORE_INDEX).sum(1) == (x != tok.pad_token_id).sum(1)).all()


def test_r1_task_rows_are_the_chat_prompt_and_a_direct_r1_answer(tok):
    x, y = TaskBatcher([get_task("add2")], tok, batch_size=8, seq_len=32, seed=3, fmt="r1").batch_at(0)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        text = tok.decode(row_x, skip_special_tokens=False)
        question = text.split("<|user|>", 1)[1].split("<|assistant|>", 1)[0]
        a, b = question.rstrip("=").split("+")
        prompt = tok.encode_chat([{"role": "user", "content": question}])
        reply = tok.encode(f"<think></think><answer>{str(int(a) + int(b))[::-1]}</answer>", add_special_tokens=False)
        assert row_x[: len(prompt)] == prompt and not is_heldout(question, 0.1)
        kept = [t for t in row_y if t != IGNORE_INDEX]
        assert kept == [*reply, tok.eos_token_id]  # the loss falls on the reply and its eos only
    with pytest.raises(ValueError, match="data.format=r1 needs a tokenizer with a chat template"):
        TaskBatcher([get_task("add2")], _without_chat_template(tok), 8, 32, fmt="r1")


def test_r1_thinking_tasks_work_the_problem_out_in_the_thought(tok):
    from nanoseek.tasks.demonstrations import carry_steps

    tasks = [get_task("add2"), get_task("sort")]
    x, y = TaskBatcher(tasks, tok, batch_size=16, seq_len=48, seed=3, fmt="r1", thinking=["add2"]).batch_at(0)
    seen = set()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        question = tok.decode(row_x, skip_special_tokens=False).split("<|user|>", 1)[1].split("<|assistant|>", 1)[0]
        if question.startswith("s:"):
            thought, answer = "", "".join(sorted(question[2:-1]))  # sort stays a direct answer
        else:
            a, b = question.rstrip("=").split("+")
            thought, answer = carry_steps(a, b), str(int(a) + int(b))[::-1]
        seen.add(bool(thought))
        reply = tok.encode(f"<think>{thought}</think><answer>{answer}</answer>", add_special_tokens=False)
        assert [t for t in row_y if t != IGNORE_INDEX] == [*reply, tok.eos_token_id]
    assert seen == {True, False}
    with pytest.raises(ValueError, match="r1 format"):
        TaskBatcher(tasks, tok, 8, 48, thinking=["add2"])  # plain rows have no thought
    from nanoseek.train.config import load_train_config

    with pytest.raises(ValueError, match=r"data.thinking_tasks \['add3'\] are not among data.tasks"):
        load_train_config(overrides=["data.tasks=[add2]", "data.format=r1", "data.thinking_tasks=[add3]"])


def _without_chat_template(tok):
    import copy

    bare = copy.copy(tok)
    bare.chat_template = None
    return bare


def test_countdown_thought_evaluates_the_reference_step_by_step():
    """A countdown demonstration that thinks computes its reference expression one operation a step, ending at
    the target, for every shape the generator writes (brackets, division, negative partial values)."""
    import random

    from nanoseek.tasks import get_task
    from nanoseek.tasks.demonstrations import countdown_steps, r1_answer_text

    assert countdown_steps("(3+5)*7") == "3+5=8,8*7=56"
    assert countdown_steps("2-7+9") == "2-7=-5,-5+9=4"
    assert countdown_steps("(2-8)/3*1") == "2-8=-6,-6/3=-2,-2*1=-2"
    task, rng = get_task("countdown"), random.Random(0)
    for _ in range(2000):
        ex = task.generate(rng)
        reply = r1_answer_text(ex)
        thought = reply[len("<think>") : reply.index("</think>")]
        assert int(thought.rsplit("=", 1)[1]) == ex.meta["target"], (ex.prompt, ex.answer, thought)
        assert reply.endswith(f"<answer>{ex.answer}</answer>")


def test_task_batches_resume_exactly_and_shard(tok):
    a = TaskBatcher([get_task("add2"), get_task("linear")], tok, 8, 20, seed=5, weights=[3, 1])
    batches = [a.next_batch() for _ in range(5)]
    b = TaskBatcher([get_task("add2"), get_task("linear")], tok, 8, 20, seed=5, weights=[3, 1])
    b.load_state_dict(json.loads(json.dumps(TaskBatcher.state_dict(a) | {"step": 3})))
    for want in batches[3:]:
        got = b.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other_seed = TaskBatcher([get_task("add2")], tok, 8, 20, seed=6)
    assert not torch.equal(other_seed.batch_at(0)[0], a.batch_at(0)[0])
    r1 = TaskBatcher([get_task("add2")], tok, 8, 20, seed=5, rank=1, world_size=2)
    assert not torch.equal(r1.batch_at(0)[0], TaskBatcher([get_task("add2")], tok, 8, 20, seed=5).batch_at(0)[0])
    with pytest.raises(ValueError, match="seed 5, this run has seed 6"):
        other_seed.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="more than seq_len"):
        TaskBatcher([get_task("add4")], tok, 4, 6, seed=0).next_batch()
    ex = get_task("add2").generate(random.Random(0))
    assert (
        prompt_ids(tok, ex)
        == TaskBatcher([get_task("add2")], tok, 1, 20).encode_example(ex)[0][: 1 + len(tok.encode(ex.prompt))]
    )


def _write_corpus(tmp_path):
    rng = random.Random(1)
    docs = [" ".join(rng.choices(WORDS, k=rng.randint(3, 40))) for _ in range(60)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:20]) + "\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for d in docs[20:40]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
        f.write("\n")
    table = pa.table({"text": docs[40:], "n": list(range(20))})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=6)
    return docs


def test_packed_rows_are_the_concatenated_documents(tok, tmp_path):
    docs = _write_corpus(tmp_path)
    stream = []
    for d in docs:
        stream += [tok.bos_token_id, *tok.encode(d), tok.eos_token_id]
    ds = PackedTextDataset([tmp_path], tok, seq_len=16, loop=False)
    rows = []
    while True:
        try:
            rows.append(ds.next_row())
        except StopIteration:
            break
    assert len(rows) == (len(stream) - 1) // 16
    for i, row in enumerate(rows):
        assert row == stream[16 * i : 16 * i + 17]
    x, y = PackedTextDataset([tmp_path], tok, seq_len=16).next_batch(3)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x[0].tolist() == stream[:16]


def test_packed_resume_is_exact_across_epochs_and_ranks(tok, tmp_path):
    _write_corpus(tmp_path)
    files = [tmp_path / "b.jsonl", tmp_path / "c.parquet", tmp_path / "a.txt"]
    for world in (1, 2):
        for rank in range(world):
            ref = PackedTextDataset(files, tok, seq_len=24, rank=rank, world_size=world)
            rows = [ref.next_row() for _ in range(80)]  # several epochs at this size
            assert ref.state_dict()["epoch"] >= 1
            for k in (0, 1, 7, 33, 61):
                ds = PackedTextDataset(files, tok, seq_len=24, rank=rank, world_size=world)
                for _ in range(k):
                    ds.next_row()
                state = json.loads(json.dumps(ds.state_dict()))
                fresh = PackedTextDataset(files, tok, seq_len=24, rank=rank, world_size=world)
                fresh.load_state_dict(state)
                assert [fresh.next_row() for _ in range(12)] == rows[k : k + 12], (world, rank, k)
    r0 = PackedTextDataset(files, tok, seq_len=24, rank=0, world_size=2)
    r1 = PackedTextDataset(files, tok, seq_len=24, rank=1, world_size=2)
    assert r0.next_row() != r1.next_row()
    with pytest.raises(ValueError, match="rank 0 of 2, this is rank 1 of 2"):
        r1.load_state_dict(r0.state_dict())


def test_bad_data_inputs(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl: data file not found"):
        PackedTextDataset([tmp_path / "missing.jsonl"], tok, 8)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        PackedTextDataset([tmp_path / "x.csv"], tok, 8)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty dataset: .*empty.txt gave rank 0 of 1 only 0 tokens"):
        PackedTextDataset([tmp_path / "empty.txt"], tok, 8).next_row()
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'text' field \(found \['body'\]\)"):
        PackedTextDataset([tmp_path / "bad.jsonl"], tok, 4).next_batch(4)
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="broken.jsonl:1: not valid JSON"):
        PackedTextDataset([tmp_path / "broken.jsonl"], tok, 4).next_row()
    pq.write_table(pa.table({"content": ["a b c"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p.parquet: no column 'text' \(columns: \['content'\]\)"):
        PackedTextDataset([tmp_path / "p.parquet"], tok, 4).next_row()
    with pytest.raises(FileNotFoundError, match="no data files match"):
        PackedTextDataset([str(tmp_path / "*.nothing")], tok, 4)


def test_iter_texts_streams_documents(tmp_path):
    from nanoseek.train.data import iter_texts

    docs = _write_corpus(tmp_path)
    assert list(iter_texts([tmp_path])) == docs
    assert list(iter_texts([tmp_path], limit=5)) == docs[:5]


def test_config_reports_missing_data_files(tmp_path):
    from nanoseek.train.config import load_train_config

    with pytest.raises(FileNotFoundError, match="nope.jsonl: data file not found"):
        load_train_config(overrides=[f"data.files=[{tmp_path / 'nope.jsonl'}]"])
