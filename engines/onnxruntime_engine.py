"""ONNX Runtime engine: the artifact's decoder graph with an in-place, slot-based KV cache.

The cache of layer i is one buffer per K and V, [max_batch, kv_heads,
capacity, head_dim] for the portable graph or [max_batch, kv_heads, head_dim,
capacity] for the CPU flavour (the manifest's state record says which axis is
the capacity); sequence s lives in row `row[s]`. Every step binds
contiguous row ranges of these buffers as both the `past_key_values.*` input
and the `present.*` output through IO binding, so the graph's TensorScatter
writes the new keys/values in place and nothing copies the cache per token.

Decodes of all running sequences go in one call over rows [0, n); each
prefill chunk is its own call over its single row (so decode rows are never
padded to a prompt's length). Rows are kept compact: when a sequence leaves,
the last row moves into its place (a copy of that sequence's filled positions
only, once per finished request), so a decode call never reads dead rows.
Capacity grows in blocks as sequences get longer, so attention reads only
about as much cache as is in use.

Hybrid (Mamba2) models add fixed-size per-sequence state (`conv`, `ssm`)
listed in the manifest's `state` record: same rows, zeroed when a slot is
reserved, and decode calls then cover only rows that really decode.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..artifact import CACHE_CAPACITY, DECODER, DECODER_CPU, graph_path, load_manifest
from .base import CacheFull, Chunk, Engine, EngineError, EngineInfo, check_chunks

log = logging.getLogger(__name__)
CAPACITY_BLOCK = 256


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
        """graph: which manifest graph to run; by default the CPU flavour on the CPU provider
        when the artifact has one (its attention streams the cache at memory bandwidth), else
        the portable decoder."""
        import onnxruntime as ort

        self.artifact = Path(artifact)
        manifest = load_manifest(self.artifact)
        arch = manifest["architecture"]
        graphs = manifest["graphs"]
        if graph is None:
            graph = DECODER_CPU if provider == "CPUExecutionProvider" and DECODER_CPU in graphs else DECODER
        if graph not in graphs:
            raise EngineError(f"{self.artifact}: manifest has no graph {graph!r} (it has {', '.join(graphs)})")
        self.graph_name = graph
        record = graphs[graph]
        if record.get("kv_cache", {}).get("kind") != "fixed_capacity_in_place":
            raise EngineError(f"{self.artifact}: {graph} graph has cache layout {record.get('kv_cache')}, "
                              "this engine needs 'fixed_capacity_in_place'")
        context = int(manifest.get("context_length") or arch["max_position_embeddings"])
        self.max_seq_len = min(max_seq_len or context, context)
        self.max_batch = max_batch
        self.states = state_specs(record)
        # Recurrent (Mamba) state changes with every token fed, so rows that do not
        # decode this step must not be run at all (no dummy rows in a decode call).
        self._recurrent = any(st["kind"] != "kv" for st in self.states)
        self.session = ort.InferenceSession(
            str(graph_path(self.artifact, manifest, self.graph_name)), _session_options(threads), providers=[provider]
        )
        self._input_names = {i.name for i in self.session.get_inputs()}
        self.capacity = 0
        self._buffers: dict[str, np.ndarray] = {}  # state input name -> [max_batch, ...]
        self._scratch: dict[str, np.ndarray] = {}  # outputs that cannot be written in place
        for st in self.states:
            if st["kind"] != "kv":
                shape = (max_batch, *st["shape"])
                self._buffers[st["input"]] = np.zeros(shape, st["dtype"])
                if not st["in_place"]:
                    self._scratch[st["input"]] = np.zeros(shape, st["dtype"])
        self._row: dict[int, int] = {}  # seq_id -> row
        self._length: dict[int, int] = {}  # seq_id -> tokens cached
        device = "cuda:0" if provider.startswith("CUDA") else "cpu"
        self.info = EngineInfo("onnxruntime", device, record.get("precision", "fp32"), max_batch,
                               self.max_seq_len, arch["vocab_size"], reason)
        self._grow(min(CAPACITY_BLOCK, self.max_seq_len))

    # --- cache management ---------------------------------------------------------------
    def _grow(self, needed: int) -> None:
        """KV buffers get capacity in whole blocks; existing rows are copied once."""
        new_cap = min(self.max_seq_len, -(-needed // CAPACITY_BLOCK) * CAPACITY_BLOCK)
        if new_cap > self.capacity:
            self._resize(new_cap)

    def _maybe_shrink(self) -> None:
        """Attention reads the whole capacity every step, so give back capacity that long
        sequences left behind once the live ones fit in half of it (amortised: one copy
        of the live rows per halving)."""
        needed = -(-(max(self._length.values(), default=0) + 1) // CAPACITY_BLOCK) * CAPACITY_BLOCK
        if self.capacity > CAPACITY_BLOCK and needed * 2 <= self.capacity:
            self._resize(max(needed, CAPACITY_BLOCK))

    def _resize(self, new_cap: int) -> None:
        keep = min(new_cap, self.capacity)
        rows = len(self._row)
        for st in self.states:
            if st["kind"] == "kv":
                new = np.zeros((self.max_batch, *[new_cap if d == CACHE_CAPACITY else d for d in st["shape"]]),
                               st["dtype"])
                if keep:
                    part = (slice(0, rows), *first_positions(st, keep))
                    new[part] = self._buffers[st["input"]][part]
                self._buffers[st["input"]] = new
        self.capacity = new_cap

    def reserve(self, seq_id: int) -> None:
        if seq_id in self._row:
            raise EngineError(f"sequence {seq_id} already has a cache slot")
        if len(self._row) >= self.max_batch:
            raise CacheFull(f"all {self.max_batch} cache slots are in use")
        row = len(self._row)
        self._row[seq_id] = row
        self._length[seq_id] = 0
        for st in self.states:  # a reused slot starts from zero state (KV rows are masked instead)
            if st["kind"] != "kv":
                self._buffers[st["input"]][row] = 0

    def release(self, seq_id: int) -> None:
        row = self._row.pop(seq_id, None)
        if row is None:
            return
        self._length.pop(seq_id)
        last = len(self._row)  # the highest row still in use, before compaction
        if row != last:
            mover = next(s for s, r in self._row.items() if r == last)
            n = self._length[mover]
            for st in self.states:
                buf = self._buffers[st["input"]]
                if st["kind"] == "kv":
                    filled = first_positions(st, n)  # only the filled positions
                    buf[(row, *filled)] = buf[(last, *filled)]
                else:
                    buf[row] = buf[last]
            self._row[mover] = row
        self._maybe_shrink()

    # --- running --------------------------------------------------------------------------
    def _run(self, rows: slice, ids: np.ndarray, positions: np.ndarray, keep_last: bool) -> np.ndarray:
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first, so it is get_outputs()[0]
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", positions)
        if keep_last and "num_logits_to_keep" in self._input_names:
            binding.bind_cpu_input("num_logits_to_keep", np.array(1, np.int64))
        copy_back = []
        for st in self.states:
            # A row range of a C-contiguous buffer is contiguous: wrap it without a copy.
            # Bound as both input and output, the graph updates it in place (TensorScatter
            # for KV; the conv window). Outputs that read their input after writing would
            # be unsafe to alias, so those go to scratch rows and are copied back.
            view = self._buffers[st["input"]][rows]
            value = ort.OrtValue.ortvalue_from_numpy(view)
            binding.bind_ortvalue_input(st["input"], value)
            if st["in_place"]:
                binding.bind_ortvalue_output(st["output"], value)
            else:
                scratch = self._scratch[st["input"]][rows]
                binding.bind_ortvalue_output(st["output"], ort.OrtValue.ortvalue_from_numpy(scratch))
                copy_back.append((view, scratch))
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise EngineError(f"ONNX Runtime step failed: {exc}") from exc
        for view, scratch in copy_back:
            np.copyto(view, scratch)
        return binding.get_outputs()[0].numpy()

    def step(self, chunks: list[Chunk]) -> np.ndarray:
        if not chunks:
            return np.zeros((0, self.info.vocab_size), np.float32)
        check_chunks(chunks, self._length, self.max_seq_len)
        self._grow(max(c.start + len(c.token_ids) for c in chunks))
        out = np.empty((len(chunks), self.info.vocab_size), np.float32)

        decodes = sorted((i for i, c in enumerate(chunks) if len(c.token_ids) == 1),
                         key=lambda i: self._row[chunks[i].seq_id])
        for lo, hi, members in self._decode_calls(decodes, chunks):
            ids = np.zeros((hi - lo, 1), np.int64)
            # Rows without a decode this step (KV-only models) get a harmless write at
            # their first free position, which a later step overwrites before reading.
            pos = np.zeros((hi - lo, 1), np.int64)
            for seq, row in self._row.items():
                if lo <= row < hi:
                    pos[row - lo, 0] = min(self._length[seq], self.capacity - 1)
            for i in members:
                c = chunks[i]
                row = self._row[c.seq_id] - lo
                ids[row, 0], pos[row, 0] = c.token_ids[0], c.start
            logits = self._run(slice(lo, hi), ids, pos, keep_last=True)
            for i in members:
                out[i] = logits[self._row[chunks[i].seq_id] - lo, -1]
        for i, c in enumerate(chunks):
            if len(c.token_ids) > 1:
                row = self._row[c.seq_id]
                ids = np.asarray(c.token_ids, np.int64)[None]
                pos = np.arange(c.start, c.start + len(c.token_ids), dtype=np.int64)[None]
                out[i] = self._run(slice(row, row + 1), ids, pos, keep_last=True)[0, -1]
        for c in chunks:
            self._length[c.seq_id] = c.start + len(c.token_ids)
        return out

    def _decode_calls(self, decodes: list[int], chunks: list[Chunk]):
        """Row ranges for the decode calls: one call over rows [0, last] for KV-only models;
        for recurrent state, one call per run of consecutive decoding rows."""
        if not decodes:
            return []
        rows = [self._row[chunks[i].seq_id] for i in decodes]
        if not self._recurrent:
            return [(0, rows[-1] + 1, decodes)]
        calls, start = [], 0
        for k in range(1, len(rows) + 1):
            if k == len(rows) or rows[k] != rows[k - 1] + 1:
                calls.append((rows[start], rows[k - 1] + 1, decodes[start:k]))
                start = k
        return calls

    def cache_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())


def state_specs(graph: dict) -> list[dict]:
    """The per-sequence state tensors of a decoder graph, from its manifest record.

    Artifacts list them under "state"; otherwise every `past_key_values.*` input
    is a KV cache written in place (the dense layout in export/io_spec.py).
    """
    if "state" in graph:
        return [{**st, "shape": tuple(st["shape"]), "dtype": np.dtype(_np_dtype(st["dtype"]))} for st in graph["state"]]
    specs = []
    for spec in graph["inputs"]:
        if spec["name"].startswith("past_key_values."):
            _, layer, part = spec["name"].split(".")
            shape = spec["shape"]
            specs.append({"input": spec["name"], "output": f"present.{layer}.{part}", "kind": "kv",
                          "shape": (shape[1], shape[2], shape[3]), "dtype": np.dtype(_np_dtype(spec["dtype"])),
                          "in_place": True})
    return specs


def first_positions(state: dict, n: int) -> tuple:
    """Index of cache positions [0, n) within one row of a KV state (its capacity axis is named)."""
    return tuple(slice(0, n) if d == CACHE_CAPACITY else slice(None) for d in state["shape"])


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return name
