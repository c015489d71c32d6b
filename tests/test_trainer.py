"""The training loop: learning, gradient accumulation, exact resume (also after kill -9 during a save), and
clear errors for checkpoints of another config."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import procs
from nanoseek.train.checkpoint import CheckpointError, list_checkpoints
from nanoseek.train.config import load_train_config
from nanoseek.train.trainer import Trainer

TINY = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.moe_intermediate_size=16",
    "model.num_hidden_layers=2", "model.q_lora_rank=16", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
    "model.num_nextn_predict_layers=1", "tokenizer.vocab_size=300", "tokenizer.train_texts=300",
    "batch_size=16", "seq_len=16", "optim.warmup_steps=2", "optim.lr=3e-3", "log_every=1",
    "eval.examples=20", "device=cpu", "peak_flops=1e11",
]  # fmt: skip


def tiny_cfg(out: Path, *overrides: str):
    return load_train_config(overrides=[*TINY, f"out_dir={out}", *overrides])


def run(cfg, **kw):
    return Trainer(cfg, show_progress=False, **kw).train()


def test_loss_decreases_and_run_folder(tmp_path):
    res = run(tiny_cfg(tmp_path / "r", "max_steps=40", "ckpt_every=0", "optim.lr=1e-2"))
    assert len(res.losses) == 40
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert (tmp_path / "r/model/config.json").is_file() and (tmp_path / "r/model/tokenizer.json").is_file()
    lines = [json.loads(x) for x in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["event"] == "step"]
    assert len(steps) == 40 and "load_imbalance" in steps[0] and "expert_load" in steps[0]
    assert any(x["event"] == "eval" for x in lines) and lines[-1]["event"] == "summary"
    assert set(res.eval) == {"add2"} and res.eval["add2"].n == 20
    # the final checkpoint is also there, and the exported model loads back
    import nanoseek

    model = nanoseek.load(tmp_path / "r/model")
    assert torch.equal(model.lm_head.weight, res.model.lm_head.weight)


def test_grad_accumulation_matches_bigger_batch(tmp_path):
    a = run(tiny_cfg(tmp_path / "a", "max_steps=4", "ckpt_every=0", "batch_size=16", "grad_accum=1"))
    b = run(tiny_cfg(tmp_path / "b", "max_steps=4", "ckpt_every=0", "batch_size=8", "grad_accum=2"))
    # same global batch, losses normalised by the step's token count: equal up to float summation order
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=1e-6)


def test_exact_resume(tmp_path):
    full = run(tiny_cfg(tmp_path / "full", "max_steps=10", "ckpt_every=5"))
    cfg = tiny_cfg(tmp_path / "part", "max_steps=10", "ckpt_every=5")
    first = run(cfg, stop_after=5)  # stops right after the step-5 checkpoint, as if killed there
    assert [p.name for p in list_checkpoints(tmp_path / "part/checkpoints")] == ["step-00000005"]
    second = run(tiny_cfg(tmp_path / "part", "max_steps=10", "ckpt_every=5"), resume=True)
    assert first.losses == full.losses[:5]
    assert second.losses == full.losses[5:]  # bit-identical after the resume
    for a, b in zip(full.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)  # the same as the parent: float sums depend on the thread count
    from nanoseek.train import checkpoint
    from nanoseek.train.config import load_train_config
    from nanoseek.train.trainer import Trainer

    original = checkpoint.save_checkpoint

    def save(run_dir, step, **kw):  # die in the middle of writing the step-8 checkpoint
        def hook(label):
            if label == "model_state.safetensors" and step == 8:
                os.kill(os.getpid(), signal.SIGKILL)

        return original(run_dir, step, after_write=hook, **kw)

    checkpoint.save_checkpoint = save  # this child process only: the Trainer saves through it
    cfg = load_train_config(overrides=sys.argv[1:])
    Trainer(cfg, show_progress=False).train()
    """
)


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    # Bit-exact comparisons across processes need one thread count in both (reductions split differently).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _kill_during_save(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _kill_during_save(tmp_path):
    out = tmp_path / "killed"
    overrides = [*TINY, f"out_dir={out}", "max_steps=10", "ckpt_every=4"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = procs.run([sys.executable, "-c", KILL_SCRIPT, *overrides], env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000004"]  # the interrupted save left no step-8 folder
    resumed = run(load_train_config(overrides=overrides), resume=True)
    full = run(tiny_cfg(tmp_path / "full", "max_steps=10", "ckpt_every=0"))
    assert resumed.losses == full.losses[4:]


def test_bad_resume_and_existing_checkpoints(tmp_path):
    run(tiny_cfg(tmp_path / "r", "max_steps=2", "ckpt_every=1"))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(tiny_cfg(tmp_path / "r", "max_steps=4"))
    with pytest.raises(CheckpointError, match="different config: field model.overrides.hidden_size"):
        run(tiny_cfg(tmp_path / "r", "max_steps=4", "model.hidden_size=48"), resume=True)
    assert [p.name for p in list_checkpoints(tmp_path / "r/checkpoints")] == ["step-00000001", "step-00000002"]


def test_text_files_train_and_bad_data(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f"the cat sat on mat number {i}. the dog ran." for i in range(200)))
    res = run(tiny_cfg(tmp_path / "t", f"data.files=[{data}]", "max_steps=3", "ckpt_every=0"))
    assert len(res.losses) == 3 and res.eval == {}  # no tasks: nothing to score
    with pytest.raises(FileNotFoundError, match="missing.txt: data file not found"):
        run(tiny_cfg(tmp_path / "m", f"data.files=[{tmp_path / 'missing.txt'}]", "max_steps=3"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        run(tiny_cfg(tmp_path / "e", f"data.files=[{empty}]", "tokenizer.path=" + str(tmp_path / "t/tokenizer")))


def test_full_disk_during_save_keeps_checkpoints(tmp_path, monkeypatch):
    import errno

    from nanoseek.train import checkpoint

    original = checkpoint.save_file

    def save_file(tensors, path, metadata=None):
        if metadata and metadata.get("step") == "4":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    with pytest.raises(CheckpointError, match="disk is full.*intact: step-00000002"):
        run(tiny_cfg(tmp_path / "d", "max_steps=6", "ckpt_every=2"))
    assert [p.name for p in list_checkpoints(tmp_path / "d/checkpoints")] == ["step-00000002"]
    assert not list((tmp_path / "d/checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_compiled_blocks_match_eager(tmp_path):
    eager = run(tiny_cfg(tmp_path / "e", "max_steps=3", "ckpt_every=0"))
    compiled = run(tiny_cfg(tmp_path / "c", "max_steps=3", "ckpt_every=0", "compile=true"))
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-5)
