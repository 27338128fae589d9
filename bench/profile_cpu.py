"""Where a decode step of the CPU flavour spends its time, per op type (ONNX Runtime's profiler).

A slice of the granite-4.0-1b architecture: every dimension full size (hidden 2048,
16/4 heads, MLP 4096, vocabulary 100352) but --layers layers (default 4) instead of 40,
random weights, exported and quantised with the project's own tool chain, cached next
to the benchmark checkpoints. For fp32 and int4 at batch 1 and 8 (past --past tokens)
it runs --steps decode steps with profiling on and prints, per op type, the time per step
split into "per layer" (x 40 for the full model) and "once per step" (embedding, final
norm, head), so a full-model step can be read off it.

    python bench/profile_cpu.py [--layers 4] [--past 128] [--steps 8] [--widths fp32,int4]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402



def slice_checkpoint(layers: int) -> Path:
    out = common.CACHE / f"granite-4.0-1b-{layers}layers-random"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    from granite_deploy.export.tiny import build_tokenizer

    cfg = json.loads((common.CONFIGS / "granite-4.0-1b.json").read_text())
    for key in ("architectures", "model_type"):
        cfg.pop(key, None)
    cfg["num_hidden_layers"] = layers
    cfg["layer_types"] = cfg["layer_types"][:layers]
    torch.manual_seed(0)
    model = GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(**cfg)).to(torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    model.save_pretrained(out)
    return out


def layer_of(node_name: str) -> int | None:
    """The decoder layer a node belongs to, from its name (the exporter names nodes by module path)."""
    import re

    m = re.match(r"l(\d+)/", node_name)
    return int(m.group(1)) if m else None


def profile(artifact: str, batch: int, past: int, steps: int, threads: int, out) -> None:
    import numpy as np

    import granite_deploy.engines.onnxruntime_engine as ortmod
    from granite_deploy.engines import Chunk, load_engine

    base = ortmod._session_options

    def with_profiling(t):
        o = base(t)
        o.enable_profiling = True
        o.profile_file_prefix = f"/tmp/granite_profile_b{batch}"
        return o

    ortmod._session_options = with_profiling
    engine = load_engine(artifact, max_batch=8, threads=threads)
    rng = np.random.default_rng(0)
    for s in range(batch):
        engine.reserve(s)
    engine._grow(past + steps + 2)
    common.fill_cache(engine, batch, past, rng)
    for s in range(batch):
        engine.slots.set_length(s, past)
    walls = []
    for i in range(steps + 1):
        t = time.perf_counter()
        engine.step([Chunk(s, (int(rng.integers(0, 1000)),), past + i) for s in range(batch)])
        walls.append(time.perf_counter() - t)
    path = engine.session.end_profiling()
    events = json.loads(Path(path).read_text())
    Path(path).unlink()
    runs = [e for e in events if e.get("name") == "model_run"]
    first_run_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0  # drop the first (warm-up) step
    per_layer = collections.Counter()
    once = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < first_run_end:
            continue
        op = e["args"].get("op_name", "?")
        (per_layer if layer_of(e["name"]) is not None else once)[op] += e["dur"]
    n_runs = max(1, len(runs) - 1)
    out.put({"per_layer": {k: v / n_runs / 1e3 for k, v in per_layer.items()},
             "once": {k: v / n_runs / 1e3 for k, v in once.items()},
             "run_ms": statistics.median(r["dur"] for r in runs[1:]) / 1e3 if len(runs) > 1 else float("nan"),
             "wall_ms": statistics.median(walls[1:]) * 1e3, "graph": engine.graph_name})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--widths", default="fp32,int4")
    ap.add_argument("--full-layers", type=int, default=40, help="layers of the model the slice stands for")
    args = ap.parse_args()

    print(f"# machine: {common.machine()}", flush=True)
    ck = slice_checkpoint(args.layers)
    art = common.CACHE / f"{ck.name}-artifact"
    if not (art / "manifest.json").exists():
        from granite_deploy.export.exporter import export

        export(ck, art, validate=False, force=True)
    arts = {w: art if w == "fp32" else common.quantized_artifact(art, w) for w in args.widths.split(",")}
    for w, a in arts.items():
        for batch in (1, 8):
            r = common.in_process(profile, str(a), batch, args.past, args.steps, args.threads)
            layer_total = sum(r["per_layer"].values()) / args.layers
            once_total = sum(r["once"].values())
            full = layer_total * args.full_layers + once_total
            rows = []
            for op in sorted(set(r["per_layer"]) | set(r["once"]),
                             key=lambda o: -(r["per_layer"].get(o, 0) / args.layers * args.full_layers + r["once"].get(o, 0))):
                pl = r["per_layer"].get(op, 0) / args.layers
                on = r["once"].get(op, 0)
                share = (pl * args.full_layers + on) / full
                if share < 0.005:
                    continue
                rows.append([op, f"{pl:.3f}", f"{on:.2f}", f"{pl * args.full_layers + on:.1f}", f"{share:.0%}"])
            common.print_table(
                f"{w}, batch {batch}, past {args.past} ({r['graph']}, {args.layers}-layer slice: step {r['wall_ms']:.1f} ms "
                f"wall, {r['run_ms']:.1f} ms in the session; kernels {layer_total:.2f} ms/layer + {once_total:.1f} ms "
                f"once -> {full:.0f} ms for {args.full_layers} layers)",
                ["op type", "ms per layer", "ms once per step", f"ms per {args.full_layers}-layer step", "share"], rows)


if __name__ == "__main__":
    main()
