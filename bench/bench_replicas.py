"""Aggregate throughput of 1, 2 and 3 `granite-deploy serve` replicas on one machine, each
pinned to its own core (`taskset`), behind the multi-target client (round_robin over replicas).

    flock /tmp/granite-bench.lock .venv/bin/python bench/bench_replicas.py            # granite-4.0-350m, random weights
    .venv/bin/python bench/bench_replicas.py --artifact PATH --new-tokens 16          # any artifact

Each configuration starts its replicas fresh, waits until all are SERVING, then runs the same
closed-loop load: `--streams-per-replica` concurrent GenerateStream calls per replica, each
request a ~20-token prompt and exactly `--new-tokens` greedy tokens (min = max), for
`--requests-per-stream` rounds. Reported: output tokens/s over the whole load, its ratio to one
pinned replica, time to first token and end-to-end latency (p50), and each replica's peak RSS.
A first row runs ONE replica with every core (threads = cores, unpinned): the scale-up
alternative to scale-out on the same machine.

What it shows and what it cannot: on a 2-core machine, replicas 1 and 2 get a core each, and a
third shares a core with the first (it can only show contention, not more capacity). Replicas
on one machine share its memory bandwidth, which bounds CPU decode (README, engine table), so
two pinned replicas give less than 2x one replica whenever one replica already uses a large
part of the bandwidth; on separate machines (the Kubernetes deployment) that resource is not
shared and the aggregate scales with the replica count until the client or network is the limit.
The load generator runs on the same cores as the servers and takes some of their time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from granite_deploy.demo import launch_server, wait_serving  # noqa: E402

PROMPT = ("Granite models are deployed as replicas behind a load balancer; each replica streams tokens "
          "from its own continuous batch")


def start_replica(artifact: Path, cores: str | None, threads: int, max_batch: int, timeout: float = 600.0):
    """`granite-deploy serve` on 127.0.0.1 (any free port), pinned to `cores` with taskset when given."""
    wrapper = ("taskset", "-c", cores) if cores is not None else ()
    return launch_server(artifact, "--threads", str(threads), "--max-batch", str(max_batch), wrapper=wrapper), timeout


def peak_rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_load(targets: list[str], concurrency: int, rounds: int, new_tokens: int) -> dict:
    from granite_deploy.serve.client import GraniteClient

    ttft, e2e, tokens = [], [], []
    lock = threading.Lock()
    with GraniteClient(targets, timeout=600) as client:
        client.wait_ready(60)
        client.generate(PROMPT, max_new_tokens=2)  # connect every subchannel before timing
        for _ in targets:
            client.generate(PROMPT, max_new_tokens=2)

        def worker(_i: int) -> None:
            for _ in range(rounds):
                t0 = time.perf_counter()
                first, count = None, 0
                # generated_tokens: one message per token, even when its text is empty (random weights
                # over a small tokenizer pick ids whose text deltas are held back)
                for msg in client.generate_stream(PROMPT, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                  generated_tokens=True):
                    if msg.generated_token_count and first is None:
                        first = time.perf_counter()
                    count = max(count, msg.generated_token_count)
                end = time.perf_counter()
                with lock:
                    ttft.append((first or end) - t0)
                    e2e.append(end - t0)
                    tokens.append(count)

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(worker, range(concurrency)))
        wall = time.perf_counter() - start
    assert all(t == new_tokens for t in tokens), "a request did not produce all its tokens"
    return {"tokens_per_s": sum(tokens) / wall, "ttft_p50": float(np.percentile(ttft, 50)) * 1000,
            "e2e_p50": float(np.percentile(e2e, 50)) * 1000, "requests": len(tokens), "wall_s": wall}


def measure(artifact: Path, n: int, pinned: bool, threads: int, args) -> dict:
    cores = os.sched_getaffinity(0)
    ordered = sorted(cores)
    procs = []
    try:
        for i in range(n):
            core = str(ordered[i % len(ordered)]) if pinned else None
            procs.append(start_replica(artifact, core, threads, args.max_batch))
        targets = [wait_serving(p, t)[0] for p, t in procs]
        result = run_load(targets, args.streams_per_replica * n, args.requests_per_stream, args.new_tokens)
        result["rss"] = [peak_rss_gib(p.pid) for p, _ in procs]
        result["cores"] = ",".join(str(ordered[i % len(ordered)]) for i in range(n)) if pinned else "all"
        return result
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="granite-4.0-350m", help="config in ../shared/reference/configs (random weights)")
    ap.add_argument("--artifact", type=Path, help="serve this artifact instead of the random --model")
    ap.add_argument("--replicas", default="1,2,3")
    ap.add_argument("--streams-per-replica", type=int, default=4)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()

    artifact = args.artifact or common.artifact_for(common.random_checkpoint(args.model), validate=False)
    counts = [int(x) for x in args.replicas.split(",")]
    ncores = len(os.sched_getaffinity(0))
    print(f"# machine: {common.machine()}")
    print(f"# artifact: {artifact}; {args.streams_per_replica} streams per replica x {args.requests_per_stream} "
          f"requests, {args.new_tokens} new tokens each, max batch {args.max_batch}", flush=True)

    rows, base = [], None
    configs = [("1 replica, all cores (scale-up)", 1, False, ncores)] + [
        (f"{n} replica{'s' if n > 1 else ''}, pinned, 1 thread each", n, True, 1) for n in counts]
    for label, n, pinned, threads in configs:
        r = measure(artifact, n, pinned, threads, args)
        if pinned and n == 1:
            base = r["tokens_per_s"]
        rows.append((label, r))
        print(f"# {label}: {r['tokens_per_s']:.1f} tokens/s over {r['requests']} requests in {r['wall_s']:.1f} s",
              flush=True)
    table = []
    for label, r in rows:
        table.append([label, r["cores"], args.streams_per_replica * (len(r["rss"])), f"{r['tokens_per_s']:.1f}",
                      f"{r['tokens_per_s'] / base:.2f}x" if base else "-", round(r["ttft_p50"]), round(r["e2e_p50"]),
                      " / ".join(f"{x:.2f}" for x in r["rss"])])
    common.print_table(
        f"Aggregate throughput by replica count ({artifact.name}, one run on {ncores} cores)",
        ["configuration", "cores", "concurrent streams", "output tokens/s", "vs 1 pinned replica",
         "TTFT p50 ms", "e2e p50 ms", "peak RSS GiB per replica"], table)


if __name__ == "__main__":
    main()
