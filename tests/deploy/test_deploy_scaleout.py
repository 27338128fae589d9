"""Local stand-in for a scale-out deployment: two `granite-deploy serve` replicas (separate
processes, loopback only) behind the multi-target client, a bounded load of streaming and unary
requests, and one replica SIGTERMed while streams run on it.

Must hold: no request that had not started fails (those refused by the draining replica, or
sent as it went away, are retried on the other one), every stream that started either completes
intact (all its tokens, the same text as the same greedy request made alone) or fails with
UNAVAILABLE, and the drained replica exits 0 after finishing its in-flight streams.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from granite_deploy.serve.client import GraniteClient, StreamInterrupted

NEW_TOKENS = 96
REQUESTS = 48
CONCURRENCY = 8
PROMPTS = ["Hello", "The quick brown fox", "Granite models", "Once upon a time", "def add(a, b):", "1 2 3"]


@pytest.fixture(scope="module")
def scaleout_artifact(tiny_checkpoint, tmp_path_factory):
    from granite_deploy.export.exporter import export

    return export(str(tiny_checkpoint), tmp_path_factory.mktemp("deploy-scaleout") / "tiny", validate=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """`granite-deploy serve` in a child process on 127.0.0.1 (port 0: any free port)."""

    def __init__(self, artifact, log_path, grace: float = 30.0):
        self.metrics_port = _free_port()
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "granite_deploy.cli", "serve", str(artifact), "--host", "127.0.0.1",
               "--port", "0", "--threads", "1", "--max-batch", "8", "--grace", str(grace),
               "--metrics-port", str(self.metrics_port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.port = None

    def wait_ready(self, timeout: float = 60.0) -> "Replica":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"replica exited ({self.proc.poll()}) before serving; see {self.log.name}")
            m = re.search(r" on 127\.0\.0\.1:(\d+) ", line)
            if m:
                self.port = int(m.group(1))
                return self
        raise AssertionError("replica not ready in time")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def gauge(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def test_drain_one_of_two_replicas_under_load(scaleout_artifact, tmp_path):
    replicas = [Replica(scaleout_artifact, tmp_path / f"replica{i}.log") for i in range(2)]
    try:
        for r in replicas:
            r.wait_ready()
        a, b = replicas
        with GraniteClient([a.target, b.target], timeout=60) as client:
            client.wait_ready(10)
            # the reference: each prompt alone, greedy
            reference = {p: client.generate(p, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS).text
                         for p in PROMPTS}

            outcomes: list[tuple] = []
            lock = threading.Lock()
            completed = threading.Semaphore(0)

            def one(i: int):
                prompt = PROMPTS[i % len(PROMPTS)]
                params = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
                if i % 4 == 3:  # a unary call now and then
                    try:
                        resp = client.generate(prompt, **params)
                        out = ("unary-ok", prompt, resp.text, resp.generated_token_count, resp.stop_reason)
                    except grpc.RpcError as exc:
                        out = ("unary-failed", prompt, exc.code(), exc.details())
                else:
                    msgs = []
                    try:
                        for msg in client.generate_stream(prompt, **params):
                            msgs.append(msg)
                        final = msgs[-1]
                        out = ("stream-ok", prompt, "".join(m.text for m in msgs), final.generated_token_count,
                               final.stop_reason, sum(1 for m in msgs if m.text))
                    except StreamInterrupted as exc:  # started, then failed: must be UNAVAILABLE
                        out = ("stream-interrupted", prompt, exc.code(), exc.details(), exc.received)
                    except grpc.RpcError as exc:  # failed before any output (after the retries)
                        out = ("stream-failed", prompt, exc.code(), exc.details())
                with lock:
                    outcomes.append(out)
                completed.release()

            pool = ThreadPoolExecutor(CONCURRENCY)
            futures = [pool.submit(one, i) for i in range(REQUESTS)]
            # SIGTERM b while it has streams in flight, with most of the load still to come
            for _ in range(CONCURRENCY):
                completed.acquire(timeout=60)
            deadline = time.monotonic() + 20
            while b.gauge("running_requests") < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            in_flight_on_b = b.gauge("running_requests")
            b.proc.send_signal(signal.SIGTERM)
            for f in futures:
                f.result(timeout=120)
            pool.shutdown()
            b_exit = b.proc.wait(timeout=60)
            # a keeps serving afterwards, through the same client
            after = client.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    finally:
        for r in replicas:
            r.close()

    assert in_flight_on_b >= 1, "the load never reached replica b"
    assert len(outcomes) == REQUESTS
    not_started = [o for o in outcomes if o[0] in ("unary-failed", "stream-failed")]
    assert not not_started, not_started
    for o in outcomes:
        if o[0] == "stream-interrupted":
            assert o[2] == grpc.StatusCode.UNAVAILABLE, o
        elif o[0] == "stream-ok":
            _, prompt, text, count, reason, text_msgs = o
            assert count == NEW_TOKENS and reason == 1 and text == reference[prompt], o  # 1 = MAX_TOKENS
            assert text_msgs <= NEW_TOKENS
        else:
            _, prompt, text, count, reason = o
            assert count == NEW_TOKENS and text == reference[prompt], o
    assert b_exit == 0
    assert after.text == reference[PROMPTS[0]]
    log = (tmp_path / "replica1.log").read_text()
    assert '"draining"' in log and '"stopped"' in log
    # the draining replica finished what it had: its access log ends its streams OK
    ends = re.findall(r'"event": "request_end".*?"status": "(\w+)"', log)
    assert ends and "CANCELLED" not in ends
