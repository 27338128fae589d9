"""Our CPU kernels (engines/kernels) against ONNX Runtime's own on one granite-4.0-1b layer's GEMM shapes
and the head, weights streamed from memory: the batch-1 and batch-8 costs that decode steps are made of.

For each shape it builds `--copies` independent weights (so a round reads more than the last-level cache
holds, as a decode step does), one session each, and times a round over all of them, best of `--reps`:

  * 8-bit: MatMulQ8Dynamic vs the ten-node dynamic GEMM it replaces (MLAS MatMulInteger) and vs MLAS's
    8-bit MatMulNBits (block 128, accuracy level 4: what onnxruntime-genai's int8 layers run);
  * 4-bit: MatMulQ4 vs MLAS's 4-bit MatMulNBits (block 32, accuracy level 4: the same packed weights);
  * attention: DecodeAttention vs ONNX Runtime's GroupQueryAttention for one new token per row, 16/4
    heads of 128, over 40 layers' fp32 caches (capacity 2048) bound in place, past 128 and 1024.

    python bench/bench_kernels.py [--threads 2] [--copies 16] [--reps 7] [--widths int8,int4,attention]

Sessions run with spinning off: dozens of idle thread pools spinning would steal the cores. Slow and
optional: never in CI.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# name, K, N (hidden 2048, 16 + 2x4 heads of 128, MLP 4096 as one gate+up GEMM, vocabulary 100352)
SHAPES = [("qkv", 2048, 3072), ("o", 2048, 2048), ("gate+up", 2048, 8192), ("down", 4096, 2048),
          ("head", 2048, 100352)]


def _matmul_model(w: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
                              initializer=[numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _nbits(model, bits: int, block: int):
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=4)
    q.process()
    return q.model.model


def _session(model, threads: int, library=None):
    import onnxruntime as ort

    from granite_deploy.engines import kernels

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rewrite = None
    if library is not None:
        model = copy.deepcopy(model)
        options.register_custom_ops_library(str(library))
        rewrite = kernels.use_kernels(model, library=library)
        if rewrite.nodes != 1:
            raise SystemExit(f"the kernel rewrite took {rewrite.nodes} nodes, expected 1")
        rewrite.attach(options)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return rewrite.keep_with(session) if rewrite is not None else session


def _time(sessions, x, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for s in sessions:
            s.run(None, {"x": x})
        best = min(best, (time.perf_counter() - t) / len(sessions))
    return best


def _gqa_model(heads: int, kv_heads: int, head_size: int):
    from onnx import TensorProto, helper

    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total"],
                            ["y", "present_key", "present_value"], domain="com.microsoft", name="attn",
                            num_heads=heads, kv_num_heads=kv_heads, scale=head_size ** -0.5)
    f, cache = TensorProto.FLOAT, ["b", kv_heads, "t", head_size]
    inputs = [helper.make_tensor_value_info("q", f, ["b", "s", heads * head_size]),
              helper.make_tensor_value_info("k", f, ["b", "s", kv_heads * head_size]),
              helper.make_tensor_value_info("v", f, ["b", "s", kv_heads * head_size]),
              helper.make_tensor_value_info("past_key", f, cache), helper.make_tensor_value_info("past_value", f, cache),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info(o, f, None) for o in node.output]
    return helper.make_model(helper.make_graph([node], "g", inputs, outputs),
                             opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _attention_rows(library, threads: int, reps: int, rng, layers: int = 40, capacity: int = 2048) -> list:
    import onnxruntime as ort

    from granite_deploy.engines import kernels

    heads, kv_heads, head_size = 16, 4, 128
    rows = []
    for batch in (1, 8):
        caches = [[ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((batch, kv_heads, capacity, head_size),
                                                                        dtype=np.float32)) for _ in range(2)]
                  for _ in range(layers)]
        q = rng.standard_normal((batch, 1, heads * head_size), dtype=np.float32)
        kv = rng.standard_normal((batch, 1, kv_heads * head_size), dtype=np.float32)
        for past in (128, 1024):
            times = {}
            for label, ours in (("ours (DecodeAttention)", True), ("ONNX Runtime GroupQueryAttention", False)):
                model = _gqa_model(heads, kv_heads, head_size)
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.log_severity_level = 3
                if ours:
                    options.register_custom_ops_library(str(library))
                    if kernels.use_kernels(model, library=library).attention_nodes != 1:
                        raise SystemExit("the attention rewrite did not take the node")
                session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
                bindings = []
                for pk, pv in caches:  # the cache bound in place, as the engine binds it
                    b = session.io_binding()
                    for name, value in (("q", q), ("k", kv), ("v", kv), ("seqlens_k", np.full(batch, past, np.int32)),
                                        ("total", np.array(capacity, np.int32))):
                        b.bind_cpu_input(name, value)
                    b.bind_ortvalue_input("past_key", pk)
                    b.bind_ortvalue_input("past_value", pv)
                    b.bind_output("y")
                    b.bind_ortvalue_output("present_key", pk)
                    b.bind_ortvalue_output("present_value", pv)
                    bindings.append(b)
                best = float("inf")
                for _ in range(reps):
                    t = time.perf_counter()
                    for b in bindings:
                        session.run_with_iobinding(b)
                    best = min(best, time.perf_counter() - t)
                times[label] = best
            cache_bytes = batch * layers * 2 * kv_heads * (past + 1) * head_size * 4
            ours_t = times["ours (DecodeAttention)"]
            for label, t in times.items():
                rows.append(["attention", f"{layers} layers, past {past}", f"{heads}/{kv_heads} heads of {head_size}", batch,
                             label, f"{t * 1e3:.3f}", f"{cache_bytes / t / 1e9:.1f}", f"{t / ours_t:.2f}x"])
    return rows


def main() -> None:
    from granite_deploy.engines import kernels
    from granite_deploy.export.quantize import _matmuls_to_dynamic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--copies", type=int, default=16, help="weights per shape (the head: 1; it is 205 MB alone)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--widths", default="int8,int4,attention")
    ap.add_argument("--rows", default="1,8", help="input rows (tokens) per call")
    args = ap.parse_args()
    widths = args.widths.split(",")
    if bad := [w for w in widths if w not in ("int8", "int4", "attention")]:
        ap.error(f"--widths: unknown {bad} (int8, int4, attention)")
    library = kernels.build()
    print(f"# machine: {common.machine()}; {args.threads} threads", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for name, k, n in SHAPES if {"int8", "int4"} & set(widths) else []:
        copies = 1 if name == "head" else args.copies
        weights = [(rng.standard_normal((k, n), dtype=np.float32) * 0.05) for _ in range(copies)]
        for width in (w for w in widths if w != "attention"):
            if width == "int8":
                dynamic = []
                for w in weights:
                    m = _matmul_model(w)
                    _matmuls_to_dynamic(m, keep=set())
                    dynamic.append(m)
                runs = {"ours (MatMulQ8Dynamic)": [_session(m, args.threads, library) for m in dynamic],
                        "MLAS MatMulInteger (10 nodes)": [_session(m, args.threads) for m in dynamic],
                        "MLAS MatMulNBits 8-bit": [_session(_nbits(_matmul_model(w), 8, 128), args.threads) for w in weights]}
                weight_bytes = k * n
            else:
                nbits = [_nbits(_matmul_model(w), 4, 32) for w in weights]
                runs = {"ours (MatMulQ4)": [_session(m, args.threads, library) for m in nbits],
                        "MLAS MatMulNBits 4-bit": [_session(m, args.threads) for m in nbits]}
                weight_bytes = k * n // 2
            for m in (int(r) for r in args.rows.split(",")):
                x = rng.standard_normal((1, m, k), dtype=np.float32)
                times = {label: _time(ss, x, args.reps) for label, ss in runs.items()}
                ours = next(iter(times.values()))
                for label, t in times.items():
                    rows.append([width, name, f"{k}x{n}", m, label, f"{t * 1e3:.3f}", f"{weight_bytes / t / 1e9:.1f}",
                                 f"{t / ours:.2f}x"])
            del runs
    if "attention" in widths:
        rows += _attention_rows(library, args.threads, args.reps, rng)
    common.print_table(f"CPU kernels ({kernels.isa(library)} path) vs ONNX Runtime's, weights from memory "
                       f"({args.copies} copies per layer shape), best of {args.reps}; {args.threads} threads; "
                       f"machine: {common.machine()}",
                       ["width", "op", "shape", "rows", "kernel", "ms", "weight (or cache) GB/s", "time / ours"], rows)


if __name__ == "__main__":
    main()
