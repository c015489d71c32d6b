"""Logit distillation in a process of its own: tests/test_distill.py runs it under torchrun (two gloo processes)
and kills it with SIGKILL in the middle of a checkpoint save.

    python distill_worker.py '{"student": DIR, "teacher": DIR, "out": DIR, "steps": 3, "overrides": [...],
                               "parallel": "ddp", "kill_at": 4}'
"""

from __future__ import annotations

import json
import os
import signal
import sys


def conversations() -> list[dict]:
    """Five R1-format traces: a batch of four wraps into the second epoch at step 2."""
    from nanoseek.train.distill import Trace, conversation

    pairs = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 9))
    return [conversation(Trace("add2", f"{a}+{b}=", "", f"<think>{a}+{b}</think><answer>{a + b}</answer>", True))
            for a, b in pairs]  # fmt: skip


def distill(spec: dict, **kw):
    """logit_distill with the settings the tests share (lr 3e-3, four conversations a step)."""
    import nanoseek
    from nanoseek.train.logit_distill import logit_distill

    return logit_distill(
        nanoseek.load(spec["student"]), nanoseek.load(spec["teacher"]), nanoseek.load_tokenizer(spec["student"]),
        conversations(), spec["out"], steps=spec["steps"], batch_size=4, lr=3e-3,
        overrides=spec.get("overrides", []), **kw,
    )  # fmt: skip


def main(spec: dict) -> int:
    import torch

    from nanoseek.parallel.distributed import end_of_worker, leaving_process_group
    from nanoseek.train import checkpoint

    torch.set_num_threads(1)  # as the test's own runs: float sums depend on the thread count
    if spec.get("kill_at"):
        original = checkpoint.save_checkpoint

        def save(run_dir, step, **kw):  # die in the middle of writing checkpoint `kill_at`
            def hook(label):
                if label == "model_state.safetensors" and step == spec["kill_at"]:
                    os.kill(os.getpid(), signal.SIGKILL)

            return original(run_dir, step, after_write=hook, **kw)

        checkpoint.save_checkpoint = save  # the trainer saves through the module's attribute
    with leaving_process_group():
        distill(spec, parallel=spec.get("parallel", "auto"))
    return end_of_worker(0)


if __name__ == "__main__":
    raise SystemExit(main(json.loads(sys.argv[1])))
