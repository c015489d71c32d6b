"""LoRA adapters: low-rank updates on a frozen model's linear layers (their PEFT folders: weights/peft_lora.py).

    cfg = LoRAConfig(rank=16, alpha=32, dropout=0.05)                 # target_modules [] = the family's defaults
    wrapped = apply_lora(model, cfg, seed=0)     # in place: targets become LoRALinear, everything else frozen
    pack_lora_bases(model)                        # (nanoseek.quant) base_format int4, QLoRA-style: the frozen
                                                  # base's forward on the 4-bit kernel (auto: if lossless)
    merge_lora(model)                             # in place: each LoRALinear back to a plain nn.Linear, W + s*BA

A LoRALinear computes base(x) + lora_B(lora_A(dropout(x))) * alpha/rank, as PEFT's lora.Linear does, with
PEFT's initialisation (lora_A kaiming-uniform with a=sqrt(5), lora_B zeros: the adapter starts as a no-op)
and PEFT's module names (base_layer, lora_A, lora_B), so the adapter's tensors are PEFT's without renaming.

Targets by default: the attention and MLP projections (q/k/v/o, gate/up/down) of the dense families; for
DeepSeek-V3 all of MLA's projections, its low-rank ones included (q_a_proj, q_b_proj or q_proj,
kv_a_proj_with_mqa, kv_b_proj, o_proj). DeepSeek-V3's dense-layer and shared-expert MLPs are wrapped when
asked for (lora.target_modules=[...,gate_proj,up_proj,down_proj]), not by default: peft (0.21.2 with
transformers 5) reads gate_proj/up_proj/down_proj of a deepseek_v3 model as its routed experts (its v4 -> v5
MoE conversion moves those names to the experts' fused parameters), so it would drop those parts of the
adapter with a warning and give other logits (measured: 0.07 apart on the tiny test model); nanoseek's own
loading and --merge apply them. Never wrapped: the routed experts (fused 3-D parameters, not linear layers),
the router, embeddings, head, and the MTP modules (transformers drops those, so an adapter for them would
load nowhere).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

DENSE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLA_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
EXCLUDED_PREFIXES = ("mtp.",)  # DeepSeek-V3's MTP modules: transformers does not build them


@dataclass
class LoRAConfig:
    """`--set lora.KEY=VALUE` keys. Defaults: rank 16 with alpha 32 (scale 2, the common PEFT/TRL setting),
    dropout 0: peft's LoraConfig default (lora_dropout=0.0 in peft 0.21.2) and what Unsloth recommends
    (`lora_dropout = 0, # Supports any, but = 0 is optimized` in its examples). Without a mask a LoRA SFT step
    of SmolLM2-135M on the CPU is ~13% shorter (benchmarks/RESULTS.md, "LoRA SFT vs full SFT"), and the slow
    SmolLM2 test learns its made-up fact with it; `--set lora.dropout=0.05` brings dropout back.

    base_format: what the frozen base's forward multiplies by. "fp32": x W^T in fp32. "int4" (QLoRA-style):
    each wrapped linear also keeps W packed on GGUF Q4_1's 4-bit grid (quant.int4_grid, as Int4Linear packs it)
    for nanoseek's 4-bit kernel, which computes the forward's x W^T faster than fp32 matmuls (SmolLM2-135M's
    shapes, 716 rows, 1 thread, AVX512-VNNI: 1.3-1.5x; a LoRA SFT step ~1.07x) but rounds the activations to
    int8 per block of 32 inputs (and fits W to the grid); the backward still takes the input's gradient from
    the fp32 W (straight through the rounding), and the adapter, its files and --merge are the same. Costs
    memory: the packed copies are 5 bits per weight (~1/6 of the fp32 base) beside it, never saved. Linears
    whose input size is not a multiple of 32 stay fp32; needs the kernel (AVX2) and the base in fp32 on the
    CPU. "auto" (default): int4 where it loses nothing of the weights, i.e. every wrapped weight is on the
    4-bit grid already (a 4-bit GGUF file's, such as SmolLM2's Q4_1: the base is 4-bit, as in QLoRA) and the
    kernel runs; fp32 otherwise (safetensors folders, 8-bit files, the GPU). On SmolLM2's Q4_1 the int4 base
    moves the first SFT loss by ~0.7% (the activations' rounding)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # module names (last path part); []: the defaults
    base_format: str = "auto"  # the frozen base's forward: "auto", "fp32" or "int4" (BASE_FORMATS; see above)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.target_modules if not t or "." in t]
        if bad:
            raise ValueError(f"lora.target_modules takes module names such as q_proj (no dots), got {bad}")
        if self.base_format not in BASE_FORMATS:
            raise ValueError(f"lora.base_format must be one of {', '.join(BASE_FORMATS)}, got {self.base_format!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BASE_FORMATS = ("auto", "fp32", "int4")
DROP_BITS = 15  # a dropout mask element compares 15 random bits with p's threshold (p quantized to 1/32768)


def keep_mask(like: torch.Tensor, drop_threshold: int) -> torch.Tensor:
    """A bool tensor shaped like `like`, each element True with probability 1 - drop_threshold / 2**15: four
    elements from each 64-bit draw of torch's generator (torch's bernoulli_ draws one a float, and on CPU it
    took 17% of a SmolLM2-135M LoRA SFT step; this mask costs about a third of it)."""
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_()  # [0, 2**63)
    lanes = words.view(torch.int16)[:n].view(like.shape)
    return (lanes & (2**DROP_BITS - 1)) >= drop_threshold


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trained low-rank update: base(x) + B(A(dropout(x))) * alpha/rank.

    Computed by lora_forward as base(x) + B(A(where(keep, x, 0)) * alpha/rank/(1-p)): the dropout's 1/(1-p)
    and the scaling are applied on the rank-r activations instead of the layer's input and output (the same
    numbers up to float rounding, two elementwise passes over wide tensors fewer), with keep_mask's cheaper
    mask (p is quantized to a multiple of 1/32768: 0.05 -> 0.049988)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scaling = rank, alpha / rank
        self.dropout = dropout
        self.drop_threshold = round(dropout * 2**DROP_BITS)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)
        # base_format int4: the frozen weight packed for the 4-bit kernel (quant.pack_lora_bases); not saved
        self.register_buffer("base_packed", None, persistent=False)

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """PEFT's init_lora_weights=True: A kaiming-uniform (a = sqrt(5)), B zeros."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_forward((self,), x)[0]

    def delta_weight(self) -> torch.Tensor:
        """(B @ A) * scaling, as PEFT's get_delta_weight computes it (so a merge gives PEFT's merged numbers)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + s*BA, for code that reads a projection's matrix instead of calling it (MLA's
        absorbed decoding reads kv_b_proj.weight): it then sees the adapter too."""
        return self.base_layer.weight + self.delta_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


# ---- the step: one autograd node per input ------------------------------------------------------------------
class SharedInputLoRA:
    """The LoRA layers that read one input (q/k/v: one normed hidden state; gate/up: another), computed together
    in the model's fused-projection slot (DenseAttention.qkv_proj, DenseMLP/SwiGLU.gate_up_proj, which take the
    tuple (q, k, v) / (gate, up) it returns): one autograd node, one dropout mask, the parts' A matrices
    stacked into one matmul. Not an nn.Module, so the model's parameters and state dict are unchanged (the
    parts stay registered under their own names); set by apply_lora, removed by merge_lora.

    One mask for the parts, where PEFT draws one per module: each part's update is still B(A(dropout(x)))
    with a mask of the same distribution (each element kept independently with probability 1 - p), so every
    module's update, and its expectation, is what PEFT's is; only the parts' masks are correlated in a step,
    as the parts' inputs already are (the same x). The model in eval mode (no dropout) is exactly PEFT's."""

    returns_parts = True  # what the model's slot checks (model/dense.py, model/moe.py)

    def __init__(self, parts: Sequence[LoRALinear]):
        self.parts = tuple(parts)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return lora_forward(self.parts, x)

    def __repr__(self) -> str:
        return f"SharedInputLoRA({len(self.parts)} parts)"


# (fused-projection slot the model reads, the projections it stands for, in output order: nanoseek.quant.FUSIONS)
SHARED_INPUT_SLOTS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))


def share_inputs(model: nn.Module) -> int:
    """Put a SharedInputLoRA in each empty fused-projection slot whose parts are all LoRA layers with the same
    bias setting; returns how many."""
    n = 0
    for module in model.modules():
        for slot, names in SHARED_INPUT_SLOTS:
            parts = [getattr(module, name, None) for name in names]
            if getattr(module, slot, 0) is None and all(isinstance(p, LoRALinear) for p in parts) and len(
                {p.base_layer.bias is None for p in parts}) == 1:  # fmt: skip
                setattr(module, slot, SharedInputLoRA(parts))
                n += 1
    return n


def unshare_inputs(model: nn.Module) -> None:
    for module in model.modules():
        for slot, _ in SHARED_INPUT_SLOTS:
            if isinstance(getattr(module, slot, None), SharedInputLoRA):
                setattr(module, slot, None)


def lora_forward(parts: Sequence[LoRALinear], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(part(x) for part in parts), the parts LoRA layers reading the same x (one mask for them: see
    SharedInputLoRA). With the base frozen (always, after apply_lora) one _FrozenBaseLoRA node; lora_reference
    otherwise."""
    first = parts[0]
    keep = keep_mask(x, first.drop_threshold) if first.training and first.drop_threshold > 0 else None
    scale = first.scaling / (1 - first.drop_threshold / 2**DROP_BITS) if keep is not None else first.scaling
    bases = [p.base_layer for p in parts]
    if any(t.requires_grad for b in bases for t in (b.weight, b.bias) if t is not None):
        return lora_reference(parts, x, keep, scale)
    lora = [p.lora_A.weight for p in parts] + [p.lora_B.weight for p in parts]
    packed = [p.base_packed for p in parts]
    return _FrozenBaseLoRA.apply(x, keep, scale, [b.weight for b in bases], [b.bias for b in bases], packed, *lora)


def lora_reference(parts: Sequence[LoRALinear], x: torch.Tensor, keep: torch.Tensor | None, scale: float):
    """What lora_forward computes, in plain autograd ops (the reference its tests compare the gradients with); the
    base in fp32 (a base that trains has no packed copy to read)."""
    xd = x if keep is None else torch.where(keep, x, 0.0)
    return tuple(p.base_layer(x) + p.lora_B(p.lora_A(xd) * scale) for p in parts)


class _FrozenBaseLoRA(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s (xd A_i^T) B_i^T for the parts i (one output each), xd = where(keep, x, 0),
    s = scaling/(1-p). Saves what the backward reads (xd, keep, h = s xd A^T of rank r per part, the weights)
    and computes no base-weight gradient: dx = sum_i dy_i W_i + where(keep, s (dy_i B_i) A_i, 0) accumulated in
    one buffer (addmm's beta = 1: no adds of their own), dB_i = dy_i^T h_i, and the parts' A stacked: one
    matmul for h in the forward, one for their dA = (s dy B)^T xd and one for dx's LoRA term in the backward.
    Autograd's graph of the same ops keeps a node per op, and adds up the projections' input gradients pass
    by pass (measured: one q/k/v or gate/up group's forward + backward 5-10% shorter than as one output that
    the model splits, whose backward concatenates the parts' gradients).

    A part with a packed 4-bit copy of W (lora.base_format=int4: packed[i] not None) computes x W_i^T + b_i with
    the 4-bit kernel instead (activations rounded to int8 per block of 32); the backward is the same, dx from
    the fp32 W_i: the rounding is passed straight through."""

    @staticmethod
    def forward(ctx, x, keep, scale, weights, biases, packed, *lora):
        n = len(weights)
        As, Bs = lora[:n], lora[n:]
        x2 = x.reshape(-1, x.shape[-1])
        xd = x2 if keep is None else torch.where(keep.view(x2.shape), x2, 0.0)
        A = As[0] if n == 1 else torch.cat(As)
        h = (xd @ A.t()).mul_(scale)  # [N, n*r]
        outs, r = [], 0
        for W, b, P, B in zip(weights, biases, packed, Bs):
            if P is not None:
                y = torch.ops.nanoseek.q4_linear.default(x2, P, W.shape[0], b)
            else:
                y = x2 @ W.t() if b is None else torch.addmm(b, x2, W.t())
            y.addmm_(h[:, r : r + B.shape[1]], B.t())  # + the LoRA term in place: no pass of its own
            r += B.shape[1]
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.scale, ctx.n, ctx.x_shape = scale, n, x.shape
        ctx.save_for_backward(xd, keep, h, A, *Bs, *weights)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.n
        xd, keep, h, A, *rest = ctx.saved_tensors
        Bs, weights = rest[:n], rest[n:]
        gys, gBs, ghs, r = [], [], [], 0
        for g, B in zip(grads, Bs):
            if g is None:  # an output the loss does not read
                g = h.new_zeros(xd.shape[0], B.shape[0])
            g = g.reshape(-1, g.shape[-1])
            gys.append(g)
            gBs.append(g.t() @ h[:, r : r + B.shape[1]])
            ghs.append(g @ B)
            r += B.shape[1]
        gh = (ghs[0] if n == 1 else torch.cat(ghs, dim=1)).mul_(ctx.scale)  # [N, n*r]
        gA = gh.t() @ xd
        gAs = gA.split([B.shape[1] for B in Bs]) if n > 1 else (gA,)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gys[0] @ weights[0]
            for g, W in zip(gys[1:], weights[1:]):
                gx.addmm_(g, W)
            if keep is None:
                gx.addmm_(gh, A)
            else:
                gx.addcmul_(gh @ A, keep.view(gx.shape))
            gx = gx.view(ctx.x_shape)
        return gx, None, None, None, None, None, *gAs, *gBs


# ---- wrapping ---------------------------------------------------------------------------------------------
def default_targets(model: nn.Module) -> tuple[str, ...]:
    from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM

    return MLA_TARGETS if isinstance(model, DeepseekV3ForCausalLM) else DENSE_TARGETS


def peft_would_drop(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The targets peft would not apply on the transformers model (see the module docstring): DeepSeek-V3's MLP
    names, which peft maps to the routed experts under transformers 5."""
    from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM

    return [t for t in targets if t in MLP_TARGETS] if isinstance(model, DeepseekV3ForCausalLM) else []


def find_targets(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Paths of the nn.Linear modules whose last path part is one of `names` (PEFT's match for plain names),
    outside the MTP modules. Raises ValueError for a name that matches no linear layer."""
    paths, seen = [], set()
    for path, module in model.named_modules():
        last = path.rsplit(".", 1)[-1]
        if last in names and not path.startswith(EXCLUDED_PREFIXES):
            if type(module) is not nn.Linear:
                raise ValueError(
                    f"lora.target_modules: {path} is a {type(module).__name__}, not a linear layer "
                    f"(LoRA wraps nn.Linear only)"
                )
            paths.append(path)
            seen.add(last)
    missing = [n for n in names if n not in seen]
    if missing:
        linear = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if type(m) is nn.Linear})
        raise ValueError(
            f"lora.target_modules: {', '.join(map(repr, missing))} match(es) no linear layer of this "
            f"{type(model).__name__}; its linear layers are named {', '.join(linear)}"
        )
    return paths


def resolved_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """The target names this model has: cfg.target_modules, or those of the defaults that it has."""
    if cfg.target_modules:
        return list(cfg.target_modules)
    names = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if type(m) is nn.Linear and not p.startswith(
        EXCLUDED_PREFIXES)}  # fmt: skip
    return [n for n in default_targets(model) if n in names]


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Wrap the target linears in place with LoRALinear (A seeded, in module order), freeze every other
    parameter; returns the wrapped modules' paths. base_format int4 then needs quant.pack_lora_bases (model/ does
    not import quant: training calls it)."""
    cfg.validate()
    paths = find_targets(model, resolved_targets(model, cfg))
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        layer = LoRALinear(getattr(parent, name), cfg.rank, cfg.alpha, cfg.dropout)
        layer.reset_lora(gen)
        setattr(parent, name, layer)
    share_inputs(model)
    return paths


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_param_count(model: nn.Module) -> int:
    return sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in lora_modules(model).values())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under nanoseek's (= transformers') module paths: `<path>.lora_A.weight`, ..."""
    out = {}
    for path, m in lora_modules(model).items():
        out[f"{path}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{path}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy `state` (adapter_state_dict's keys) into the model's LoRALinear modules; every key must match."""
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: the adapter does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for path, m in lora_modules(model).items():
            for part in ("lora_A", "lora_B"):
                t = state[f"{path}.{part}.weight"]
                w = getattr(m, part).weight
                if t.shape != w.shape:
                    raise ValueError(f"{source}: {path}.{part}.weight has shape {tuple(t.shape)}, the model "
                                     f"needs {tuple(w.shape)}")  # fmt: skip
                w.copy_(t)


def merge_lora(model: nn.Module) -> nn.Module:
    """In place: every LoRALinear becomes its base nn.Linear with weight W + (B @ A) * scaling (PEFT's merge);
    returns the model, a plain one again (save_pretrained writes it as a full HF folder)."""
    unshare_inputs(model)
    for path, m in lora_modules(model).items():
        parent_path, _, name = path.rpartition(".")
        base = m.base_layer
        with torch.no_grad():
            base.weight.add_(m.delta_weight().to(base.weight.dtype))
        setattr(model.get_submodule(parent_path), name, base)
    return model
