"""TensorRT engine: the artifact's plan with the same slot design as the ONNX Runtime engine.

Device memory: torch.cuda tensors (torch with CUDA is what a TensorRT machine
running this project has anyway, it gives allocation, row copies and
host<->device transfers without hand-written CUDA calls; cuda-python would
add a dependency for the same thing). The ONNX Runtime CPU path does not need
it: this module imports torch and tensorrt only when an engine is opened.

Every state tensor of the graph's manifest state spec (attention K/V, Mamba
conv/ssm; the spec the build planned its profiles from) is one buffer
[max_batch, *shape], a KV capacity axis fixed at the plan's build-time max_seq
(TensorRT's KVCacheUpdate needs a static cache length, see
tensorrt_build.py). Sequence s lives in one row of the slot table. Each call
binds a contiguous row range of every buffer as both the state input address
and, where the spec allows in-place (KV, conv), the output address, so the
update writes straight into the slot; nothing copies the cache per token
(the Mamba ssm output goes to a scratch row range, copied back). Recurrent
state zeroes on reserve, and only rows that really decode run. Decodes of all
running sequences go in one call over rows [0, n)
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
from .base import Chunk, Engine, EngineError, EngineInfo
from .slots import Call, SlotTable
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
        # Every state tensor (attention KV, Mamba conv/ssm) comes from the graph's state spec, the same
        # spec the build planned its profiles from (tensorrt_build.plan_profiles).
        self.states = graph.state
        self._recurrent = graph.recurrent
        self.capacity = plan.cache_capacity
        self.max_batch = min(max_batch, plan.max_batch)
        if max_batch > self.max_batch:
            log.warning("TensorRT plan %s allows at most batch %d (asked %d)", plan.file, self.max_batch, max_batch)
        self.max_seq_len = min(max_seq_len or self.capacity, self.capacity)
        torch_dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        self._torch = torch
        self.device = torch.device("cuda", torch.cuda.current_device())

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        data = (self.artifact / plan.file).read_bytes()
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise EngineError(f"{self.artifact / plan.file}: TensorRT could not deserialize the plan")
        self._stream = torch.cuda.Stream(device=self.device)
        self._contexts = {}
        for name in (PREFILL, DECODE):
            ctx = self._engine.create_execution_context()
            if ctx is None:
                raise EngineError(f"TensorRT: cannot create an execution context for profile {name!r}")
            ctx.set_optimization_profile_async(plan.profile_index(name), self._stream.cuda_stream)
            self._contexts[name] = ctx
        self._stream.synchronize()

        # One [max_batch, ...] device buffer per state input (capacity axis at the plan's static capacity);
        # outputs that may not alias their input (in_place False: Mamba ssm) get a scratch buffer.
        self._buffers, self._scratch = {}, {}
        for st in self.states:
            shape = st.batched_shape(self.max_batch, self.capacity)
            self._buffers[st.input] = torch.zeros(shape, dtype=torch_dtypes[st.dtype], device=self.device)
            if not st.in_place:
                self._scratch[st.input] = torch.zeros(shape, dtype=torch_dtypes[st.dtype], device=self.device)
        self._logits = torch.empty((self.max_batch, 1, arch.vocab_size), dtype=torch.float32, device=self.device)
        self.slots = SlotTable(self.max_batch)
        self.plan = plan
        self.info = EngineInfo("tensorrt", str(self.device), plan.precision,
                               self.max_batch, self.max_seq_len, arch.vocab_size, reason)

    # --- slots (the shared table; this engine only copies rows and runs calls) ---------------
    def reserve(self, seq_id: int) -> None:
        row = self.slots.reserve(seq_id)
        with self._torch.cuda.stream(self._stream):
            for st in self.states:  # a reused slot starts from zero recurrent state (KV rows are masked)
                if st.kind != "kv":
                    self._buffers[st.input][row].zero_()

    def truncate(self, seq_id: int, length: int) -> None:
        if self._recurrent:
            raise EngineError(f"sequence {seq_id}: recurrent (Mamba) state cannot be rolled back to {length} tokens")
        self.slots.truncate(seq_id, length)

    def release(self, seq_id: int) -> None:
        move = self.slots.release(seq_id)
        if move is not None:
            n = move.length
            with self._torch.cuda.stream(self._stream):
                for st in self.states:
                    buf = self._buffers[st.input]
                    if st.kind == "kv":
                        if n:  # only the filled positions, along the spec's capacity axis
                            buf[move.dst].narrow(st.capacity_axis, 0, n).copy_(
                                buf[move.src].narrow(st.capacity_axis, 0, n))
                    else:
                        buf[move.dst].copy_(buf[move.src])

    # --- running ---------------------------------------------------------------------------------
    def _run(self, call: Call) -> np.ndarray:
        torch = self._torch
        profile = DECODE if call.decode else PREFILL
        ctx = self._contexts[profile]
        rows, ids, positions = call.rows, call.input_ids, call.position_ids
        n = rows.stop - rows.start
        with torch.cuda.stream(self._stream):
            ids_d = torch.from_numpy(ids).to(self.device, non_blocking=True)
            pos_d = torch.from_numpy(positions).to(self.device, non_blocking=True)
            ok = ctx.set_input_shape("input_ids", tuple(ids.shape)) and \
                ctx.set_input_shape("position_ids", tuple(positions.shape))
            ctx.set_tensor_address("input_ids", ids_d.data_ptr())
            ctx.set_tensor_address("position_ids", pos_d.data_ptr())
            copy_back = []
            for st in self.states:
                view = self._buffers[st.input][rows]  # a row range of a contiguous buffer
                ok = ok and ctx.set_input_shape(st.input, tuple(view.shape))
                ctx.set_tensor_address(st.input, view.data_ptr())
                if st.in_place:
                    ctx.set_tensor_address(st.output, view.data_ptr())  # same address: in-place update
                else:
                    scratch = self._scratch[st.input][rows]
                    ctx.set_tensor_address(st.output, scratch.data_ptr())
                    copy_back.append((view, scratch))
            if not ok:
                raise EngineError(f"TensorRT: shapes {tuple(ids.shape)} over rows {rows.start}..{rows.stop} are "
                                  f"outside the {profile} profile of {self.plan.file}")
            ctx.set_tensor_address("logits", self._logits.data_ptr())
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise EngineError("TensorRT step failed (execute_async_v3 returned False; see its log)")
            for view, scratch in copy_back:
                view.copy_(scratch)
            out = self._logits[:n].to("cpu", non_blocking=False)
        self._stream.synchronize()  # ids_d/pos_d stay alive until the step has consumed them
        return out.numpy()

    def step(self, chunks: list[Chunk]) -> np.ndarray:
        if not chunks:
            return np.zeros((0, self.info.vocab_size), np.float32)
        # The capacity is fixed at the plan's max_seq; recurrent (Mamba) state: only rows that decode run.
        calls = self.slots.plan(chunks, self.capacity, self.max_seq_len, recurrent=self._recurrent)
        out = np.empty((len(chunks), self.info.vocab_size), np.float32)
        for call in calls:
            logits = self._run(call)
            for i, r in zip(call.members, call.member_rows):
                out[i] = logits[r, -1]
        self.slots.advance(chunks)
        return out

    def cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def close(self) -> None:
        self._contexts.clear()
        self._engine = None
