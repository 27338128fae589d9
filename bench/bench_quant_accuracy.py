"""Quantization accuracy on a small *trained* Granite-architecture model (not the real 1B).

Trains (or reuses) the model of `train_tiny_granite.py`, exports it to an fp32 artifact (validated
against PyTorch), quantizes it with `--int8`, `--int8-dynamic`, `--int4` and `--int8-qdq`, and prints one table:
perplexity on the held-out stdlib docstrings (fp32 vs each, % increase), teacher-forced greedy
agreement with fp32 over 64 decode steps on the gate's fixed prompts, mean KL, whether the default
gate thresholds pass, graph size and ONNX Runtime CPU decode speed (batch 1), plus the machine.

This proves the method (and the gate) on weights that learned something; the real
granite-4.0-1b's accuracy has to be measured on it.

    python bench/bench_quant_accuracy.py [--ppl-tokens 16384] [--threads 1] [--minutes 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny_granite  # noqa: E402

METHODS = ("int8", "int8-dynamic", "int4", "int8-qdq")


def machine() -> str:
    try:
        import common

        return common.machine()
    except Exception:  # noqa: BLE001
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def decode_speeds(artifacts: dict, threads: int, prompt_len: int = 32, steps: int = 128, rounds: int = 5) -> dict:
    """Batch-1 greedy decode tokens/s through the ONNX Runtime engine, best of `rounds`; the artifacts take
    turns within each round so that load from other processes hits them alike."""
    from granite_deploy.engines.base import Chunk
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

    engines = {k: OnnxRuntimeEngine(a, max_batch=1, max_seq_len=prompt_len + steps + 1, threads=threads)
               for k, a in artifacts.items()}
    best = dict.fromkeys(engines, 0.0)
    for r in range(rounds):
        for name, engine in engines.items():
            engine.reserve(r)
            logits = engine.step([Chunk(r, tuple(range(10, 10 + prompt_len)), 0)])
            start = time.perf_counter()
            for i in range(steps):
                logits = engine.step([Chunk(r, (int(logits[0].argmax()),), prompt_len + i)])
            best[name] = max(best[name], steps / (time.perf_counter() - start))
            engine.release(r)
    return best


def graph_mib(artifact: Path) -> float:
    from granite_deploy.artifact import load_manifest

    m = load_manifest(artifact)
    g = m.graph("decoder")
    return sum(m.files[n].bytes for n in (g.file, *g.external_data)) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=train_tiny_granite.DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=8.0, help="training budget if the checkpoint is not cached")
    ap.add_argument("--ppl-tokens", type=int, default=16384, help="held-out tokens for perplexity (default 16384)")
    ap.add_argument("--threads", type=int, default=1,
                    help="ONNX Runtime threads for the speed column (default 1: at 2.9 M params a step is mostly "
                         "per-op overhead, and extra threads only add synchronisation)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--work", type=Path, default=None, help="artifact folder (default: <checkpoint>-artifacts)")
    args = ap.parse_args()
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        ap.error(f"--methods: {', '.join(unknown)} not among {', '.join(METHODS)} (fp32 is always measured)")

    from granite_deploy.export.exporter import export
    from granite_deploy.export.quantize import quantize

    ckpt = train_tiny_granite.ensure_trained(args.checkpoint, args.minutes)
    training = json.loads((ckpt / "training.json").read_text())
    heldout = ckpt / "heldout.txt"
    work = args.work or ckpt.with_name(ckpt.name + "-artifacts")
    fp32 = export(str(ckpt), work / "fp32", force=True)
    from granite_deploy.artifact import load_manifest

    v = load_manifest(fp32).validation

    rows = []
    for method in args.methods.split(","):
        t = time.perf_counter()
        out = quantize(fp32, work / method, method, calibration=heldout, force=True, skip_gate=True,
                       ppl_max_tokens=args.ppl_tokens)
        manifest = load_manifest(out)
        m = {**manifest.extra, "precision": manifest.graph("decoder").precision}  # accuracy, quantization records
        rows.append((method, out, m, time.perf_counter() - t))
    speed = decode_speeds({"fp32": fp32, **{method: out for method, out, _, _ in rows}}, args.threads)

    p0 = rows[0][2]["accuracy"]["perplexity"]
    print(f"Model: GraniteMoeHybridForCausalLM, {training['params'] / 1e6:.1f} M params "
          f"(4 attention layers, hidden 256, vocab {training['vocab']}), trained {training['minutes']} min on CPU "
          f"({training['tokens_seen'] / 1e6:.1f} M tokens of stdlib docstrings / pydoc topics, final train loss "
          f"{training['final_train_loss']:.2f}).")
    print(f"fp32 export vs PyTorch: max |logit diff| {v['max_abs_logit_diff']:.1e}, greedy agreement "
          f"{v['greedy_agreement']:.0%}.")
    print(f"Perplexity: {p0['tokens']} held-out tokens (modules/topics never trained on), windows of {p0['window']}. "
          "Greedy agreement: teacher-forced, 4 prompts x 64 decode steps, vs the fp32 graph.")
    print()
    print("| artifact | graph MiB | perplexity | vs fp32 | greedy agreement | mean KL (nats) | default gate | "
          f"decode tok/s (batch 1, {args.threads} thread{'s' if args.threads != 1 else ''}) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| fp32 | {graph_mib(fp32):.1f} | {p0['reference']:.3f} | - | - | - | - | {speed['fp32']:.0f} |")
    for method, out, m, _ in rows:
        a = m["accuracy"]
        p, gr, th = a["perplexity"], a["greedy"], a["thresholds"]
        gate = "pass" if a["passed"] else "FAIL"
        print(f"| {method} ({m['precision']}) | {graph_mib(out):.1f} | {p['quantized']:.3f} | "
              f"{p['relative_increase']:+.2%} | {gr['agreement']:.1%} ({round(gr['agreement'] * gr['positions'])}/"
              f"{gr['positions']}) | {gr['mean_kl_nats']:.4f} | {gate} (ppl <= +{th['max_ppl_increase']:.0%}, "
              f"agree >= {th['min_greedy_agreement']:.0%}) | {speed[method]:.0f} |")
    print()
    import onnxruntime

    print(f"Machine: {machine()}; onnxruntime {onnxruntime.__version__}, CPUExecutionProvider. "
          f"INT8/INT4: MatMulNBits block 32, accuracy_level 4; INT8 QDQ: per-channel, run by ONNX Runtime CPU.")
    print("This shows the method on a small trained model; it is not a measurement of granite-4.0-1b's accuracy.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
