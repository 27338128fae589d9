"""MatMulQ4's tiled weight layout, made from a 4-bit MatMulNBits' packed weights and scales at load.

MatMulNBits stores B column by column ([N, K/block, block/2], weight 2j in the low nibble of byte
j) and its scales apart. MatMulQ4 wants 8 columns side by side in each vector so that a block's
int32 sums are already 8 outputs (q4_matmul.cc says why), and each group of 8 columns as one
stream: group g is K/block blocks of [block*4 weight bytes | 8 fp32 scales]; in the block's
32-byte step t, byte 4c + j holds weight k = 8t + j of column 8g + c (low nibble) and
k = 8t + 4 + j (high nibble). A last part group is padded with zero weights and zero scales.
The bytes are the same count as before plus the scales: no second copy stays resident.
"""

from __future__ import annotations

import numpy as np

GROUP = 8  # columns per vector
_CHUNK_GROUPS = 512  # groups rearranged at a time: bounds the temporary copies (~4 MiB at K=2048)


def tiled_size(k: int, n: int, block: int) -> int:
    """Bytes of the tiled layout for K x N (q4_matmul.cc's tiled_bytes)."""
    return -(-n // GROUP) * (k // block) * (block * 4 + 32)


def tile(packed: np.ndarray, scales: np.ndarray, k: int, n: int, block: int) -> np.ndarray:
    """MatMulNBits' 4-bit packed weights (N x K/2 bytes, any shape) and scales (N x K/block floats)
    as MatMulQ4's tiled bytes (1-D uint8)."""
    blocks, steps = k // block, block // 8
    packed = np.asarray(packed, np.uint8).reshape(n, k // 2)
    scales = np.asarray(scales, np.float32).reshape(n, blocks)
    groups = -(-n // GROUP)
    out = np.empty((groups, blocks, block * 4 + 32), np.uint8)
    for g0 in range(0, groups, _CHUNK_GROUPS):
        g1 = min(groups, g0 + _CHUNK_GROUPS)
        c0, c1, cols = g0 * GROUP, min(n, g1 * GROUP), (g1 - g0) * GROUP
        nib = np.zeros((cols, k), np.uint8)
        nib[: c1 - c0, 0::2] = packed[c0:c1] & 15
        nib[: c1 - c0, 1::2] = packed[c0:c1] >> 4
        nib = nib.reshape(g1 - g0, GROUP, blocks, steps, 2, 4)  # g, c, b, t, half, j: k = b*block + 8t + 4*half + j
        weights = nib[..., 0, :] | (nib[..., 1, :] << 4)  # g, c, b, t, j
        out[g0:g1, :, : block * 4] = weights.transpose(0, 2, 3, 1, 4).reshape(g1 - g0, blocks, block * 4)
        s = np.zeros((cols, blocks), np.float32)
        s[: c1 - c0] = scales[c0:c1]
        s = np.ascontiguousarray(s.reshape(g1 - g0, GROUP, blocks).transpose(0, 2, 1)).astype("<f4")
        out[g0:g1, :, block * 4:] = s.view(np.uint8).reshape(g1 - g0, blocks, 32)
    return out.reshape(-1)
