"""Atomic, resumable training checkpoints.

    path = save_checkpoint(
        run_dir, step,
        model_state=model.state_dict(),              # native names, saved exactly (safetensors)
        optimizer_state=opt.state_dict(), scheduler_state=sched.state_dict(),
        data_state=batcher.state_dict(),             # or a list of every rank's state
        rng_state=capture_rng_state(),
        train_config=cfg.to_dict(),
        write_files=lambda d: (save_pretrained(model, d), tok.save(d)),  # makes the folder a HF model
        keep_last=cfg.keep_last,
    )
    ckpt = load_latest(run_dir, train_config=cfg.to_dict())   # None when there is nothing to resume
    model.load_state_dict(ckpt.model_state); opt.load_state_dict(ckpt.optimizer_state)
    restore_rng_state(ckpt.rng_state)

Layout of `run_dir`:
    step-00000100/   config.json, model.safetensors, tokenizer.json ... (whatever write_files writes),
                     model_state.safetensors, train_state.pt, train_config.json, manifest.json
    latest           text file naming the newest complete checkpoint (for people and tools)
    .tmp-step-*      a save in progress (or one killed mid-way; removed by the next save)

A save writes everything into `.tmp-step-XXXXXXXX`, fsyncs each file and the folder, writes
manifest.json (file names and sizes) last, renames the folder to `step-XXXXXXXX` (atomic on POSIX),
fsyncs `run_dir`, updates `latest` atomically, then prunes to the newest `keep_last`. A crash or kill -9
at any moment leaves the previous checkpoints untouched; `load_latest` takes the newest folder whose
manifest matches its files and skips anything else. A failed save (disk full, permissions) removes its
temporary folder and raises CheckpointError.

`train_state.pt` holds only tensors, dicts, lists, tuples, numbers and strings, so it loads with
`torch.load(weights_only=True)` (no unpickling of arbitrary objects). With FSDP, gather full state dicts
on rank 0 (or use torch.distributed.checkpoint) before calling save_checkpoint from rank 0 only.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
STEP_RE = re.compile(r"step-(\d{8,})")

# Train-config fields a resumed run may change without invalidating its checkpoint.
RESUME_MAY_CHANGE = frozenset(
    {
        "max_steps", "time_budget_min", "out_dir", "device", "compile", "ckpt_every", "keep_last", "log_every",
        "eval", "price_per_device_hour", "currency", "watts_per_core", "peak_flops", "tokenizer.path",
        "eval_every", "data.eval_examples",  # (the eval section's old keys, in older checkpoints)
    }
)  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used; the message says which and why."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor] | None
    optimizer_state: Any = None
    scheduler_state: Any = None
    data_state: Any = None
    rng_state: dict[str, Any] | None = None
    train_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---- RNG states ---------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA when present) generator states, in weights_only-safe types."""
    version, py_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(py_state), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- saving -------------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU contiguous copies; safetensors refuses tensors sharing storage (tied embeddings)."""
    out, seen = {}, set()
    for name, t in state.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else None
        t = t.to("cpu").contiguous()
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: Any = None,
    scheduler_state: Any = None,
    data_state: Any = None,
    rng_state: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    write_files: Callable[[Path], None] | None = None,
    keep_last: int = 3,
    after_write: Callable[[str], None] | None = None,
) -> Path:
    """Write checkpoint `step` atomically into run_dir/step-XXXXXXXX and return its path.

    after_write: called with a label ("write_files", "model_state.safetensors", "train_state.pt",
    "manifest.json", "renamed") after each stage of the save; tests use it to fail or kill a save at a
    known point."""
    reached = after_write or (lambda label: None)
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create checkpoint folder {run_dir}: {exc.strerror}") from exc
    for stale in run_dir.glob(".tmp-step-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    try:
        tmp.mkdir()
        if write_files is not None:
            write_files(tmp)
            reached("write_files")
        if model_state is not None:
            save_file(_unshared(model_state), str(tmp / "model_state.safetensors"), metadata={"step": str(step)})
            reached("model_state.safetensors")
        train_state = {
            "format": FORMAT_VERSION,
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler_state,
            "data": data_state,
            "rng": rng_state,
            "extra": extra or {},
        }
        torch.save(train_state, tmp / "train_state.pt")
        reached("train_state.pt")
        _write_bytes(tmp / "train_config.json", (json.dumps(train_config, indent=2, sort_keys=True) + "\n").encode())
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                _fsync(p)
                files[str(p.relative_to(tmp))] = p.stat().st_size
        manifest = {"format": FORMAT_VERSION, "step": step, "files": files}
        _write_bytes(tmp / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
        _fsync(tmp)
        reached("manifest.json")
        if final.exists():  # re-saving a step: move the old one aside, never delete before the new is in place
            old = run_dir / f".trash-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync(run_dir)
        reached("renamed")
        _write_latest(run_dir, final.name)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        code = _io_errno(exc)
        if code is None:
            raise
        what = "the disk is full" if code in (errno.ENOSPC, errno.EDQUOT) else os.strerror(code)
        kept = [p.name for p in list_checkpoints(run_dir)]
        raise CheckpointError(
            f"could not save checkpoint step {step} in {run_dir}: {what} ({exc}); "
            f"existing checkpoints are intact: {', '.join(kept) if kept else 'none'}"
        ) from exc
    prune_checkpoints(run_dir, keep_last)
    return final


def _io_errno(exc: BaseException) -> int | None:
    """The OS error number behind a failed write: OSError's errno, or the "(os error N)" that
    safetensors' Rust writer puts in its SafetensorError message."""
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    m = re.search(r"os error (\d+)", str(exc))
    return int(m.group(1)) if m else None


def _write_latest(run_dir: Path, name: str) -> None:
    tmp = run_dir / f".latest.tmp-{os.getpid()}"
    _write_bytes(tmp, (name + "\n").encode())
    os.replace(tmp, run_dir / "latest")
    _fsync(run_dir)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete-looking checkpoint folders (step-* with a manifest), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_RE.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_RE.fullmatch(p.name).group(1)))


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (renamed away first, so no half-deleted folder
    ever looks like a checkpoint)."""
    run_dir = Path(run_dir)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        trash = run_dir / f".trash-{old.name}-{os.getpid()}"
        try:
            os.rename(old, trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
    for trash in run_dir.glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)


# ---- the model as a HF folder ----------------------------------------------------------------------------
def save_model(model: torch.nn.Module, tok: Any, folder: str | os.PathLike) -> Path:
    """A model (DeepSeek-V3 or a dense family) as a HF folder with its tokenizer: what nanoseek.load and
    transformers read. Every stage writes its final model, and every checkpoint its files, through this."""
    from nanoseek.weights.hf_folder import save_pretrained

    folder = Path(folder)
    save_pretrained(model, folder)
    tok.save(folder)
    return folder


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of a model's weights: a resume checks that a frozen model it rebuilds (GRPO's reference, a
    distillation teacher) is the one the run started with."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---- optimizer state --------------------------------------------------------------------------------------
# Saved keyed by parameter name (torch.distributed.checkpoint's full state dict): the same layout for one
# process, DDP and FSDP2, so a checkpoint of any of them resumes under any other.
def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, sharded: bool) -> Any:
    """The complete optimizer state (gathered from FSDP2's shards to the CPU when `sharded`: every rank calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Any) -> None:
    """Load what full_optimizer_state saved, or a state keyed by index (GRPO before the name-keyed layout)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if all(isinstance(i, int) for g in state["param_groups"] for i in g["params"]):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


# ---- loading ------------------------------------------------------------------------------------------
def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """None when the folder's files match its manifest, else the reason it is unusable."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (incomplete save)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"manifest.json is corrupt ({exc})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint folder not found")
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"{path}: not a usable checkpoint: {problem}")
    try:
        state = torch.load(path / "train_state.pt", map_location=map_location, weights_only=True)
        model_file = path / "model_state.safetensors"
        model_state = load_file(str(model_file), device=str(map_location)) if model_file.is_file() else None
        config = json.loads((path / "train_config.json").read_text())
    except Exception as exc:  # corrupt bytes surface as many exception types
        raise CheckpointError(f"{path}: not a usable checkpoint: {type(exc).__name__}: {exc}") from exc
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        model_state=model_state,
        optimizer_state=state.get("optimizer"),
        scheduler_state=state.get("scheduler"),
        data_state=state.get("data"),
        rng_state=state.get("rng"),
        train_config=config,
        extra=state.get("extra") or {},
    )


def load_latest(
    run_dir: str | os.PathLike,
    train_config: dict[str, Any] | None = None,
    may_change: frozenset[str] | set[str] = RESUME_MAY_CHANGE,
    map_location: str | torch.device = "cpu",
) -> Checkpoint | None:
    """The newest usable checkpoint in run_dir (None if there is none). Temporary and incomplete or
    corrupt folders are skipped with a warning. With `train_config`, a checkpoint whose saved config
    differs in a field outside `may_change` raises CheckpointError naming the field."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = load_checkpoint(path, map_location=map_location)
        except CheckpointError as exc:
            warnings.warn(f"skipping {exc}", stacklevel=2)
            continue
        if train_config is not None and ckpt.train_config is not None:
            check_config_match(ckpt.train_config, train_config, may_change, source=str(path))
        return ckpt
    return None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_config_match(
    saved: dict[str, Any], current: dict[str, Any], may_change: frozenset[str] | set[str] = RESUME_MAY_CHANGE,
    source: str = "checkpoint",
) -> None:  # fmt: skip
    """Raise CheckpointError on the first field (dotted name) that differs and may not change on resume."""
    a, b = _flatten(saved), _flatten(current)
    for key in sorted(set(a) | set(b)):
        if key in may_change or any(key.startswith(p + ".") for p in may_change):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            raise CheckpointError(
                f"{source}: checkpoint from a different config: field {key} is {a.get(key, '<absent>')!r}, "
                f"run has {b.get(key, '<absent>')!r} (use a new out_dir, or restore the setting)"
            )
