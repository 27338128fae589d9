"""Prefill with the vocabulary head on the last position only vs on every prompt position.

The ONNX Runtime engine binds `num_logits_to_keep` (1 for a normal prefill chunk); before it
could, the head ran at every prompt position. This measures both in one run on one artifact:
the engine as it is, and the same engine with the graph's default left in place (head at
every position). Default artifact: the full-width 4-layer slice of granite-4.0-1b that
bench/profile_cpu.py caches (same head as the 1B: 100k x 2048), int4.

    flock /tmp/granite-bench.lock .venv/bin/python bench/bench_prefill_head.py [--artifact DIR] [--tokens 512]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common import CACHE, machine
from granite_deploy.engines import onnxruntime_engine as ort_engine
from granite_deploy.engines.base import Chunk


def prefill_s(engine, n: int, repeats: int) -> float:
    best = float("inf")
    for r in range(repeats):
        engine.reserve(r)
        ids = tuple(int(x) for x in np.random.default_rng(r).integers(100, 50000, n))
        t0 = time.perf_counter()
        engine.step([Chunk(r, ids, 0)])
        best = min(best, time.perf_counter() - t0)
        engine.release(r)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=CACHE / "granite-4.0-1b-4layers-random-artifact-int4")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.artifact.is_dir():
        raise SystemExit(f"--artifact: {args.artifact} is not there (bench/profile_cpu.py builds the default)")
    results = {}
    for label in ("last position (bound)", "every position (default)"):
        if label.startswith("every"):
            real = ort_engine._open_session

            def unbound(path, threads, provider):  # the graph as exported: the default stays, not bindable
                import onnxruntime as ort
                return ort.InferenceSession(str(path), ort_engine._session_options(threads), providers=[provider]), 0

            ort_engine._open_session = unbound
        engine = ort_engine.OnnxRuntimeEngine(args.artifact, max_batch=args.repeats, threads=args.threads,
                                        max_seq_len=args.tokens + 8)
        results[label] = prefill_s(engine, args.tokens, args.repeats)
        engine.close()
        if label.startswith("every"):
            ort_engine._open_session = real
    print(f"machine: {machine()}; artifact: {args.artifact.name}; prompt {args.tokens} tokens, best of {args.repeats}")
    print("| head computed at | prefill s | tokens/s | vs last position |")
    print("|---|---|---|---|")
    base = results["last position (bound)"]
    for label, s in results.items():
        print(f"| {label} | {s:.2f} | {args.tokens / s:.1f} | {s / base:.2f}x |")


if __name__ == "__main__":
    main()
