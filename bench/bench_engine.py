"""ONNX Runtime engine vs transformers eager on the full-size granite-4.0-1b architecture.

Random weights (speed does not depend on their values), fp32, 2 threads each.
Prints, in one run: prefill tokens/s (128 and 1024 tokens), decode tokens/s
at batch 1 and 8 for both, with ratios; our decode step time at 128/1024/2048
tokens of past for batch 1 and 8 next to the memory floor (weights + KV cache
in use, read once at the measured bandwidth); peak RSS of each side; and the
machine. Each side runs in its own process so their memory does not mix.

    python bench/bench_engine.py [--model granite-4.0-1b] [--threads 2] [--decode-steps 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def weight_bytes(manifest) -> int:
    """Bytes of weights read per decode step: every matrix once (the tied embedding once, as the head)."""
    a = manifest.architecture
    h, layers = a.hidden_size, a.num_layers
    qkv = h * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
    per_layer = qkv + a.num_heads * a.head_dim * h + 3 * h * a.intermediate_size + 2 * h
    head = a.vocab_size * h * (1 if a.tie_word_embeddings else 2)
    return 4 * (layers * per_layer + head + h)


def kv_bytes_per_token(manifest) -> int:
    a = manifest.architecture
    return 4 * 2 * a.num_layers * a.num_kv_heads * a.head_dim


def ours(artifact: str, threads: int, steps: int, past_sweep: bool, graph: str | None, decode_only: bool,
         out: mp.Queue) -> None:
    """graph None: what load_engine picks (the CPU flavour when the artifact has one)."""
    import numpy as np

    from granite_deploy.engines import Chunk, load_engine
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

    res = {}
    rng = np.random.default_rng(0)
    if graph is None:
        engine = load_engine(artifact, max_batch=8, threads=threads)
    else:
        engine = OnnxRuntimeEngine(artifact, max_batch=8, threads=threads, graph=graph)
    res["graph"] = getattr(engine, "graph_name", "?")
    engine.reserve(100)
    engine.step([Chunk(100, (1, 2, 3, 4), 0)])  # warm-up
    engine.release(100)
    for n in () if decode_only else (128, 1024):
        engine.reserve(0)
        t = time.perf_counter()
        engine.step([Chunk(0, tuple(rng.integers(0, 1000, n).tolist()), 0)])
        res[f"prefill_{n}"] = n / (time.perf_counter() - t)
        engine.release(0)

    def decode_step_s(batch: int, past: int) -> float:
        for s in range(batch):
            engine.reserve(s)
        # Fill the cache up to `past` with random values instead of prefilling 8 x 2048
        # tokens: attention's cost does not depend on the values.
        engine._grow(past + steps + 1)
        common.fill_cache(engine, batch, past, rng)
        for s in range(batch):
            engine.slots.set_length(s, past)
        times = []
        for i in range(steps):
            chunks = [Chunk(s, (int(rng.integers(0, 1000)),), past + i) for s in range(batch)]
            t = time.perf_counter()
            engine.step(chunks)
            times.append(time.perf_counter() - t)
        for s in range(batch):
            engine.release(s)
        return float(np.median(times[1:] if len(times) > 2 else times))

    for batch in (1, 8):
        for past in (128, 1024, 2048) if past_sweep else (128,):
            res[f"step_b{batch}_p{past}"] = decode_step_s(batch, past)
            print(f"#   ours ({res['graph']}): batch {batch} past {past}: {res[f'step_b{batch}_p{past}'] * 1e3:.0f} ms/step", flush=True)
    res["capacity_at_2048"] = engine.capacity
    res["peak_rss_gib"] = common.peak_rss_gib()
    out.put(res)


def reference(checkpoint: str, threads: int, steps: int, out: mp.Queue) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    res = {}
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, 4), generator=gen))  # warm-up
        for n in (128, 1024):
            ids = torch.randint(0, 1000, (1, n), generator=gen)
            t = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            res[f"prefill_{n}"] = n / (time.perf_counter() - t)
        for batch in (1, 8):
            ids = torch.randint(0, 1000, (batch, 128), generator=gen)
            kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            prefill_s = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kwargs)
            decode_s = time.perf_counter() - t - prefill_s
            res[f"decode_b{batch}"] = batch * steps / decode_s
            print(f"#   transformers: batch {batch}: {res[f'decode_b{batch}']:.2f} tokens/s", flush=True)
    res["peak_rss_gib"] = common.peak_rss_gib()
    out.put(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="granite-4.0-1b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--skip-reference", action="store_true", help="only our engine")
    ap.add_argument("--quantized", default="int8,int4", help="weight-only variants to add ('' for none)")
    args = ap.parse_args()

    print(f"# machine: {common.machine()}", flush=True)
    checkpoint = common.random_checkpoint(args.model)
    artifact = common.artifact_for(checkpoint)
    from granite_deploy.artifact import load_manifest

    manifest = load_manifest(artifact)
    gemv_bw = common.measure_bandwidth_gbs(args.threads)
    bw = max(gemv_bw, common.stream_read_gbs(args.threads))
    wbytes = weight_bytes(manifest)
    floor_tps = bw * 1e9 / wbytes
    print(f"# measured bandwidth {bw:.1f} GB/s (GEMV {gemv_bw:.1f}); weights {wbytes / 1e9:.2f} GB/token -> "
          f"floor {floor_tps:.2f} tokens/s", flush=True)
    quantized = {m: common.quantized_artifact(artifact, m) for m in args.quantized.split(",") if m}

    mine = common.in_process(ours, str(artifact), args.threads, args.decode_steps, True, None, False)
    # The graph flavour decision (README): the portable graph's decode steps in the same run.
    portable = common.in_process(ours, str(artifact), args.threads, args.decode_steps, True, "decoder", True)
    ref = {} if args.skip_reference else common.in_process(reference, str(checkpoint), args.threads, args.decode_steps)
    quant = {m: common.in_process(ours, str(a), args.threads, args.decode_steps, False, None, False)
             for m, a in quantized.items()}

    def ratio(a, b):
        return f"{a / b:.2f}x" if b else "n/a"

    dec1 = 1 / mine["step_b1_p128"]
    dec8 = 8 / mine["step_b8_p128"]
    v = manifest.validation
    print(f"\n{args.model} (random weights, fp32), {args.threads} threads. Machine: {common.machine()}.")
    print(f"Export parity on this architecture: max |logit diff| {v.get('max_abs_logit_diff', float('nan')):.2e}, "
          f"greedy agreement {v.get('greedy_agreement', float('nan')):.0%}.")
    common.print_table(
        "Throughput (tokens/s)", ["measure", "granite-deploy (ORT CPU)", "transformers eager", "ratio"],
        [
            ["prefill, 128-token prompt", mine["prefill_128"], ref.get("prefill_128", "-"), ratio(mine["prefill_128"], ref.get("prefill_128", 0))],
            ["prefill, 1024-token prompt", mine["prefill_1024"], ref.get("prefill_1024", "-"), ratio(mine["prefill_1024"], ref.get("prefill_1024", 0))],
            ["decode, batch 1 (past 128)", dec1, ref.get("decode_b1", "-"), ratio(dec1, ref.get("decode_b1", 0))],
            ["decode, batch 8 (past 128)", dec8, ref.get("decode_b8", "-"), ratio(dec8, ref.get("decode_b8", 0))],
            ["batch 8 / batch 1", dec8 / dec1, ref["decode_b8"] / ref["decode_b1"] if ref else "-", ""],
            ["batch-1 decode vs bandwidth floor", f"{dec1 / floor_tps:.0%} of {floor_tps:.2f}",
             f"{ref['decode_b1'] / floor_tps:.0%}" if ref else "-", ""],
        ],
    )
    rows = []
    for batch in (1, 8):
        for past in (128, 1024, 2048):
            step = mine[f"step_b{batch}_p{past}"]
            other = portable[f"step_b{batch}_p{past}"]
            floor = (wbytes + batch * past * kv_bytes_per_token(manifest)) / (bw * 1e9)
            rows.append([batch, past, f"{step * 1e3:.0f}", f"{floor * 1e3:.0f}", f"{step / floor:.2f}",
                         f"{other * 1e3:.0f}", f"{other / floor:.2f}"])
    common.print_table("Decode step time vs the memory floor (weights + KV cache in use, read once)",
                       ["batch", "past tokens", f"step ms ({mine['graph']})", "floor ms", "step / floor",
                        "step ms (portable decoder)", "step / floor"], rows)
    if quant:
        rows = [["fp32", f"{mine['prefill_128']:.1f}", f"{mine['prefill_1024']:.1f}", f"{dec1:.2f}", f"{dec8:.2f}",
                 ratio(dec1, ref.get("decode_b1", 0)), "1.00x", f"{mine['peak_rss_gib']:.1f}"]]
        for m, q in quant.items():
            q1, q8 = 1 / q["step_b1_p128"], 8 / q["step_b8_p128"]
            rows.append([f"{m} weight-only", f"{q['prefill_128']:.1f}", f"{q['prefill_1024']:.1f}", f"{q1:.2f}",
                         f"{q8:.2f}", ratio(q1, ref.get("decode_b1", 0)), ratio(q1, dec1), f"{q['peak_rss_gib']:.1f}"])
        common.print_table(
            "Weight-only quantization, our engine (tokens/s; past 128)",
            ["weights", "prefill 128", "prefill 1024", "decode b1", "decode b8", "b1 vs transformers fp32",
             "b1 vs our fp32", "peak RSS GiB"], rows)
    common.print_table("Memory", ["process", "peak RSS GiB"],
                       [["granite-deploy engine", mine["peak_rss_gib"]], ["transformers", ref.get("peak_rss_gib", "-")]])
    print(f"\nbandwidth: {bw:.1f} GB/s, the larger of a STREAM-style read ({args.threads} numpy threads) and "
          f"ONNX Runtime's fp32 GEMV on a 1 GiB weight ({gemv_bw:.1f} GB/s)")


if __name__ == "__main__":
    main()
