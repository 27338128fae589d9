"""Node overhead of decoder_ragged: its 1-token decode step vs decoder_cpu's, graph level (IO binding, caches
bound in place, no engine). The ragged call binds every row into group 0 (width 1) and group 1 as zero rows,
the way an engine runs a step of decodes only. Default artifact: the full-width 4-layer granite-4.0-1b
slice (bench/profile_cpu.py's checkpoint) exported fp32 with the flavour.

    flock /tmp/granite-bench.lock .venv/bin/python bench/bench_ragged_graph.py [--artifact DIR] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import common
from granite_deploy.artifact import DECODER_CPU, DECODER_RAGGED, load_manifest
from granite_deploy.engines.onnxruntime_engine import _session_options
from granite_deploy.export.ragged_graph import ragged_feeds
from granite_deploy.manifest import ragged_state_name


def default_artifact() -> Path:
    import profile_cpu
    from granite_deploy.export.exporter import export

    out = common.CACHE / "granite-4.0-1b-4layers-random-artifact-fp32-ragged"
    with common.build_lock():
        if not (out / "manifest.json").exists() or DECODER_RAGGED not in load_manifest(out).graphs:
            export(profile_cpu.slice_checkpoint(4), out, validate=False, force=True)
    return out


def step_ms(artifact: Path, graph: str, batch: int, past: int, capacity: int, steps: int, threads: int) -> dict:
    import onnx
    import onnxruntime as ort

    m = load_manifest(artifact)
    g = m.graph(graph)
    session = ort.InferenceSession(str(artifact / g.file), _session_options(threads),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    buffers = {st.input: ort.OrtValue.ortvalue_from_numpy(
        rng.standard_normal((batch, *st.row_shape(capacity))).astype(np.float32)) for st in g.state}
    binding = session.io_binding()
    if graph == DECODER_RAGGED:
        empty = {st.input: ort.OrtValue.ortvalue_from_numpy(np.zeros((0, *st.row_shape(capacity)), np.float32))
                 for st in g.state}
        for st in g.state:
            for grp, buf in ((0, buffers[st.input]), (1, empty[st.input])):
                binding.bind_ortvalue_input(ragged_state_name(st.input, grp), buf)
                binding.bind_ortvalue_output(ragged_state_name(st.output, grp), buf)
    else:
        for st in g.state:
            binding.bind_ortvalue_input(st.input, buffers[st.input])
            binding.bind_ortvalue_output(st.output, buffers[st.input])
    binding.bind_output("logits")
    times = []
    for s in range(steps):
        ids = rng.integers(100, 50000, batch).tolist()
        if graph == DECODER_RAGGED:
            feeds = ragged_feeds([[(past + s, [t]) for t in ids], []], logits="last")
        else:
            feeds = {"input_ids": np.array(ids, np.int64)[:, None],
                     "position_ids": np.full((batch, 1), past + s, np.int64)}
        t0 = time.perf_counter()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - t0)
    nodes = len(onnx.load(str(artifact / g.file), load_external_data=False).graph.node)
    times = np.array(times[2:]) * 1e3
    return {"graph": graph, "batch": batch, "past": past, "nodes": nodes, "median_ms": float(np.median(times)),
            "min_ms": float(times.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--past", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="alternating cpu/ragged rounds (noise on a shared host)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    artifact = args.artifact or default_artifact()
    print(f"# {common.machine()}; {artifact}", flush=True)
    capacity = args.past + args.steps + 8
    for batch in args.batch:
        best = {}
        for _ in range(args.rounds):
            for graph in (DECODER_CPU, DECODER_RAGGED):
                r = step_ms(artifact, graph, batch, args.past, capacity, args.steps, args.threads)
                if graph not in best or r["median_ms"] < best[graph]["median_ms"]:
                    best[graph] = r
        cpu, ragged = best[DECODER_CPU], best[DECODER_RAGGED]
        print(json.dumps({"batch": batch, "past": args.past, "threads": args.threads,
                          "decoder_cpu_ms": round(cpu["median_ms"], 3), "decoder_ragged_ms": round(ragged["median_ms"], 3),
                          "overhead_ms": round(ragged["median_ms"] - cpu["median_ms"], 3),
                          "nodes": {"decoder_cpu": cpu["nodes"], "decoder_ragged": ragged["nodes"]}}), flush=True)


if __name__ == "__main__":
    main()
