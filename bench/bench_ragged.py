"""Issue #13 benchmarks: the ragged step and prompt-lookup speculative decoding, full-size 1B.

The ragged step runs a whole scheduler step in one graph call; measured on the full-size
granite-4.0-1b architecture (random weights), 2 threads.

Three parts, each printing its tables (ratios measured in one run) and the machine:

  load    (4a) `granite-deploy serve` under gRPC load at concurrency 1/4/8/16, prompts of 300 tokens,
          64 new tokens, fp32 and int4. "before": the code of main before #13 (`--before-commit`,
          exported with `git archive` and run from there: per-call `decoder_cpu` engine, the old
          scheduler with its CPU prefill chunk of 8 tokens while others decode) on the artifact
          without the ragged flavour; "after": this checkout on the same artifact plus the
          `decoder_ragged` flavour (a view folder: a copy), with the
          scheduler's token budget; a token-budget sweep at one concurrency on the after side.
  verify  (4b) engine-level cost of a step whose every row carries a k-token chunk (k = 1..8, what
          verifying k-1 draft tokens costs), batch 1 and 8, past 300, relative to a 1-token step;
          the ragged graph and the per-call `decoder_cpu` graph side by side. Saved as JSON for `spec`.
  spec    (4c) prompt-lookup speculative decoding on a copy-heavy task (extract / summarise a
          passage given in the prompt) with the small trained Granite model of
          bench/train_tiny_granite.py: greedy outputs with and without `--speculative ngram`
          (asserted identical), accepted tokens per step and draft acceptance (replaying the
          drafter over the greedy token ids), served decode tokens/s at batch 1 and 8 on the tiny
          model, and the full-size speed-up PROJECTED from those acceptance numbers and the `verify`
          cost curve; `--full-size` adds a direct full-size 1B run at batch 1.

    python bench/bench_ragged.py load   [--widths fp32,int4] [--levels 1,4,8,16] [--budgets 16,32,64,128]
    python bench/bench_ragged.py verify [--widths fp32,int4]
    python bench/bench_ragged.py spec   [--k 4] [--ngram 3] [--full-size]

Run under `flock /tmp/granite-bench.lock` (the host is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from granite_deploy.demo import launch_server, wait_serving  # noqa: E402

REPO = common.REPO
RESULTS = common.CACHE / "results"
BEFORE_COMMIT = "ed06367"  # main just before the #13 work (ragged graph, engine, budget, speculation)
RAGGED = "decoder_ragged"
PKG_DIRS = ("granite_deploy", "engines", "export", "serve", "protos")


# --- artifacts -----------------------------------------------------------------------------------
def ragged_view(artifact: Path) -> Path:
    """`artifact` plus the decoder_ragged flavour, in a folder of its own so the shared cached
    artifact is left as it is: a copy (ONNX refuses external data
    behind a link), then the
    exporter's `add_ragged_flavour` (it writes only a graph file and the manifest)."""
    from granite_deploy.artifact import load_manifest

    if RAGGED in load_manifest(artifact).graphs:
        return artifact
    out = common.CACHE / f"{artifact.name}-ragged-view"
    with common.build_lock():
        if (out / "manifest.json").exists() and RAGGED in load_manifest(out).graphs:
            return out
        from granite_deploy.export.ragged_graph import add_ragged_flavour

        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for f in artifact.rglob("*"):
            dst = out / f.relative_to(artifact)
            if f.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            else:  # a copy of everything: ONNX's checker refuses external data behind a sym- or hard link
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dst)
        t = time.perf_counter()
        add_ragged_flavour(out)
        print(f"# added {RAGGED} in {time.perf_counter() - t:.0f} s: {out}", flush=True)
    return out


def widths_artifacts(widths: list[str], given: str | None = None) -> dict[str, Path]:
    if given:  # one artifact given on the command line (e.g. a tiny one, to try the script)
        return {"given": Path(given)}
    base = common.artifact_for(common.random_checkpoint("granite-4.0-1b"))
    return {w: base if w == "fp32" else common.quantized_artifact(base, w) for w in widths}


def before_code(commit: str) -> Path:
    """The package as it was at `commit` (git archive), laid out as the import namespace
    (granite_deploy/{engines,export,serve,protos}), for PYTHONPATH: it shadows the editable install."""
    out = Path("/tmp") / f"granite-deploy-before-{commit}"
    if (out / "pkg" / "granite_deploy" / "cli.py").exists():
        return out / "pkg"
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, *PKG_DIRS], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = out / "pkg" / "granite_deploy"
    shutil.copytree(src / "granite_deploy", pkg)
    for sub in PKG_DIRS[1:]:
        (pkg / sub).symlink_to(src / sub)
    return out / "pkg"


# --- the server ------------------------------------------------------------------------------------
def launch(artifact: Path, args: list[str], code: Path | None = None, log: Path | None = None,
           timeout: float = 900) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code) + os.pathsep + env.get("PYTHONPATH", "")
    err = open(log, "w") if log else subprocess.DEVNULL
    proc = launch_server(artifact, "--skip-verify", *args, stderr=err, env=env,
                         cwd="/tmp" if code is not None else None)
    return proc, wait_serving(proc, timeout)[0]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(stub, pb, prompt: str, new_tokens: int, min_tokens: bool = True) -> dict:
    req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=prompt))
    req.params.stopping.max_new_tokens = new_tokens
    if min_tokens:
        req.params.stopping.min_new_tokens = new_tokens
    req.params.response.generated_tokens = True  # one message per token even when its text is empty
    start = time.perf_counter()
    stamps, texts = [], []
    async for msg in stub.GenerateStream(req):
        texts += [t.text for t in msg.tokens]
        if msg.generated_token_count and (not stamps or msg.generated_token_count > stamps[-1][1]):
            stamps.append((time.perf_counter(), msg.generated_token_count))
    end = time.perf_counter()
    times = [t for t, _ in stamps]
    return {"ttft": times[0] - start, "itl": list(np.diff(times)), "e2e": end - start, "tokens": stamps[-1][1],
            "start": start, "end": end, "first": times[0], "texts": texts}


async def run_prompts(target: str, prompts: list[str], concurrency: int, new_tokens: int,
                      min_tokens: bool = True) -> tuple[list[dict], float]:
    """Every prompt once, `concurrency` in flight; results in prompt order, and the wall time."""
    import grpc

    from granite_deploy.protos import generation_pb2 as pb
    from granite_deploy.protos import generation_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        todo = list(enumerate(prompts))[::-1]
        results: dict[int, dict] = {}

        async def worker():
            while todo:
                i, p = todo.pop()
                results[i] = await one_request(stub, pb, p, new_tokens, min_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return [results[i] for i in range(len(prompts))], wall


def summarise(results: list[dict], wall: float) -> dict:
    itl = [x for r in results for x in r["itl"]]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3  # noqa: E731
    return {"ttft_p50": pct([r["ttft"] for r in results], 50), "ttft_p99": pct([r["ttft"] for r in results], 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
            "tokens_per_s": sum(r["tokens"] for r in results) / wall, "requests": len(results)}


# --- 4a: gRPC load -------------------------------------------------------------------------------
WORDS = ("the model reads every weight once per step so decode on a cpu is bound by memory bandwidth and "
         "a prompt that arrives while others decode must share that pass with them").split()


def make_prompts(artifact: Path, n: int, tokens: int, seed: int) -> tuple[list[str], float]:
    """n distinct prompts of about `tokens` tokens (distinct from their first words, so no prefix
    is shared), and their mean token count under the artifact's tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(next(artifact.rglob("tokenizer.json"))))
    rng = np.random.default_rng(seed)
    prompts, counts = [], []
    for i in range(n):
        words = [f"request{seed}x{i}"] + [WORDS[j] for j in rng.integers(0, len(WORDS), tokens * 2)]
        ids = tok.encode(" ".join(words), add_special_tokens=False).ids[:tokens]
        text = tok.decode(ids)
        prompts.append(text)
        counts.append(len(tok.encode(text, add_special_tokens=False).ids))
    return prompts, float(np.mean(counts))


def load_side(name: str, artifact: Path, server_args: list[str], code: Path | None, levels: list[int],
              args, seed: int) -> tuple[dict, float]:
    log = RESULTS / f"server-{name}.log"
    t = time.perf_counter()
    proc, target = launch(artifact, server_args, code, log)
    print(f"#   {name}: server up in {time.perf_counter() - t:.0f} s ({' '.join(server_args)})", flush=True)
    out, mean_tokens = {}, 0.0
    try:
        warm, _ = make_prompts(artifact, 1, 16, seed=999)
        asyncio.run(run_prompts(target, warm, 1, 4))
        for c in levels:
            prompts, mean_tokens = make_prompts(artifact, c * args.requests_per_stream, args.prompt_tokens, seed + c)
            results, wall = asyncio.run(run_prompts(target, prompts, c, args.new_tokens))
            out[c] = summarise(results, wall)
            r = out[c]
            print(f"#   {name} c{c}: TTFT p50/p99 {r['ttft_p50']:.0f}/{r['ttft_p99']:.0f} ms, ITL p50/p99 "
                  f"{r['itl_p50']:.0f}/{r['itl_p99']:.0f} ms, {r['tokens_per_s']:.2f} tokens/s "
                  f"({wall:.0f} s)", flush=True)
    finally:
        stop(proc)
    return out, mean_tokens


def cmd_load(args) -> None:
    print(f"# machine: {common.machine()}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.levels.split(",")]
    budgets = [int(x) for x in args.budgets.split(",") if x]
    arts = widths_artifacts(args.widths.split(","), args.artifact)
    code = before_code(args.before_commit)
    common_args = ["--threads", str(args.threads), "--max-batch", str(max(levels)), "--max-queue", "64",
                   "--prefix-cache-mb", "0"]
    report = {"machine": common.machine(), "args": {k: v for k, v in vars(args).items() if k != "func"}, "widths": {}}
    for w, art in arts.items():
        after_art = ragged_view(art)
        rec = report["widths"][w] = {}
        for rep in range(args.repeats):
            rec_rep = rec.setdefault("runs", [])
            before, mean_tokens = load_side(f"{w}-before", art, common_args + ["--prefill-chunk", "8"], code,
                                            levels, args, seed=rep * 100)
            after, _ = load_side(f"{w}-after", after_art, common_args + args.after_args.split(), None,
                                 levels, args, seed=rep * 100)
            sweep = {}
            for b in budgets:
                sweep[b] = load_side(f"{w}-after-budget{b}", after_art,
                                     common_args + args.after_args.split() + [args.budget_flag, str(b)], None,
                                     [args.sweep_level], args, seed=rep * 100)[0][args.sweep_level]
            rec_rep.append({"before": before, "after": after, "sweep": sweep, "prompt_tokens": mean_tokens})
            (RESULTS / f"load-{'-'.join(arts)}.json").write_text(json.dumps(report, indent=1))
            print_load(w, rec_rep[-1], levels, args, rep)
    print_load_summary(report, args)


def print_load(w: str, run: dict, levels: list[int], args, rep: int) -> None:
    b, a = run["before"], run["after"]
    print(f"\ngranite-4.0-1b (random weights, {w}), {args.threads} threads, prompts of {run['prompt_tokens']:.0f} "
          f"tokens, {args.new_tokens} new tokens, {args.requests_per_stream} request(s) per stream; run {rep + 1}. "
          f"Machine: {common.machine()}.")
    common.print_table(
        f"gRPC load, {w}: before (per-call decoder_cpu, prefill chunk 8 while decoding) vs after (ragged step, "
        f"token budget{' ' + args.after_args if args.after_args else ''}); ms",
        ["concurrency", "TTFT p50 before/after", "TTFT p99 before/after", "TTFT p99 before ÷ after",
         "ITL p50 before/after", "ITL p99 before/after", "ITL p99/p50 before/after", "tokens/s before/after",
         "tokens/s after ÷ before"],
        [[c, f"{b[c]['ttft_p50']:.0f} / {a[c]['ttft_p50']:.0f}", f"{b[c]['ttft_p99']:.0f} / {a[c]['ttft_p99']:.0f}",
          f"{b[c]['ttft_p99'] / a[c]['ttft_p99']:.2f}x", f"{b[c]['itl_p50']:.0f} / {a[c]['itl_p50']:.0f}",
          f"{b[c]['itl_p99']:.0f} / {a[c]['itl_p99']:.0f}",
          f"{b[c]['itl_p99'] / b[c]['itl_p50']:.2f} / {a[c]['itl_p99'] / a[c]['itl_p50']:.2f}",
          f"{b[c]['tokens_per_s']:.2f} / {a[c]['tokens_per_s']:.2f}",
          f"{a[c]['tokens_per_s'] / b[c]['tokens_per_s']:.2f}x"] for c in levels])
    if run["sweep"]:
        c = args.sweep_level
        common.print_table(
            f"Token budget sweep, {w}, concurrency {c} (after side; before for reference); ms",
            ["budget", "TTFT p50", "TTFT p99", "TTFT p99 before ÷ this", "ITL p50", "ITL p99", "ITL p99/p50",
             "tokens/s", "tokens/s ÷ before"],
            [["before (chunk 8)", f"{b[c]['ttft_p50']:.0f}", f"{b[c]['ttft_p99']:.0f}", "1.00x",
              f"{b[c]['itl_p50']:.0f}", f"{b[c]['itl_p99']:.0f}", f"{b[c]['itl_p99'] / b[c]['itl_p50']:.2f}",
              f"{b[c]['tokens_per_s']:.2f}", "1.00x"]]
            + [[k, f"{r['ttft_p50']:.0f}", f"{r['ttft_p99']:.0f}", f"{b[c]['ttft_p99'] / r['ttft_p99']:.2f}x",
                f"{r['itl_p50']:.0f}", f"{r['itl_p99']:.0f}", f"{r['itl_p99'] / r['itl_p50']:.2f}",
                f"{r['tokens_per_s']:.2f}", f"{r['tokens_per_s'] / b[c]['tokens_per_s']:.2f}x"]
               for k, r in run["sweep"].items()])


def print_load_summary(report: dict, args) -> None:
    c = 8 if 8 in [int(x) for x in args.levels.split(",")] else None
    if c is None:
        return
    rows = []
    for w, rec in report["widths"].items():
        for i, run in enumerate(rec["runs"]):
            b, a = run["before"][c], run["after"][c]
            ok = b["ttft_p99"] / a["ttft_p99"] >= 2 and a["itl_p99"] / a["itl_p50"] < 3 \
                and a["tokens_per_s"] >= b["tokens_per_s"]
            rows.append([w, i + 1, f"{b['ttft_p99'] / a['ttft_p99']:.2f}x", f"{a['itl_p99'] / a['itl_p50']:.2f}",
                         f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x", "met" if ok else "missed"])
            for k, r in run["sweep"].items():
                ok = b["ttft_p99"] / r["ttft_p99"] >= 2 and r["itl_p99"] / r["itl_p50"] < 3 \
                    and r["tokens_per_s"] >= b["tokens_per_s"]
                rows.append([f"{w}, budget {k}", i + 1, f"{b['ttft_p99'] / r['ttft_p99']:.2f}x",
                             f"{r['itl_p99'] / r['itl_p50']:.2f}", f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x",
                             "met" if ok else "missed"])
    common.print_table(f"Targets at concurrency {c}: TTFT p99 >= 2x lower, ITL p99/p50 < 3, tokens/s >= before",
                       ["after side", "run", "TTFT p99 before ÷ after", "ITL p99/p50", "tokens/s after ÷ before",
                        "all three"], rows)


# --- 4b: the cost of a k-token step ------------------------------------------------------------
def verify_worker(artifact: str, graph: str | None, threads: int, ks: list[int], batches: list[int], past: int,
                  steps: int, out) -> None:
    from granite_deploy.engines import Chunk
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

    rng = np.random.default_rng(0)
    engine = OnnxRuntimeEngine(artifact, max_batch=max(batches), threads=threads, graph=graph)
    res = {"graph": engine.graph_name, "times": {}}
    vocab = min(1000, engine.info.vocab_size)
    engine.reserve(100)
    engine.step([Chunk(100, (1, 2, 3, 4), 0)])  # warm-up
    engine.release(100)
    for batch in batches:
        for s in range(batch):
            engine.reserve(s)
        engine._grow(past + max(ks) + 1)
        common.fill_cache(engine, batch, past, rng)
        for s in range(batch):
            engine.slots.set_length(s, past)
        for k in ks:
            times = []
            for i in range(steps + 1):
                chunks = [Chunk(s, tuple(int(x) for x in rng.integers(0, vocab, k)), past) for s in range(batch)]
                t = time.perf_counter()
                engine.step(chunks)
                times.append(time.perf_counter() - t)
                for s in range(batch):  # roll back (as a rejected draft would)
                    engine.slots.set_length(s, past)
            res["times"][f"{batch},{k}"] = float(np.median(times[1:]))
            print(f"#   {engine.graph_name}: batch {batch} k {k}: {res['times'][f'{batch},{k}'] * 1e3:.0f} ms",
                  flush=True)
        for s in range(batch):
            engine.release(s)
    out.put(res)


def cmd_verify(args) -> None:
    print(f"# machine: {common.machine()}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    ks = list(range(1, args.max_k + 1))
    batches = [int(x) for x in args.batches.split(",")]
    report = {"machine": common.machine(), "past": args.past, "ks": ks, "batches": batches, "widths": {}}
    for w, art in widths_artifacts(args.widths.split(","), args.artifact).items():
        graphs = {}
        try:
            view = ragged_view(art)
            graphs[RAGGED] = common.in_process(verify_worker, str(view), RAGGED, args.threads, ks, batches,
                                               args.past, args.steps)
        except Exception as exc:  # noqa: BLE001 - the ragged flavour may not have landed yet: say so
            print(f"# {w}: no ragged measurement: {type(exc).__name__}: {exc}", flush=True)
        if not args.skip_per_call:
            graphs["decoder_cpu"] = common.in_process(verify_worker, str(art), "decoder_cpu", args.threads, ks,
                                                      batches, args.past, args.steps)
        report["widths"][w] = graphs
        (RESULTS / "verify.json").write_text(json.dumps(report, indent=1))
    print_verify(report, args)


def print_verify(report: dict, args) -> None:
    print(f"\ngranite-4.0-1b (random weights), {args.threads} threads, every row's cache at {report['past']} tokens, "
          f"median of {args.steps} steps. Machine: {report['machine']}.")
    for w, graphs in report["widths"].items():
        cols, names = [], list(graphs)
        for g in names:
            for b in report["batches"]:
                cols.append((g, b))
        rows = []
        for k in report["ks"]:
            row = [k]
            for g, b in cols:
                t = graphs[g]["times"]
                row.append(f"{t[f'{b},{k}'] * 1e3:.0f} ms ({t[f'{b},{k}'] / t[f'{b},1']:.2f}x)")
            rows.append(row)
        common.print_table(f"Cost of a step with a k-token chunk on every row vs a 1-token step, {w} "
                           "(k - 1 draft tokens verified per row)",
                           ["k"] + [f"{g}, batch {b}" for g, b in cols], rows)


# --- 4c: speculative decoding ------------------------------------------------------------------
def tiny_artifact() -> Path:
    import train_tiny_granite

    ckpt = train_tiny_granite.ensure_trained()
    out = common.CACHE / "trained-tiny-artifact"
    with common.build_lock():
        from granite_deploy.artifact import load_manifest

        if not (out / "manifest.json").exists() or "decoder_cpu" not in load_manifest(out).graphs:
            from granite_deploy.export.exporter import export

            export(ckpt, out, validate=True, force=True)
        if RAGGED not in load_manifest(out).graphs:
            try:
                from granite_deploy.export.ragged_graph import add_ragged_flavour

                add_ragged_flavour(out)
            except ImportError as exc:
                print(f"# tiny model: no ragged flavour ({exc}); per-call engine", flush=True)
    return out


INSTRUCTIONS = {
    # Copy-heavy prompts over a passage given in full: the answer's spans come from the passage.
    "extract": "\n\nQuote the passage above, word for word:\n\n",
    "summarise": "\n\nSummary of the passage above:\n\n",
}


def copy_task(ckpt: Path, n: int, passage_tokens: int, kind: str) -> list[str]:
    """Held-out docstrings (never trained on) of about `passage_tokens` tokens, each followed by an
    instruction to extract from / summarise it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    docs = [d for d in (ckpt / "heldout.txt").read_text(encoding="utf-8").split("\n\n")]
    passages, buf = [], ""
    for d in docs:  # join consecutive paragraphs into passages of the wanted length
        buf = f"{buf}\n\n{d}" if buf else d
        ids = tok.encode(buf, add_special_tokens=False).ids
        if len(ids) >= passage_tokens:
            passages.append(tok.decode(ids[:passage_tokens]))
            buf = ""
        if len(passages) == n:
            break
    return [p + INSTRUCTIONS[kind] for p in passages]


def greedy_ids(artifact: Path, prompts: list[str], new_tokens: int, threads: int) -> tuple[list, list]:
    """(prompt ids, greedy output ids) per prompt, by the engine directly (no server, no speculation);
    stops at end of text."""
    from tokenizers import Tokenizer

    from granite_deploy.artifact import load_manifest
    from granite_deploy.engines import Chunk
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

    tok = Tokenizer.from_file(str(next(artifact.rglob("tokenizer.json"))))
    eos = load_manifest(artifact).architecture.eos_token_id if hasattr(load_manifest(artifact).architecture,
                                                                        "eos_token_id") else None
    engine = OnnxRuntimeEngine(artifact, max_batch=1, threads=threads, graph="decoder_cpu")
    pids, outs = [], []
    for p in prompts:
        ids = tok.encode(p, add_special_tokens=False).ids
        engine.reserve(0)
        logits = engine.step([Chunk(0, tuple(ids), 0)])
        gen = []
        while len(gen) < new_tokens:
            t = int(np.argmax(logits[0]))
            gen.append(t)
            if eos is not None and t == eos:
                break
            logits = engine.step([Chunk(0, (t,), len(ids) + len(gen) - 1)])
        engine.release(0)
        pids.append(ids)
        outs.append(gen)
    return pids, outs


def ngram_draft(context: list[int], k: int, n: int) -> list[int]:
    """The drafter's proposal: serve/speculative.py's when it is there, else the documented rule (the
    last n tokens matched against the earlier context, most recent match first; up to k followers)."""
    try:
        from granite_deploy.serve import speculative

        fn = getattr(speculative, "propose", None) or getattr(speculative, "ngram_draft", None)
        if fn is not None:
            return list(fn(context, k, n))
    except ImportError:
        pass
    for m in range(min(n, len(context) - 1), 0, -1):
        tail = context[-m:]
        for i in range(len(context) - m - 1, -1, -1):
            if context[i:i + m] == tail:
                return context[i + m:i + m + k]
    return []


def replay(prompt: list[int], output: list[int], k: int, n: int) -> list[tuple[int, int]]:
    """(drafted, accepted) per step of greedy speculative decoding that yields `output`."""
    steps, pos = [], 1  # the first token comes from the prefill step
    while pos < len(output):
        draft = ngram_draft(prompt + output[:pos], k, n)[: len(output) - pos - 1]
        acc = 0
        while acc < len(draft) and draft[acc] == output[pos + acc]:
            acc += 1
        steps.append((len(draft), acc))
        pos += acc + 1
    return steps


def cost_ratio(curve: dict, batch: int, k: float) -> float:
    """Step cost with k tokens per row relative to 1 (linear between measured k)."""
    ks = sorted(int(key.split(",")[1]) for key in curve if key.startswith(f"{batch},"))
    vals = [curve[f"{batch},{x}"] / curve[f"{batch},1"] for x in ks]
    return float(np.interp(k, ks, vals))


def cmd_spec(args) -> None:
    print(f"# machine: {common.machine()}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    import train_tiny_granite

    ckpt = train_tiny_granite.ensure_trained()
    art = tiny_artifact()
    report = {"machine": common.machine(), "k": args.k, "ngram": args.ngram, "tasks": {}}
    spec_args = ["--speculative", "ngram", "--speculative-tokens", str(args.k), "--speculative-ngram", str(args.ngram)]
    base = ["--threads", str(args.threads), "--max-batch", "8", "--prefix-cache-mb", "0"]
    curve = json.loads((RESULTS / "verify.json").read_text()) if (RESULTS / "verify.json").exists() else None
    for kind in args.tasks.split(","):
        prompts = copy_task(ckpt, args.prompts, args.passage_tokens, kind)
        pids, outs = greedy_ids(art, prompts, args.new_tokens, args.threads)
        steps = [replay(p, o, args.k, args.ngram) for p, o in zip(pids, outs)]
        flat = [s for r in steps for s in r]
        drafted, accepted = sum(d for d, _ in flat), sum(a for _, a in flat)
        rec = {"tokens_per_step": sum(a + 1 for _, a in flat) / len(flat), "acceptance": accepted / max(1, drafted),
               "drafted_per_step": drafted / len(flat), "steps": len(flat),
               "out_tokens": [len(o) for o in outs], "served": {}}
        print(f"#   {kind}: {rec['tokens_per_step']:.2f} tokens/step, acceptance {rec['acceptance']:.0%} "
              f"({drafted} drafted, {accepted} accepted over {len(flat)} steps)", flush=True)
        for label, extra in (("off", []), ("on", spec_args)):
            proc, target = launch(art, base + extra, None, RESULTS / f"server-tiny-spec-{label}.log")
            try:
                asyncio.run(run_prompts(target, prompts[:1], 1, 4, False))  # warm-up
                for batch in (1, 8):
                    res, wall = asyncio.run(run_prompts(target, prompts, batch, args.new_tokens, False))
                    decode_tokens = sum(r["tokens"] - 1 for r in res)
                    if batch == 1:
                        decode_s = sum(r["end"] - r["first"] for r in res)
                    else:  # from the last first token to the last end: the batch's decode phase
                        decode_s = max(r["end"] for r in res) - min(r["first"] for r in res)
                    rec["served"][f"{label},{batch}"] = {"decode_tps": decode_tokens / decode_s,
                                                         "texts": [r["texts"] for r in res]}
                    print(f"#   {kind} speculation {label}, batch {batch}: "
                          f"{decode_tokens / decode_s:.1f} decode tokens/s", flush=True)
            finally:
                stop(proc)
        identical = all(rec["served"][f"off,{b}"]["texts"] == rec["served"][f"on,{b}"]["texts"] for b in (1, 8)) \
            and rec["served"]["off,1"]["texts"] == rec["served"]["off,8"]["texts"]
        rec["identical"] = identical
        report["tasks"][kind] = rec
        if curve:
            proj = {}
            for w, graphs in curve["widths"].items():
                g = graphs.get(RAGGED) or graphs.get("decoder_cpu")
                name = RAGGED if RAGGED in graphs else "decoder_cpu"
                b1 = sum(a + 1 for _, a in flat) / sum(cost_ratio(g["times"], 1, d + 1) for d, _ in flat)
                # batch 8: every step costs a batch-8 step with (mean verification tokens per row)
                b8 = rec["tokens_per_step"] / cost_ratio(g["times"], 8, 1 + rec["drafted_per_step"]) \
                    if "8,1" in g["times"] else float("nan")
                proj[w] = {"graph": name, "b1": b1, "b8": b8,
                           "b1_tps_base": 1 / g["times"]["1,1"], "b8_tps_base": 8 / g["times"].get("8,1", float("nan"))}
            rec["projected"] = proj
        (RESULTS / "spec.json").write_text(json.dumps(report, indent=1, default=str))
        assert identical, f"{kind}: greedy output differs with speculation"
    if args.full_size:
        report["full_size"] = full_size_direct(args, report)
        (RESULTS / "spec.json").write_text(json.dumps(report, indent=1, default=str))
    print_spec(report, args)


def full_size_direct(args, report: dict) -> dict:
    """Batch 1, the full-size 1B (random weights: its own acceptance, not the copy task's), fp32."""
    art = ragged_view(widths_artifacts(["fp32"])["fp32"])
    prompts, _ = make_prompts(art, args.full_size_prompts, 300, seed=7)
    base = ["--threads", str(args.threads), "--max-batch", "1", "--prefix-cache-mb", "0"]
    spec_args = ["--speculative", "ngram", "--speculative-tokens", str(args.k), "--speculative-ngram", str(args.ngram)]
    out = {}
    for label, extra in (("off", []), ("on", spec_args)):
        proc, target = launch(art, base + extra, None, RESULTS / f"server-1b-spec-{label}.log")
        try:
            asyncio.run(run_prompts(target, prompts[:1], 1, 4))
            res, _ = asyncio.run(run_prompts(target, prompts, 1, args.full_size_tokens))
            out[label] = {"decode_tps": sum(r["tokens"] - 1 for r in res) / sum(r["end"] - r["first"] for r in res),
                          "texts": [r["texts"] for r in res]}
            print(f"#   1B fp32 speculation {label}: {out[label]['decode_tps']:.2f} decode tokens/s", flush=True)
        finally:
            stop(proc)
    out["identical"] = out["off"]["texts"] == out["on"]["texts"]
    return out


def print_spec(report: dict, args) -> None:
    print(f"\nPrompt-lookup speculative decoding (k = {args.k} draft tokens, n-gram {args.ngram}), greedy, "
          f"{args.new_tokens} new tokens at most, {args.prompts} prompts of {args.passage_tokens}-token held-out "
          f"passages. Machine: {report['machine']}.")
    rows = []
    for kind, r in report["tasks"].items():
        s = r["served"]
        rows.append([kind, f"{r['tokens_per_step']:.2f}", f"{r['acceptance']:.0%}", f"{r['drafted_per_step']:.2f}",
                     f"{s['off,1']['decode_tps']:.0f} / {s['on,1']['decode_tps']:.0f}",
                     f"{s['on,1']['decode_tps'] / s['off,1']['decode_tps']:.2f}x",
                     f"{s['off,8']['decode_tps']:.0f} / {s['on,8']['decode_tps']:.0f}",
                     f"{s['on,8']['decode_tps'] / s['off,8']['decode_tps']:.2f}x",
                     "yes" if r["identical"] else "NO"])
    common.print_table("Trained tiny Granite (2.9 M params), served (gRPC, 2 threads): measured",
                       ["task", "tokens per step", "draft acceptance", "drafted per step",
                        "decode tokens/s b1 off / on", "b1 on ÷ off", "decode tokens/s b8 off / on", "b8 on ÷ off",
                        "greedy output identical"], rows)
    rows = []
    for kind, r in report["tasks"].items():
        for w, p in r.get("projected", {}).items():
            rows.append([kind, w, p["graph"], f"{p['b1_tps_base']:.2f} -> {p['b1_tps_base'] * p['b1']:.2f}",
                         f"{p['b1']:.2f}x", f"{p['b8_tps_base']:.1f} -> {p['b8_tps_base'] * p['b8']:.1f}",
                         f"{p['b8']:.2f}x"])
    if rows:
        common.print_table("Full-size granite-4.0-1b: PROJECTED decode tokens/s from the tiny model's acceptance "
                           "and the measured k-token step cost (verify)",
                           ["task", "weights", "graph", "b1 tokens/s off -> on", "b1 speed-up",
                            "b8 tokens/s off -> on", "b8 speed-up"], rows)
    fs = report.get("full_size")
    if fs:
        common.print_table("Full-size granite-4.0-1b fp32 (random weights), batch 1, served: measured",
                           ["speculation", "decode tokens/s", "greedy output identical"],
                           [["off", f"{fs['off']['decode_tps']:.2f}", ""],
                            ["on", f"{fs['on']['decode_tps']:.2f} ({fs['on']['decode_tps'] / fs['off']['decode_tps']:.2f}x)",
                             "yes" if fs["identical"] else "NO"]])


def cmd_replay(args) -> None:
    """Model-free: the drafter replayed over a REFERENCE extract (sentences quoted verbatim from the
    passage, as an extraction answer would), teacher-forced; projected with the verify curve."""
    from tokenizers import Tokenizer

    import train_tiny_granite

    ckpt = train_tiny_granite.ensure_trained()
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    curve = json.loads((RESULTS / "verify.json").read_text())
    prompts = copy_task(ckpt, args.prompts, args.passage_tokens, "extract")
    flat = []
    for p in prompts:
        passage = p[: -len(INSTRUCTIONS["extract"])]
        sentences = [x.strip() for x in re.split(r"(?<=[.:])\s+", passage) if len(x.strip()) > 20]
        answer = "\n".join(sentences[1::2])
        ids = tok.encode(answer, add_special_tokens=False).ids[: args.new_tokens]
        flat += replay(tok.encode(p, add_special_tokens=False).ids, ids, args.k, args.ngram)
    drafted, accepted = sum(d for d, _ in flat), sum(a for _, a in flat)
    tps = sum(a + 1 for _, a in flat) / len(flat)
    print(f"\nReference extract (every other sentence of each passage, verbatim), {args.prompts} passages, "
          f"k = {args.k}, n-gram {args.ngram}: {tps:.2f} tokens per step, acceptance {accepted / max(1, drafted):.0%}, "
          f"{drafted / len(flat):.2f} drafted per step (teacher-forced, no model).")
    rows = []
    for w, graphs in curve["widths"].items():
        g = graphs.get(RAGGED) or graphs["decoder_cpu"]
        b1 = sum(a + 1 for _, a in flat) / sum(cost_ratio(g["times"], 1, d + 1) for d, _ in flat)
        b8 = tps / cost_ratio(g["times"], 8, 1 + drafted / len(flat))
        rows.append([w, f"{1 / g['times']['1,1']:.2f} -> {b1 / g['times']['1,1']:.2f}", f"{b1:.2f}x",
                     f"{8 / g['times']['8,1']:.1f} -> {8 * b8 / g['times']['8,1']:.1f}", f"{b8:.2f}x"])
    common.print_table("Full-size granite-4.0-1b: PROJECTED from the reference extract and the verify curve",
                       ["weights", "b1 tokens/s off -> on", "b1 speed-up", "b8 tokens/s off -> on", "b8 speed-up"],
                       rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("load", help="4a: gRPC load, before vs after, token-budget sweep")
    p.add_argument("--widths", default="fp32,int4")
    p.add_argument("--artifact", help="measure this artifact instead of the full-size ones (to try the script)")
    p.add_argument("--levels", default="1,4,8,16")
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--requests-per-stream", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--before-commit", default=BEFORE_COMMIT, help="the code the before side runs")
    p.add_argument("--after-args", default="", help="extra serve flags for the after side")
    p.add_argument("--budget-flag", default="--token-budget", help="the serve flag that sets the token budget")
    p.add_argument("--budgets", default="16,32,64,128", help="token budgets swept on the after side ('' for none)")
    p.add_argument("--sweep-level", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.set_defaults(func=cmd_load)
    p = sub.add_parser("verify", help="4b: cost of a k-token step vs a 1-token step")
    p.add_argument("--widths", default="fp32,int4")
    p.add_argument("--artifact", help="measure this artifact instead of the full-size ones (to try the script)")
    p.add_argument("--max-k", type=int, default=8)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--past", type=int, default=300)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-per-call", action="store_true", help="only the ragged graph")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("spec", help="4c: prompt-lookup speculative decoding")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--ngram", type=int, default=3)
    p.add_argument("--tasks", default="extract,summarise")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--passage-tokens", type=int, default=300)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full-size", action="store_true", help="also a direct full-size 1B fp32 run at batch 1")
    p.add_argument("--full-size-prompts", type=int, default=2)
    p.add_argument("--full-size-tokens", type=int, default=64)
    p.set_defaults(func=cmd_spec)
    p = sub.add_parser("replay", help="4c without a model: the drafter over reference extracts, projected")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--ngram", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--passage-tokens", type=int, default=300)
    p.add_argument("--new-tokens", type=int, default=128)
    p.set_defaults(func=cmd_replay)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
