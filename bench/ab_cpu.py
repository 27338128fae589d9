"""Interleaved A/B of CPU quantisation parameters and session options (issue #18).

Every variant is an engine over a quantised copy of the full-width 4-layer granite-4.0-1b
slice (bench/profile_cpu.py's), all loaded in ONE process; the timed steps go round-robin
over the variants (variant 1 step, variant 2 step, ...) for --rounds rounds, so a busy
host slows every variant alike. Per variant it prints the median and the best step of
decode batch 1 and batch 8 (past --past) and a --prefill-token prefill, plus the RSS the
variant's load added.

A variant is `method:block:accuracy_level[:option=value,...]`, e.g. `int4:32:4`,
`int4:128:4`, `int8:32:1`, `int8-qdq:0:0` (block 0: the method's default), `int4:32:4:session.intra_op.allow_spinning=0`, `@/path/to/artifact:0:0` (that artifact as it is; options are
ONNX Runtime session config entries added to the engine's `_session_options`).

    flock /tmp/granite-bench.lock python bench/ab_cpu.py int4:32:4 int4:64:4 int4:128:4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import rss_gib  # noqa: E402


def slice_artifact(layers: int) -> Path:
    from profile_cpu import slice_checkpoint

    ck = slice_checkpoint(layers)
    art = common.CACHE / f"{ck.name}-artifact"
    with common.build_lock():
        if not (art / "manifest.json").exists():
            from granite_deploy.export.exporter import export

            export(ck, art, validate=False, force=True)
    return art


def variant_artifact(src: Path, method: str, block: int, level: int) -> Path:
    from granite_deploy.export.quantize import quantize

    out = common.CACHE / f"{src.name}-{method}-b{block}-a{level}"
    if not (out / "manifest.json").exists():
        t = time.perf_counter()
        quantize(src, out, method, block_size=block or None, accuracy_level=level, force=True, skip_gate=True,
                 decode_steps=2, ppl_max_tokens=32)
        print(f"# quantized {out.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--graph", default=None, help="manifest graph (default: the engine's)")
    args = ap.parse_args()

    import numpy as np

    import granite_deploy.engines.onnxruntime_engine as ortmod
    from granite_deploy.engines import Chunk
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

    print(f"# machine: {common.machine()}", flush=True)
    src = slice_artifact(args.layers)
    base_options = ortmod._session_options
    engines = {}
    for v in args.variants:
        parts = v.split(":")
        method, block, level = parts[0], int(parts[1]), int(parts[2])
        opts = dict(kv.split("=", 1) for kv in parts[3].split(",")) if len(parts) > 3 and parts[3] else {}
        if method.startswith("@"):  # an existing artifact as it is (block, level ignored)
            art = Path(method[1:])
        else:
            art = src if method == "fp32" else variant_artifact(src, method, block, level)

        def options(threads, _opts=opts):
            o = base_options(threads)
            for k, val in _opts.items():
                o.add_session_config_entry(k, val)
            return o

        ortmod._session_options = options
        before = rss_gib()
        eng = OnnxRuntimeEngine(art, max_batch=8, threads=args.threads, graph=args.graph)
        ortmod._session_options = base_options
        eng.reserve(0)
        eng.step([Chunk(0, (1, 2, 3, 4), 0)])
        eng.release(0)
        for s in range(8):
            eng.reserve(s)
        eng._grow(args.past + 2 * args.rounds + 4)
        common.fill_cache(eng, 8, args.past, np.random.default_rng(0))
        engines[v] = {"engine": eng, "rss": rss_gib() - before, "b1": [], "b8": [], "prefill": [], "graph": eng.graph_name}

    rng = np.random.default_rng(1)
    for r in range(args.rounds):
        for v, e in engines.items():
            eng = e["engine"]
            # decode batch 1 on row 0, batch 8 on rows 0..7, both at past..past+rounds
            for s in range(8):
                eng.slots.set_length(s, args.past + r)
            t = time.perf_counter()
            eng.step([Chunk(0, (int(rng.integers(0, 1000)),), args.past + r)])
            e["b1"].append(time.perf_counter() - t)
            for s in range(8):
                eng.slots.set_length(s, args.past + r)
            t = time.perf_counter()
            eng.step([Chunk(s, (int(rng.integers(0, 1000)),), args.past + r) for s in range(8)])
            e["b8"].append(time.perf_counter() - t)
            if r % 3 == 0:
                eng.release(7)
                eng.reserve(7)
                t = time.perf_counter()
                eng.step([Chunk(7, tuple(rng.integers(0, 1000, args.prefill_tokens).tolist()), 0)])
                e["prefill"].append(time.perf_counter() - t)

    print(f"\n{args.layers}-layer full-width granite-4.0-1b slice, past {args.past}, {args.rounds} interleaved rounds, "
          f"{args.threads} threads, ms per step (median / best); load {__import__('os').getloadavg()[0]:.1f}\n")
    print("| variant | graph | decode b1 | decode b8 | prefill " + str(args.prefill_tokens) + " | RSS added GiB |")
    print("|---|---|---|---|---|---|")
    for v, e in engines.items():
        cells = [f"{statistics.median(e[k]) * 1e3:.1f} / {min(e[k]) * 1e3:.1f}" for k in ("b1", "b8", "prefill")]
        print(f"| {v} | {e['graph']} | " + " | ".join(cells) + f" | {e['rss']:.2f} |")


if __name__ == "__main__":
    main()
