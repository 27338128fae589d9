"""Shared benchmark helpers: the full-size random-weight checkpoint, the machine, bandwidth."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO.parent / "shared" / "reference" / "configs"
CACHE = Path(os.environ.get("GRANITE_DEPLOY_BENCH_CACHE", Path.home() / ".cache" / "granite-deploy" / "bench"))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.machine()}"


@contextlib.contextmanager
def build_lock():
    """Several benchmark processes may want the same cached artifact at once: one builds it,
    the others wait and then find it (callers re-check the cache inside the lock)."""
    import fcntl

    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _random_checkpoint(name: str = "granite-4.0-1b", dtype: str = "float32") -> Path:
    """The full-size architecture from ../shared/reference/configs with random weights, cached,
    saved as dtype ("float32", or "bfloat16": the dtype every released Granite 4.0 checkpoint has).

    Speed does not depend on weight values; a tiny tokenizer is attached so the
    folder is a complete checkpoint (the benchmark feeds token ids directly).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"checkpoint dtype {dtype!r}: float32 or bfloat16")
    out = CACHE / (f"{name}-random" if dtype == "float32" else f"{name}-random-bf16")
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out
    import torch
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    from granite_deploy.export.tiny import build_tokenizer

    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    for key in ("architectures", "model_type"):
        cfg.pop(key, None)
    config = GraniteMoeHybridConfig(**cfg)
    t = time.perf_counter()
    torch.manual_seed(0)
    model = GraniteMoeHybridForCausalLM(config).to(getattr(torch, dtype)).eval()
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    model.save_pretrained(out)
    print(f"# built random {name} checkpoint in {time.perf_counter() - t:.0f} s: {out}", flush=True)
    return out

def random_checkpoint(name: str = "granite-4.0-1b", dtype: str = "float32") -> Path:
    with build_lock():
        return _random_checkpoint(name, dtype)


def _artifact_for(checkpoint: Path, validate: bool = True) -> Path:
    from granite_deploy.export.exporter import export

    out = CACHE / f"{checkpoint.name}-artifact"
    from granite_deploy.artifact import load_manifest

    if (out / "manifest.json").exists() and "decoder_cpu" in load_manifest(out).graphs:
        return out  # (an artifact from before the CPU flavour existed is re-exported)
    t = time.perf_counter()
    export(checkpoint, out, validate=validate, force=True)
    print(f"# exported in {time.perf_counter() - t:.0f} s: {out}", flush=True)
    return out

def artifact_for(checkpoint: Path, validate: bool = True) -> Path:
    with build_lock():
        return _artifact_for(checkpoint, validate)


def measure_bandwidth_gbs(threads: int = 2, size_mib: int = 1024) -> float:
    """Read bandwidth the way decode reads weights: ONNX Runtime's own fp32 MatMul of one
    row against a weight far larger than the caches, with `threads` threads, best of 7."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    cols = 4096
    rows = size_mib * 2**20 // 4 // cols
    w = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        import onnx

        path = f"{d}/gemv.onnx"
        onnx.save_model(model, path, save_as_external_data=True, location="gemv.data")
        del model, graph
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = np.ones((1, rows), np.float32)
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - t)
    return w.nbytes / best / 1e9


def stream_read_gbs(threads: int = 2, size_mib: int = 1024) -> float:
    """STREAM-style read bandwidth: `threads` threads each summing its own array
    (numpy releases the GIL in the reduction), best of 5. This is the floor to beat:
    a kernel cannot read weights faster than this."""
    import threading

    import numpy as np

    arrays = [np.ones(size_mib * 2**20 // 4, np.float32) for _ in range(threads)]
    best = float("inf")
    for _ in range(5):
        workers = [threading.Thread(target=a.sum, kwargs={"dtype": np.float32}) for a in arrays]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t)
    return sum(a.nbytes for a in arrays) / best / 1e9


def in_process(target, *args):
    """target(*args, queue) in a fresh spawned process (so measurements do not share memory);
    its result, or an error if the process died without one (never a hang)."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    while True:
        try:
            result = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{target.__name__} exited with code {p.exitcode} before reporting a result")
    p.join()
    return result


def fill_cache(engine, rows: int, positions: int, rng) -> int:
    """Random values in KV positions [0, positions) of the first `rows` rows (attention's cost does not
    depend on the values; the capacity axis comes from the graph's layout); returns their bytes."""
    import numpy as np

    from granite_deploy.engines.onnxruntime_engine import first_positions

    filled = 0
    for st in engine.states:
        if st["kind"] == "kv":
            where = (slice(0, rows), *first_positions(st, positions))
            buf = engine._buffers[st["input"]]
            buf[where] = rng.standard_normal(buf[where].shape, dtype=np.float32)
            filled += buf[where].nbytes
    return filled


def _quantized_artifact(artifact: Path, method: str) -> Path:
    """int8/int4 weight-only copy of a benchmark artifact, cached. Random weights make the
    accuracy gate meaningless, so it is recorded but not enforced here (bench_quant_accuracy
    gates on a trained model)."""
    from granite_deploy.export.quantize import quantize

    import hashlib

    out = CACHE / f"{artifact.name}-{method}"
    if (out / "manifest.json").exists():  # reuse it only if made from this very source artifact
        from granite_deploy.artifact import load_manifest

        made_from = load_manifest(out).extra["source_artifact"]["manifest_sha256"]
        if made_from == hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest():
            return out
    t = time.perf_counter()
    quantize(artifact, out, method, force=True, skip_gate=True, decode_steps=4, ppl_max_tokens=64)
    print(f"# quantized {method} in {time.perf_counter() - t:.0f} s: {out}", flush=True)
    return out

def quantized_artifact(artifact: Path, method: str) -> Path:
    with build_lock():
        return _quantized_artifact(artifact, method)


def rss_gib() -> float:
    """This process's resident memory now (VmRSS), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in row) + " |")
