"""Fault containment: an exception or non-finite logits in a scheduler step fail only the
affected requests (clear status, the cause in the message), the loop goes on, and an engine
that keeps failing (or fails its warm-up) turns health NOT_SERVING / makes `serve` exit."""

from __future__ import annotations

import queue
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from granite_deploy.engines.base import CacheFull, Engine
from granite_deploy.errors import EngineUnusable
from granite_deploy.protos import generation_pb2 as g
from granite_deploy.protos import generation_pb2_grpc as gg
from granite_deploy.serve.client import build_parameters
from granite_deploy.serve.scheduler import Request, Scheduler
from granite_deploy.serve.server import ServerConfig, ServerThread
from granite_deploy.serve.stopping import StoppingParams, StopReason
from granite_deploy.serve.tokenizer import GraniteTokenizer

SC = grpc.StatusCode


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    from granite_deploy.export.exporter import export

    return export(str(tiny_checkpoint), tmp_path_factory.mktemp("faults") / "tiny", validate=False)


class FaultEngine(Engine):
    """The real engine with injectable faults: NaN rows for some sequences, an exception raised
    by the next `fail_steps` steps, or by the next `fail_reserves` reserves."""

    def __init__(self, inner):
        self.inner, self.info = inner, inner.info
        self.nan_seqs: set[int] = set()
        self.nan_all = False
        self.fail_steps = 0
        self.step_error: BaseException = ValueError("injected")
        self.fail_reserves = 0

    def reserve(self, seq_id):
        if self.fail_reserves:
            self.fail_reserves -= 1
            raise CacheFull("no free cache slot (injected)")
        self.inner.reserve(seq_id)

    def release(self, seq_id):
        self.inner.release(seq_id)

    def step(self, chunks):
        if self.fail_steps:
            self.fail_steps -= 1
            raise self.step_error
        logits = np.array(self.inner.step(chunks), copy=True)
        for i, chunk in enumerate(chunks):
            if self.nan_all or chunk.seq_id in self.nan_seqs:
                logits[i, : logits.shape[1] // 2] = np.nan
        return logits


def _engine(artifact, max_batch=2):
    from granite_deploy.engines import load_engine

    return FaultEngine(load_engine(artifact, engine="onnxruntime-cpu", max_batch=max_batch, threads=1))


def _final(events: queue.Queue, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ev = events.get(timeout=max(0.01, end - time.monotonic()))
        if ev.kind == "final":
            return ev
    raise AssertionError("no final event")


def _request(tok, text="Hello", n=6):
    return Request(tuple(tok.encode(text)), stopping=StoppingParams(max_new_tokens=n, min_new_tokens=n))


@pytest.fixture
def sched(artifact):
    engine = _engine(artifact)
    tok = GraniteTokenizer.from_dir(artifact)
    fatal = []
    s = Scheduler(engine, tok, max_queue=8, max_running=2, on_fatal=fatal.append).start()
    yield s, engine, tok, fatal
    s.shutdown(5)


def test_nan_row_fails_only_its_sequence(sched):
    s, engine, tok, fatal = sched
    engine.nan_seqs = {0}  # the first request submitted
    a, b = queue.Queue(), queue.Queue()
    s.submit(_request(tok, "Hello"), a.put)
    s.submit(_request(tok, "World"), b.put)
    fa, fb = _final(a), _final(b)
    assert fa.stop_reason == StopReason.ERROR and fa.error == "logits contain NaN at step 0"
    assert fb.stop_reason == StopReason.MAX_TOKENS and fb.generated_count == 6
    assert not fatal and s.unusable is None


@pytest.mark.parametrize("error,cause", [
    (ValueError("bad shape"), "ValueError: bad shape"),
    (MemoryError(), "MemoryError"),
    (CacheFull("cache full in step"), "CacheFull: cache full in step"),
    (ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero"),
])
def test_step_exception_fails_the_step_and_loop_goes_on(sched, error, cause):
    s, engine, tok, fatal = sched
    engine.step_error, engine.fail_steps = error, 1
    a = queue.Queue()
    s.submit(_request(tok), a.put)
    final = _final(a)
    assert final.stop_reason == StopReason.ERROR and final.error == f"engine step failed: {cause}"
    b = queue.Queue()
    s.submit(_request(tok), b.put)  # the loop still runs
    assert _final(b).stop_reason == StopReason.MAX_TOKENS
    assert not fatal


def test_reserve_failure_fails_that_request_only(sched):
    s, engine, tok, fatal = sched
    engine.fail_reserves = 1
    a, b = queue.Queue(), queue.Queue()
    s.submit(_request(tok), a.put)
    s.submit(_request(tok), b.put)
    fa = _final(a)
    assert fa.stop_reason == StopReason.ERROR
    assert fa.error == "cannot reserve a cache slot: CacheFull: no free cache slot (injected)"
    assert _final(b).stop_reason == StopReason.MAX_TOKENS


def test_repeated_failures_make_the_engine_unusable(sched):
    s, engine, tok, fatal = sched
    engine.nan_all = True
    for _ in range(s.max_consecutive_failures):
        q = queue.Queue()
        s.submit(_request(tok), q.put)
        assert _final(q).stop_reason == StopReason.ERROR
    end = time.monotonic() + 5  # on_fatal runs on the scheduler thread right after the last final event
    while not fatal and time.monotonic() < end:
        time.sleep(0.01)
    assert fatal and "5 engine steps in a row failed" in fatal[0] and s.unusable == fatal[0]
    from granite_deploy.errors import Unavailable

    with pytest.raises(Unavailable, match="unusable"):
        s.submit(_request(tok), lambda ev: None)


# ============================================================================ through the server

def _health(target):
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _generate(stub, text="Hello", n=4):
    return stub.Generate(g.BatchedGenerationRequest(requests=[g.GenerationRequest(text=text)],
                                                    params=build_parameters(max_new_tokens=n, min_new_tokens=n)),
                         timeout=30)


def test_server_nan_request_internal_then_unusable_not_serving(artifact):
    engine = _engine(artifact, 2)
    st = ServerThread(ServerConfig(str(artifact), port=0, max_batch=2, threads=1), engine=engine)
    try:
        channel = grpc.insecure_channel(st.target)
        stub = gg.GenerationServiceStub(channel)
        engine.nan_all = True
        with pytest.raises(grpc.RpcError) as e:
            _generate(stub)
        assert e.value.code() == SC.INTERNAL and "logits contain NaN at step 0" in e.value.details()
        assert _health(st.target) == health_pb2.HealthCheckResponse.SERVING
        stream = stub.GenerateStream(g.SingleGenerationRequest(
            request=g.GenerationRequest(text="Hello"), params=build_parameters(max_new_tokens=4)), timeout=30)
        msgs = list(stream)  # a stream ends with stop reason ERROR, the cause in the trailing metadata
        assert msgs[-1].stop_reason == g.ERROR
        assert dict(stream.trailing_metadata())["granite-error"] == "logits contain NaN at step 0"
        engine.nan_all = False
        assert _generate(stub).responses[0].generated_token_count == 4  # other requests still served
        engine.nan_all = True
        for _ in range(st.server.scheduler.max_consecutive_failures):
            with pytest.raises(grpc.RpcError):
                _generate(stub)
        end = time.monotonic() + 5
        while _health(st.target) != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < end:
            time.sleep(0.05)
        assert _health(st.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            _generate(stub)
        assert e.value.code() == SC.UNAVAILABLE and "unusable" in e.value.details()
        channel.close()
    finally:
        st.stop()


def test_failed_warm_up_is_a_clear_error(artifact):
    engine = _engine(artifact, 1)
    engine.nan_all = True
    t0 = time.monotonic()
    with pytest.raises(EngineUnusable, match="warm-up generation failed: logits contain NaN at step 0"):
        ServerThread(ServerConfig(str(artifact), port=0, max_batch=1, threads=1), engine=engine)
    assert time.monotonic() - t0 < 30


def test_warm_up_timeout(artifact):
    engine = _engine(artifact, 1)
    slow_step = engine.step
    engine.step = lambda chunks: (time.sleep(0.5), slow_step(chunks))[1]
    with pytest.raises(EngineUnusable, match="did not finish within 0.2 s"):
        ServerThread(ServerConfig(str(artifact), port=0, max_batch=1, threads=1, warmup_timeout_s=0.2), engine=engine)


# ============================================================================ a NaN weight, end to end

def _nan_weight_artifact(artifact, dest):
    """A copy of `artifact` whose final norm weight is NaN (every logit NaN). The bytes are
    patched in place, so every file keeps its size (only the sha256 changes)."""
    import onnx

    shutil.copytree(artifact, dest)
    for path in dest.glob("*.onnx"):
        model = onnx.load(str(path), load_external_data=False)
        norms = [t for t in model.graph.initializer if "norm" in t.name and t.data_type == onnx.TensorProto.FLOAT]
        target = norms[-1]
        n = int(np.prod(target.dims))
        nan = np.full(n, np.nan, dtype="<f4").tobytes()
        if target.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in target.external_data}
            with open(dest / info["location"], "r+b") as f:
                f.seek(int(info.get("offset", 0)))
                f.write(nan)
        else:
            size = path.stat().st_size
            target.raw_data = nan
            onnx.save(model, str(path))
            assert path.stat().st_size == size
    return dest


def test_serve_exits_with_the_reason_on_nan_weights(artifact, tmp_path):
    bad = _nan_weight_artifact(artifact, tmp_path / "nan")
    cmd = [sys.executable, "-m", "granite_deploy.cli", "serve", str(bad), "--port", "0", "--threads", "1"]
    help_text = subprocess.run([sys.executable, "-m", "granite_deploy.cli", "serve", "--help"],
                               capture_output=True, text=True).stdout
    if "--skip-verify" in help_text:  # the edited weights no longer match the manifest's hashes
        cmd.append("--skip-verify")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert any("logits contain NaN" in line for line in lines), proc.stderr
    assert time.monotonic() - t0 < 60
