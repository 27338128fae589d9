"""ONNX Runtime engine: the artifact's decoder graph with an in-place, slot-based KV cache.

The cache of layer i is one buffer per K and V, [max_batch, kv_heads,
capacity, head_dim] for the portable graph or [max_batch, kv_heads, head_dim,
capacity] for the CPU flavour (the manifest's state record says which axis is
the capacity); sequence s lives in a row of the shared slot table
(`slots.SlotTable`: rows, lengths, compaction moves, the calls of a step). Every
call binds a contiguous row range of these buffers as both the
`past_key_values.*` input and the `present.*` output through IO binding, so the
graph's TensorScatter writes the new keys/values in place and nothing copies the
cache per token. The buffers live on the provider's device (`device_memory`:
numpy on the CPU provider, ONNX Runtime-allocated GPU memory bound by address on
the CUDA provider), so on a GPU only ids, positions and logits cross the bus.

This module only runs the calls the slot table plans and copies the rows it
says to move. Capacity grows in blocks as sequences get longer (and shrinks when
long ones leave), so attention reads only about as much cache as is in use.

Hybrid (Mamba2) models add fixed-size per-sequence state (`conv`, `ssm`)
listed in the manifest's `state` record: same rows, zeroed when a slot is
reserved, and decode calls then cover only rows that really decode.

With the ragged flavour (`decoder_ragged`, the default on the CPU provider when the artifact
has it; docs/ragged-step.md) a whole step is ONE call: `SlotTable.plan_ragged` puts the chunks in
two groups of contiguous rows (swapping rows where they interleave), and each group's state is
bound to its row range under its own input names, in place as above.

For the prefix cache the engine copies a sequence's KV positions or recurrent
state out (`save_kv`, `save_recurrent`) and into a fresh slot (`restore`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ..artifact import CACHE_CAPACITY, DECODER, DECODER_CPU, DECODER_RAGGED, graph_path, load_manifest
from ..manifest import KV_LAYOUT_IN_PLACE, GraphRecord, ragged_state_name
from .base import CacheFull, Chunk, Engine, EngineError, EngineInfo, StateSnapshot
from .device_memory import memory_for
from .slots import Call, Move, RaggedCall, RaggedInfeasible, SlotTable, Swap, blocks
from ..export.io_spec import NUM_LOGITS_TO_KEEP  # graph IO names: declared once, there

log = logging.getLogger(__name__)
CAPACITY_BLOCK = 256
# Whether the ragged graph runs with a group of zero rows (an empty group is then bound as such;
# otherwise to a one-row dummy state).
RAGGED_BINDINGS_KEPT = 64  # row-range combinations whose state bindings are kept (_run_ragged)
RAGGED_ZERO_ROWS = True  # ONNX Runtime 1.32's CPU provider does (tests/export/test_ragged_graph.py)


def _session_options(threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Shapes change every step (sequence length, batch, capacity): a memory
    # pattern planned for one shape is wasted on the next.
    options.enable_mem_pattern = False
    options.enable_cpu_mem_arena = True
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # in-place TensorScatter warnings are expected only if binding fails
    return options


def _open_session(path: Path, threads: int | None, provider: str):
    """The graph's session and how many of its nodes run our CPU kernels (`_use_cpu_kernels`), with
    `num_logits_to_keep` made a plain input.

    Export declares it as an input with a default (an initializer of the same name), which
    ONNX Runtime treats as an overridable initializer: absent from `get_inputs()` and not
    bindable through IO binding ("Failed to find NodeArg"), so every prefill ran the
    vocabulary head at every prompt position (half of a 1024-token prefill, and hundreds of
    MiB of logits). Dropping the default in memory (the file, already verified, stays as it
    is) lets the engine bind it on every call; external weights are read from the graph's
    folder as before."""
    import onnx
    import onnxruntime as ort

    options = _session_options(threads)
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    defaults = [t for t in model.graph.initializer if t.name == NUM_LOGITS_TO_KEEP and t.name in inputs]
    for t in defaults:
        model.graph.initializer.remove(t)
    rewrite = _use_cpu_kernels(model, options, path.parent) if provider == "CPUExecutionProvider" else None
    fast = rewrite.nodes if rewrite is not None else 0
    if not defaults and not fast:
        return ort.InferenceSession(str(path), options, providers=[provider]), 0
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[provider])
    return (rewrite.keep_with(session) if fast else session), fast


def _use_cpu_kernels(model, options, folder: Path):
    """Register our CPU kernel library (engines/kernels) and point the graph's eligible 4-bit
    MatMulNBits and dynamic int8 GEMMs at it, over tiled copies of their weights given to the session; None (the graph
    untouched) where it is not built, this CPU lacks AVX2/FMA, or the weights cannot be read."""
    from . import kernels

    library = kernels.available()
    if library is None:
        return None
    try:
        options.register_custom_ops_library(str(library))
    except Exception as exc:  # an unloadable library must not stop serving: MLAS runs the graph
        log.warning("CPU kernels at %s not loaded (%s); using ONNX Runtime's own", library, exc)
        return None
    started = time.perf_counter()
    try:
        rewrite = kernels.use_kernels(model, folder, library)
    except kernels.KernelBuildError as exc:  # e.g. an external weight file it cannot read: MLAS runs
        log.warning("CPU kernels not used: %s", exc)
        return None
    if rewrite.nodes:
        rewrite.attach(options)
    if rewrite.nodes or rewrite.attention_nodes:
        log.info("CPU kernels (%s): %d 4-bit MatMulNBits run as %s.%s, %d dynamic int8 GEMMs as %s.%s, %d fp32 "
                 "MatMuls as %s.%s (%d weights stored as bf16, exactly), %d GroupQueryAttention decode calls as "
                 "%s.DecodeAttention; weights tiled in %.1f s",
                 kernels.isa(library), rewrite.nodes - rewrite.q8_nodes - rewrite.f32_nodes, kernels.DOMAIN, kernels.OP,
                 rewrite.q8_nodes, kernels.DOMAIN, kernels.OP_Q8, rewrite.f32_nodes, kernels.DOMAIN, kernels.OP_F32,
                 rewrite.f32_bf16_weights, rewrite.attention_nodes, kernels.DOMAIN, time.perf_counter() - started)
    return rewrite


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


class OnnxRuntimeEngine(Engine):
    def __init__(
        self,
        artifact: str | Path,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        threads: int | None = None,
        provider: str = "CPUExecutionProvider",
        reason: str = "",
        graph: str | None = None,
    ):
        """graph: which manifest graph to run; by default, on the CPU provider, the ragged flavour
        (one call per step) or else the CPU flavour when the artifact has one (its attention
        streams the cache at memory bandwidth), else the portable decoder."""
        import onnxruntime as ort

        self.artifact = Path(artifact)
        manifest = load_manifest(self.artifact)
        arch = manifest.architecture
        graphs = manifest.graphs
        if graph is None:
            cpu = provider == "CPUExecutionProvider"
            graph = next((g for g in (DECODER_RAGGED, DECODER_CPU) if cpu and g in graphs), DECODER)
        if graph not in graphs:
            raise EngineError(f"{self.artifact}: manifest has no graph {graph!r} (it has {', '.join(graphs)})")
        self.graph_name = graph
        record = graphs[graph]
        if record.kv_layout != KV_LAYOUT_IN_PLACE:
            raise EngineError(f"{self.artifact}: {graph} graph has cache layout {dict(record.kv_cache)}, "
                              f"this engine needs {KV_LAYOUT_IN_PLACE!r}")
        context = manifest.context_length
        self.max_seq_len = min(max_seq_len or context, context)
        self.max_batch = max_batch
        self.states = state_specs(record)
        # The ragged flavour runs a whole step in one call (docs/ragged-step.md, SlotTable.plan_ragged).
        self.ragged = graph == DECODER_RAGGED
        # Recurrent (Mamba) state changes with every token fed, so rows that do not
        # decode this step must not be run at all (no dummy rows in a decode call).
        self._recurrent = any(st["kind"] != "kv" for st in self.states)
        # cpu_kernel_nodes: how many nodes run engines/kernels' code instead of ONNX Runtime's
        self.session, self.cpu_kernel_nodes = _open_session(graph_path(self.artifact, manifest, self.graph_name),
                                                            threads, provider)
        self._input_names = {i.name for i in self.session.get_inputs()}
        self.memory = memory_for(provider)
        self.capacity = 0
        self._axis = {st["input"]: (st["shape"].index(CACHE_CAPACITY) if st["kind"] == "kv" else None)
                      for st in self.states}
        self._buffers: dict = {}  # state input name -> [max_batch, ...] on the provider's device
        self._scratch: dict = {}  # outputs that cannot be written in place
        self._ragged_bindings: dict = {}  # groups' row ranges -> (IOBinding with the state bound, copy-backs)
        for st in self.states:
            if st["kind"] != "kv":
                shape = (max_batch, *st["shape"])
                self._buffers[st["input"]] = self.memory.zeros(shape, st["dtype"])
                if not st["in_place"]:
                    self._scratch[st["input"]] = self.memory.zeros(shape, st["dtype"])
        # An empty ragged group is bound to a one-row dummy state (KV capacity 1) where the graph
        # cannot run zero-row tensors: the planner gives it row `max_batch`, a 1-slot, 0-length row.
        self._dummy: dict = {}  # state input name -> (input/in-place output, out-of-place output)
        if self.ragged and not RAGGED_ZERO_ROWS:
            for st in self.states:
                shape = self._kv_shape(st, 1, 1) if st["kind"] == "kv" else (1, *st["shape"])
                buf = self.memory.zeros(shape, st["dtype"])
                self._dummy[st["input"]] = (buf, buf if st["in_place"] else self.memory.zeros(shape, st["dtype"]))
        self.slots = SlotTable(max_batch)
        device = "cuda:0" if provider.startswith("CUDA") else "cpu"
        self.info = EngineInfo("onnxruntime", device, record.precision, max_batch,
                               self.max_seq_len, arch.vocab_size, reason)
        self._grow(min(CAPACITY_BLOCK, self.max_seq_len))

    supports_snapshots = True
    supports_all_logits = True  # Chunk.all_logits: the graph's num_logits_to_keep left at 0

    @property
    def recurrent(self) -> bool:
        return self._recurrent

    # --- cache management ---------------------------------------------------------------
    def _grow(self, needed: int) -> None:
        """KV buffers get capacity in whole blocks; existing rows are copied once."""
        new_cap = blocks(needed, CAPACITY_BLOCK, self.max_seq_len)
        if new_cap > self.capacity:
            self._resize(new_cap)

    def _maybe_shrink(self) -> None:
        """Attention reads the whole capacity every step, so give back capacity that long
        sequences left behind once the live ones fit in half of it (amortised: one copy
        of the live rows per halving)."""
        needed = blocks(self.slots.longest() + 1, CAPACITY_BLOCK, 1 << 62)
        if self.capacity > CAPACITY_BLOCK and needed * 2 <= self.capacity:
            self._resize(max(needed, CAPACITY_BLOCK))

    def _resize(self, new_cap: int) -> None:
        keep = min(new_cap, self.capacity)
        for st in self.states:
            if st["kind"] == "kv":
                new = self.memory.zeros(self._kv_shape(st, self.max_batch, new_cap), st["dtype"])
                old = self._buffers.get(st["input"])
                if keep and old is not None:
                    for seq, row in self.slots.rows.items():
                        n = min(keep, self.slots.lengths[seq])
                        if n:
                            self.memory.copy(new, row, old, row, self._axis[st["input"]], n)
                self._buffers[st["input"]] = new
        self._ragged_bindings.clear()  # they point at the old buffers
        self.capacity = new_cap

    @staticmethod
    def _kv_shape(st: dict, rows: int, capacity: int) -> tuple:
        return (rows, *[capacity if d == CACHE_CAPACITY else d for d in st["shape"]])

    def reserve(self, seq_id: int) -> None:
        row = self.slots.reserve(seq_id)
        for st in self.states:  # a reused slot starts from zero state (KV rows are masked instead)
            if st["kind"] != "kv":
                self.memory.zero_row(self._buffers[st["input"]], row)

    def truncate(self, seq_id: int, length: int) -> None:
        if self.recurrent:
            raise EngineError(f"sequence {seq_id}: recurrent (Mamba) state cannot be rolled back to {length} tokens")
        self.slots.truncate(seq_id, length)

    def release(self, seq_id: int) -> None:
        if seq_id not in self.slots:
            return
        move = self.slots.release(seq_id)
        if move is not None:
            self._copy_row(move)
        self._maybe_shrink()

    def _swap_rows(self, swap: Swap) -> None:
        """Exchange two rows' state (the KV positions each holds, the whole recurrent state),
        through a one-row temporary."""
        for st in self.states:
            buf = self._buffers[st["input"]]
            axis = self._axis[st["input"]]
            if axis is None:
                tmp = self.memory.empty((1, *st["shape"]), st["dtype"])
                self.memory.copy(tmp, 0, buf, swap.a, None)
                self.memory.copy(buf, swap.a, buf, swap.b, None)
                self.memory.copy(buf, swap.b, tmp, 0, None)
                continue
            tmp = self.memory.empty(self._kv_shape(st, 1, max(swap.length_a, 1)), st["dtype"])
            if swap.length_a:
                self.memory.copy(tmp, 0, buf, swap.a, axis, swap.length_a)
            if swap.length_b:
                self.memory.copy(buf, swap.a, buf, swap.b, axis, swap.length_b)
            if swap.length_a:
                self.memory.copy(buf, swap.b, tmp, 0, axis, swap.length_a)

    def _copy_row(self, move: Move) -> None:
        for st in self.states:
            buf = self._buffers[st["input"]]
            axis = self._axis[st["input"]]
            if axis is None:
                self.memory.copy(buf, move.dst, buf, move.src, None)
            elif move.length:  # only the filled positions
                self.memory.copy(buf, move.dst, buf, move.src, axis, move.length)

    # --- prefix-cache snapshots -------------------------------------------------------------
    def save_kv(self, seq_id: int, start: int, end: int) -> StateSnapshot:
        row, n = self.slots.rows[seq_id], end - start
        if not 0 <= start < end <= self.slots.lengths[seq_id]:
            raise EngineError(f"sequence {seq_id}: no cached positions [{start}, {end})")
        buffers, nbytes = {}, 0
        for st in self.states:
            if st["kind"] == "kv":
                snap = self.memory.empty(self._kv_shape(st, 1, n), st["dtype"])
                self.memory.copy(snap, 0, self._buffers[st["input"]], row, self._axis[st["input"]], n, src_start=start)
                buffers[st["input"]] = snap
                nbytes += self.memory.nbytes(snap)
        return StateSnapshot("kv", start, end, buffers, nbytes)

    def save_recurrent(self, seq_id: int) -> StateSnapshot | None:
        if not self._recurrent:
            return None
        row, buffers, nbytes = self.slots.rows[seq_id], {}, 0
        for st in self.states:
            if st["kind"] != "kv":
                snap = self.memory.empty((1, *st["shape"]), st["dtype"])
                self.memory.copy(snap, 0, self._buffers[st["input"]], row, None)
                buffers[st["input"]] = snap
                nbytes += self.memory.nbytes(snap)
        n = self.slots.lengths[seq_id]
        return StateSnapshot("recurrent", n, n, buffers, nbytes)

    def restore(self, seq_id: int, length: int, kv: list[StateSnapshot], recurrent: StateSnapshot | None) -> None:
        if seq_id not in self.slots or self.slots.lengths[seq_id]:
            raise EngineError(f"sequence {seq_id}: restore needs a freshly reserved slot")
        if length > self.max_seq_len:
            raise CacheFull(f"sequence {seq_id} would exceed {self.max_seq_len} tokens")
        if self._recurrent and (recurrent is None or recurrent.end != length):
            raise EngineError(f"sequence {seq_id}: recurrent state must be restored at exactly {length} tokens")
        covered = 0
        for seg in sorted(kv, key=lambda s: s.start):
            if seg.start > covered:
                break
            covered = max(covered, seg.end)
        if covered < length:
            raise EngineError(f"sequence {seq_id}: cached KV covers {covered} of {length} positions")
        self._grow(length + 1)
        row = self.slots.rows[seq_id]
        for seg in kv:
            n = min(seg.end, length) - seg.start
            if n <= 0:
                continue
            for st in self.states:
                if st["kind"] == "kv":
                    self.memory.copy(self._buffers[st["input"]], row, seg.buffers[st["input"]], 0,
                                     self._axis[st["input"]], n, dst_start=seg.start)
        if recurrent is not None:
            for name, snap in recurrent.buffers.items():
                self.memory.copy(self._buffers[name], row, snap, 0, None)
        self.slots.set_length(seq_id, length)

    # --- running --------------------------------------------------------------------------
    def _bind_states(self, binding, rows: slice, group: int = 0) -> list:
        """Bind every state tensor's rows `rows` as input and output (group 1 of the ragged graph
        under its `group1.` names). Bound as both, the graph updates the rows in place (TensorScatter
        for KV; the conv window). Outputs that read their input after writing would be unsafe to
        alias, so those go to scratch rows; returns (buffer, scratch, rows) to copy back after the run."""
        copy_back = []
        for st in self.states:
            name_in, name_out = ragged_state_name(st["input"], group), ragged_state_name(st["output"], group)
            buf = self._buffers[st["input"]]
            if st["in_place"]:
                self.memory.bind(binding, name_in, buf, rows, name_out)
            else:
                scratch = self._scratch[st["input"]]
                self.memory.bind(binding, name_in, buf, rows, name_out, out_buf=scratch)
                copy_back.append((buf, scratch, rows))
        return copy_back

    def _execute(self, binding, copy_back: list) -> None:
        """Run the bound call, copy scratch rows back."""
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise EngineError(f"ONNX Runtime step failed: {exc}") from exc
        for buf, scratch, rows in copy_back:
            for row in range(rows.start, rows.stop):
                self.memory.copy(buf, row, scratch, row, None)

    def _run_bound(self, binding, copy_back: list) -> np.ndarray:
        """Run the bound call, copy scratch rows back; the logits output."""
        self._execute(binding, copy_back)
        return binding.get_outputs()[0].numpy()

    def _run(self, call: Call, keep_last: bool = True) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first, so it is get_outputs()[0]
        binding.bind_cpu_input("input_ids", call.input_ids)
        binding.bind_cpu_input("position_ids", call.position_ids)
        if NUM_LOGITS_TO_KEEP in self._input_names:  # 1: the head runs on the last position only; 0: all
            binding.bind_cpu_input(NUM_LOGITS_TO_KEEP, np.array(1 if keep_last else 0, np.int64))
        return self._run_bound(binding, self._bind_states(binding, call.rows))

    def _run_ragged(self, call: RaggedCall) -> np.ndarray:
        """One call of the ragged graph: every group's state bound to its row range in place
        (out-of-place outputs through scratch rows, copied back), the dummy state for a group on
        the spare row. Returns logits [logits, vocab].

        The state bindings (two per state tensor and group: 160 for the 1B) depend only on the
        groups' row ranges and the buffers, so they are made once per range and reused: rebuilding
        them cost ~2 ms of a 56 ms batch-1 step. Only the index inputs and the logits change per call."""
        key = tuple((group.lo, group.hi) for group in call.groups)
        cached = self._ragged_bindings.get(key)
        if cached is None:
            if len(self._ragged_bindings) >= RAGGED_BINDINGS_KEPT:
                self._ragged_bindings.clear()
            binding = self.session.io_binding()
            copy_back = []
            for g, group in enumerate(call.groups):
                if group.lo >= self.max_batch:  # the spare row: an empty group's dummy state
                    for st in self.states:
                        buf, out = self._dummy[st["input"]]
                        self.memory.bind(binding, ragged_state_name(st["input"], g), buf, slice(0, 1),
                                         ragged_state_name(st["output"], g), out_buf=out)
                else:
                    copy_back += self._bind_states(binding, group.rows, g)
            cached = self._ragged_bindings[key] = (binding, copy_back)
        binding, copy_back = cached
        for name in ("input_ids", "position_ids", "unpad_index", "logits_index"):
            binding.bind_cpu_input(name, getattr(call, name))
        for g, group in enumerate(call.groups):
            binding.bind_cpu_input(f"group{g}.token_index", group.token_index)
            binding.bind_cpu_input(f"group{g}.position_ids", group.position_ids)
            binding.bind_cpu_input(f"group{g}.lengths", group.lengths)
        logits = np.empty((1, len(call.logits_index), self.info.vocab_size), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self._execute(binding, copy_back)
        return logits[0]

    def _step_ragged(self, chunks: list[Chunk]) -> np.ndarray:
        spare = None if RAGGED_ZERO_ROWS else self.max_batch
        try:
            plans = [(range(len(chunks)), self.slots.plan_ragged(chunks, self.capacity, self.max_seq_len, spare))]
        except RaggedInfeasible:  # a row too close to max_seq_len for a shared group: each chunk alone
            plans = [(range(i, i + 1), self.slots.plan_ragged([c], self.capacity, self.max_seq_len, spare))
                     for i, c in enumerate(chunks)]
        out = np.empty((len(chunks), self.info.vocab_size), np.float32)
        self.chunk_logits = {}
        for members, call in plans:
            for swap in call.swaps:  # before growing: a resize copies rows by the table's (new) rows
                self._swap_rows(swap)
            self._grow(call.capacity)
            logits = self._run_ragged(call)
            for k, i in enumerate(members):
                lo, hi = call.logits_offsets[k], call.logits_offsets[k + 1]
                out[i] = logits[hi - 1]
                if chunks[i].all_logits:
                    self.chunk_logits[chunks[i].seq_id] = np.array(logits[lo:hi], np.float32)
        self.slots.advance(chunks)
        return out

    def step(self, chunks: list[Chunk]) -> np.ndarray:
        if not chunks:
            return np.zeros((0, self.info.vocab_size), np.float32)
        if self.ragged:
            return self._step_ragged(chunks)
        # Grow first, also past every idle row's length: the dummy write a KV-only decode call
        # makes at an idle row's first free position must land inside the capacity.
        self._grow(max(max(c.start + len(c.token_ids) for c in chunks), self.slots.longest() + 1))
        calls = self.slots.plan(chunks, self.capacity, self.max_seq_len, self._recurrent)
        out = np.empty((len(chunks), self.info.vocab_size), np.float32)
        self.chunk_logits = {}  # Chunk.all_logits (tgis prompt logprobs): seq_id -> [tokens, vocab]
        for call in calls:
            want_all = not call.decode and chunks[call.members[0]].all_logits
            logits = self._run(call, keep_last=not want_all)
            for i, r in zip(call.members, call.member_rows):
                out[i] = logits[r, -1]
            if want_all:
                self.chunk_logits[chunks[call.members[0]].seq_id] = np.array(logits[0], np.float32)
        for i, c in enumerate(chunks):
            if c.all_logits and len(c.token_ids) == 1:
                self.chunk_logits[c.seq_id] = out[i][None].copy()
        self.slots.advance(chunks)
        return out

    def cache_bytes(self) -> int:
        return sum(self.memory.nbytes(b) for b in self._buffers.values())

    def free_memory_bytes(self) -> int | None:
        return self.memory.free_bytes()


def state_specs(graph: GraphRecord) -> list[dict]:
    """The per-sequence state tensors of a decoder graph (its manifest record's typed `state`), as the
    dicts this engine indexes, with numpy dtypes."""
    return [{**st.to_dict(), "shape": st.shape, "dtype": np.dtype(_np_dtype(st.dtype))} for st in graph.state]


def first_positions(state: dict, n: int) -> tuple:
    """Index of cache positions [0, n) within one row of a KV state (its capacity axis is named)."""
    return tuple(slice(0, n) if d == CACHE_CAPACITY else slice(None) for d in state["shape"])


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return name
