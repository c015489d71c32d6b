"""Reading and writing HF-style safetensors folders, with errors that name the file and the problem.

A folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensors are read lazily (mmap through `safe_open`), so a model loads
without holding two copies of its weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class WeightsError(ValueError):
    """Weights that cannot be loaded: missing, mis-shaped, corrupt. The message names file and tensor."""


def read_config_json(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such file or directory")
    if not folder.is_dir():
        raise WeightsError(f"{folder}: expected a model folder (config.json + *.safetensors) or a .gguf file")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing; a model folder needs config.json")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{cfg_path}: expected a JSON object")
    return data


class SafetensorsReader(Mapping[str, torch.Tensor]):
    """A read-only mapping name -> tensor over one or many safetensors files in a folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        files: list[Path]
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise WeightsError(f"{index}: not a valid safetensors index ({exc})") from exc
            files = sorted({self.folder / f for f in weight_map.values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.folder}: no *.safetensors weights found")
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: listed in the safetensors index but missing")
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
                keys = list(handle.keys())
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise WeightsError(f"{f}: corrupt or unreadable safetensors file ({exc})") from exc
            self._handles[f] = handle
            for k in keys:
                self._where[k] = f

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise WeightsError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        f = self._where[name]
        try:
            return self._handles[f].get_tensor(name)
        except Exception as exc:
            raise WeightsError(f"{f}: tensor {name!r} could not be read ({exc})") from exc

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], source: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise WeightsError(
            f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects {tuple(expected)}"
        )


def save_safetensors_folder(
    folder: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict,
    *,
    max_shard_bytes: int = 4 << 30,
) -> None:
    """Write config.json + model.safetensors (sharded with an index when over max_shard_bytes).

    Each file is written to a temporary name and renamed, so a crash never leaves a half-written file
    under the final name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        _atomic_save(shards[0], folder / "model.safetensors", meta)
        stale_index = folder / "model.safetensors.index.json"
        if stale_index.exists():
            stale_index.unlink()
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, folder / fname, meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _atomic_write_text(
            folder / "model.safetensors.index.json",
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2),
        )
    _atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
