"""ONNX Runtime engine: the artifact's decoder graph with an in-place, slot-based KV cache.

The cache of layer i is one buffer per K and V, [max_batch, kv_heads,
capacity, head_dim]; sequence s lives in row `row[s]`. Every step binds
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
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..artifact import graph_path, load_manifest
from .base import CacheFull, Chunk, Engine, EngineError, EngineInfo

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
    ):
        import onnxruntime as ort

        self.artifact = Path(artifact)
        manifest = load_manifest(self.artifact)
        arch = manifest["architecture"]
        graph = manifest["graphs"]["decoder"]
        if graph.get("kv_cache", {}).get("kind") != "fixed_capacity_in_place":
            raise EngineError(f"{self.artifact}: decoder graph has cache layout {graph.get('kv_cache')}, "
                              "this engine needs 'fixed_capacity_in_place'")
        self.num_layers = arch["num_layers"]
        self.kv_heads = arch["num_kv_heads"]
        self.head_dim = arch["head_dim"]
        context = int(manifest.get("context_length") or arch["max_position_embeddings"])
        self.max_seq_len = min(max_seq_len or context, context)
        self.max_batch = max_batch
        self.cache_dtype = np.dtype(next(s["dtype"] for s in graph["inputs"] if s["name"].startswith("past_")))
        self.session = ort.InferenceSession(
            str(graph_path(self.artifact, manifest)), _session_options(threads), providers=[provider]
        )
        self._input_names = {i.name for i in self.session.get_inputs()}
        self._names = [
            (f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value")
            for i in range(self.num_layers)
        ]
        self.capacity = 0
        self._keys: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._row: dict[int, int] = {}  # seq_id -> row
        self._length: dict[int, int] = {}  # seq_id -> tokens cached
        device = "cuda:0" if provider.startswith("CUDA") else "cpu"
        self.info = EngineInfo("onnxruntime", device, graph.get("precision", "fp32"), max_batch,
                               self.max_seq_len, arch["vocab_size"], reason)
        self._grow(min(CAPACITY_BLOCK, self.max_seq_len))

    # --- cache management ---------------------------------------------------------------
    def _grow(self, needed: int) -> None:
        new_cap = min(self.max_seq_len, -(-needed // CAPACITY_BLOCK) * CAPACITY_BLOCK)
        if new_cap <= self.capacity:
            return
        shape = (self.max_batch, self.kv_heads, new_cap, self.head_dim)
        keys = [np.zeros(shape, self.cache_dtype) for _ in range(self.num_layers)]
        values = [np.zeros(shape, self.cache_dtype) for _ in range(self.num_layers)]
        if self.capacity:
            for old, new in zip(self._keys + self._values, keys + values):
                new[:, :, : self.capacity] = old
        self._keys, self._values, self.capacity = keys, values, new_cap

    def reserve(self, seq_id: int) -> None:
        if seq_id in self._row:
            raise EngineError(f"sequence {seq_id} already has a cache slot")
        if len(self._row) >= self.max_batch:
            raise CacheFull(f"all {self.max_batch} cache slots are in use")
        self._row[seq_id] = len(self._row)
        self._length[seq_id] = 0

    def release(self, seq_id: int) -> None:
        row = self._row.pop(seq_id, None)
        if row is None:
            return
        self._length.pop(seq_id)
        last = len(self._row)  # the highest row still in use, before compaction
        if row != last:
            mover = next(s for s, r in self._row.items() if r == last)
            n = self._length[mover]
            for buf in self._keys + self._values:
                buf[row, :, :n] = buf[last, :, :n]
            self._row[mover] = row

    # --- running --------------------------------------------------------------------------
    def _run(self, rows: slice, ids: np.ndarray, positions: np.ndarray, keep_last: bool) -> np.ndarray:
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first, so it is get_outputs()[0]
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", positions)
        if keep_last and "num_logits_to_keep" in self._input_names:
            binding.bind_cpu_input("num_logits_to_keep", np.array(1, np.int64))
        for (past_k, past_v, present_k, present_v), k, v in zip(self._names, self._keys, self._values):
            # A row range of a C-contiguous buffer is contiguous: wrap it without a copy
            # and bind it as both input and output, which makes TensorScatter write in place.
            kv = ort.OrtValue.ortvalue_from_numpy(k[rows])
            vv = ort.OrtValue.ortvalue_from_numpy(v[rows])
            binding.bind_ortvalue_input(past_k, kv)
            binding.bind_ortvalue_output(present_k, kv)
            binding.bind_ortvalue_input(past_v, vv)
            binding.bind_ortvalue_output(present_v, vv)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise EngineError(f"ONNX Runtime step failed: {exc}") from exc
        return binding.get_outputs()[0].numpy()

    def step(self, chunks: list[Chunk]) -> np.ndarray:
        if not chunks:
            return np.zeros((0, self.info.vocab_size), np.float32)
        for c in chunks:
            if c.seq_id not in self._row:
                raise EngineError(f"sequence {c.seq_id} has no cache slot (reserve it first)")
            if c.start != self._length[c.seq_id]:
                raise EngineError(f"sequence {c.seq_id}: chunk starts at {c.start}, cache holds {self._length[c.seq_id]}")
            if not c.token_ids:
                raise EngineError(f"sequence {c.seq_id}: empty chunk")
            if c.start + len(c.token_ids) > self.max_seq_len:
                raise CacheFull(f"sequence {c.seq_id} would exceed {self.max_seq_len} tokens")
        self._grow(max(c.start + len(c.token_ids) for c in chunks))
        out = np.empty((len(chunks), self.info.vocab_size), np.float32)

        decodes = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        if decodes:
            n_rows = max(self._row[chunks[i].seq_id] for i in decodes) + 1
            ids = np.zeros((n_rows, 1), np.int64)
            # Rows without a decode this step get a harmless write at their first free position.
            pos = np.zeros((n_rows, 1), np.int64)
            for seq, row in self._row.items():
                if row < n_rows:
                    pos[row, 0] = min(self._length[seq], self.capacity - 1)
            for i in decodes:
                c = chunks[i]
                row = self._row[c.seq_id]
                ids[row, 0], pos[row, 0] = c.token_ids[0], c.start
            logits = self._run(slice(0, n_rows), ids, pos, keep_last=True)
            for i in decodes:
                out[i] = logits[self._row[chunks[i].seq_id], -1]
        for i, c in enumerate(chunks):
            if len(c.token_ids) > 1:
                row = self._row[c.seq_id]
                ids = np.asarray(c.token_ids, np.int64)[None]
                pos = np.arange(c.start, c.start + len(c.token_ids), dtype=np.int64)[None]
                out[i] = self._run(slice(row, row + 1), ids, pos, keep_last=True)[0, -1]
        for c in chunks:
            self._length[c.seq_id] = c.start + len(c.token_ids)
        return out

    def cache_bytes(self) -> int:
        return sum(b.nbytes for b in self._keys + self._values)
