"""Structured generation cost: JSON-schema-constrained vs unconstrained decode, compile and mask times.

Full-size granite-4.0-1b architecture (random weights; speed does not depend on their values),
int4 weight-only by default (``--precision fp32`` for the fp32 artifact), through the real
Scheduler (continuous batching, the mask fill overlapped with the engine step). The grammar
engine needs a real ~100k-token vocabulary: the benchmark's checkpoint ships a tiny tokenizer, so
a byte-level BPE with 100256 merged tokens is trained once on the venv's Python sources and given
Granite's 96 added tokens at 100256..100351 (``<tool_call>`` = 100270, as in the real tokenizer),
then cached next to the checkpoints.

Prints, from ONE run: decode tokens/s at batch 1 and 8 with and without a JSON-schema constraint
(alternating rounds, best of each) and their ratio; compile time of a 3-tool forced tool-call
grammar and of a JSON schema (cold cache); the mask fill per step (one row, and 8 rows with
llguidance's parallel fill) along a real tool-call trajectory; how long the scheduler waited for
masks after the engine step (what the overlap did not hide); and the machine.

    flock /tmp/granite-bench.lock .venv/bin/python bench/bench_structured.py [--precision int4] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
     "parameters": {"type": "object", "properties": {
         "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
         "days": {"type": "integer", "minimum": 1, "maximum": 14}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search_flights", "description": "Find flights",
     "parameters": {"type": "object", "properties": {
         "origin": {"type": "string", "pattern": "^[A-Z]{3}$"}, "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
         "date": {"type": "string", "format": "date"}, "passengers": {"type": "integer", "minimum": 1},
         "cabin": {"enum": ["economy", "business", "first"]}}, "required": ["origin", "destination", "date"]}}},
    {"type": "function", "function": {"name": "create_event", "description": "Add a calendar event",
     "parameters": {"type": "object", "properties": {
         "title": {"type": "string", "maxLength": 80}, "start": {"type": "string"},
         "attendees": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
         "reminder": {"type": "boolean"},
         "location": {"type": "object", "properties": {"name": {"type": "string"}, "lat": {"type": "number"},
                                                      "lon": {"type": "number"}}, "required": ["name"]}},
         "required": ["title", "start"]}}},
]
# the decode benchmark's schema: long enough that no sequence completes within --tokens
NOTES = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "notes": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 64},
    "score": {"type": "number"}}, "required": ["title", "notes", "score"], "additionalProperties": False}
SAMPLE_CALL = ('<tool_call>\n{"name": "create_event", "arguments": {"title": "Team sync about the quarterly roadmap", '
               '"start": "2026-12-02T10:00", "attendees": ["alice@example.com", "bob@example.com", '
               '"carol@example.com"], "reminder": true, "location": {"name": "Room 4", "lat": 48.85, '
               '"lon": 2.35}}}\n</tool_call>')


def bench_tokenizer() -> Path:
    """A 100352-token byte-level BPE with Granite's added tokens (cached)."""
    out = common.CACHE / "bpe100k-granite-tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    import glob

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from granite_deploy.export.tiny import GRANITE_ADDED_TOKENS, N_ADDED

    t = time.perf_counter()
    files = sorted(glob.glob(str(Path(sys.prefix) / "lib" / "python3*" / "site-packages" / "**" / "*.py"),
                             recursive=True))

    def texts():
        for f in files:
            try:
                yield Path(f).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                pass

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=100256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        max_token_length=24))
    if tok.get_vocab_size() != 100256:
        raise SystemExit(f"the BPE reached only {tok.get_vocab_size()} tokens (too little text under {sys.prefix})")
    by_offset = {off: (content, special) for off, content, special in GRANITE_ADDED_TOKENS}
    for off in range(N_ADDED):
        content, special = by_offset.get(off, (f"<|reserved_special_token_{off}|>", True))
        (tok.add_special_tokens if special else tok.add_tokens)([AddedToken(content, special=special, normalized=False)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}))
    print(f"# trained the 100k benchmark tokenizer in {time.perf_counter() - t:.0f} s: {out}", flush=True)
    return out


def compile_and_mask(tokenizer_dir: str, out) -> None:
    """Compile times (cold) and mask fill per step along a real tool-call trajectory."""
    import numpy as np

    import llguidance.numpy as lnp
    from granite_deploy.serve import constraints as C
    from granite_deploy.serve.tokenizer import GraniteTokenizer

    res = {}
    tok = GraniteTokenizer.from_dir(tokenizer_dir)
    t = time.perf_counter()
    gt = C.grammar_tokenizer(tok, 100352)
    res["tokenizer_build_s"] = time.perf_counter() - t
    times = {"tools": [], "schema": []}
    for i in range(5):  # a different description each time: a cold compile, never a cache hit
        tools = json.loads(json.dumps(TOOLS))
        tools[0]["function"]["description"] += f" ({i})"
        t = time.perf_counter()
        compiled = C.compile_constraint(C.ConstraintSpec("tool_call", tools=tuple(tools)), gt)
        times["tools"].append(time.perf_counter() - t)
        schema = {**NOTES, "description": str(i)}
        t = time.perf_counter()
        C.compile_constraint(C.ConstraintSpec("json_schema", json.dumps(schema)), gt)
        times["schema"].append(time.perf_counter() - t)
    res["compile_tools_ms"] = 1e3 * statistics.median(times["tools"])
    res["compile_schema_ms"] = 1e3 * statistics.median(times["schema"])
    t = time.perf_counter()
    C.compile_constraint(C.ConstraintSpec("tool_call", tools=tuple(tools)), gt)
    res["compile_cached_ms"] = 1e3 * (time.perf_counter() - t)

    ids = tok.encode(SAMPLE_CALL)
    res["trajectory_tokens"] = len(ids)
    one, eight, apply, apply_bias = [], [], [], []
    states = [compiled.new_state() for _ in range(8)]
    bits = np.empty((8, gt.words), np.int32)
    from granite_deploy.serve.sampling import SamplingParams, TokenSampler

    sampler = TokenSampler(SamplingParams(), 100352)
    logits = np.random.default_rng(0).standard_normal(100352).astype(np.float32)
    filler = C.MaskFiller()
    for tid in ids:
        t = time.perf_counter()
        states[0].fill(bits[0])
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        lnp.fill_next_token_bitmask_par(filler._executor, [(s.matcher, i) for i, s in enumerate(states)], bits)
        eight.append(time.perf_counter() - t)
        allowed = C.unpack_mask(bits[0], gt.vocab_size)
        assert allowed[tid], f"the grammar refuses token {tid} of the sample call"
        t = time.perf_counter()
        sampler.sample(logits, allowed=C.unpack_mask(bits[0], gt.vocab_size))
        apply.append(time.perf_counter() - t)
        bias = np.take(C._BIAS, C.unpack_mask(bits[0], gt.vocab_size).view(np.uint8))  # as MaskFiller hands it over
        t = time.perf_counter()
        sampler.sample(logits, allowed=bias)
        apply_bias.append(time.perf_counter() - t)
        for s in states:
            assert s.consume(tid), s.error
    t = time.perf_counter()
    for _ in range(len(ids)):
        sampler.sample(logits)
    res["sample_plain_ms"] = 1e3 * (time.perf_counter() - t) / len(ids)
    res["mask1_ms"] = 1e3 * statistics.median(one)
    res["mask1_p90_ms"] = 1e3 * sorted(one)[int(0.9 * len(one))]
    res["mask8_ms"] = 1e3 * statistics.median(eight)
    res["mask8_p90_ms"] = 1e3 * sorted(eight)[int(0.9 * len(eight))]
    res["sample_masked_ms"] = 1e3 * statistics.median(apply)
    res["sample_bias_ms"] = 1e3 * statistics.median(apply_bias)
    out.put(res)


def decode(artifact: str, tokenizer_dir: str, threads: int, tokens: int, rounds: int, out) -> None:
    """Decode tokens/s through the Scheduler, constrained vs not, alternating rounds."""
    from granite_deploy.engines import load_engine
    from granite_deploy.serve import constraints as C
    from granite_deploy.serve.sampling import SamplingParams
    from granite_deploy.serve.scheduler import Request, Scheduler
    from granite_deploy.serve.stopping import StoppingParams
    from granite_deploy.serve.tokenizer import GraniteTokenizer

    tok = GraniteTokenizer.from_dir(tokenizer_dir)
    engine = load_engine(artifact, max_batch=8, threads=threads)
    res = {"engine": f"{engine.info.kind} {getattr(engine, 'graph_name', '')} {engine.info.precision}"}
    scheduler = Scheduler(engine, tok)
    waits: list[float] = []
    real_masks = scheduler._masks

    def timed_masks(pending):  # how long the step waited for masks after the engine returned
        t = time.perf_counter()
        try:
            return real_masks(pending)
        finally:
            if pending is not None:
                waits.append(time.perf_counter() - t)

    scheduler._masks = timed_masks
    in_engine = [0.0, 0]  # seconds inside engine.step, steps
    real_step = engine.step

    def timed_step(chunks):
        t = time.perf_counter()
        try:
            return real_step(chunks)
        finally:
            in_engine[0] += time.perf_counter() - t
            in_engine[1] += 1

    engine.step = timed_step
    scheduler.start()
    spec = C.ConstraintSpec("json_schema", json.dumps(NOTES))
    C.compile_constraint(spec, tok, engine.info.vocab_size)  # compile outside the timed runs

    def run(batch: int, constrained: bool) -> tuple[float, float]:
        """(decode tokens/s, host ms per step outside engine.step)."""
        done = threading.Event()
        stamps: dict[int, list[float]] = {i: [] for i in range(batch)}
        left = [batch]
        lock = threading.Lock()

        def sink_for(i):
            def sink(ev):
                if ev.kind == "token":
                    stamps[i].append(time.perf_counter())
                elif ev.kind == "final":
                    with lock:
                        left[0] -= 1
                        if not left[0]:
                            done.set()
            return sink

        for i in range(batch):
            prompt = tuple(tok.encode(f"Write the notes of meeting {i} as JSON:"))
            req = Request(prompt, SamplingParams(temperature=1.0, seed=i),
                          StoppingParams(max_new_tokens=tokens, min_new_tokens=tokens),
                          constraint=spec if constrained else None)
            scheduler.submit(req, sink_for(i))
        t0, e0, n0 = time.perf_counter(), in_engine[0], in_engine[1]
        done.wait(600)
        host_ms = 1e3 * ((time.perf_counter() - t0) - (in_engine[0] - e0)) / max(1, in_engine[1] - n0)
        # decode phase only: from the moment every row has its first token to the last token
        start = max(s[0] for s in stamps.values())
        end = max(s[-1] for s in stamps.values())
        n = sum(sum(1 for x in s if x > start) for s in stamps.values())
        return n / (end - start), host_ms

    run(1, True)  # warm-up (first mask filler, first constrained step)
    for batch in (1, 8):
        best = {False: 0.0, True: 0.0}
        host = {False: [], True: []}
        for _ in range(rounds):
            for constrained in (False, True):
                if constrained:
                    waits.clear()
                tps, host_ms = run(batch, constrained)
                best[constrained] = max(best[constrained], tps)
                host[constrained].append(host_ms)
                if constrained:
                    res[f"wait_b{batch}_ms"] = 1e3 * statistics.median(waits) if waits else 0.0
        res[f"plain_b{batch}"], res[f"json_b{batch}"] = best[False], best[True]
        res[f"host_plain_b{batch}"], res[f"host_json_b{batch}"] = min(host[False]), min(host[True])
        res[f"step_b{batch}_ms"] = 1e3 * batch / best[False]
    scheduler.shutdown(10)
    res["peak_rss_gib"] = common.peak_rss_gib()
    out.put(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="granite-4.0-1b")
    ap.add_argument("--precision", default="int4", choices=["int4", "int8", "fp32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48, help="tokens generated per sequence and run")
    ap.add_argument("--rounds", type=int, default=2, help="alternating constrained/unconstrained rounds (best kept)")
    args = ap.parse_args()

    print(f"# machine: {common.machine()}", flush=True)
    tokenizer_dir = bench_tokenizer()
    masks = common.in_process(compile_and_mask, str(tokenizer_dir))
    checkpoint = common.random_checkpoint(args.model)
    artifact = common.artifact_for(checkpoint, validate=False)
    if args.precision != "fp32":
        artifact = common.quantized_artifact(artifact, args.precision)
    dec = common.in_process(decode, str(artifact), str(tokenizer_dir), args.threads, args.tokens, args.rounds)

    print(f"\n{args.model} (random weights, {args.precision}; engine {dec['engine']}), {args.threads} threads, "
          f"100352-token vocabulary, llguidance. Machine: {common.machine()}. One run; the constrained and "
          f"unconstrained rounds alternate (best of {args.rounds} each), so the ratio is measured under the "
          f"same load.")
    common.print_table(
        f"Decode tokens/s through the scheduler, sampled, {args.tokens} tokens per sequence",
        ["batch", "unconstrained", "JSON schema", "constrained / unconstrained", "mask wait after step (median ms)",
         "host ms/step outside engine: plain / JSON", "added host time / step time"],
        [[b, dec[f"plain_b{b}"], dec[f"json_b{b}"], f"{dec[f'json_b{b}'] / dec[f'plain_b{b}']:.3f}",
          f"{dec[f'wait_b{b}_ms']:.3f}", f"{dec[f'host_plain_b{b}']:.2f} / {dec[f'host_json_b{b}']:.2f}",
          f"{(dec[f'host_json_b{b}'] - dec[f'host_plain_b{b}']) / dec[f'step_b{b}_ms']:.2%}"] for b in (1, 8)],
    )
    common.print_table(
        "Constraint compile and per-step mask costs (ms)", ["measure", "ms"],
        [["grammar tokenizer build (once per tokenizer)", 1e3 * masks["tokenizer_build_s"]],
         ["compile 3-tool forced tool-call grammar (cold, median of 5)", masks["compile_tools_ms"]],
         ["compile the decode benchmark's JSON schema (cold, median of 5)", masks["compile_schema_ms"]],
         ["compile again (cache hit)", masks["compile_cached_ms"]],
         [f"mask fill, 1 row (median / p90 over a {masks['trajectory_tokens']}-token tool call)",
          f"{masks['mask1_ms']:.3f} / {masks['mask1_p90_ms']:.3f}"],
         ["mask fill, 8 rows in parallel (median / p90)", f"{masks['mask8_ms']:.3f} / {masks['mask8_p90_ms']:.3f}"],
         ["sample one token with a bool mask (unpack + masked copy + greedy)", masks["sample_masked_ms"]],
         ["sample one token with the worker's 0/-inf bias (add + greedy; what the scheduler does)",
          masks["sample_bias_ms"]],
         ["sample one token without a mask", masks["sample_plain_ms"]]],
    )
    print(f"\npeak RSS of the decode process: {dec['peak_rss_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
