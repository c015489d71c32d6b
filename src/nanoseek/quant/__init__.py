"""Quantized weights for CPU inference: every eligible nn.Linear swapped for a module that keeps its weight
in a compact run format, applied to a built model from outside, so the model code knows nothing of it.

    quantize_model(model, "int8")   # int8 weights (a scale per output row), int8 activations (a scale per row)
    quantize_model(model, "int4")   # GGUF Q4_1's grid (groups of 32), int8 activations; AVX2 or AVX512-VNNI
    quantize_model(model, "fp16")   # fp16 weights packed for fbgemm, fp32 math
    nanoseek.load("x.gguf", quant="int8")  # the same, packed while loading: no fp32 copy of the whole model

Kernels, measured on the 2-core development machine (SmolLM2-135M shapes, µs per call, one token):
fp32 `F.linear` 51-103 (lm_head 576->49152: 7,400); fbgemm fp16 26-39 (780); `torch._int_mm` int8 x int8
-> int32 6-14 (280), weights in cache. fbgemm's dynamic int8 picks one activation scale for the whole call,
so a row's numbers would depend on the other rows of the batch: not used.

4-bit runs on nanoseek's own kernel (quant/q4_kernel.py, native/csrc/q4_linear.cpp): the Q4_1 grid times int8
activations in integer dot products, as llama.cpp runs Q4 files: AVX512-VNNI where the CPU has it (this one,
an AMD EPYC, has, although AVX2 was all the project guide promised), else AVX2, with the same bits. What torch
offers was measured first (benchmarks/int4_kernels.py) and left: `_weight_int4pack_mm_for_cpu` is fast only
with bf16 activations (fp32 takes a scalar path) and, even then, bound by converting nibbles to bf16, so a
compiled SmolLM2 token decoded only 0-5% faster than int8 although it reads half the bytes; torchao's x86 int4
layout calls the same kernel; inductor's code for the grid as plain torch ops was no faster;
`_dyn_quant_matmul_4bit` is a reference fallback on x86. SmolLM2's 120 layer linears for one token, eager, 2
threads, weights from memory (medians of 15 alternating rounds): int8 `_int_mm` 5.98 ms, torch's int4 kernel
4.33, nanoseek's 3.01; for 16 rows 13.8 / 13.6 / 10.0. A large matrix streams at 33 GB/s with 2 threads (19
with one). A GGUF's 4-bit weights are packed from the file's own blocks (weights/gguf_grid.py; Q4_0 and Q4_1
exactly, Q4_K's sub-block scales rounded to fp16), and `int4_grid`, which fits the grid to other weights, also
recovers a Q4_0 or Q4_1 tensor's fp16 scales exactly (SmolLM2's Q4_1: max difference 0). Rounding activations
to int8 per block of 32 costs ~5e-3 relative error per linear on random data (the block offsets multiply the
sum of the rounded activations, as llama.cpp's Q8_1 blocks do; the unrounded sum had doubled it); on
SmolLM2 Q4_1 (`nanoseek bench quality`, one 512-token chunk) int4 is 0.0025 nats of mean KL from the fp32 model
of the file's weights, llama.cpp's run of the file 0.0026, int8 0.0334.
lm_head stays 8-bit in int4 mode, in Q8_0's blocks of 32 (INT8_IN_INT4, Int8BlockLinear).

Every mode quantizes each row's activations on its own, and computes each row in an order that does not depend
on the number of rows (int8: exact integer products; int4's kernel: one fixed order; fbgemm's fp16: measured),
so a row's numbers do not depend on the rest of the batch, bit for bit. With the paged attention kernel
(engine/paged_attention.py, dense models on CPU), which computes every query, in decodes and prompt chunks
alike, from its own keys in one fixed order, a greedy request's tokens are the same alone, in any batch and
whatever its prompt chunks (tests/test_batch_invariance.py). Where attention runs SDPA over padded rows
(DeepSeek's MLA, Gemma 2's soft-capping, or where the kernel cannot be built) it rounds differently from a lone
row's in the last bit, and with int8 activations that can pick the other token at a near tie
(tests/test_engine.py measured one at 0.011 nats on a random model). fp32 weights (MKL's sgemm) sum a row in
an order that changes with the number of rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nanoseek.memory import return_freed_memory

MODES = ("int8", "int4", "fp16")


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `weight` as int8 with one fp32 scale (its largest |w| / 127): q [rows, cols], scale [rows]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).to(torch.int8), scale


class Int8Embedding(nn.Module):
    """The token embedding as int8 rows with one scale each, looked up and scaled to fp32. In the int8 and int4
    run formats, where lm_head is int8: a model whose output matrix is its embedding (tied) keeps one int8
    matrix for both, sharing the lm_head's buffers, where the fp32 table used to stay beside it (SmolLM2-135M:
    113 MB of fp32 + 28 MB of int8 -> 28 MB; Gemma 3 270M: 671 + 168 -> 168 MB)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)  # [vocab, hidden] int8
        self.register_buffer("scale", scale)  # [vocab] fp32
        self.num_embeddings, self.embedding_dim = qweight.shape

    @classmethod
    def of(cls, weight: torch.Tensor) -> Int8Embedding:
        return cls(*int8_rows(weight))

    @classmethod
    def sharing(cls, head: Int8Linear) -> Int8Embedding:
        """The embedding of a tied model, over its int8 lm_head's own rows (the same numbers int8_rows gives)."""
        return cls(head.qweight_t.t(), head.scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)


def pack_embedding(model: nn.Module, mode: str, read_weight: Callable[[], torch.Tensor] | None = None) -> bool:
    """int8/int4 (lm_head int8): replace the model's token embedding by an Int8Embedding, sharing a tied
    lm_head's int8 rows. read_weight: gives the embedding matrix when the model holds none yet (packing while
    loading), called only for an untied model. Returns whether it did."""
    if mode not in ("int8", "int4"):
        return False
    inner, head = model.model, getattr(model, "lm_head", None)
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(head, Int8Linear):
        inner.embed_tokens = Int8Embedding.sharing(head)
    else:
        inner.embed_tokens = Int8Embedding.of(inner.embed_tokens.weight if read_weight is None else read_weight())
    return True


class Int8Linear(nn.Module):
    """int8 weights (one scale per output row) times int8 activations (one scale per input row), int32
    accumulation in `torch._int_mm`, rescaled to fp32. Each row's activation scale is its own, so a row's
    result never depends on the other rows of the batch."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        q, scale = int8_rows(weight)
        # [in, out], column-major: the layout _int_mm's CPU kernel is fastest with (measured 3x on lm_head)
        self.register_buffer("qweight_t", q.t())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        x_scale = (rows.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
        x_q = torch.round(rows / x_scale).to(torch.int8)
        # scaled in place: for a batch of 64 rows the lm_head's outputs are 12.6 MB each (SmolLM2), and a
        # third copy of them raised the generation's peak
        out = torch._int_mm(x_q, self.qweight_t).float().mul_(x_scale * self.scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*shape[:-1], self.out_features)


# GGUF Q4_0/Q4_1's block size: the kernel wants the input size divisible by it
INT4_GROUP = 32


def _fit_grid(groups: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
    """q for the fp16 grid (d, m) of each group, and the group's largest |d * q + m - w|."""
    safe_d = torch.where(d == 0, torch.ones_like(d), d).float()[..., None]
    q = torch.round((groups - m.float()[..., None]) / safe_d).clamp(0, 15)
    error = (q * d.float()[..., None] + m.float()[..., None] - groups).abs().amax(-1)
    return q, error


def int4_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit weights in groups of 32 inputs: w ~ d * q + m with q in 0..15 and an fp16 d and m per group
    (GGUF Q4_1's grid). Each group takes the better (by largest error) of two fits:
    - Q4_1's own: m = min, d = (max - min) / 15 (a Q4_1 file's weights come back exactly);
    - Q4_0's: w = d * (q - 8) with the largest-magnitude weight at q = 0, so d = -that weight / 8 and
      m = -8 d (a Q4_0 file's weights come back exactly; its groups need not span q = 0..15).
    Returns q [out, in] uint8, d and m [out, in / 32] fp16; q is rounded against the fp16 d and m."""
    groups = weight.detach().float().view(weight.shape[0], -1, INT4_GROUP)
    m1 = groups.amin(-1).half()
    d1 = ((groups.amax(-1) - m1.float()) / 15).half()
    q1, error1 = _fit_grid(groups, d1, m1)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]
    d0 = (-extreme / 8).half()
    m0 = -8 * d0  # exact in fp16
    q0, error0 = _fit_grid(groups, d0, m0)
    q4_0 = error0 < error1
    q = torch.where(q4_0[..., None], q0, q1)
    d, m = torch.where(q4_0, d0, d1), torch.where(q4_0, m0, m1)
    return q.view(weight.shape).to(torch.uint8), d, m


def int4_dequantize(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The fp32 weight that `int4_grid`'s output stands for: what Int4Linear multiplies by."""
    groups = q.view(q.shape[0], -1, INT4_GROUP).float() * d.float()[..., None] + m.float()[..., None]
    return groups.view(q.shape)


def int4_kernel_available() -> bool:
    from nanoseek.quant import q4_kernel

    return q4_kernel.available()


def require_int4_kernel() -> None:
    """A ValueError saying why int4 cannot run on this machine: it needs nanoseek's kernel (AVX2, a compiler)."""
    from nanoseek.quant import q4_kernel

    if reason := q4_kernel.unavailable_reason():
        raise ValueError(f"int4 weights cannot run here: {reason}; use int8")


class Int4Linear(nn.Module):
    """4-bit weights in GGUF Q4_1's grid (`int4_grid`) run by nanoseek's kernel (quant/q4_kernel.py):
    activations rounded to int8 per block of 32 inputs, integer dot products, as llama.cpp runs Q4 files.
    Each row is quantized and computed on its own: a row's result never depends on the rest of the batch."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, grid=None):
        """grid: (q, d, m) already on the grid (a GGUF file's 4-bit blocks, weights/gguf_grid.py), in place of
        fitting one to `weight`, which may then be None."""
        super().__init__()
        from nanoseek.quant import q4_kernel

        self.out_features, self.in_features = (weight if grid is None else grid[0]).shape
        if self.in_features % INT4_GROUP:
            raise ValueError(f"int4 weights need the input size divisible by {INT4_GROUP}, got {self.in_features}")
        require_int4_kernel()
        self.register_buffer("packed", q4_kernel.pack(*(int4_grid(weight) if grid is None else grid)))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one op for the reshapes, the dtype and the bias: a decode step makes ~120 of these calls, and each
        # dispatch from Python costs about a microsecond
        return torch.ops.nanoseek.q4_linear.default(x, self.packed, self.out_features, self.bias)


def int8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit weights in groups of 32 inputs, GGUF Q8_0's grid: w ~ d * q with q in -127..127 and an fp16 d per
    group (the largest |w| / 127, as Q8_0 rounds it), q rounded against the fp16 d: a Q8_0 file's weights come
    back exactly (SmolLM2's token embedding: max difference 0). Returns q [out, in] int8, d [out, in / 32]
    fp16."""
    groups = weight.detach().float().view(weight.shape[0], -1, INT4_GROUP)
    d = (groups.abs().amax(-1) / 127).half()
    safe = torch.where(d == 0, torch.ones_like(d), d).float()[..., None]
    q = torch.round(groups / safe).clamp(-127, 127)
    return q.view(weight.shape).to(torch.int8), d


def int8_blocks_as_planes(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q8_0 grid (q int8 [out, in], d [out, in / 32]) as one 4-bit grid of twice the inputs: with u = q + 128
    in 1..255, w = d q = (16 d) (u >> 4) - 128 d + d (u & 15), so the first `in` inputs carry the high nibbles
    (scale 16 d, offset -128 d) and the next `in` the low ones (scale d, offset 0). 16 d and -128 d are exact
    in fp16, so the planes' sum is the Q8_0 weight exactly."""
    u = q.to(torch.int16) + 128
    d = d.float()
    planes = torch.cat([(u >> 4).to(torch.uint8), (u & 15).to(torch.uint8)], dim=1)
    return planes, torch.cat([16 * d, d], dim=1), torch.cat([-128 * d, torch.zeros_like(d)], dim=1)


class Int8BlockLinear(nn.Module):
    """8-bit weights in GGUF Q8_0's grid (`int8_blocks`: one fp16 scale per 32 inputs), run by the 4-bit kernel
    as two 4-bit planes over the input given twice (`int8_blocks_as_planes`): activations rounded to int8 per
    block of 32, as llama.cpp's Q8_0 x Q8_0 dot products. For the output matrix in int4 mode: Int8Linear's one
    activation scale per row cost SmolLM2 Q4_1 most of its distance to the file's model (the final hidden
    state has a few large channels; mean KL 0.0074 with it, 0.0025 with blocks of 32; benchmarks/RESULTS.md).
    Reads 10 bits per weight (int8 rows: 8)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        from nanoseek.quant import q4_kernel

        self.out_features, self.in_features = weight.shape
        if self.in_features % INT4_GROUP:
            raise ValueError(f"Q8_0 blocks need the input size divisible by {INT4_GROUP}, got {self.in_features}")
        require_int4_kernel()
        self.register_buffer("packed", q4_kernel.pack(*int8_blocks_as_planes(*int8_blocks(weight))))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.nanoseek.q4_linear.default(torch.cat([x, x], -1), self.packed, self.out_features, self.bias)


def int8_blocks_or_rows(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """Int8BlockLinear where the kernel takes the shape (input size divisible by 32), Int8Linear elsewhere."""
    if weight.shape[1] % INT4_GROUP:
        return Int8Linear(weight, bias)
    return Int8BlockLinear(weight, bias)


def int4_or_int8(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """Int4Linear where the kernel takes the shape (input size divisible by 32), Int8Linear elsewhere."""
    if weight.shape[1] % INT4_GROUP:
        return Int8Linear(weight, bias)
    return Int4Linear(weight, bias)


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
    if w.is_meta:  # nothing to copy (and torch.cat on meta tensors imports torch._dynamo: ~70 MB of RSS)
        return fused
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


# Kept in 8 bits in int4 mode, in Q8_0's blocks (Int8BlockLinear): the output matrix is where 4 bits cost the
# most accuracy, and llama.cpp's Q4 files keep it at 6-8 bits too (SmolLM2's Q4_1 file stores it as Q8_0).
INT8_IN_INT4 = ("lm_head",)


def packed_linear(mode: str, name: str = ""):
    """`(weight [out, in], bias | None) -> module` for `mode` and the linear called `name`, after checking
    that the mode fits this machine."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "fp16" and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("fp16 weights need fbgemm (x86 CPUs); use int8")
    if mode == "int4":
        require_int4_kernel()
    if mode == "int4" and name in INT8_IN_INT4:
        return int8_blocks_or_rows
    return {"int8": Int8Linear, "int4": int4_or_int8, "fp16": Fp16Linear}[mode]


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
    packed_linear(mode)  # an unknown mode or one this machine cannot run fails before anything changes
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("quantize_model is for CPU inference; the model is not on the CPU")
    fuse_projections(model)
    for module, name, _ in quantizable_linears(model):
        child = getattr(module, name)
        setattr(module, name, packed_linear(mode, name)(child.weight, child.bias))
    pack_embedding(model, mode)
    model.quantization = mode
    return_freed_memory()  # the replaced fp32 weights (measured: 1,294 MB -> 896 MB for SmolLM2 in fp16)
    return model


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights in their run format (packed linears count at the size their kernel holds)."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.in_features * m.out_features + 8 * m.out_features
        elif isinstance(m, Int8Embedding):  # a tied model's shares the lm_head's (counted there)
            head = getattr(model, "lm_head", None)
            if not (isinstance(head, Int8Linear) and m.scale.data_ptr() == head.scale.data_ptr()):
                total += m.qweight.numel() + 4 * m.num_embeddings
        elif isinstance(m, (Int4Linear, Int8BlockLinear)):
            total += m.packed.numel() + (4 * m.out_features if m.bias is not None else 0)
        elif isinstance(m, Fp16Linear):
            total += m.packed_bytes
        else:
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


def pack_lora_bases(model: nn.Module, only_if_exact: bool = False) -> int:
    """LoRA's int4 base (model/lora.LoRAConfig.base_format, QLoRA-style): give every LoRALinear of `model` its
    frozen weight packed on the 4-bit grid (Int4Linear's packing) as the non-persistent buffer base_packed, which
    its forward then multiplies by; a layer whose input size is not a multiple of 32 stays fp32. Returns how many
    were packed. Needs the kernel, and the base in fp32 on the CPU (ValueError otherwise).

    only_if_exact (base_format auto): packs only when every packable weight is on the grid exactly (a 4-bit GGUF
    file's, such as SmolLM2's Q4_1: packing then loses nothing of the weights), and only where the kernel runs
    and the base is fp32 on the CPU; otherwise packs nothing and returns 0."""
    from nanoseek.model.lora import lora_modules
    from nanoseek.quant import q4_kernel

    layers = list(lora_modules(model).values())
    weights = [layer.base_layer.weight for layer in layers]
    off = [w for w in weights if w.device.type != "cpu" or w.dtype != torch.float32]  # the kernel's is fp32 on CPU
    if only_if_exact and (off or not q4_kernel.available()):
        return 0
    require_int4_kernel()
    if off:
        raise ValueError(f"lora.base_format=int4 runs nanoseek's CPU kernel on an fp32 base; this one is "
                         f"{off[0].dtype} on {off[0].device} (use lora.base_format=fp32)")  # fmt: skip
    grids = {}
    for layer, w in zip(layers, weights):
        if layer.in_features % INT4_GROUP == 0:
            grids[layer] = int4_grid(w)
            if only_if_exact and not torch.equal(int4_dequantize(*grids[layer]), w.detach()):
                return 0
    for layer, grid in grids.items():
        layer.base_packed = q4_kernel.pack(*grid)
    return len(grids)
