"""LoRA adapters served beside their base model, several in one batch: each row of a forward runs its own
adapter, or none.

    adapters = attach_lora(model, {"math": math_modules, "chat": chat_modules})   # module name -> (A, B, scale)
    with adapters.rows(["math", None, "chat"]):        # row i of the next forwards runs that adapter
        logits = model(ids)
    Engine(model).generate(prompts, SamplingParams(lora="math"))                     # per request in the engine

(`nanoseek.load(path, lora={"math": "adapter-folder"})` reads PEFT folders and attaches them.)

Every linear an adapter targets is wrapped in a `LoraLinear`: y = base(x), then for each adapter present in the
batch, its rows get y[rows] += (x[rows] A^T) B^T (the scale folded into B), in fp32, over whatever the base is
(fp32, int8, int4, fp16 weights): S-LoRA / punica's segmented form, a loop over the distinct adapters of the
batch, each gathering its rows. A forward whose rows all run the base (`groups` None) calls the base alone,
and a model without adapters has no wrapper at all.

Projections the run format fused (q/k/v into qkv_proj, gate/up into gate_up_proj: nanoseek.quant) get one
wrapper: the parts' A matrices stacked, their B matrices block-diagonal, so a part the adapter does not
target gets exactly 0.

Batch invariance: a row's delta must not depend on the other rows, which a plain fp32 matmul does not give
(MKL's sgemm sums a row in another order for another number of rows: measured, e.g. 576 inputs -> rank 16
differs from 16 rows on, and one row takes a gemv path of its own). So every matmul here has one fixed shape:
rows go through in tiles of TILE, the last one zero-padded, and with the shape fixed the BLAS takes one code
path, where a row's result was measured to depend on its own values only (not on its tile-mates or its place
in the tile: tests/test_serve_lora.py checks it bitwise on the shapes, and the engine's tokens alone and in
mixed batches). The add into the base output is one fp32 addition per value. With int8 / int4 bases,
which are bitwise batch-invariant themselves (nanoseek/quant), a request's logits are then the same bit for
bit alone or beside other adapters' rows.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

TILE = 8  # rows per matmul call (see the module docstring)

# fused projection -> its parts in output order (nanoseek.quant.FUSIONS)
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PART_OF = {part: (fused, i) for fused, parts in FUSED_PARTS.items() for i, part in enumerate(parts)}


def _tiled_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, k] @ w.T ([n, k]) -> [N, n], every matmul on a [TILE, k] block (zero-padded)."""
    n_rows = x.shape[0]
    pad = (-n_rows) % TILE
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    wt = w.t()
    if x.shape[0] == TILE:
        return (x @ wt)[:n_rows]
    return torch.cat([x[i : i + TILE] @ wt for i in range(0, x.shape[0], TILE)])[:n_rows]


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(x A^T) B^T in fp32 for x [..., in], a [r, in], b [out, r]; each row's value independent of the others."""
    rows = x.reshape(-1, x.shape[-1]).float()
    return _tiled_mm(_tiled_mm(rows, a), b).view(*x.shape[:-1], b.shape[0])


class LoraAdapters:
    """The adapters attached to a model: their names (id i + 1 is names[i]; 0 is the base) and which adapter
    each row of the forwards in progress on this thread runs (`groups`: (adapter id, row indices) per adapter
    present, or None when every row runs the base)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.paths: dict[str, str] = {}  # where each adapter came from (for listings)
        # per thread: the server scores prompts (serve/prompt_logprobs.py) on a worker thread beside the
        # engine's steps, and neither may see the other's rows
        self._local = threading.local()

    @property
    def groups(self) -> list[tuple[int, torch.Tensor]] | None:
        return getattr(self._local, "groups", None)

    def id_of(self, name: str | None) -> int:
        """0 for None (the base), else the adapter's id; ValueError for a name not attached."""
        if name is None:
            return 0
        if name not in self.names:
            known = ", ".join(map(repr, self.names)) or "none"
            raise ValueError(f"unknown LoRA adapter {name!r} (attached: {known})")
        return self.names.index(name) + 1

    @contextlib.contextmanager
    def rows(self, adapters: Sequence[str | int | None], device: torch.device | str = "cpu") -> Iterator[None]:
        """Row i of the forwards inside runs adapters[i] (a name, an id, or None / 0 for the base)."""
        ids = [a if isinstance(a, int) else self.id_of(a) for a in adapters]
        previous = self.groups
        self._local.groups = groups_of(ids, device)
        try:
            yield
        finally:
            self._local.groups = previous


def groups_of(ids: Sequence[int], device: torch.device | str = "cpu") -> list[tuple[int, torch.Tensor]] | None:
    """(adapter id, its rows) for every adapter in `ids` but the base (0), in id order; None if there is none."""
    rows: dict[int, list[int]] = {}
    for i, a in enumerate(ids):
        if a:
            rows.setdefault(a, []).append(i)
    if not rows:
        return None
    return [(a, torch.tensor(rows[a], dtype=torch.long, device=device)) for a in sorted(rows)]


class LoraLinear(nn.Module):
    """A linear (nn.Linear or a packed one) plus, per adapter id, its low-rank update: a [R, in] and b [out, R]
    (scale folded in). The base is a child module, so the model's parameters and buffers are unchanged."""

    def __init__(self, base: nn.Module, adapters: LoraAdapters):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        object.__setattr__(self, "adapters", adapters)  # shared by every wrapper; not a submodule
        self.a: dict[int, torch.Tensor] = {}
        self.b: dict[int, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        groups = self.adapters.groups
        if groups is None:
            return y
        for adapter, rows in groups:
            a = self.a.get(adapter)
            if a is not None:
                delta = lora_delta(x.index_select(0, rows), a, self.b[adapter])
                y = y.index_add(0, rows, delta.to(y.dtype))
        return y


@dataclass
class _Update:
    offset: int  # first output of the part it updates (fused projections)
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [part outputs, r], scale folded in


def _part_sizes(parent: nn.Module, fused: str, total: int) -> list[int]:
    """Output sizes of a fused projection's parts, in order."""
    if fused == "qkv_proj":
        q, kv = parent.n_heads * parent.head_dim, parent.n_kv * parent.head_dim
        return [q, kv, kv]
    return [total // 2, total // 2]


def _target(model: nn.Module, name: str) -> tuple[nn.Module, str, int, int] | None:
    """(parent, attribute, output offset, output size) of the module the model runs for the transformers module
    `name` (a part of a fused projection where the run format fused it), or None when there is none."""
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None
    child = getattr(parent, attr, None)
    if isinstance(child, nn.Module) and hasattr(child, "in_features"):
        return parent, attr, 0, child.out_features
    if attr in PART_OF:
        fused, i = PART_OF[attr]
        module = getattr(parent, fused, None)
        if isinstance(module, nn.Module) and hasattr(module, "in_features"):
            sizes = _part_sizes(parent, fused, module.out_features)
            return parent, fused, sum(sizes[:i]), sizes[i]
    return None


def attach_lora(
    model: nn.Module,
    adapters: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]],
    sources: Mapping[str, str] | None = None,
) -> LoraAdapters:
    """Attach adapters to a (dense) model: name -> {transformers module name -> (A [r, in], B [out, r], scale)}.
    Call it after quantizing (the wrappers hold the packed linears). Every adapter is checked against the
    model before anything changes: a module the model does not have, or shapes that differ from the base's,
    raise ValueError naming the adapter, the module and both shapes. Returns the model's LoraAdapters (also
    `model.lora_adapters`); attaching again adds to them."""
    if hasattr(model.config, "kv_lora_rank"):
        raise ValueError("LoRA adapters are served on the dense families (llama, mistral, qwen2, gemma), not on "
                         "DeepSeek's MLA models")  # fmt: skip
    registry: LoraAdapters = getattr(model, "lora_adapters", None) or LoraAdapters()
    sources = dict(sources or {})
    device = next(model.parameters()).device
    plan: dict[tuple[int, str], list[tuple[str, _Update]]] = {}  # (id(parent), attribute) -> updates
    parents: dict[tuple[int, str], nn.Module] = {}
    for name, modules in adapters.items():
        where = f"LoRA adapter {name!r}" + (f" ({sources[name]})" if name in sources else "")
        if name in registry.names:
            raise ValueError(f"{where}: an adapter of that name is attached already")
        for module, (a, b, scale) in modules.items():
            found = _target(model, module)
            if found is None:
                raise ValueError(f"{where}: it targets {module!r}, which this model does not have: the adapter was "
                                 "trained for another architecture")  # fmt: skip
            parent, attr, out_offset, out_size = found
            linear = getattr(parent, attr)
            base = linear.base if isinstance(linear, LoraLinear) else linear
            if a.shape[1] != base.in_features or b.shape[0] != out_size:
                raise ValueError(
                    f"{where}: {module} maps {a.shape[1]} -> {b.shape[0]} features, the base model's {base.in_features}"
                    f" -> {out_size}: the adapter was trained for another base model"
                )
            key = (id(parent), attr)
            parents[key] = parent
            update = _Update(out_offset, a.float().to(device), (b.float() * scale).to(device))
            plan.setdefault(key, []).append((name, update))
    for name in adapters:
        registry.names.append(name)
        if name in sources:
            registry.paths[name] = sources[name]
    for key, updates in plan.items():
        parent, attr = parents[key], key[1]
        wrapper = getattr(parent, attr)
        if not isinstance(wrapper, LoraLinear):
            wrapper = LoraLinear(wrapper, registry)
            setattr(parent, attr, wrapper)
        for name in dict.fromkeys(n for n, _ in updates):
            parts = [u for n, u in updates if n == name]
            a = torch.cat([u.a for u in parts])
            b = torch.zeros(wrapper.out_features, a.shape[0], device=device)
            col = 0
            for u in parts:  # block-diagonal: each part's outputs read its own rank columns
                b[u.offset : u.offset + u.b.shape[0], col : col + u.a.shape[0]] = u.b
                col += u.a.shape[0]
            adapter_id = registry.id_of(name)
            wrapper.a[adapter_id], wrapper.b[adapter_id] = a.contiguous(), b
    model.lora_adapters = registry
    return registry
