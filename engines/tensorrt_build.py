"""`granite-deploy build`: compile an artifact's decoder graph into a TensorRT plan.

What it does, in order (steps 1-3 are `plan`, which `build --plan-only` prints as
JSON without TensorRT or a GPU):
1. Checks the options and the artifact: the manifest validates, every listed
   file is inside the folder with its size and sha256, the portable decoder is
   TensorRT-bound (not a MatMulNBits graph).
2. Checks the graph statically (`export/opcheck.py`): only ops, types and
   attributes TensorRT's ONNX parser takes.
3. Plans two optimisation profiles from the manifest's graph record, covering
   every graph input: `input_ids`/`position_ids` by their batch/sequence axes,
   each state input (attention KV, Mamba conv/ssm) from the state spec, the
   scalar `num_logits_to_keep` as shape []. They agree with each other (same
   batch for every input of a profile, cache capacity >= sequence at
   min/opt/max, the same cache capacity in both):
   prefill: batch 1, sequence 1..max_seq, cache capacity max_seq;
   decode: batch 1..max_batch, sequence 1, cache capacity max_seq.
4. Checks the machine: the `tensorrt` package imports, torch is a CUDA build
   and sees a GPU (the engine allocates its device buffers with torch.cuda).
   Every missing piece is named; nothing is written. Then parses the graph
   with `OnnxParser.parse_from_file`, so the external weight file is found
   next to it. The network is strongly typed: the precision is the ONNX
   graph's own (fp32, or the fp16/bf16 mixed-precision export); no builder
   precision flags (TensorRT 11 has none).
   The graph is parsed from a sibling copy of model.onnx (weights shared,
   removed after the build) with two changes:
   - `num_logits_to_keep` is a constant 1 instead of an optional input: the
     engine only needs each chunk's last logits, and a scalar input used in
     shape arithmetic would otherwise be a TensorRT shape tensor (so its
     profile entry is not set on the builder);
   - the capacity axis of every KV state input and output (from the state
     spec; Mamba state has none) is fixed to max_seq: TensorRT imports
     TensorScatter as its KVCacheUpdate layer, whose documentation requires
     a network-input cache with a static maximum-sequence dimension, updated
     in place (output bound to the input's address). The engine therefore
     allocates every cache at full capacity, and attention reads max_seq
     positions (masked) each step: pick --max-seq for the workload.
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

from types import MappingProxyType

from .. import progress
from ..artifact import MANIFEST, load_manifest, sha256_file, write_manifest
from ..errors import GraniteDeployError, InvalidField
from ..manifest import DECODER, FileRecord, GraphRecord, PlanRecord, ProfileRecord
from ..export.io_spec import BATCH, NUM_LOGITS_TO_KEEP, SEQUENCE  # graph IO names: declared once, there


TENSORRT_MISSING = "tensorrt is not installed (needs an NVIDIA GPU machine)"
PREFILL, DECODE = "prefill", "decode"
DEFAULT_MAX_SEQ = 4096
DEFAULT_OPT_SEQ = 512


class BuildError(GraniteDeployError, RuntimeError):
    """The plan cannot be built here or from this artifact; the message names what is missing or wrong (exit 2)."""

    exit_code = 2


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


def plan_compatibility(record: PlanRecord, runtime: dict) -> list[str]:
    """Why a plan's build record does not fit this machine ([] when it does)."""
    problems = []
    built = (f"{record.file} was built with TensorRT {record.tensorrt_version} for "
             f"{record.gpu_name} (compute capability {record.compute_capability})")
    if runtime.get("tensorrt") is None:
        problems.append(runtime.get("tensorrt_error") or TENSORRT_MISSING)
    elif runtime["tensorrt"] != record.tensorrt_version:
        problems.append(f"TensorRT here is {runtime['tensorrt']}")
    if runtime.get("gpu") is None:
        problems.append(runtime.get("gpu_error") or "no CUDA GPU visible")
    else:
        if runtime.get("compute_capability") != record.compute_capability:
            problems.append(f"the GPU here has compute capability {runtime.get('compute_capability')}")
        if runtime["gpu"] != record.gpu_name:
            problems.append(f"the GPU here is {runtime['gpu']}")
    return [f"{built}, but " + ", ".join(problems)] if problems else []


def plan_filename(runtime: dict) -> str:
    cc = (runtime.get("compute_capability") or "0.0").replace(".", "")
    return f"model.sm{cc}.trt{runtime.get('tensorrt')}.plan"


# --- profiles ----------------------------------------------------------------------------------
PROFILE_NAMES = (PREFILL, DECODE)  # index 0 = prefill, 1 = decode (the engine relies on this order)


def plan_profiles(graph: GraphRecord, max_batch: int, max_seq: int, opt_seq: int,
                  opt_batch: int | None = None) -> list[dict]:
    """[prefill, decode]: each {input: {"min", "opt", "max"}} for EVERY input of the graph, read from the
    manifest's graph record: state inputs (KV cache, Mamba conv/ssm) from its state spec, the cache
    capacity axis static at max_seq; batch/sequence axes per profile; a scalar input has shape []."""
    if max_batch < 1 or max_seq < 1 or not 1 <= opt_seq <= max_seq:
        raise BuildError(f"profiles: need max_batch >= 1 and 1 <= opt_seq <= max_seq "
                         f"(got max_batch {max_batch}, opt_seq {opt_seq}, max_seq {max_seq})")
    opt_batch = min(opt_batch or max_batch, max_batch)
    state = {st.input: st for st in graph.state}

    def shapes(batch: tuple, seq: tuple) -> dict:
        out = {}
        for tensor in graph.inputs:
            triple = []
            for b, s_ in zip(batch, seq):
                st = state.get(tensor.name)
                if st is not None:
                    # static capacity: see the module docstring (KVCacheUpdate)
                    triple.append(list(st.batched_shape(b, max_seq)))
                    continue
                dims = []
                for d in tensor.shape:
                    if d == BATCH:
                        dims.append(b)
                    elif d == SEQUENCE:
                        dims.append(s_)
                    elif isinstance(d, int):
                        dims.append(d)
                    else:
                        raise BuildError(f"graphs.{graph.name}.inputs: {tensor.name} has symbolic axis {d!r}, "
                                         "which no profile sizes")
                triple.append(dims)
            out[tensor.name] = dict(zip(("min", "opt", "max"), triple))
        return out

    return [shapes((1, 1, 1), (1, opt_seq, max_seq)),
            shapes((1, opt_batch, max_batch), (1, 1, 1))]


def check_profiles(profiles: list[dict], graph: GraphRecord) -> list[str]:
    """Consistency of the profiles with the graph and each other: every graph input covered, one batch per
    profile, the cache capacity >= the sequence and the same in both, min <= opt <= max."""
    problems = []
    names = set(graph.input_names)
    batched = {t.name for t in graph.inputs if t.shape[:1] == (BATCH,)}
    kv = {st.input: st for st in graph.state if st.kind == "kv"}
    for name, shapes in zip(PROFILE_NAMES, profiles):
        if set(shapes) != names:
            missing, extra = sorted(names - set(shapes)), sorted(set(shapes) - names)
            problems.append(f"{name}: inputs differ from the graph's (missing {missing}, not in the graph {extra})")
        for tensor, r in shapes.items():
            lo, opt, hi = r["min"], r["opt"], r["max"]
            if not (len(lo) == len(opt) == len(hi)) or not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                problems.append(f"{name}: {tensor} min/opt/max not ordered ({lo}, {opt}, {hi})")
        for k in ("min", "opt", "max"):
            batches = {shapes[t][k][0] for t in shapes if t in batched and shapes[t][k]}
            if len(batches) > 1:
                problems.append(f"{name}: inputs disagree on batch ({sorted(batches)}) at {k}")
            seq = shapes.get("input_ids", {}).get(k, [0, 0])[1]
            caps = {shapes[t][k][kv[t].capacity_axis + 1] for t in shapes if t in kv}
            if caps and min(caps) < seq:
                problems.append(f"{name}: cache capacity {min(caps)} < sequence {seq} at {k}")
    if len(profiles) == 2:
        for tensor in kv:
            p, d = profiles[0].get(tensor), profiles[1].get(tensor)
            if p and d and (p["min"][1:] != d["min"][1:] or p["max"][1:] != d["max"][1:]):
                problems.append(f"{tensor}: prefill and decode cache ranges differ ({p} vs {d})")
    return problems


def plan(artifact: str | Path, max_batch: int = 8, max_seq: int | None = None, opt_seq: int | None = None,
         verify_hashes: bool = True) -> dict:
    """What `build` would build, checked without TensorRT or a GPU: options, the artifact (paths, sizes and,
    by default, hashes), the graph's TensorRT ops, and the profiles from the manifest's state spec."""
    from ..artifact import open_trusted
    from ..export.opcheck import check_artifact

    for option, value in (("--max-batch", max_batch), ("--max-seq", max_seq), ("--opt-seq", opt_seq)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidField(option, f"must be an integer >= 1 (got {value!r})")
    artifact = Path(artifact)
    manifest = open_trusted(artifact, verify_hashes=verify_hashes)
    graph = manifest.graph(DECODER)
    if graph.engines and "tensorrt" not in graph.engines:
        raise BuildError(f"graphs.{graph.name}: {graph.file} ({graph.precision}) runs on "
                         f"{', '.join(graph.engines)} only, not TensorRT (quantize with --int8-qdq for TensorRT)")
    context = manifest.context_length
    if max_seq is not None and max_seq > context:
        raise InvalidField("--max-seq", f"{max_seq} is above the model's context length {context}")
    max_seq = max_seq or min(DEFAULT_MAX_SEQ, context)
    if opt_seq is not None and opt_seq > max_seq:
        raise InvalidField("--opt-seq", f"{opt_seq} is above --max-seq {max_seq}")
    opt_seq = opt_seq or min(DEFAULT_OPT_SEQ, max_seq)

    with progress.step("checking ops against TensorRT's ONNX parser"):
        bad = [r for r in check_artifact(artifact) if not r.ok]
    if bad:
        raise BuildError("the graph has ops TensorRT cannot import:\n" + "\n".join(
            line for r in bad for line in r.lines() if "UNSUPPORTED" in line))
    profiles = plan_profiles(graph, max_batch, max_seq, opt_seq)
    problems = check_profiles(profiles, graph)
    if problems:
        raise BuildError("inconsistent optimisation profiles: " + "; ".join(problems))
    return {
        "artifact": str(artifact),
        "graph": graph.name,
        "file": graph.file,
        "precision": graph.precision,
        "inputs": list(graph.input_names),
        "profile_names": list(PROFILE_NAMES),
        "profiles": profiles,
        "max_batch": max_batch,
        "max_seq": max_seq,
        "opt_seq": opt_seq,
        "cache_capacity": max_seq,
        "state": [{"input": st.input, "output": st.output, "kind": st.kind,
                   "bind": "output at the input's address" if st.in_place else "separate output buffer, copied back"}
                  for st in graph.state],
        "build_graph": {NUM_LOGITS_TO_KEEP: "constant 1 in the graph TensorRT parses (not a network input; "
                                            "its profile entry is the scalar shape [])",
                        "cache_capacity": f"static {max_seq} on every KV input and output"},
    }


# --- the build --------------------------------------------------------------------------------
def _build_graph(onnx_path: Path, graph: GraphRecord, capacity: int) -> Path:
    """A sibling of model.onnx (same external data file) with num_logits_to_keep the constant 1 and the
    cache capacity axis of every KV state (from the manifest's state spec) fixed to `capacity`."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    axis = {}
    for st in graph.state:
        if st.capacity_axis is not None:
            axis[st.input] = axis[st.output] = st.capacity_axis + 1  # + the batch axis
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name in axis:
            dim = value.type.tensor_type.shape.dim[axis[value.name]]
            dim.Clear()
            dim.dim_value = capacity
    inputs = [i for i in model.graph.input if i.name != NUM_LOGITS_TO_KEEP]
    if len(inputs) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        kept = [t for t in model.graph.initializer if t.name != NUM_LOGITS_TO_KEEP]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), NUM_LOGITS_TO_KEEP))
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
    """Build the plan, write it into the artifact, record it in the manifest; returns the build record.
    Options and the artifact are checked (`plan`) before the machine is."""
    planned = plan(artifact, max_batch, max_seq, opt_seq)
    runtime = check_environment()
    import tensorrt as trt

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    graph = manifest.graph(planned["graph"])
    onnx_path = artifact / graph.file
    max_seq, opt_seq, profiles = planned["max_seq"], planned["opt_seq"], planned["profiles"]

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    build_graph = _build_graph(onnx_path, graph, max_seq)
    started = time.time()
    try:
        with progress.step(f"parsing {onnx_path.name} (strongly typed, {graph.precision})"):
            if not parser.parse_from_file(str(build_graph)):
                errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
                raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  " + "\n  ".join(errors))
        config = builder.create_builder_config()
        if workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        monitor = _progress_monitor(trt) if progress.enabled() else None
        if monitor is not None:
            config.progress_monitor = monitor
        network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        for shapes in profiles:  # index 0 = prefill, 1 = decode (the engine relies on this order)
            profile = builder.create_optimization_profile()
            for tensor, r in shapes.items():
                if tensor in network_inputs:  # num_logits_to_keep is a constant in the build graph
                    profile.set_shape(tensor, r["min"], r["opt"], r["max"])
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
    record = PlanRecord(
        file=name,
        graph=graph.name,
        tensorrt_version=runtime["tensorrt"],
        gpu_name=runtime["gpu"],
        compute_capability=runtime["compute_capability"],
        precision=graph.precision,
        profiles=tuple(ProfileRecord(n, i, MappingProxyType(profiles[i])) for i, n in enumerate(PROFILE_NAMES)),
        max_batch=planned["max_batch"],
        max_seq=max_seq,
        cache_capacity=max_seq,
        extra=MappingProxyType({
            "graph": onnx_path.name,
            "graph_sha256": manifest.files[graph.file].sha256,
            "strongly_typed": True,
            "opt_seq": opt_seq,
            "logits": "last position of each row only (num_logits_to_keep fixed to 1 in the build)",
            "timing_cache": {"file": str(cache_path), "reused": reused} if cache_path else None,
            "built_unix": int(started),
            "build_seconds": round(build_seconds, 1),
        }),
    )
    record_plan(artifact, record)
    return record


def record_plan(artifact: Path, record: PlanRecord) -> None:
    """Add (or replace: same file name) a plan's build record and file hash; the manifest is replaced atomically."""
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    path = artifact / record.file
    plans = tuple(p for p in manifest.plans if p.file != record.file) + (record,)
    files = {**manifest.files, record.file: FileRecord(sha256_file(path), path.stat().st_size)}
    write_manifest(artifact, manifest.replace(plans=plans, files=files))


def summary(artifact: Path, record: PlanRecord) -> str:
    return (f"wrote {Path(artifact) / record.file}: TensorRT {record.tensorrt_version}, {record.gpu_name} "
            f"(sm {record.compute_capability}), {record.precision}, max batch {record.max_batch}, "
            f"max seq {record.max_seq}, built in {record.extra.get('build_seconds')} s; recorded in {MANIFEST}")
