"""`granite-deploy build`: compile an artifact's decoder graph into a TensorRT plan.

What it does, in order:
1. Checks the machine: the `tensorrt` package imports, torch is a CUDA build
   and sees a GPU (the engine allocates its device buffers with torch.cuda).
   Every missing piece is named; nothing is written.
2. Checks the graph statically (`export/opcheck.py`): only ops, types and
   attributes TensorRT's ONNX parser takes.
3. Parses the graph with `OnnxParser.parse_from_file`, so the external weight
   file is found next to it. The network is strongly typed: the precision is
   the ONNX graph's own (fp32, or the fp16/bf16 mixed-precision export); no
   builder precision flags (TensorRT 11 has none).
   The graph is parsed from a sibling copy of model.onnx (weights shared,
   removed after the build) with two changes:
   - `num_logits_to_keep` is a constant 1 instead of an optional input: the
     engine only needs each chunk's last logits, and a scalar input used in
     shape arithmetic would otherwise be a TensorRT shape tensor;
   - the cache capacity axis of `past_key_values.*` / `present.*` is fixed
     to max_seq: TensorRT imports TensorScatter as its KVCacheUpdate layer,
     whose documentation requires a network-input cache with a static
     maximum-sequence dimension, updated in place (output bound to the
     input's address). The engine therefore allocates every cache at full
     capacity, and attention reads max_seq positions (masked) each step:
     pick --max-seq for the workload.
4. Two optimisation profiles that agree with each other (same batch for every
   input of a profile, cache capacity >= sequence at min/opt/max, the same
   cache capacity in both):
   prefill: batch 1, sequence 1..max_seq, cache capacity max_seq;
   decode: batch 1..max_batch, sequence 1, cache capacity max_seq.
5. Reuses a timing cache when given one (and saves it back), reports build
   progress, writes the plan next to the graph (write to a temporary name,
   then rename) and records the build in the manifest (TensorRT version, GPU
   name, compute capability, profiles, precision) with the plan's sha256 in
   the manifest's file list; the manifest itself is replaced atomically.

A plan only runs with the TensorRT version and GPU model it was built with;
`plan_compatibility` says why not, and `load_engine` falls back to ONNX
Runtime with that reason.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .. import progress
from ..artifact import MANIFEST, graph_path, load_manifest, sha256_file, write_manifest

TENSORRT_MISSING = "tensorrt is not installed (needs an NVIDIA GPU machine)"
PLANS_KEY = "tensorrt_plans"
PREFILL, DECODE = "prefill", "decode"
DEFAULT_MAX_SEQ = 4096
DEFAULT_OPT_SEQ = 512


class BuildError(RuntimeError):
    """The plan cannot be built here; the message names what is missing or wrong."""


# --- the machine ------------------------------------------------------------------------------
def current_runtime() -> dict:
    """What this machine offers a TensorRT plan, without raising:
    {tensorrt, tensorrt_error, gpu, compute_capability, gpu_error}."""
    info = {"tensorrt": None, "tensorrt_error": None, "gpu": None, "compute_capability": None, "gpu_error": None}
    try:
        import tensorrt as trt

        info["tensorrt"] = trt.__version__
    except ImportError:
        info["tensorrt_error"] = TENSORRT_MISSING
    except Exception as exc:  # a broken install (missing libnvinfer, ...)
        info["tensorrt_error"] = f"tensorrt failed to import: {exc}"
    try:
        import torch
    except ImportError:
        info["gpu_error"] = "torch is not installed (the TensorRT engine allocates device buffers with torch.cuda)"
        return info
    if torch.version.cuda is None:
        info["gpu_error"] = f"no CUDA GPU usable: torch {torch.__version__} is a CPU-only build"
    elif not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        info["gpu_error"] = ("no CUDA GPU visible (torch.cuda.is_available() is False"
                             + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "") + ")")
    else:
        major, minor = torch.cuda.get_device_capability(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = f"{major}.{minor}"
    return info


def check_environment() -> dict:
    """current_runtime(), or BuildError naming every missing piece."""
    info = current_runtime()
    missing = [m for m in (info["tensorrt_error"], info["gpu_error"]) if m]
    if missing:
        raise BuildError("cannot build a TensorRT plan on this machine: " + "; ".join(missing))
    return info


def plan_compatibility(record: dict, runtime: dict) -> list[str]:
    """Why a plan's build record does not fit this machine ([] when it does)."""
    problems = []
    built = (f"{record.get('file')} was built with TensorRT {record.get('tensorrt_version')} for "
             f"{record.get('gpu_name')} (compute capability {record.get('compute_capability')})")
    if runtime.get("tensorrt") is None:
        problems.append(runtime.get("tensorrt_error") or TENSORRT_MISSING)
    elif runtime["tensorrt"] != record.get("tensorrt_version"):
        problems.append(f"TensorRT here is {runtime['tensorrt']}")
    if runtime.get("gpu") is None:
        problems.append(runtime.get("gpu_error") or "no CUDA GPU visible")
    else:
        if runtime.get("compute_capability") != record.get("compute_capability"):
            problems.append(f"the GPU here has compute capability {runtime.get('compute_capability')}")
        if runtime["gpu"] != record.get("gpu_name"):
            problems.append(f"the GPU here is {runtime['gpu']}")
    return [f"{built}, but " + ", ".join(problems)] if problems else []


def plan_filename(runtime: dict) -> str:
    cc = (runtime.get("compute_capability") or "0.0").replace(".", "")
    return f"model.sm{cc}.trt{runtime.get('tensorrt')}.plan"


# --- profiles ----------------------------------------------------------------------------------
def plan_profiles(arch: dict, max_batch: int, max_seq: int, opt_seq: int, opt_batch: int | None = None) -> dict:
    """{profile: {input: [min, opt, max] shapes}} for the prefill and decode profiles."""
    if max_batch < 1 or max_seq < 1 or not 1 <= opt_seq <= max_seq:
        raise BuildError(f"profiles: need max_batch >= 1 and 1 <= opt_seq <= max_seq "
                         f"(got max_batch {max_batch}, opt_seq {opt_seq}, max_seq {max_seq})")
    opt_batch = opt_batch or max_batch
    kv, d = arch["num_kv_heads"], arch["head_dim"]

    cap = (max_seq, max_seq, max_seq)  # static: see the module docstring (KVCacheUpdate)

    def profile(batch: tuple, seq: tuple) -> dict:
        shapes = {"input_ids": [[b, s] for b, s in zip(batch, seq)],
                  "position_ids": [[b, s] for b, s in zip(batch, seq)]}
        for i in range(arch["num_layers"]):
            for kind in ("key", "value"):
                shapes[f"past_key_values.{i}.{kind}"] = [[b, kv, c, d] for b, c in zip(batch, cap)]
        return shapes

    return {
        PREFILL: profile((1, 1, 1), (1, opt_seq, max_seq)),
        DECODE: profile((1, min(opt_batch, max_batch), max_batch), (1, 1, 1)),
    }


def check_profiles(profiles: dict) -> list[str]:
    """Consistency of the profiles: one batch per profile, capacity >= sequence, min <= opt <= max."""
    problems = []
    for name, shapes in profiles.items():
        for tensor, (lo, opt, hi) in shapes.items():
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                problems.append(f"{name}: {tensor} min/opt/max not ordered ({lo}, {opt}, {hi})")
        for k in range(3):
            batches = {shapes[t][k][0] for t in shapes}
            if len(batches) != 1:
                problems.append(f"{name}: inputs disagree on batch ({sorted(batches)}) at {('min', 'opt', 'max')[k]}")
            seq = shapes["input_ids"][k][1]
            caps = {shapes[t][k][2] for t in shapes if t.startswith("past_key_values.")}
            if caps and min(caps) < seq:
                problems.append(f"{name}: cache capacity {min(caps)} < sequence {seq} at {('min', 'opt', 'max')[k]}")
    if set(profiles.get(PREFILL, {})) != set(profiles.get(DECODE, {})):
        problems.append("prefill and decode profiles cover different inputs")
    else:
        for tensor in profiles.get(PREFILL, {}):
            p, dcd = profiles[PREFILL][tensor], profiles[DECODE][tensor]
            if tensor.startswith("past_key_values.") and (p[0][1:] != dcd[0][1:] or p[2][1:] != dcd[2][1:]):
                problems.append(f"{tensor}: prefill and decode cache ranges differ ({p} vs {dcd})")
    return problems


# --- the build --------------------------------------------------------------------------------
def _build_graph(onnx_path: Path, capacity: int) -> Path:
    """A sibling of model.onnx (same external data file) with num_logits_to_keep the constant 1 and the
    cache capacity axis fixed to `capacity`."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            dim = value.type.tensor_type.shape.dim[2]
            dim.Clear()
            dim.dim_value = capacity
    inputs = [i for i in model.graph.input if i.name != "num_logits_to_keep"]
    if len(inputs) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        kept = [t for t in model.graph.initializer if t.name != "num_logits_to_keep"]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "num_logits_to_keep"))
    out = onnx_path.with_name(f".{onnx_path.stem}.tensorrt-build-{os.getpid()}.onnx")
    onnx.save_model(model, str(out))
    return out


def _progress_monitor(trt):
    """A trt.IProgressMonitor printing build phases to stderr (when progress is on)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._start = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._start[phase_name] = time.perf_counter()
            depth = 0 if parent_phase is None else 1
            sys.stderr.write(f"{'  ' * depth}[tensorrt] {phase_name} ({num_steps} steps)\n")

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            took = time.perf_counter() - self._start.pop(phase_name, time.perf_counter())
            sys.stderr.write(f"[tensorrt] {phase_name} done ({took:.1f} s)\n")

    return Monitor()


def build(
    artifact: str | Path,
    max_batch: int = 8,
    max_seq: int | None = None,
    opt_seq: int | None = None,
    timing_cache: str | Path | None = None,
    workspace_gib: float | None = None,
) -> dict:
    """Build the plan, write it into the artifact, record it in the manifest; returns the build record."""
    runtime = check_environment()
    import tensorrt as trt

    from ..export.opcheck import check_artifact

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    onnx_path = graph_path(artifact, manifest)
    graph = manifest["graphs"]["decoder"]
    arch = manifest["architecture"]
    context = int(manifest.get("context_length") or arch["max_position_embeddings"])
    max_seq = min(max_seq or min(DEFAULT_MAX_SEQ, context), context)
    opt_seq = min(opt_seq or DEFAULT_OPT_SEQ, max_seq)

    with progress.step("checking ops against TensorRT's ONNX parser"):
        bad = [r for r in check_artifact(artifact) if not r.ok]
    if bad:
        raise BuildError("the graph has ops TensorRT cannot import:\n" + "\n".join(
            line for r in bad for line in r.lines() if "UNSUPPORTED" in line))
    profiles = plan_profiles(arch, max_batch, max_seq, opt_seq)
    problems = check_profiles(profiles)
    if problems:
        raise BuildError("inconsistent optimisation profiles: " + "; ".join(problems))

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    build_graph = _build_graph(onnx_path, max_seq)
    started = time.time()
    try:
        with progress.step(f"parsing {onnx_path.name} (strongly typed, {graph.get('precision', 'fp32')})"):
            if not parser.parse_from_file(str(build_graph)):
                errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
                raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  " + "\n  ".join(errors))
        config = builder.create_builder_config()
        if workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        monitor = _progress_monitor(trt) if progress.enabled() else None
        if monitor is not None:
            config.progress_monitor = monitor
        for name in (PREFILL, DECODE):  # index 0 = prefill, 1 = decode (the engine relies on this order)
            profile = builder.create_optimization_profile()
            for tensor, (lo, opt, hi) in profiles[name].items():
                profile.set_shape(tensor, lo, opt, hi)
            config.add_optimization_profile(profile)

        cache_path = Path(timing_cache) if timing_cache else None
        reused = bool(cache_path and cache_path.is_file() and cache_path.stat().st_size)
        cache = config.create_timing_cache(cache_path.read_bytes() if reused else b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise BuildError(f"{cache_path}: timing cache does not match this TensorRT version / GPU")

        with progress.step(f"building the plan (profiles: prefill seq 1..{max_seq}, decode batch 1..{max_batch})"):
            serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BuildError("TensorRT failed to build the engine (see its log above)")
    finally:
        build_graph.unlink(missing_ok=True)
    build_seconds = time.time() - started

    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + f".tmp-{os.getpid()}")
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
        os.replace(tmp, cache_path)

    name = plan_filename(runtime)
    tmp = artifact / f".{name}.tmp-{os.getpid()}"
    tmp.write_bytes(memoryview(serialized))
    os.replace(tmp, artifact / name)
    record = {
        "file": name,
        "graph": onnx_path.name,
        "graph_sha256": (manifest.get("files") or {}).get(onnx_path.name, {}).get("sha256"),
        "tensorrt_version": runtime["tensorrt"],
        "gpu_name": runtime["gpu"],
        "compute_capability": runtime["compute_capability"],
        "precision": graph.get("precision", "fp32"),
        "strongly_typed": True,
        "profiles": [{"name": n, "index": i, "shapes": profiles[n]} for i, n in enumerate((PREFILL, DECODE))],
        "max_batch": max_batch,
        "max_seq": max_seq,
        "opt_seq": opt_seq,
        "cache_capacity": max_seq,
        "logits": "last position of each row only (num_logits_to_keep fixed to 1 in the build)",
        "timing_cache": {"file": str(cache_path), "reused": reused} if cache_path else None,
        "built_unix": int(started),
        "build_seconds": round(build_seconds, 1),
    }
    record_plan(artifact, record)
    return record


def record_plan(artifact: Path, record: dict) -> None:
    """Add (or replace: same file name) a plan's build record and file hash; the manifest is replaced atomically."""
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    path = artifact / record["file"]
    plans = [p for p in manifest.get(PLANS_KEY, []) if p.get("file") != record["file"]]
    manifest[PLANS_KEY] = plans + [record]
    files = dict(manifest.get("files") or {})
    files[record["file"]] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["files"] = dict(sorted(files.items()))
    write_manifest(artifact, manifest)


def summary(artifact: Path, record: dict) -> str:
    return (f"wrote {Path(artifact) / record['file']}: TensorRT {record['tensorrt_version']}, {record['gpu_name']} "
            f"(sm {record['compute_capability']}), {record['precision']}, max batch {record['max_batch']}, "
            f"max seq {record['max_seq']}, built in {record['build_seconds']} s; recorded in {MANIFEST}")
