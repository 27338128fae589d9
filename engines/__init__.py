"""Engines run an artifact. `load_engine` picks one and says why."""

from __future__ import annotations

import logging
from pathlib import Path

from .base import CacheFull, Chunk, Engine, EngineError, EngineInfo

log = logging.getLogger(__name__)
ENGINE_CHOICES = ("auto", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda")


def load_engine(artifact: str | Path, engine: str = "auto", max_batch: int = 8, max_seq_len: int | None = None,
                threads: int | None = None) -> Engine:
    """Open the best engine for this machine: TensorRT when the artifact has a plan built for this
    GPU and TensorRT version, else ONNX Runtime CUDA when onnxruntime-gpu is installed, else ONNX
    Runtime CPU. Logs one line naming the engine and why."""
    from .onnxruntime_engine import OnnxRuntimeEngine, available_providers

    trt_why = ""
    if engine in ("auto", "tensorrt"):
        from .tensorrt_engine import TensorRTEngine, select_plan

        plan, trt_why = select_plan(artifact)
        if plan is not None:
            eng = TensorRTEngine(artifact, max_batch=max_batch, max_seq_len=max_seq_len, reason=trt_why, plan=plan)
            log.info("engine: tensorrt %s (%s)", plan["file"], trt_why)
            return eng
        if engine == "tensorrt":
            raise ValueError(f"--engine: tensorrt requested but {trt_why}")
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"--engine: {engine!r} is not one of {', '.join(ENGINE_CHOICES + ('tensorrt',))}")
    providers = available_providers()
    if engine in ("auto", "onnxruntime", "onnxruntime-cuda") and "CUDAExecutionProvider" in providers:
        provider, reason = "CUDAExecutionProvider", "onnxruntime-gpu is installed (CUDAExecutionProvider available)"
        if trt_why:
            reason = f"{trt_why}; {reason}"
    elif engine == "onnxruntime-cuda":
        raise ValueError("--engine: onnxruntime-cuda requested but CUDAExecutionProvider is not available "
                         "(install onnxruntime-gpu on a CUDA machine)")
    else:
        provider = "CPUExecutionProvider"
        reason = ("requested" if engine == "onnxruntime-cpu"
                  else "no TensorRT plan and no CUDAExecutionProvider on this machine: CPU fallback")
        if trt_why and engine == "auto":
            reason = f"CPU fallback: {trt_why}; no CUDAExecutionProvider on this machine"
    eng = OnnxRuntimeEngine(artifact, max_batch=max_batch, max_seq_len=max_seq_len, threads=threads,
                            provider=provider, reason=reason)
    log.info("engine: onnxruntime %s, graph %s (%s)", provider, eng.graph_name, reason)
    return eng


__all__ = ["load_engine", "Engine", "EngineInfo", "Chunk", "EngineError", "CacheFull", "ENGINE_CHOICES"]
