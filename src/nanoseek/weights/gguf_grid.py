"""GGUF 4-bit tensors (Q4_0, Q4_1, Q4_K) as the int4 run format's grid, read from the file's own blocks.

The int4 format (nanoseek.quant.Int4Linear) stores, per block of 32 inputs, 4-bit values q and a scale d and
offset m (w = d * q + m). Every 4-bit GGUF type is such a grid:
- Q4_0 (18 bytes / 32): an fp16 d; w = d * (q - 8), so m = -8 d;
- Q4_1 (20 bytes / 32): fp16 d and m; w = d * q + m;
- Q4_K (144 bytes / 256): fp16 d and dmin, and per 32-value sub-block 6-bit integers sc and mn;
  w = (d * sc) * q - dmin * mn, so d = d * sc and m = -dmin * mn per sub-block.
Reading the blocks (instead of fitting a grid to the dequantized weights) keeps q exactly. The kernel holds d
and m in fp16: exact for Q4_0 and Q4_1, while Q4_K's products of a 6-bit integer and an fp16 value are
rounded once (relative error <= 2^-11 on a sub-block's scale and offset). Fitting min/max to a Q4_K block
instead moves the grid wherever a block leaves q = 0 or 15 unused.
"""

from __future__ import annotations

import numpy as np

FOUR_BIT_TYPES = ("Q4_0", "Q4_1", "Q4_K")
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})  # unquantized GGUF tensor types
GROUP = 32


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] packed bytes -> [..., 32] values: the low nibbles are values 0-15, the high ones 16-31
    (the layout of Q4_0/Q4_1 blocks and of each 32-byte chunk of a Q4_K block's two sub-blocks)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def four_bit_grid(raw: np.ndarray, qtype: str, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 4-bit tensor's bytes, uint8 [rows, bytes per row], -> q uint8 [rows, cols] in 0..15, and d, m fp32
    [rows, cols / 32], with w = d * q + m per block of 32 inputs."""
    rows = raw.shape[0]
    if qtype in ("Q4_0", "Q4_1"):
        size = 18 if qtype == "Q4_0" else 20
        blocks = raw.reshape(rows, cols // GROUP, size)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if qtype == "Q4_0":
            m = -8 * d
        else:
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        q = _nibbles(blocks[..., size - 16 :])
        return q.reshape(rows, cols), d, m
    if qtype == "Q4_K":
        from gguf.quants import Q4_K

        blocks = raw.reshape(rows * (cols // 256), 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])  # [n, 8] 6-bit integers
        # each 32-byte chunk of the 128 holds two sub-blocks: its low nibbles, then its high nibbles
        chunks = blocks[:, 16:].reshape(-1, 4, 32)
        q = np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 256)
        scale = (d * sc.astype(np.float32)).reshape(rows, cols // GROUP)
        offset = -(dmin * mn.astype(np.float32)).reshape(rows, cols // GROUP)
        return q.reshape(rows, cols), scale, offset
    raise ValueError(f"{qtype} is not a 4-bit GGUF type ({', '.join(FOUR_BIT_TYPES)})")
