import errno
import gc
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import procs
from nanoseek.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    list_checkpoints,
    load_latest,
    restore_rng_state,
    save_checkpoint,
)


def _save(run_dir, step, value, **kw):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    with torch.no_grad():
        model.weight.fill_(value)
    return save_checkpoint(
        run_dir, step, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
        scheduler_state={"last_epoch": step}, data_state={"kind": "tasks", "step": step}, rng_state=capture_rng_state(),
        train_config={"seed": 1, "model": {"size": "x", "overrides": {"hidden_size": 8}}, "max_steps": 10}, **kw,
    )  # fmt: skip


def test_save_load_roundtrip_prune_and_latest(tmp_path):
    for step in (10, 20, 30, 40):
        path = _save(tmp_path, step, float(step), keep_last=2, extra={"loss": 1.5})
    assert path.name == "step-00000040"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000040"
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".trash-*"))
    ckpt = load_latest(tmp_path, train_config={"seed": 1, "model": {"size": "x", "overrides": {"hidden_size": 8}},
                                               "max_steps": 99})  # fmt: skip
    assert ckpt.step == 40 and ckpt.extra == {"loss": 1.5} and ckpt.data_state["step"] == 40
    assert torch.equal(ckpt.model_state["weight"], torch.full((3, 4), 40.0))
    model = torch.nn.Linear(4, 3)
    model.load_state_dict(ckpt.model_state)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt.load_state_dict(ckpt.optimizer_state)
    assert opt.state[model.weight]["step"].item() == 1
    # train_state.pt is loadable without unpickling arbitrary objects
    torch.load(ckpt.path / "train_state.pt", weights_only=True)
    assert load_latest(tmp_path / "nothing-here") is None
    # re-saving an existing step replaces it atomically
    _save(tmp_path, 40, 7.0, keep_last=2)
    assert load_latest(tmp_path).model_state["weight"][0, 0] == 7.0


def test_different_config_is_refused_with_the_field(tmp_path):
    _save(tmp_path, 5, 1.0)
    other = {"seed": 1, "model": {"size": "x", "overrides": {"hidden_size": 16}}, "max_steps": 10}
    with pytest.raises(CheckpointError, match="different config: field model.overrides.hidden_size is 8, run has 16"):
        load_latest(tmp_path, train_config=other)
    with pytest.raises(CheckpointError, match="field seed is 1, run has 2"):
        load_latest(
            tmp_path, train_config={**other, "seed": 2, "model": {"size": "x", "overrides": {"hidden_size": 8}}}
        )


def test_corrupt_and_incomplete_checkpoints_are_skipped(tmp_path):
    _save(tmp_path, 1, 1.0)
    _save(tmp_path, 2, 2.0)
    with open(tmp_path / "step-00000002" / "model_state.safetensors", "ab") as f:
        f.write(b"garbage")  # size no longer matches the manifest
    (tmp_path / "step-00000003").mkdir()  # no manifest: incomplete
    (tmp_path / ".tmp-step-00000004-1").mkdir()
    with pytest.warns(UserWarning, match="skipping"):
        ckpt = load_latest(tmp_path)
    assert ckpt.step == 1 and ckpt.model_state["weight"][0, 0] == 1.0


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    _save(tmp_path, 1, 0.0)
    want = (random.random(), np.random.rand(5).tolist(), torch.rand(5).tolist())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(load_latest(tmp_path).rng_state)
    assert (random.random(), np.random.rand(5).tolist(), torch.rand(5).tolist()) == want


def test_failed_save_keeps_previous_and_cleans_tmp(tmp_path):
    _save(tmp_path, 1, 1.0)

    def disk_full(label):
        if label == "train_state.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(
        CheckpointError, match=r"could not save checkpoint step 2 .*disk is full.*intact: step-00000001"
    ):
        _save(tmp_path, 2, 2.0, after_write=disk_full)
    assert not list(tmp_path.glob(".tmp-*"))
    assert load_latest(tmp_path).step == 1


def test_real_full_disk_on_a_small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                            capture_output=True).returncode:  # fmt: skip
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run = mnt / "run"
        save_checkpoint(run, 1, model_state={"w": torch.ones(1000)}, train_config={"a": 1})
        with pytest.raises(CheckpointError, match="could not save checkpoint step 2 .*the disk is full"):
            save_checkpoint(run, 2, model_state={"w": torch.ones(200_000)}, train_config={"a": 1})
        assert not list(run.glob(".tmp-*"))
        ckpt = load_latest(run)
        assert ckpt.step == 1 and torch.equal(ckpt.model_state["w"], torch.ones(1000))
        del ckpt  # its tensors map the file; the mount is busy until they are gone
    finally:
        gc.collect()
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from nanoseek.train import checkpoint as ck
    run_dir, marker, kill_at = sys.argv[1], sys.argv[2], sys.argv[3]
    ck.save_checkpoint(run_dir, 1, model_state={"w": torch.full((50_000,), 1.0)}, train_config={"a": 1},
                       optimizer_state={"m": torch.zeros(10)}, keep_last=1)
    def hook(label):
        if label == kill_at:
            open(marker, "w").write(label)
            while True:  # the parent kills us here
                time.sleep(1)
    ck.save_checkpoint(run_dir, 2, model_state={"w": torch.full((50_000,), 2.0)}, train_config={"a": 1},
                       optimizer_state={"m": torch.ones(10)}, keep_last=1, after_write=hook)
    """
)


@pytest.mark.parametrize("kill_at", ["model_state.safetensors", "train_state.pt", "manifest.json", "renamed"])
def test_kill_9_during_save_leaves_a_loadable_checkpoint(tmp_path, kill_at):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(run_dir), str(marker), kill_at]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        start = time.monotonic()
        while not marker.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the saving process ended (status {proc.returncode}) before reaching {kill_at}:\n{err}")
            if time.monotonic() - start > procs.BOUND_S:  # only a hang gets here
                proc.kill()
                pytest.fail(procs.still_running(cmd, procs.BOUND_S, *proc.communicate()))
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    ckpt = load_latest(run_dir)
    if kill_at == "renamed":  # step 2 was complete before the kill: it is the newest usable checkpoint
        assert ckpt.step == 2 and torch.equal(ckpt.model_state["w"], torch.full((50_000,), 2.0))
        assert (run_dir / "latest").read_text().strip() == "step-00000001"  # pointer not yet updated
    else:
        assert ckpt.step == 1 and torch.equal(ckpt.model_state["w"], torch.full((50_000,), 1.0))
        assert torch.equal(ckpt.optimizer_state["m"], torch.zeros(10))
        assert list(run_dir.glob(".tmp-step-*"))  # the killed save's leftovers, ignored ...
    save_checkpoint(run_dir, 3, model_state={"w": torch.zeros(3)}, train_config={"a": 1}, keep_last=1)
    assert not list(run_dir.glob(".tmp-step-*"))  # ... and cleaned by the next save
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000003"]
    assert json.loads((run_dir / "step-00000003" / "manifest.json").read_text())["step"] == 3


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a busy machine
    yield
    torch.set_num_threads(n)


def test_exact_resume_of_losses_with_the_building_blocks(tmp_path, one_thread):
    """Stop at step k, save, rebuild everything from the checkpoint, continue: the same losses as the
    uninterrupted run. Uses the real model, task batcher, lr schedule, RNG capture and checkpoint."""
    from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
    from nanoseek.model.moe import update_router_bias
    from nanoseek.tasks import get_task
    from nanoseek.train.config import load_train_config, lr_at
    from nanoseek.train.data import TaskBatcher
    from nanoseek.train.tokenizer import train_tokenizer
    from nanoseek.weights.hf_folder import save_pretrained

    rng = random.Random(0)
    tok = train_tokenizer((get_task("add2").generate(rng).prompt for _ in range(500)), vocab_size=300)
    cfg = load_train_config(preset="tiny", overrides=[
        "batch_size=4", "seq_len=12", "max_steps=6", "optim.warmup_steps=2", "model.num_hidden_layers=2",
        "model.hidden_size=48", "model.intermediate_size=64", "model.moe_intermediate_size=16",
    ])  # fmt: skip

    def build(state=None):
        torch.manual_seed(cfg.seed)
        model = DeepseekV3ForCausalLM(cfg.model_config(vocab_size=tok.vocab_size))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
        batcher = TaskBatcher([get_task(t) for t in cfg.data.tasks], tok, cfg.batch_size, cfg.seq_len, cfg.seed)
        step = 0
        if state is not None:
            model.load_state_dict(state.model_state)
            opt.load_state_dict(state.optimizer_state)
            batcher.load_state_dict(state.data_state)
            restore_rng_state(state.rng_state)
            step = state.step
        return model, opt, batcher, step

    def train(model, opt, batcher, start, stop):
        losses = []
        for step in range(start, stop):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            x, y = batcher.next_batch()
            loss = model.compute_loss(x, y, mtp_weight=cfg.mtp_weight).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            update_router_bias(model, cfg.router_bias_gamma)
            torch.rand(1)  # consume global RNG so its restore matters
            losses.append(loss.item())
        return losses

    model, opt, batcher, _ = build()
    full = train(model, opt, batcher, 0, 6)

    model, opt, batcher, _ = build()
    first = train(model, opt, batcher, 0, 3)
    save_checkpoint(tmp_path, 3, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                    data_state=batcher.state_dict(), rng_state=capture_rng_state(), train_config=cfg.to_dict(),
                    write_files=lambda d: (save_pretrained(model, d), tok.save(d)))  # fmt: skip
    del model, opt, batcher
    torch.manual_seed(12345), random.seed(1)  # disturb every generator
    model, opt, batcher, step = build(load_latest(tmp_path, train_config=cfg.to_dict()))
    rest = train(model, opt, batcher, step, 6)
    assert first + rest == full
    assert (tmp_path / "step-00000003" / "config.json").is_file()
    assert (tmp_path / "step-00000003" / "tokenizer.json").is_file()
    # the checkpoint folder is also a HF model folder
    import nanoseek

    reloaded = nanoseek.load(tmp_path / "step-00000003")
    x = torch.tensor([tok.encode("12+34=")])
    saved = load_latest(tmp_path).model_state
    ref, _, _, _ = build()
    ref.load_state_dict(saved)
    assert torch.allclose(reloaded(x), ref(x), atol=1e-6)
