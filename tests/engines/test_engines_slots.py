"""The shared slot table (engines/slots.py): reserve, compaction moves, and the calls of a step."""

from __future__ import annotations

import numpy as np
import pytest

from granite_deploy.engines.base import CacheFull, Chunk, EngineError
from granite_deploy.engines.device_memory import HostMemory
from granite_deploy.engines.slots import Move, SlotTable, blocks


def table(lengths: list[int], max_batch: int = 4) -> SlotTable:
    t = SlotTable(max_batch)
    for s, n in enumerate(lengths):
        assert t.reserve(s) == s
        t.set_length(s, n)
    return t


def test_reserve_gives_the_lowest_free_row_and_refuses_when_full():
    t = SlotTable(2)
    assert t.reserve(10) == 0 and t.reserve(11) == 1
    with pytest.raises(CacheFull):
        t.reserve(12)
    with pytest.raises(EngineError, match="already has a cache slot"):
        t.reserve(10)
    assert t.release(10) == Move(src=1, dst=0, length=0)
    assert t.reserve(12) == 1 and t.rows == {11: 0, 12: 1}


def test_release_moves_the_last_row_into_the_hole_with_its_filled_length():
    t = table([5, 7, 9, 3])
    assert t.release(1) == Move(src=3, dst=1, length=3)  # seq 3 (3 tokens) moves from row 3 to row 1
    assert t.rows == {0: 0, 2: 2, 3: 1} and t.lengths == {0: 5, 2: 9, 3: 3}
    assert t.release(2) is None  # the highest row leaves: nothing moves
    assert t.release(2) is None  # idempotent
    assert t.release(0) == Move(src=1, dst=0, length=3)
    assert t.rows == {3: 0} and t.longest() == 3


def test_kv_only_decode_is_one_call_over_rows_up_to_the_last_decoding_row():
    t = table([5, 7, 9, 3])
    # seq 0 and 2 decode, seq 1 (row 1) is idle, seq 3 prefills 4 tokens
    chunks = [Chunk(2, (42,), 9), Chunk(3, (1, 2, 3, 4), 3), Chunk(0, (41,), 5)]
    calls = t.plan(chunks, capacity=8, max_seq_len=100, recurrent=False)
    assert [(c.lo, c.hi, c.decode) for c in calls] == [(0, 3, True), (3, 4, False)]
    dec, pre = calls
    assert dec.members == (2, 0) and dec.member_rows == (0, 2)  # chunk 2 is row 0, chunk 0 is row 2
    assert dec.input_ids.tolist() == [[41], [0], [42]]
    # the idle row writes at its first free position, clamped inside the capacity
    assert dec.position_ids.tolist() == [[5], [7], [9]]
    assert t.plan([Chunk(0, (41,), 5), Chunk(2, (1,), 9)], 8, 100, False)[0].position_ids.tolist() == [[5], [7], [9]]
    assert pre.members == (1,) and pre.member_rows == (0,)
    assert pre.input_ids.tolist() == [[1, 2, 3, 4]] and pre.position_ids.tolist() == [[3, 4, 5, 6]]
    idle = t.plan([Chunk(2, (1,), 9)], capacity=8, max_seq_len=100, recurrent=False)[0]
    assert idle.position_ids[1, 0] == 7 and idle.position_ids[0, 0] == 5


def test_recurrent_decode_covers_only_runs_of_decoding_rows():
    t = table([5, 7, 9, 3])
    chunks = [Chunk(0, (1,), 5), Chunk(2, (2,), 9), Chunk(3, (3,), 3)]
    calls = t.plan(chunks, capacity=16, max_seq_len=100, recurrent=True)
    assert [(c.lo, c.hi, c.members) for c in calls] == [(0, 1, (0,)), (2, 4, (1, 2))]
    assert calls[1].input_ids.tolist() == [[2], [3]] and calls[1].position_ids.tolist() == [[9], [3]]


def test_advance_records_lengths_and_plans_refuse_bad_steps():
    t = table([5, 0])
    t.advance([Chunk(0, (1,), 5), Chunk(1, (1, 2, 3), 0)])
    assert t.lengths == {0: 6, 1: 3}
    with pytest.raises(EngineError, match="starts at 5, cache holds 6"):
        t.plan([Chunk(0, (1,), 5)], 8, 100, False)
    with pytest.raises(EngineError, match="no cache slot"):
        t.plan([Chunk(9, (1,), 0)], 8, 100, False)
    with pytest.raises(EngineError, match="empty chunk"):
        t.plan([Chunk(0, (), 6)], 8, 100, False)
    with pytest.raises(CacheFull):
        t.plan([Chunk(1, tuple(range(10)), 3)], 16, 10, False)
    with pytest.raises(EngineError, match="reserve it first"):
        t.set_length(7, 1)


def test_blocks():
    assert [blocks(n, 256, 1000) for n in (1, 256, 257, 900)] == [256, 256, 512, 1000]


@pytest.mark.parametrize("shape, axis", [((2, 8, 3), 1), ((2, 3, 8), 2)])
def test_host_memory_copies_the_first_positions_of_either_cache_layout(shape, axis):
    mem = HostMemory()
    src = np.arange(2 * np.prod(shape), dtype=np.float32).reshape(2, *shape)
    dst = mem.zeros((3, *shape), np.float32)
    mem.copy(dst, 2, src, 1, axis, 5)
    index = tuple(slice(0, 5) if d == axis else slice(None) for d in range(len(shape)))
    np.testing.assert_array_equal(dst[2][index], src[1][index])
    assert dst[2].sum() == src[1][index].sum() and dst[:2].sum() == 0
    # positions [2, 5) of src into [0, 3) of a 3-position snapshot
    snap_shape = tuple(3 if d == axis else n for d, n in enumerate(shape))
    snap = mem.zeros((1, *snap_shape), np.float32)
    mem.copy(snap, 0, src, 0, axis, 3, src_start=2)
    part = tuple(slice(2, 5) if d == axis else slice(None) for d in range(len(shape)))
    np.testing.assert_array_equal(snap[0], src[0][part])


class _FakeValue:  # an "OrtValue on the GPU" backed by host memory, for the address arithmetic
    def __init__(self, array):
        self.array = array

    def data_ptr(self):
        return self.array.ctypes.data

    def numpy(self):
        return self.array


class _FakeCudaRuntime:  # cudaMemcpy2D / cudaMemset semantics over host addresses
    def cudaMemcpy2D(self, dst, dpitch, src, spitch, width, height, kind):
        import ctypes

        assert kind == 3 and width <= dpitch and width <= spitch
        for h in range(height):
            ctypes.memmove(dst + h * dpitch, src + h * spitch, width)
        return 0

    def cudaMemset(self, ptr, value, count):
        import ctypes

        ctypes.memset(ptr, value, count)
        return 0

    def cudaDeviceSynchronize(self):
        return 0


@pytest.mark.parametrize("shape, axis", [((2, 8, 3), 1), ((2, 3, 8), 2)])
def test_cuda_memory_address_arithmetic_matches_host_copies(shape, axis):
    """The CUDA path (no GPU here): the same copies and bindings as the host path, with cudaMemcpy2D
    and pointer offsets simulated over host memory."""
    from granite_deploy.engines.device_memory import CudaMemory, DeviceBuffer

    cuda, host = CudaMemory(), HostMemory()
    cuda._rt = _FakeCudaRuntime()
    src = np.arange(2 * np.prod(shape), dtype=np.float32).reshape(2, *shape)
    d_src = DeviceBuffer(_FakeValue(src.copy()), src.shape, np.float32)
    d_dst = DeviceBuffer(_FakeValue(np.zeros((3, *shape), np.float32)), (3, *shape), np.float32)
    h_dst = host.zeros((3, *shape), np.float32)
    for args in [(2, 1, axis, 5), (0, 0, None, 0)]:
        cuda.copy(d_dst, args[0], d_src, *args[1:])
        host.copy(h_dst, args[0], src, *args[1:])
    np.testing.assert_array_equal(d_dst.value.array, h_dst)
    snap_shape = tuple(3 if d == axis else n for d, n in enumerate(shape))
    d_snap = DeviceBuffer(_FakeValue(np.zeros((1, *snap_shape), np.float32)), (1, *snap_shape), np.float32)
    h_snap = host.zeros((1, *snap_shape), np.float32)
    cuda.copy(d_snap, 0, d_src, 1, axis, 3, src_start=4)
    host.copy(h_snap, 0, src, 1, axis, 3, src_start=4)
    np.testing.assert_array_equal(d_snap.value.array, h_snap)
    cuda.copy(d_dst, 1, d_snap, 0, axis, 3, dst_start=2)
    host.copy(h_dst, 1, h_snap, 0, axis, 3, dst_start=2)
    np.testing.assert_array_equal(d_dst.value.array, h_dst)
    cuda.zero_row(d_dst, 2)
    assert not d_dst.value.array[2].any() and d_dst.value.array[1].any()

    bound = []

    class Binding:
        def bind_input(self, name, device, device_id, dtype, shape, ptr):
            bound.append(("in", name, device, tuple(shape), ptr))

        def bind_output(self, name, device, device_id, dtype, shape, ptr):
            bound.append(("out", name, device, tuple(shape), ptr))

    cuda.bind(Binding(), "past", d_dst, slice(1, 3), "present")
    row_bytes = int(np.prod(shape)) * 4
    assert bound == [("in", "past", "cuda", (2, *shape), d_dst.ptr + row_bytes),
                     ("out", "present", "cuda", (2, *shape), d_dst.ptr + row_bytes)]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_host_cache_buffers_are_resident_only_where_written():
    """A [max_batch, ..., capacity] KV buffer costs memory for the rows and positions written,
    not for its whole shape (HostMemory.zeros: an anonymous mapping, whatever glibc's
    mmap threshold is after earlier frees)."""
    mem = HostMemory()
    for _ in range(3):  # free buffers of the size first: glibc then serves np.zeros from the heap
        mem.zeros((8, 4, 64, 4096), np.float32)
    row = np.ones((1, 4, 64, 4096), np.float32)
    before = _rss_bytes()
    buf = mem.zeros((8, 4, 64, 4096), np.float32)  # 32 MiB
    assert buf.shape == (8, 4, 64, 4096) and buf.dtype == np.float32 and buf.flags.writeable
    assert _rss_bytes() - before < 4 << 20
    mem.copy(buf, 2, row, 0, 2, n=4096)  # one row: 4 MiB
    grown = _rss_bytes() - before
    assert 4 << 20 <= grown < 6 << 20
    assert buf[2].min() == 1.0 and buf[[0, 1, 3, 4, 5, 6, 7]].max() == 0.0


def test_host_cache_buffers_are_private_across_fork():
    """Like malloc's memory: a child forked after the engine allocated its cache writes its own copy."""
    import os

    buf = HostMemory().zeros((8, 1 << 18), np.float32)  # 8 MiB: a mapping, not np.zeros
    pid = os.fork()
    if pid == 0:
        buf[0, 0] = 5.0
        os._exit(0)
    os.waitpid(pid, 0)
    assert buf[0, 0] == 0.0
    buf[1, 1] = 2.0
    assert buf[1, 1] == 2.0
