"""TensorRT engine: the artifact's plan with the same slot design as the ONNX Runtime engine.

Device memory: torch.cuda tensors (torch with CUDA is what a TensorRT machine
running this project has anyway, it gives allocation, row copies and
host<->device transfers without hand-written CUDA calls; cuda-python would
add a dependency for the same thing). The ONNX Runtime CPU path does not need
it: this module imports torch and tensorrt only when an engine is opened.

The KV cache of layer i is one buffer per K and V, [max_batch, kv_heads,
capacity, head_dim], with capacity fixed at the plan's build-time max_seq
(TensorRT's KVCacheUpdate needs a static cache length, see
tensorrt_build.py). Sequence s lives in row `row[s]`. Each call binds a
contiguous row range of every buffer as both the `past_key_values.*` input
address and the `present.*` output address, so the in-place cache update
writes the new keys/values straight into the slot; nothing copies the cache
per token. Decodes of all running sequences go in one call over rows [0, n)
(execution context of the decode profile); each multi-token chunk is its own
call over its single row (context of the prefill profile). Rows stay compact:
when a sequence leaves, the last row moves into its place (only its filled
positions are copied). Calls run with `execute_async_v3` on one CUDA stream.

A plan runs only with the TensorRT version and GPU model it was built with:
the constructor refuses any other, naming both (`plan_compatibility`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..artifact import load_manifest
from .base import CacheFull, Chunk, Engine, EngineError, EngineInfo, check_chunks
from ..manifest import PlanRecord
from .tensorrt_build import DECODE, PREFILL, current_runtime, plan_compatibility

log = logging.getLogger(__name__)


def select_plan(artifact: str | Path, runtime: dict | None = None) -> tuple[PlanRecord | None, str]:
    """(build record of a plan that runs here, why) or (None, why not). Imports no GPU library itself
    beyond what `current_runtime` probes (tests pass `runtime` to simulate a machine)."""
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    plans = manifest.plans
    if not plans:
        return None, "the artifact has no TensorRT plan (build one with `granite-deploy build` on a GPU machine)"
    runtime = runtime if runtime is not None else current_runtime()
    reasons = []
    for record in plans:
        problems = plan_compatibility(record, runtime)
        if not problems and not (artifact / record.file).is_file():
            problems = [f"{record.file} is listed in the manifest but missing"]
        if not problems:
            return record, (f"TensorRT plan {record.file} matches this machine (TensorRT "
                            f"{runtime['tensorrt']}, {runtime['gpu']}, compute capability "
                            f"{runtime['compute_capability']})")
        reasons += problems
    return None, "no TensorRT plan fits this machine: " + "; ".join(reasons)


class TensorRTEngine(Engine):
    def __init__(
        self,
        artifact: str | Path,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        reason: str = "",
        plan: PlanRecord | None = None,
    ):
        self.artifact = Path(artifact)
        manifest = load_manifest(self.artifact)
        runtime = current_runtime()
        if plan is None:
            plan, why = select_plan(self.artifact, runtime)
            if plan is None:
                raise EngineError(f"{self.artifact}: {why}")
        problems = plan_compatibility(plan, runtime)
        if problems:
            raise EngineError(f"{self.artifact}: refusing TensorRT plan: {'; '.join(problems)}")

        import tensorrt as trt
        import torch

        arch = manifest.architecture
        graph = manifest.graph(plan.graph)
        self.num_layers = arch.num_layers
        self.kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.capacity = plan.cache_capacity
        self.max_batch = min(max_batch, plan.max_batch)
        if max_batch > self.max_batch:
            log.warning("TensorRT plan %s allows at most batch %d (asked %d)", plan.file, self.max_batch, max_batch)
        self.max_seq_len = min(max_seq_len or self.capacity, self.capacity)
        cache_dtype = next(st.dtype for st in graph.state if st.kind == "kv")
        torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cache_dtype]
        self._torch = torch
        self.device = torch.device("cuda", torch.cuda.current_device())

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        data = (self.artifact / plan.file).read_bytes()
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise EngineError(f"{self.artifact / plan.file}: TensorRT could not deserialize the plan")
        self._stream = torch.cuda.Stream(device=self.device)
        index = {p.name: p.index for p in plan.profiles}
        self._contexts = {}
        for name in (PREFILL, DECODE):
            ctx = self._engine.create_execution_context()
            if ctx is None:
                raise EngineError(f"TensorRT: cannot create an execution context for profile {name!r}")
            ctx.set_optimization_profile_async(index[name], self._stream.cuda_stream)
            self._contexts[name] = ctx
        self._stream.synchronize()

        shape = (self.max_batch, self.kv_heads, self.capacity, self.head_dim)
        self._keys = [torch.zeros(shape, dtype=torch_dtype, device=self.device) for _ in range(self.num_layers)]
        self._values = [torch.zeros(shape, dtype=torch_dtype, device=self.device) for _ in range(self.num_layers)]
        self._logits = torch.empty((self.max_batch, 1, arch.vocab_size), dtype=torch.float32, device=self.device)
        self._names = [
            (f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value")
            for i in range(self.num_layers)
        ]
        self._row: dict[int, int] = {}
        self._length: dict[int, int] = {}
        self.plan = plan
        self.info = EngineInfo("tensorrt", str(self.device), plan.precision,
                               self.max_batch, self.max_seq_len, arch.vocab_size, reason)

    # --- slots -----------------------------------------------------------------------------------
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
        last = len(self._row)
        if row != last:
            mover = next(s for s, r in self._row.items() if r == last)
            n = self._length[mover]
            with self._torch.cuda.stream(self._stream):
                for buf in self._keys + self._values:
                    buf[row, :, :n].copy_(buf[last, :, :n])
            self._row[mover] = row

    # --- running ---------------------------------------------------------------------------------
    def _run(self, profile: str, rows: slice, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        torch = self._torch
        ctx = self._contexts[profile]
        n = rows.stop - rows.start
        with torch.cuda.stream(self._stream):
            ids_d = torch.from_numpy(ids).to(self.device, non_blocking=True)
            pos_d = torch.from_numpy(positions).to(self.device, non_blocking=True)
            ok = ctx.set_input_shape("input_ids", tuple(ids.shape)) and \
                ctx.set_input_shape("position_ids", tuple(positions.shape))
            ctx.set_tensor_address("input_ids", ids_d.data_ptr())
            ctx.set_tensor_address("position_ids", pos_d.data_ptr())
            cache_shape = (n, self.kv_heads, self.capacity, self.head_dim)
            for (past_k, past_v, present_k, present_v), k, v in zip(self._names, self._keys, self._values):
                kp, vp = k[rows].data_ptr(), v[rows].data_ptr()  # a row range of a contiguous buffer
                ok = ok and ctx.set_input_shape(past_k, cache_shape) and ctx.set_input_shape(past_v, cache_shape)
                ctx.set_tensor_address(past_k, kp)
                ctx.set_tensor_address(present_k, kp)  # same address: in-place cache update
                ctx.set_tensor_address(past_v, vp)
                ctx.set_tensor_address(present_v, vp)
            if not ok:
                raise EngineError(f"TensorRT: shapes {tuple(ids.shape)} / cache {cache_shape} are outside the "
                                  f"{profile} profile of {self.plan.file}")
            ctx.set_tensor_address("logits", self._logits.data_ptr())
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise EngineError("TensorRT step failed (execute_async_v3 returned False; see its log)")
            out = self._logits[:n].to("cpu", non_blocking=False)
        self._stream.synchronize()  # ids_d/pos_d stay alive until the step has consumed them
        return out.numpy()

    def step(self, chunks: list[Chunk]) -> np.ndarray:
        if not chunks:
            return np.zeros((0, self.info.vocab_size), np.float32)
        check_chunks(chunks, self._length, self.max_seq_len)
        out = np.empty((len(chunks), self.info.vocab_size), np.float32)

        decodes = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        if decodes:
            n_rows = max(self._row[chunks[i].seq_id] for i in decodes) + 1
            ids = np.zeros((n_rows, 1), np.int64)
            pos = np.zeros((n_rows, 1), np.int64)  # rows without a decode: harmless write at their first free slot
            for seq, row in self._row.items():
                if row < n_rows:
                    pos[row, 0] = min(self._length[seq], self.capacity - 1)
            for i in decodes:
                c = chunks[i]
                row = self._row[c.seq_id]
                ids[row, 0], pos[row, 0] = c.token_ids[0], c.start
            logits = self._run(DECODE, slice(0, n_rows), ids, pos)
            for i in decodes:
                out[i] = logits[self._row[chunks[i].seq_id], -1]
        for i, c in enumerate(chunks):
            if len(c.token_ids) > 1:
                row = self._row[c.seq_id]
                ids = np.asarray(c.token_ids, np.int64)[None]
                pos = np.arange(c.start, c.start + len(c.token_ids), dtype=np.int64)[None]
                out[i] = self._run(PREFILL, slice(row, row + 1), ids, pos)[0, -1]
        for c in chunks:
            self._length[c.seq_id] = c.start + len(c.token_ids)
        return out

    def cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._keys + self._values)

    def close(self) -> None:
        self._contexts.clear()
        self._engine = None
