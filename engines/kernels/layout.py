"""MatMulQ4's tiled weight layout, made from a 4-bit MatMulNBits' packed weights and scales at load.

MatMulNBits stores B column by column ([N, K/block, block/2], weight 2j in the low nibble of byte
j) and its scales apart. MatMulQ4 wants 8 columns side by side in each vector so that a block's
int32 sums are already 8 outputs (q4_matmul.cc says why), and each group of 8 columns as one
stream: group g is K/block blocks of [block*4 weight bytes | 8 fp16 scales]; in the block's
32-byte step t, byte 4c + j holds weight k = 8t + j of column 8g + c (low nibble) and
k = 8t + 4 + j (high nibble). A last part group is padded with zero weights and zero scales.
The bytes are the packed weights' count plus fp16 scales (4.5 bits a weight at block 32, fp32
scales would make it 5): no second copy stays resident.
The rearranging is the library's own `GraniteQ4Tile` (a numpy version took 8.5 s for the 1B).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

GROUP = 8  # columns per vector
HUGE_PAGE = 2 << 20
HUGEPAGES_ENV = "GRANITE_DEPLOY_HUGEPAGES"  # "0": tiled weights on ordinary 4 KiB pages (A/B runs)


def resident_buffer(nbytes: int) -> np.ndarray:
    """nbytes of zeroed, 2 MiB-aligned anonymous memory (1-D uint8) advised onto transparent huge pages.

    Why: a decode step streams every weight once, and on 4 KiB pages each page boundary stops the
    hardware prefetcher and costs a TLB walk; on 2 MiB pages one core read a 1 GiB buffer at 33 GB/s
    instead of 25 (Zen 4, kernel THP mode `madvise`, which only advised memory gets). Where the kernel
    has no THP the advice is a no-op and these are ordinary pages."""
    if os.environ.get(HUGEPAGES_ENV, "1") == "0" or nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.zeros(nbytes, np.uint8)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -np.frombuffer(region, np.uint8, count=1).ctypes.data % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % HUGE_PAGE)
    except OSError:
        pass  # no THP in this kernel: ordinary pages
    return np.frombuffer(region, np.uint8, count=nbytes, offset=start)  # the array keeps region mapped


def tiled_size(k: int, n: int, block: int) -> int:
    """Bytes of the tiled layout for K x N (q4_matmul.cc's tiled_bytes)."""
    return -(-n // GROUP) * (k // block) * (block * 4 + 16)


FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14


def fp16_scales_fit(scales: np.ndarray) -> bool:
    """Whether every scale keeps its precision as fp16 (MatMulQ4's layout): zero, or a finite magnitude
    inside fp16's normal range (a subnormal would lose relative precision, a larger one overflow)."""
    mag = np.abs(np.asarray(scales, np.float32))
    return bool(np.all((mag == 0) | ((mag >= FP16_MIN_NORMAL) & (mag <= FP16_MAX))))


def on_fp16_grid(scales: np.ndarray) -> bool:
    """Whether every scale is an fp16 value already (what `quantize --int4` writes): tiling is then exact."""
    s = np.asarray(scales, np.float32)
    return bool(np.array_equal(s.astype(np.float16).astype(np.float32), s))


def tile(library: Path, packed: np.ndarray, scales: np.ndarray, k: int, n: int, block: int) -> np.ndarray:
    """MatMulNBits' 4-bit packed weights (N x K/2 bytes, any shape) and scales (N x K/block, rounded to
    the nearest fp16; see fp16_scales_fit) as MatMulQ4's tiled bytes (1-D uint8), rearranged by the
    kernel library at library."""
    packed = np.ascontiguousarray(packed, np.uint8).reshape(-1)
    scales = np.ascontiguousarray(scales, np.float32).reshape(-1)
    if packed.size != n * k // 2 or scales.size != n * (k // block):
        raise ValueError(f"{packed.size} weight bytes and {scales.size} scales do not fit K={k}, N={n}, "
                         f"block_size={block}")
    out = resident_buffer(tiled_size(k, n, block))
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
    out = resident_buffer(tiled8_size(k, n))
    fn = ctypes.CDLL(str(library)).GraniteQ8Tile
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    fn(weights.ctypes.data, scales.ctypes.data, k, n, out.ctypes.data)
    return out


F32_STRIP = 48  # f32_tile.h's kF32Strip


def tiled_f32_size(k: int, n: int, bf16: bool = False) -> int:
    """Bytes of MatMulF32's strips for K x N (q4_matmul.cc's tiled_f32_bytes)."""
    return -(-n // F32_STRIP) * k * F32_STRIP * (2 if bf16 else 4)


def bf16_exact(weights: np.ndarray) -> bool:
    """Whether every fp32 weight is a bfloat16 value (its lower 16 bits zero), as in an fp32 export of a
    bf16 checkpoint: MatMulF32 then stores the upper halves and widens them back exactly."""
    bits = np.ascontiguousarray(weights, np.float32).reshape(-1).view(np.uint32)
    return not any(np.any(bits[i:i + (1 << 24)] & 0xFFFF) for i in range(0, bits.size, 1 << 24))


def tile_f32(library: Path, weights: np.ndarray, k: int, n: int, *, bf16: bool = False,
             transposed: bool = False) -> np.ndarray:
    """An fp32 [K, N] weight (or, transposed, the [N, K] of a Gemm with transB) as MatMulF32's bytes
    (1-D uint8): strips of 48 columns, each K x 48 weights k-major, the last padded with zero columns;
    as bf16 (the upper 16 bits; the caller has checked bf16_exact) or fp32. Rearranged by the kernel library."""
    weights = np.ascontiguousarray(weights, np.float32).reshape(-1)
    if weights.size != k * n:
        raise ValueError(f"{weights.size} weights do not fit K={k}, N={n}")
    out = resident_buffer(tiled_f32_size(k, n, bf16))
    fn = ctypes.CDLL(str(library)).GraniteF32Tile
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_void_p]
    stride_k, stride_n = (1, k) if transposed else (n, 1)
    fn(weights.ctypes.data, k, n, stride_k, stride_n, int(bf16), out.ctypes.data)
    return out
