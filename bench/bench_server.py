"""Load test: a running `granite-deploy serve` on the full-size architecture, at concurrency 1/4/8/16.

Starts the server (a separate process, ONNX Runtime CPU, 2 threads), then for
each concurrency level keeps that many GenerateStream calls in flight over
loopback and reports time to first token, inter-token latency (time between
streamed tokens) and end-to-end latency p50/p99, and aggregate output tokens/s,
with the ratio to concurrency 1. States the machine.

    python bench/bench_server.py [--model granite-4.0-1b] [--requests-per-level 2] [--new-tokens 24]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from granite_deploy.demo import start_server  # noqa: E402


async def one_request(stub, pb, prompt: str, new_tokens: int) -> dict:
    req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=prompt))
    req.params.stopping.max_new_tokens = new_tokens
    req.params.stopping.min_new_tokens = new_tokens
    # One message per token even when a token's text is empty (random weights over a
    # small benchmark tokenizer often pick ids with no text, whose deltas are held back).
    req.params.response.generated_tokens = True
    start = time.perf_counter()
    stamps = []
    async for msg in stub.GenerateStream(req):
        if msg.generated_token_count and (not stamps or msg.generated_token_count > stamps[-1][1]):
            stamps.append((time.perf_counter(), msg.generated_token_count))
    end = time.perf_counter()
    times = [t for t, _ in stamps]
    return {"ttft": times[0] - start, "itl": list(np.diff(times)), "e2e": end - start, "tokens": stamps[-1][1]}


async def level(target: str, concurrency: int, total: int, new_tokens: int, prompt: str) -> dict:
    import grpc

    from granite_deploy.protos import generation_pb2 as pb
    from granite_deploy.protos import generation_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        queue = list(range(total))
        results = []

        async def worker():
            while queue:
                queue.pop()
                results.append(await one_request(stub, pb, prompt, new_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    itl = [x for r in results for x in r["itl"]]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3  # noqa: E731
    return {
        "concurrency": concurrency,
        "ttft_p50": pct([r["ttft"] for r in results], 50), "ttft_p99": pct([r["ttft"] for r in results], 99),
        "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
        "e2e_p50": pct([r["e2e"] for r in results], 50), "e2e_p99": pct([r["e2e"] for r in results], 99),
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="granite-4.0-1b")
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--requests-per-level", type=int, default=2, help="requests per concurrent stream")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=8, help="prompt length in words (about 2 tokens each here)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    print(f"# machine: {common.machine()}", flush=True)
    artifact = common.artifact_for(common.random_checkpoint(args.model))
    levels = [int(x) for x in args.levels.split(",")]
    proc, target = start_server(artifact, "--max-batch", str(max(levels)), "--max-queue", "64",
                                "--threads", str(args.threads), timeout=600)
    words = "The quick brown fox jumps over the lazy dog and runs far away".split()
    prompt = " ".join(words[i % len(words)] for i in range(args.prompt_words))
    rows = []
    try:
        for c in levels:
            r = asyncio.run(level(target, c, c * args.requests_per_level, args.new_tokens, prompt))
            print(f"#   concurrency {c}: {r['tokens_per_s']:.2f} tokens/s, ITL p50 {r['itl_p50']:.0f} ms", flush=True)
            rows.append(r)
    finally:
        proc.terminate()
        proc.wait(60)
    base = rows[0]["tokens_per_s"]
    print(f"\n{args.model} (random weights, fp32) served by granite-deploy, ONNX Runtime CPU, {args.threads} threads, "
          f"prompts of {args.prompt_words} words, {args.new_tokens} new tokens per request. Machine: {common.machine()}.")
    common.print_table(
        "gRPC load (GenerateStream over loopback; latencies in ms)",
        ["concurrency", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "ITL p99/p50", "e2e p50", "e2e p99",
         "output tokens/s", "vs concurrency 1"],
        [[r["concurrency"], f"{r['ttft_p50']:.0f}", f"{r['ttft_p99']:.0f}", f"{r['itl_p50']:.0f}",
          f"{r['itl_p99']:.0f}", f"{r['itl_p99'] / r['itl_p50']:.2f}", f"{r['e2e_p50']:.0f}", f"{r['e2e_p99']:.0f}",
          f"{r['tokens_per_s']:.2f}", f"{r['tokens_per_s'] / base:.2f}x"] for r in rows],
    )


if __name__ == "__main__":
    main()
