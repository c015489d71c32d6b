"""Quantized weights for CPU inference: every eligible nn.Linear swapped for a module that keeps its weight
in a compact run format, applied to a built model from outside, so the model code knows nothing of it.

    quantize_model(model, "int8")   # int8 weights (a scale per output row), int8 activations (a scale per row)
    quantize_model(model, "fp16")   # fp16 weights packed for fbgemm, fp32 math
    nanoseek.load("x.gguf", quant="int8")  # the same, packed while loading: no fp32 copy of the whole model

Kernels, measured on the 2-core AVX2 development machine (SmolLM2-135M shapes, µs per call, one token):
fp32 `F.linear` 51-103 (lm_head 576->49152: 7,400); fbgemm fp16 26-39 (780); `torch._int_mm` int8 x int8
-> int32 6-14 (280). torch's weight-only `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` were 5-10x
slower than fp32 here, and fbgemm's dynamic int8 picks one activation scale for the whole call, so a row's
numbers would depend on the other rows of the batch: neither is used.

Both modes are batch invariant: a request gets the same tokens alone or in any batch.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.memory import return_freed_memory

MODES = ("int8", "fp16")


class Int8Linear(nn.Module):
    """int8 weights (one scale per output row) times int8 activations (one scale per input row), int32
    accumulation in `torch._int_mm`, rescaled to fp32. Each row's activation scale is its own, so a row's
    result never depends on the other rows of the batch."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        # [in, out], column-major: the layout _int_mm's CPU kernel is fastest with (measured 3x on lm_head)
        self.register_buffer("qweight_t", torch.round(w / scale[:, None]).to(torch.int8).t())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        x_scale = (rows.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
        x_q = torch.round(rows / x_scale).to(torch.int8)
        out = torch._int_mm(x_q, self.qweight_t).float() * (x_scale * self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)


# fbgemm's PackedGemmMatrixFP16 stores the input dimension in blocks of 512 rows, padded: a 576-wide
# input takes 1024 rows (measured with mallinfo2 on SmolLM2's shapes: 1.78x the fp16 bytes for in=576,
# 1.00x for in=1536).
FP16_BLOCK_ROWS = 512


class Fp16Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        bias = None if bias is None else bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), bias)
        self.out_features, self.in_features = weight.shape
        self._has_bias = bias is not None

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed weight as fbgemm holds it (its input dimension padded to 512-row blocks)."""
        rows = -(-self.in_features // FP16_BLOCK_ROWS) * FP16_BLOCK_ROWS
        return 2 * rows * self.out_features + (4 * self.out_features if self._has_bias else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, shape[-1]).float(), self._packed)
        return out.view(*shape[:-1], self.out_features)


# Linears whose weight the model reads directly (MLA folds kv_b_proj into queries and outputs): kept as is.
KEEP = ("kv_b_proj",)


def _concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output is the given linears' outputs side by side."""
    first = linears[0]
    out_features = sum(m.out_features for m in linears)
    w = first.weight  # on the meta device (packing while loading) nothing is allocated
    fused = nn.Linear(first.in_features, out_features, bias=first.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused


# (fused attribute the model reads, the projections it replaces, in output order)
FUSIONS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))


def fuse_projections(model: nn.Module) -> nn.Module:
    """For inference: wherever a module offers a fused projection slot (DenseAttention.qkv_proj,
    DenseMLP/SwiGLU.gate_up_proj), put one linear there in place of the projections it stands for. One
    matmul instead of two or three, and, quantized, one activation quantization of their shared input.
    The model then has no q/k/v (gate/up) parameters of its own: it is for inference only."""
    for module in model.modules():
        for fused_name, names in FUSIONS:
            parts = [getattr(module, n, None) for n in names]
            if hasattr(module, fused_name) and all(type(p) is nn.Linear for p in parts):
                setattr(module, fused_name, _concat_linears(parts))
                for n in names:
                    delattr(module, n)
    return model


def packed_linear(mode: str):
    """`(weight [out, in], bias | None) -> module` for `mode`, after checking the mode fits this machine."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "fp16" and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("fp16 weights need fbgemm (x86 CPUs); use int8")
    return Int8Linear if mode == "int8" else Fp16Linear


def quantizable_linears(model: nn.Module) -> list[tuple[nn.Module, str, tuple[str, ...]]]:
    """(parent module, attribute, the HF-named projections it stands for) for every nn.Linear to pack, after
    `fuse_projections`: a fused qkv_proj stands for (q_proj, k_proj, v_proj), a plain linear for itself."""
    parts_of = dict(FUSIONS)
    return [
        (module, name, parts_of.get(name, (name,)))
        for module in model.modules()
        for name, child in module.named_children()
        if type(child) is nn.Linear and name not in KEEP
    ]


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Swap the model's nn.Linear modules (in place) for `mode`'s packed form. CPU only; returns the model."""
    make = packed_linear(mode)
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("quantize_model is for CPU inference; the model is not on the CPU")
    fuse_projections(model)
    for module, name, _ in quantizable_linears(model):
        child = getattr(module, name)
        setattr(module, name, make(child.weight, child.bias))
    model.quantization = mode
    return_freed_memory()  # the replaced fp32 weights (measured: 1,294 MB -> 896 MB for SmolLM2 in fp16)
    return model


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights in their run format (packed linears count at the size their kernel holds)."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.in_features * m.out_features + 8 * m.out_features
        elif isinstance(m, Fp16Linear):
            total += m.packed_bytes
        else:
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total
