"""Decode attention: the portable graph's `Attention` op vs the CPU flavour's MatMul form.

Builds one granite-4.0-1b attention layer (16 query heads, 4 KV heads, head_dim
128, from ../shared/reference/configs) with the real graph builder and the
real CPU-flavour rewrite, random weights, a small vocabulary and MLP so that
attention dominates, and times one decode step at several batch sizes and
cache lengths, with the time needed to read that layer's K and V once at the
measured bandwidth next to it. This is the measurement behind the choice of
the `decoder_cpu` graph (README, "The artifact").

    python bench/bench_attention.py [--threads 2] [--keys 512,2304,8192] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def build_graphs(out: Path):
    from granite_deploy.export.checkpoint import arch_from_config
    from granite_deploy.export.cpu_graph import derive_cpu_graph
    from granite_deploy.export.graph import build_decoder_graph

    config = json.loads((common.CONFIGS / "granite-4.0-1b.json").read_text())
    arch = arch_from_config(config)
    # One attention layer; vocabulary and MLP shrunk so the step is attention.
    arch = replace(arch, num_layers=1, layer_types=("attention",), vocab_size=256, intermediate_size=64,
                   tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    shapes = {
        "model.embed_tokens.weight": (arch.vocab_size, arch.hidden_size),
        "model.norm.weight": (arch.hidden_size,),
        "model.layers.0.input_layernorm.weight": (arch.hidden_size,),
        "model.layers.0.post_attention_layernorm.weight": (arch.hidden_size,),
        "model.layers.0.self_attn.q_proj.weight": (arch.num_heads * arch.head_dim, arch.hidden_size),
        "model.layers.0.self_attn.k_proj.weight": (arch.num_kv_heads * arch.head_dim, arch.hidden_size),
        "model.layers.0.self_attn.v_proj.weight": (arch.num_kv_heads * arch.head_dim, arch.hidden_size),
        "model.layers.0.self_attn.o_proj.weight": (arch.hidden_size, arch.num_heads * arch.head_dim),
        "model.layers.0.shared_mlp.input_linear.weight": (2 * arch.intermediate_size, arch.hidden_size),
        "model.layers.0.shared_mlp.output_linear.weight": (arch.hidden_size, arch.intermediate_size),
    }
    portable, _ = build_decoder_graph(arch, lambda n: rng.standard_normal(shapes[n], dtype=np.float32) * 0.02,
                                      out, opset=24)
    return arch, portable, derive_cpu_graph(portable, arch.num_heads)


def step_ms(path: Path, arch, batch: int, keys: int, threads: int, head_dim_major: bool, reps: int = 7) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shape = ((batch, arch.num_kv_heads, arch.head_dim, keys) if head_dim_major
             else (batch, arch.num_kv_heads, keys, arch.head_dim))
    k = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape, dtype=np.float32))
    v = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape, dtype=np.float32))
    binding = session.io_binding()
    binding.bind_cpu_input("input_ids", np.ones((batch, 1), np.int64))
    binding.bind_cpu_input("position_ids", np.full((batch, 1), keys - 1, np.int64))
    binding.bind_output("logits", "cpu")
    for name, value in (("key", k), ("value", v)):  # in place, as the engine binds them
        binding.bind_ortvalue_input(f"past_key_values.0.{name}", value)
        binding.bind_ortvalue_output(f"present.0.{name}", value)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:])) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keys", default="512,2304,8192", help="cache lengths (all attended: queries sit at the end)")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    print(f"# machine: {common.machine()}", flush=True)
    bw = max(common.measure_bandwidth_gbs(args.threads), common.stream_read_gbs(args.threads))
    print(f"# measured bandwidth {bw:.1f} GB/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        arch, portable, cpu = build_graphs(Path(d))
        weight_bytes = (Path(d) / "model.onnx.data").stat().st_size  # the layer's weights, read every step
        for batch in (int(b) for b in args.batches.split(",")):
            for keys in (int(k) for k in args.keys.split(",")):
                a = step_ms(portable, arch, batch, keys, args.threads, head_dim_major=False)
                b = step_ms(cpu, arch, batch, keys, args.threads, head_dim_major=True)
                kv_bytes = 2 * batch * arch.num_kv_heads * keys * arch.head_dim * 4
                floor = (kv_bytes + weight_bytes) / (bw * 1e9) * 1e3
                rows.append([batch, keys, f"{kv_bytes / 2**20:.0f}", f"{floor:.2f}", f"{a:.2f}", f"{b:.2f}",
                             f"{a / b:.2f}x", f"{a / floor:.2f}", f"{b / floor:.2f}"])
                print(f"#   batch {batch} keys {keys}: Attention op {a:.2f} ms, MatMul form {b:.2f} ms", flush=True)
    print(f"\nOne granite-4.0-1b attention layer, decode step, fp32, ONNX Runtime CPU, {args.threads} threads. "
          f"Machine: {common.machine()}.")
    common.print_table(
        "Decode step of one layer (ms)",
        ["batch", "keys", "K+V MiB", "read time (K+V + weights)", "portable (Attention op)",
         "decoder_cpu (MatMul form)", "speed-up", "portable / read", "decoder_cpu / read"], rows)
    print(f"\nbandwidth: {bw:.1f} GB/s (larger of a STREAM-style read and ONNX Runtime's GEMV); read time: the "
          f"layer's K and V plus its {weight_bytes / 2**20:.0f} MiB of weights, once.")


if __name__ == "__main__":
    main()
