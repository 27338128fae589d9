"""Node overhead of decoder_ragged: its 1-token decode step vs decoder_cpu's, graph level (IO binding, caches
bound in place, no engine). The ragged call binds every row into group 0 (width 1) and group 1 as zero rows,
the way an engine runs a step of decodes only. Default artifact: the full-width 4-layer granite-4.0-1b
slice (bench/profile_cpu.py's checkpoint) exported fp32 with the flavour. On a tiny artifact (tests'
make_tiny_checkpoint, weights of a few MB) the difference is the per-step node overhead itself; on the
slice it is that overhead next to a full-width step.

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


class Stepper:
    """One graph's session with its state bound in place; step() binds one decode step's inputs and runs it."""

    def __init__(self, artifact: Path, graph: str, batch: int, capacity: int, threads: int):
        import onnx
        import onnxruntime as ort

        g = load_manifest(artifact).graph(graph)
        self.graph, self.batch = graph, batch
        self.nodes = len(onnx.load(str(artifact / g.file), load_external_data=False).graph.node)
        self.session = ort.InferenceSession(str(artifact / g.file), _session_options(threads),
                                            providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(
            rng.standard_normal((batch, *st.row_shape(capacity))).astype(np.float32)) for st in g.state]
        binding = self.session.io_binding()
        for st, buf in zip(g.state, self.buffers):
            binding.bind_ortvalue_input(st.input, buf)
            binding.bind_ortvalue_output(st.output, buf)
            if graph == DECODER_RAGGED:  # group 1: zero rows, as an engine binds an unused group
                empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((0, *st.row_shape(capacity)), np.float32))
                self.buffers.append(empty)
                binding.bind_ortvalue_input(ragged_state_name(st.input, 1), empty)
                binding.bind_ortvalue_output(ragged_state_name(st.output, 1), empty)
        binding.bind_output("logits")
        self.binding = binding

    def step(self, ids: list[int], position: int) -> float:
        if self.graph == DECODER_RAGGED:
            feeds = ragged_feeds([[(position, [t]) for t in ids], []], logits="last")
        else:
            feeds = {"input_ids": np.array(ids, np.int64)[:, None],
                     "position_ids": np.full((len(ids), 1), position, np.int64)}
        t0 = time.perf_counter()
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, value)
        self.session.run_with_iobinding(self.binding)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--past", type=int, default=512)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    artifact = args.artifact or default_artifact()
    print(f"# {common.machine()}; {artifact}", flush=True)
    capacity = args.past + args.steps + 8
    rng = np.random.default_rng(0)
    vocab = load_manifest(artifact).architecture.vocab_size
    for batch in args.batch:
        # both graphs in one process, steps alternating, so that the host's noise hits both alike
        cpu = Stepper(artifact, DECODER_CPU, batch, capacity, args.threads)
        ragged = Stepper(artifact, DECODER_RAGGED, batch, capacity, args.threads)
        t_cpu, t_ragged = [], []
        for s in range(args.steps + 3):
            ids = rng.integers(0, min(50000, vocab), batch).tolist()
            if s % 2:  # alternate which graph goes first
                b, a = ragged.step(ids, args.past + s), cpu.step(ids, args.past + s)
            else:
                a, b = cpu.step(ids, args.past + s), ragged.step(ids, args.past + s)
            if s >= 3:
                t_cpu.append(a * 1e3)
                t_ragged.append(b * 1e3)
        t_cpu, t_ragged = np.array(t_cpu), np.array(t_ragged)
        print(json.dumps({"batch": batch, "past": args.past, "threads": args.threads, "steps": args.steps,
                          "decoder_cpu_ms": round(float(np.median(t_cpu)), 3),
                          "decoder_ragged_ms": round(float(np.median(t_ragged)), 3),
                          "overhead_ms_median_of_pairs": round(float(np.median(t_ragged - t_cpu)), 3),
                          "min_ms": {"decoder_cpu": round(float(t_cpu.min()), 3),
                                     "decoder_ragged": round(float(t_ragged.min()), 3)},
                          "nodes": {"decoder_cpu": cpu.nodes, "decoder_ragged": ragged.nodes}}), flush=True)
        del cpu, ragged


if __name__ == "__main__":
    main()
