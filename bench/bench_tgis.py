"""What TGIS features cost on the full-size architecture (random weights), ONE run, ratios:

1. prompt-token logprobs (fmaas input_tokens + token_logprobs/ranks/top_n): a prefill that
   returns the logits of every prompt position (Chunk.all_logits: the graph's vocabulary
   projection for every token instead of the last one) plus the scores (serve/tgis.py:
   log-softmax, rank, top-5 per position), against the ordinary last-position prefill;
2. one engine per adapter (serve --adapter): resident memory of a second engine of the same
   size (a merged adapter artifact is a full model), measured by loading the artifact twice.

    flock /tmp/granite-bench.lock .venv/bin/python bench/bench_tgis.py [--model granite-4.0-1b] [--tokens 64 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import artifact_for, machine, random_checkpoint, rss_gib  # noqa: E402


def prefill_ms(engine, ids, all_logits: bool, top_n: int = 5) -> tuple[float, float]:
    from granite_deploy.engines.base import Chunk
    from granite_deploy.serve.tgis import prompt_token_infos

    engine.reserve(0)
    try:
        t0 = time.perf_counter()
        engine.step([Chunk(0, tuple(ids), 0, all_logits=all_logits)])
        t1 = time.perf_counter()
        score = 0.0
        if all_logits:
            prompt_token_infos(engine.chunk_logits[0], ids, 0, top_n)
            score = (time.perf_counter() - t1) * 1000
        return (t1 - t0) * 1000, score
    finally:
        engine.release(0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="granite-4.0-1b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--artifact", help="an existing artifact instead of the cached full-size one (smoke runs)")
    args = ap.parse_args()

    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

    artifact = Path(args.artifact) if args.artifact else artifact_for(random_checkpoint(args.model))
    what = f"artifact {artifact}" if args.artifact else f"model {args.model} (random weights)"
    print(f"# machine: {machine()}; {what}, ONNX Runtime CPU, "
          f"{args.threads} threads; one run, other helpers may be using the CPUs")
    before = rss_gib()
    engine = OnnxRuntimeEngine(artifact, max_batch=1, threads=args.threads)
    one = rss_gib()
    vocab = engine.info.vocab_size
    rng = np.random.default_rng(0)

    print("\n| prompt tokens | prefill, last position (ms) | prefill, every position (ms) | scoring (ms) | "
          "total / last | logits kept |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.tokens:
        ids = rng.integers(0, vocab, n).tolist()
        prefill_ms(engine, ids, False)  # warm-up of this shape
        last = statistics.median(prefill_ms(engine, ids, False)[0] for _ in range(args.repeats))
        runs = [prefill_ms(engine, ids, True) for _ in range(args.repeats)]
        every = statistics.median(r[0] for r in runs)
        score = statistics.median(r[1] for r in runs)
        mib = n * vocab * 4 / 2**20
        print(f"| {n} | {last:.0f} | {every:.0f} | {score:.0f} | {(every + score) / last:.2f}x | {mib:.0f} MiB |")

    second = OnnxRuntimeEngine(artifact, max_batch=1, threads=args.threads)
    two = rss_gib()
    print(f"\n| resident memory | GiB |\n|---|---:|\n| before loading | {before:.2f} |\n"
          f"| base engine | {one:.2f} (+{one - before:.2f}) |\n| + one adapter engine (same size) | "
          f"{two:.2f} (+{two - one:.2f}) |")
    del second
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
