"""State buffers on the device of an ONNX Runtime provider, and the row copies an engine needs.

An engine keeps each state tensor as one `[rows, ...]` buffer and binds contiguous row
ranges of it as graph input and output, so the graph updates the cache in place. Where
the buffer lives is this module's business:

- `HostMemory` (CPU provider): numpy arrays; a row range is a numpy view wrapped as an
  OrtValue without a copy.
- `CudaMemory` (CUDA provider): OrtValues allocated on the GPU by ONNX Runtime; a row range
  is bound by device address (`IOBinding.bind_input/bind_output` with a pointer), and row
  copies are `cudaMemcpy2D` device-to-device through the CUDA runtime ONNX Runtime itself
  loaded. Nothing moves the cache between host and device per step: only input ids,
  positions and logits cross. (No GPU was available where this was written: the CUDA path
  is untested; the CPU path is what the tests run.)

All copies address a state row as `[outer, capacity, inner]` (the capacity axis named in
the manifest's state record; recurrent state has none and is copied whole), so "the first
n positions" of a KV row, in either cache layout, is one strided 2-D copy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap

import numpy as np

# Buffers at least this big are anonymous mappings (HostMemory.zeros); smaller ones are not
# worth a mapping each.
LAZY_ZEROS_MIN_BYTES = 1 << 20


def _layout(shape: tuple, axis: int | None) -> tuple[int, int, int]:
    """(outer, capacity, inner) element counts of one row of `shape` around `axis`."""
    if axis is None:
        return 1, 1, math.prod(shape)
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


class HostMemory:
    device_type = "cpu"
    device_id = 0

    def zeros(self, shape: tuple, dtype) -> np.ndarray:
        """Zeros whose pages become resident only when first written.

        KV buffers hold max_batch rows at the longest row's capacity, mostly never written
        (idle rows, positions past a row's length). np.zeros gives that only while glibc
        serves the request with mmap; below its (adaptive, up to 32 MiB) threshold it comes
        from the heap and is memset, so one 1k-token prompt at max_batch 8 made the whole
        [8, ..., capacity] cache resident (peak RSS 3.1 GiB vs 2.0 for the 1B int4 engine,
        bench/bench_peers.py). An anonymous mapping is always zero-filled on demand."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if nbytes < LAZY_ZEROS_MIN_BYTES:
            return np.zeros(shape, dtype)
        # Private, like malloc's own mappings: a forked child must not share the parent's cache.
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype).reshape(shape)

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        """Uninitialised (for buffers a copy fills at once: snapshots)."""
        return np.empty(shape, dtype)

    def bind(self, binding, name: str, buf: np.ndarray, rows: slice, output_name: str | None = None,
             out_buf: np.ndarray | None = None) -> None:
        """Bind rows of `buf` as input `name`; and as output `output_name` (in place), or rows of
        `out_buf` as that output when given."""
        import onnxruntime as ort

        # A row range of a C-contiguous buffer is contiguous: wrap it without a copy.
        value = ort.OrtValue.ortvalue_from_numpy(buf[rows])
        binding.bind_ortvalue_input(name, value)
        if output_name is not None:
            out = value if out_buf is None else ort.OrtValue.ortvalue_from_numpy(out_buf[rows])
            binding.bind_ortvalue_output(output_name, out)

    @staticmethod
    def _region(buf: np.ndarray, row: int, axis: int | None, start: int, n: int) -> np.ndarray:
        outer, cap, inner = _layout(buf.shape[1:], None if axis is None else axis)
        view = buf[row].reshape(outer, cap, inner)
        return view if axis is None else view[:, start:start + n]

    def copy(self, dst, dst_row: int, src, src_row: int, axis: int | None, n: int = 0,
             dst_start: int = 0, src_start: int = 0) -> None:
        """Positions [src_start, src_start+n) of src's row into [dst_start, ...) of dst's row
        (axis: the row's capacity axis; None copies the whole row)."""
        np.copyto(self._region(dst, dst_row, axis, dst_start, n), self._region(src, src_row, axis, src_start, n))

    def zero_row(self, buf, row: int) -> None:
        buf[row] = 0

    def nbytes(self, buf) -> int:
        return buf.nbytes

    def to_numpy(self, buf) -> np.ndarray:
        return buf

    def free_bytes(self) -> int | None:
        """MemAvailable from /proc/meminfo (None where there is none)."""
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


class DeviceBuffer:
    """An OrtValue on a GPU with the shape/dtype/address arithmetic the engine needs."""

    def __init__(self, value, shape: tuple, dtype):
        self.value, self.shape, self.dtype = value, tuple(shape), np.dtype(dtype)
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def ptr(self) -> int:
        return self.value.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes


def _cudart():
    names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.13", "libcudart.so.12",
             "libcudart.so.11.0"]
    for name in names:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaMemcpy2D.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                     ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
        lib.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        return lib
    raise RuntimeError("the CUDA runtime library (libcudart) could not be loaded for device row copies")


class CudaMemory:
    device_type = "cuda"
    _D2D = 3  # cudaMemcpyDeviceToDevice

    def __init__(self, device_id: int = 0):
        self.device_id = device_id
        self._rt = None

    @property
    def rt(self):
        if self._rt is None:
            self._rt = _cudart()
        return self._rt

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"CUDA {what} failed with error {code}")

    def zeros(self, shape: tuple, dtype) -> DeviceBuffer:
        import onnxruntime as ort

        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type, "cuda", self.device_id)
        buf = DeviceBuffer(value, shape, dtype)
        self._check(self.rt.cudaMemset(buf.ptr, 0, buf.nbytes), "cudaMemset")
        return buf

    def empty(self, shape: tuple, dtype) -> DeviceBuffer:
        import onnxruntime as ort

        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type, "cuda", self.device_id)
        return DeviceBuffer(value, shape, dtype)

    def bind(self, binding, name: str, buf: DeviceBuffer, rows: slice, output_name: str | None = None,
             out_buf: DeviceBuffer | None = None) -> None:
        shape = [rows.stop - rows.start, *buf.shape[1:]]
        ptr = buf.ptr + rows.start * buf.row_bytes
        binding.bind_input(name, "cuda", self.device_id, buf.dtype.type, shape, ptr)
        if output_name is not None:
            out_ptr = ptr if out_buf is None else out_buf.ptr + rows.start * out_buf.row_bytes
            binding.bind_output(output_name, "cuda", self.device_id, buf.dtype.type, shape, out_ptr)

    def copy(self, dst: DeviceBuffer, dst_row: int, src: DeviceBuffer, src_row: int, axis: int | None, n: int = 0,
             dst_start: int = 0, src_start: int = 0) -> None:
        es = src.dtype.itemsize
        d_outer, d_cap, inner = _layout(dst.shape[1:], axis)
        s_outer, s_cap, _ = _layout(src.shape[1:], axis)
        if axis is None:
            d_cap = s_cap = n = 1
        width = n * inner * es
        dst_ptr = dst.ptr + dst_row * dst.row_bytes + dst_start * inner * es
        src_ptr = src.ptr + src_row * src.row_bytes + src_start * inner * es
        self.rt.cudaDeviceSynchronize()
        self._check(self.rt.cudaMemcpy2D(dst_ptr, d_cap * inner * es, src_ptr, s_cap * inner * es, width, s_outer,
                                         self._D2D), "cudaMemcpy2D")
        self.rt.cudaDeviceSynchronize()

    def zero_row(self, buf: DeviceBuffer, row: int) -> None:
        self.rt.cudaDeviceSynchronize()
        self._check(self.rt.cudaMemset(buf.ptr + row * buf.row_bytes, 0, buf.row_bytes), "cudaMemset")

    def nbytes(self, buf: DeviceBuffer) -> int:
        return buf.nbytes

    def to_numpy(self, buf: DeviceBuffer) -> np.ndarray:
        return buf.value.numpy()

    def free_bytes(self) -> int | None:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if self.rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
            return None
        return free.value


def memory_for(provider: str):
    return CudaMemory() if provider.startswith("CUDA") else HostMemory()
