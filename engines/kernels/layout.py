"""MatMulQ4's tiled weight layout, made from a 4-bit MatMulNBits' packed weights and scales at load.

MatMulNBits stores B column by column ([N, K/block, block/2], weight 2j in the low nibble of byte
j) and its scales apart. MatMulQ4 wants 8 columns side by side in each vector so that a block's
int32 sums are already 8 outputs (q4_matmul.cc says why), and each group of 8 columns as one
stream: group g is K/block blocks of [block*4 weight bytes | 8 fp32 scales]; in the block's
32-byte step t, byte 4c + j holds weight k = 8t + j of column 8g + c (low nibble) and
k = 8t + 4 + j (high nibble). A last part group is padded with zero weights and zero scales.
The bytes are the same count as before plus the scales: no second copy stays resident.
The rearranging is the library's own `GraniteQ4Tile` (a numpy version took 8.5 s for the 1B).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

GROUP = 8  # columns per vector


def tiled_size(k: int, n: int, block: int) -> int:
    """Bytes of the tiled layout for K x N (q4_matmul.cc's tiled_bytes)."""
    return -(-n // GROUP) * (k // block) * (block * 4 + 32)


def tile(library: Path, packed: np.ndarray, scales: np.ndarray, k: int, n: int, block: int) -> np.ndarray:
    """MatMulNBits' 4-bit packed weights (N x K/2 bytes, any shape) and scales (N x K/block) as
    MatMulQ4's tiled bytes (1-D uint8), rearranged by the kernel library at library."""
    packed = np.ascontiguousarray(packed, np.uint8).reshape(-1)
    scales = np.ascontiguousarray(scales, np.float32).reshape(-1)
    if packed.size != n * k // 2 or scales.size != n * (k // block):
        raise ValueError(f"{packed.size} weight bytes and {scales.size} scales do not fit K={k}, N={n}, "
                         f"block_size={block}")
    out = np.empty(tiled_size(k, n, block), np.uint8)
    fn = ctypes.CDLL(str(library)).GraniteQ4Tile
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    fn(packed.ctypes.data, scales.ctypes.data, k, n, block, out.ctypes.data)
    return out


def tiled8_size(k: int, n: int) -> int:
    """Bytes of MatMulQ8Dynamic's tiled layout for K x N (q4_matmul.cc's tiled8_bytes)."""
    return -(-n // GROUP) * (k * 8 + 64)


def tile8(library: Path, weights: np.ndarray, scales: np.ndarray, k: int, n: int) -> np.ndarray:
    """A dynamic int8 GEMM's weights (int8 [K, N]) and column scales ([N]) as MatMulQ8Dynamic's tiled
    bytes: per group of 8 columns, K/4 steps of 32 bytes (byte 4c + j: weight k = 4t + j of column c),
    then the 8 fp32 scales, then 8 int32 sums of -128 x the column (the input's zero point)."""
    weights = np.ascontiguousarray(weights, np.int8).reshape(-1)
    scales = np.ascontiguousarray(scales, np.float32).reshape(-1)
    if weights.size != k * n or scales.size != n or k % 8:
        raise ValueError(f"{weights.size} weights and {scales.size} scales do not fit K={k} (a multiple of 8), N={n}")
    out = np.empty(tiled8_size(k, n), np.uint8)
    fn = ctypes.CDLL(str(library)).GraniteQ8Tile
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    fn(weights.ctypes.data, scales.ctypes.data, k, n, out.ctypes.data)
    return out
