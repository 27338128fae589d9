"""Hybrid vs dense: decode speed and memory per sequence at long context.

granite-4.0-h-1b (36 Mamba2 + 4 attention layers) next to granite-4.0-1b (40
attention layers), full-size architectures with random weights, fp32, ONNX
Runtime CPU engine, 2 threads. For each context length the sequence's state
(KV cache of attention layers, conv/ssm state of Mamba layers) is filled with
random values instead of prefilling thousands of tokens (cost does not depend
on the values), then batch-1 decode steps are timed. Memory per sequence is
the bytes of state the engine holds for one sequence at that context.

    python bench/bench_hybrid.py [--contexts 512,4096,16384] [--steps 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def measure(artifact: str, contexts: list[int], steps: int, threads: int, out: mp.Queue) -> None:
    import numpy as np

    from granite_deploy.engines import Chunk, load_engine

    rng = np.random.default_rng(0)
    engine = load_engine(artifact, max_batch=1, max_seq_len=max(contexts) + steps + 1, threads=threads)
    res = {}
    for ctx in contexts:
        engine.reserve(0)
        engine._grow(ctx + steps + 1)
        per_seq = common.fill_cache(engine, 1, ctx, rng)
        for st in engine.states:
            if st["kind"] != "kv":  # Mamba conv/ssm state
                buf = engine._buffers[st["input"]]
                buf[0] = rng.standard_normal(buf[0].shape, dtype=np.float32) * 0.1
                per_seq += buf[0].nbytes
        engine.slots.set_length(0, ctx)
        times = []
        for i in range(steps):
            t = time.perf_counter()
            engine.step([Chunk(0, (int(rng.integers(0, 1000)),), ctx + i)])
            times.append(time.perf_counter() - t)
        engine.release(0)
        res[ctx] = {"step_s": float(np.median(times[1:])), "state_bytes": per_seq}
        print(f"#   {Path(artifact).name}: context {ctx}: {res[ctx]['step_s'] * 1e3:.0f} ms/step, "
              f"{per_seq / 2**20:.0f} MiB/sequence", flush=True)
    out.put(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="granite-4.0-h-1b,granite-4.0-1b")
    ap.add_argument("--contexts", default="512,4096,16384")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from granite_deploy.artifact import load_manifest

    contexts = [int(x) for x in args.contexts.split(",")]
    print(f"# machine: {common.machine()}", flush=True)
    results = {}
    for name in args.models.split(","):
        artifact = common.artifact_for(common.random_checkpoint(name))
        v = load_manifest(artifact).validation
        print(f"# {name}: export parity max |logit diff| {v.get('max_abs_logit_diff', float('nan')):.2e}, "
              f"greedy agreement {v.get('greedy_agreement', float('nan')):.0%}", flush=True)
        results[name] = common.in_process(measure, str(artifact), contexts, args.steps, args.threads)
    print(f"\nDecode at batch 1, fp32, ONNX Runtime CPU, {args.threads} threads. Machine: {common.machine()}.")
    rows = []
    for c in contexts:
        row = [c]
        for name in results:
            r = results[name][c]
            row += [f"{1 / r['step_s']:.2f}", f"{r['state_bytes'] / 2**20:.0f}"]
        rows.append(row)
    header = ["context"] + [h for name in results for h in (f"{name} tokens/s", f"{name} MiB/sequence")]
    common.print_table("Decode speed and state memory per sequence", header, rows)


if __name__ == "__main__":
    main()
