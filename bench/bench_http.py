"""OpenAI-compatible HTTP (SSE streaming) next to gRPC, one server, one run: TTFT / ITL / e2e at
concurrency 1 and 8 and the per-token cost of the HTTP path.

`bench_server.py`'s workload (prompts of 8 words, 32 new tokens forced with min = max, 2 requests
per concurrent stream) sent to ONE `granite-deploy serve --http-port` process, alternately as fmaas
GenerateStream (gRPC, one message per token with its logprob) and as streamed POST /v1/completions
(SSE, one chunk per token: ``logprobs: 0``, the same raw prompt, no chat template). Both protocols go through the
same session, scheduler and engine, so the difference is the front end.

Two models in the same run:
* the full-size architecture (default granite-4.0-1b, random weights, fp32, ONNX Runtime CPU):
  what a user sees; the engine step (~200 ms on 2 cores) dwarfs protocol costs;
* the tiny test model (granite_deploy.export.tiny, a step well under a millisecond): there the
  front end is most of the time per token, so ``1 / tokens/s`` HTTP minus gRPC is the HTTP
  path's extra cost per token.

Clients: grpc.aio and httpx2 (the HTTP client the openai SDK uses) reading SSE lines and parsing
each chunk's JSON; both run in this process, on the same cores as the server.

    flock /tmp/granite-bench.lock python bench/bench_http.py [--model granite-4.0-1b] [--skip-full]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from granite_deploy.demo import launch_server, wait_serving  # noqa: E402


def start(artifact: Path, max_batch: int, threads: int, timeout: float = 900.0):
    """`granite-deploy serve ARTIFACT --port 0 --http-port 0`: (process, gRPC target, HTTP base URL)."""
    proc = launch_server(artifact, "--http-port", "0", "--max-batch", str(max_batch), "--max-queue", "64",
                         "--threads", str(threads))
    target, base = wait_serving(proc, timeout, http=True)
    return proc, target, base


async def grpc_request(stub, pb, prompt: str, new_tokens: int) -> dict:
    req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=prompt))
    req.params.stopping.max_new_tokens = new_tokens
    req.params.stopping.min_new_tokens = new_tokens
    req.params.response.generated_tokens = True  # one message per token, even with empty text
    req.params.response.token_logprobs = True  # the same scheduler work as HTTP's logprobs: 0
    start = time.perf_counter()
    stamps = []
    async for msg in stub.GenerateStream(req):
        if msg.generated_token_count and (not stamps or msg.generated_token_count > stamps[-1][1]):
            stamps.append((time.perf_counter(), msg.generated_token_count))
    return _result(start, stamps)


async def http_request(client, base: str, model: str, prompt: str, new_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "min_tokens": new_tokens, "stream": True,
            "logprobs": 0, "temperature": 0}
    start = time.perf_counter()
    stamps, count = [], 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", ()):
                n = len((choice.get("logprobs") or {}).get("tokens", ()))
                if n:
                    count += n
                    stamps.append((time.perf_counter(), count))
    return _result(start, stamps)


def _result(start: float, stamps: list) -> dict:
    end = time.perf_counter()
    times = [t for t, _ in stamps]
    return {"ttft": times[0] - start, "itl": list(np.diff(times)), "e2e": end - start, "tokens": stamps[-1][1]}


async def level(protocol: str, grpc_target: str, base: str, model: str, concurrency: int, total: int,
                new_tokens: int, prompt: str) -> dict:
    import grpc
    import httpx2

    from granite_deploy.protos import generation_pb2 as pb
    from granite_deploy.protos import generation_pb2_grpc as pb_grpc

    results = []
    queue = list(range(total))
    async with grpc.aio.insecure_channel(grpc_target) as channel, \
            httpx2.AsyncClient(timeout=httpx2.Timeout(600.0),
                               limits=httpx2.Limits(max_connections=concurrency + 2)) as client:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def one():
            if protocol == "grpc":
                return await grpc_request(stub, pb, prompt, new_tokens)
            return await http_request(client, base, model, prompt, new_tokens)

        await one()  # warm the connection / channel (not measured)

        async def worker():
            while queue:
                queue.pop()
                results.append(await one())

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    itl = [x for r in results for x in r["itl"]]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3  # noqa: E731
    tokens = sum(r["tokens"] for r in results)
    return {"protocol": protocol, "concurrency": concurrency,
            "ttft_p50": pct([r["ttft"] for r in results], 50), "ttft_p99": pct([r["ttft"] for r in results], 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
            "e2e_p50": pct([r["e2e"] for r in results], 50), "e2e_p99": pct([r["e2e"] for r in results], 99),
            "tokens_per_s": tokens / wall, "tokens": tokens}


def run_model(artifact: Path, label: str, levels: list[int], per_level: int, new_tokens: int, prompt: str,
              threads: int, rounds: int) -> list[dict]:
    proc, target, base = start(artifact, max(levels), threads)
    rows = []
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as resp:
            model = json.loads(resp.read())["data"][0]["id"]
        for c in levels:
            for rnd in range(rounds):  # alternate the order: neither protocol always goes first
                order = ("grpc", "http") if rnd % 2 == 0 else ("http", "grpc")
                for protocol in order:
                    r = asyncio.run(level(protocol, target, base, model, c, c * per_level, new_tokens, prompt))
                    r["model"], r["round"] = label, rnd
                    print(f"#   {label} {protocol:4s} c{c} round {rnd}: {r['tokens_per_s']:.2f} tokens/s, "
                          f"TTFT p50 {r['ttft_p50']:.1f} ms, ITL p50 {r['itl_p50']:.2f} ms", flush=True)
                    rows.append(r)
    finally:
        proc.terminate()
        proc.wait(120)
    return rows


def merge(rows: list[dict]) -> dict:
    """Per (model, protocol, concurrency): the median of the rounds' figures."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["model"], r["protocol"], r["concurrency"]), []).append(r)
    return {k: {f: float(np.median([r[f] for r in v])) for f in v[0] if isinstance(v[0][f], float)}
            for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="granite-4.0-1b", help="full-size config from shared/reference/configs")
    ap.add_argument("--skip-full", action="store_true", help="only the tiny model (no lock needed)")
    ap.add_argument("--levels", default="1,8")
    ap.add_argument("--requests-per-level", type=int, default=2, help="requests per concurrent stream")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny-requests-per-level", type=int, default=8)
    ap.add_argument("--tiny-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="alternating gRPC/HTTP rounds per level (median)")
    args = ap.parse_args()

    print(f"# machine: {common.machine()}", flush=True)
    levels = [int(x) for x in args.levels.split(",")]
    words = "The quick brown fox jumps over the lazy dog and runs far away".split()
    prompt = " ".join(words[i % len(words)] for i in range(args.prompt_words))

    from granite_deploy.export.exporter import export
    from granite_deploy.export.tiny import make_tiny_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tiny = export(make_tiny_checkpoint(Path(d) / "ck", seed=0), Path(d) / "tiny", validate=False)
        rows += run_model(tiny, "tiny", levels, args.tiny_requests_per_level, args.tiny_new_tokens, prompt,
                          args.threads, args.rounds)
    if not args.skip_full:
        artifact = common.artifact_for(common.random_checkpoint(args.model))
        rows += run_model(artifact, args.model, levels, args.requests_per_level, args.new_tokens, prompt,
                          args.threads, args.rounds)
    med = merge(rows)

    print(f"\nOne `granite-deploy serve --http-port` per model (ONNX Runtime CPU, {args.threads} threads), "
          f"gRPC GenerateStream and HTTP SSE /v1/completions alternating over loopback, medians of {args.rounds} "
          f"rounds. Machine: {common.machine()}.")
    table = []
    for (model, protocol, c), r in sorted(med.items(), key=lambda kv: (kv[0][0] != "tiny", kv[0][2], kv[0][1])):
        g = med[(model, "grpc", c)]
        table.append([model, protocol, c, f"{r['ttft_p50']:.1f}", f"{r['ttft_p99']:.1f}", f"{r['itl_p50']:.2f}",
                      f"{r['itl_p99']:.2f}", f"{r['e2e_p50']:.0f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['tokens_per_s'] / g['tokens_per_s']:.3f}", f"{r['itl_p50'] / g['itl_p50']:.3f}"])
    common.print_table("HTTP (SSE) next to gRPC, same server (latencies in ms; ratios HTTP / gRPC)",
                       ["model", "protocol", "concurrency", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "e2e p50",
                        "output tokens/s", "tokens/s vs gRPC", "ITL p50 vs gRPC"], table)
    over = []
    for c in levels:
        g, h = med[("tiny", "grpc", c)], med[("tiny", "http", c)]
        per_g, per_h = 1e6 / g["tokens_per_s"], 1e6 / h["tokens_per_s"]
        over.append([c, f"{per_g:.0f}", f"{per_h:.0f}", f"{per_h - per_g:.0f}", f"{per_h / per_g:.2f}x"])
    common.print_table("Per-token cost of the front end (tiny model: the engine step is negligible; µs of wall "
                       "time per output token, all streams together)",
                       ["concurrency", "gRPC µs/token", "HTTP µs/token", "HTTP extra µs/token", "HTTP / gRPC"], over)


if __name__ == "__main__":
    main()
