"""The gRPC server end to end: real servers on 127.0.0.1 (port 0, grpc.aio on a background
thread) and real clients through the generated stubs, on a tiny random Granite artifact.

Servers with ``ControlledEngine`` wrap the real ONNX Runtime engine to slow steps down (so a
"long" request really is long on a tiny model) or to inject an engine failure.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import random
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from granite_deploy.engines.base import Engine, EngineError
from granite_deploy.protos import generation_pb2 as g
from granite_deploy.protos import generation_pb2_grpc as gg
from granite_deploy.protos import granite_chat_pb2 as c
from granite_deploy.protos import granite_chat_pb2_grpc as cg
from granite_deploy.serve.bridge import Prepared
from granite_deploy.serve.chat_service import CHAT_SERVICE, ChatEventBuilder, accumulate_chat
from granite_deploy.serve.client import GraniteClient, build_chat_request, build_parameters
from granite_deploy.serve.fmaas_service import FMAAS_SERVICE, FmaasStreamBuilder
from granite_deploy.serve.sampling import SampledToken
from granite_deploy.serve.scheduler import Event
from granite_deploy.serve.server import ServerConfig, ServerThread
from granite_deploy.serve.stopping import StopReason

SC = grpc.StatusCode
LONG = dict(max_new_tokens=1000, min_new_tokens=1000)  # EOS suppressed: really 1000 tokens


# ============================================================================ fixtures and helpers

@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint, tmp_path_factory):
    from granite_deploy.export.exporter import export

    return export(str(tiny_checkpoint), tmp_path_factory.mktemp("tiny-artifact") / "tiny", validate=False)


class ControlledEngine(Engine):
    """The real engine, with an adjustable delay per step and injectable step failures."""

    def __init__(self, inner):
        self.inner, self.info = inner, inner.info
        self.delay = 0.0
        self.fail_steps = 0

    def reserve(self, seq_id):
        self.inner.reserve(seq_id)

    def release(self, seq_id):
        self.inner.release(seq_id)

    def step(self, chunks):
        if self.delay:
            time.sleep(self.delay)
        if self.fail_steps:
            self.fail_steps -= 1
            raise EngineError("injected engine failure")
        return self.inner.step(chunks)


def _controlled(artifact, max_batch):
    from granite_deploy.engines import load_engine

    return ControlledEngine(load_engine(artifact, engine="onnxruntime-cpu", max_batch=max_batch, threads=1))


def _config(artifact, **kw):
    kw.setdefault("threads", 1)
    return ServerConfig(str(artifact), host="127.0.0.1", port=0, **kw)


@pytest.fixture(scope="module")
def server(tiny_artifact):
    st = ServerThread(_config(tiny_artifact, max_batch=8, metrics_port=0))
    yield st
    st.stop()


@pytest.fixture(scope="module")
def slow(tiny_artifact):
    """max_batch=1, max_queue=1; engine.delay is 0 unless a test sets it."""
    engine = _controlled(tiny_artifact, 1)
    st = ServerThread(_config(tiny_artifact, max_batch=1, max_queue=1), engine=engine)
    yield st, engine
    st.stop()


@pytest.fixture
def slowed(slow):
    st, engine = slow
    engine.delay = 0.01
    yield st, engine
    engine.delay, engine.fail_steps = 0.0, 0
    _wait(lambda: st.server.scheduler.idle(), 20)


def _stubs(target, creds=None):
    channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
    return channel, gg.GenerationServiceStub(channel), cg.ChatServiceStub(channel)


@pytest.fixture(scope="module")
def gen(server):
    channel, stub, _ = _stubs(server.target)
    yield stub
    channel.close()


@pytest.fixture(scope="module")
def chat(server):
    channel, _, stub = _stubs(server.target)
    yield stub
    channel.close()


def _wait(cond, timeout=10.0, interval=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def single(text, **params):
    return g.SingleGenerationRequest(request=g.GenerationRequest(text=text), params=build_parameters(**params))


def batched(texts, **params):
    return g.BatchedGenerationRequest(requests=[g.GenerationRequest(text=t) for t in texts],
                                      params=build_parameters(**params))


def conversation(text, **params):
    return build_chat_request([{"role": "user", "content": text}], **params)


def stream_text(msgs):
    return "".join(m.text for m in msgs)


def _code(excinfo):
    return excinfo.value.code()


# ============================================================================ fmaas generation

@pytest.mark.parametrize("params", [
    dict(max_new_tokens=16),
    dict(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=1234),
    dict(max_new_tokens=12, decoding_method="sample", seed=7, repetition_penalty=1.3, min_new_tokens=12),
], ids=["greedy", "sampled", "sampled-default-temperature"])
def test_stream_equals_unary(gen, params):
    prompt = "The quick brown fox"
    msgs = list(gen.GenerateStream(single(prompt, **params)))
    unary = gen.Generate(batched([prompt], **params)).responses[0]
    assert stream_text(msgs) == unary.text and unary.text
    first, last = msgs[0], msgs[-1]
    assert first.input_token_count == unary.input_token_count > 0 and first.text == ""
    assert last.stop_reason == unary.stop_reason != g.NOT_FINISHED
    assert all(m.stop_reason == g.NOT_FINISHED for m in msgs[:-1])
    assert last.generated_token_count == unary.generated_token_count
    counts = [m.generated_token_count for m in msgs[1:]]
    assert counts == sorted(counts) and all(m.text for m in msgs[1:-1])  # empty deltas are not sent
    sampled = params.get("temperature") or params.get("decoding_method") == "sample"
    if sampled:
        assert first.seed == unary.seed == params["seed"]
    else:
        assert first.seed == 0


def test_token_details_and_input_options(gen):
    params = dict(max_new_tokens=10, min_new_tokens=10, generated_tokens=True, token_logprobs=True, token_ranks=True, top_n_tokens=3,
                  input_text=True, input_tokens=True, temperature=0.8, seed=5)
    prompt = "Hello world"
    msgs = list(gen.GenerateStream(single(prompt, **params)))
    unary = gen.Generate(batched([prompt], **params)).responses[0]
    assert msgs[0].text == prompt and unary.text.startswith(prompt)  # input text first
    assert stream_text(msgs) == unary.text
    # TGIS: the input tokens (with their scores) come in their own message after the first
    assert not msgs[0].input_tokens and msgs[1].input_token_count == unary.input_token_count
    assert msgs[1].input_tokens == unary.input_tokens
    assert len(unary.input_tokens) == unary.input_token_count
    # one message per token (also for empty deltas), each with exactly one TokenInfo
    assert all(len(m.tokens) == 1 for m in msgs[2:])
    assert len(msgs) - 2 == unary.generated_token_count == len(unary.tokens) == 10
    for a, b in zip([m.tokens[0] for m in msgs[2:]], unary.tokens):
        assert a == b
        assert a.logprob <= 0 and a.rank >= 1 and len(a.top_tokens) == 3
        assert a.top_tokens[0].logprob >= a.top_tokens[1].logprob >= a.top_tokens[2].logprob


def test_eight_in_flight_equal_unary(server, gen):
    prompts = [f"{w} number {i}" for i, w in enumerate(["Hello", "The", "Paris", "Tokyo", "def", "Café", "What", "is"])]
    params = [dict(max_new_tokens=16) if i % 2 else dict(max_new_tokens=14, temperature=0.7, seed=100 + i)
              for i in range(8)]
    results = [None] * 8
    barrier = threading.Barrier(8)

    def run(i):
        barrier.wait()
        results[i] = list(gen.GenerateStream(single(prompts[i], **params[i])))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(8):
        alone = gen.Generate(batched([prompts[i]], **params[i])).responses[0]
        assert stream_text(results[i]) == alone.text, i
        assert results[i][-1].stop_reason == alone.stop_reason
    # one batched unary call: all its requests are submitted together and match too
    greedy = [p for i, p in enumerate(prompts) if i % 2]
    together = gen.Generate(batched(greedy, max_new_tokens=16)).responses
    assert [r.text for r in together] == [stream_text(results[i]) for i in range(8) if i % 2]


def test_stop_sequence_never_partial(gen):
    prompt = "What is the weather like in Boston?"
    full = gen.Generate(batched([prompt], max_new_tokens=24, min_new_tokens=24)).responses[0].text
    # a 3-character stop sequence from the middle of the greedy output
    clean = [i for i in range(4, len(full) - 6) if "\ufffd" not in full[i:i + 3]]
    stop = full[clean[len(clean) // 2]:clean[len(clean) // 2] + 3]
    at = full.find(stop)
    for include, expected in ((False, full[:at]), (True, full[:at + 3])):
        msgs = list(gen.GenerateStream(single(prompt, max_new_tokens=24, min_new_tokens=24, stop_sequences=[stop],
                                              include_stop_sequence=include)))
        seen = ""
        for m in msgs:
            seen += m.text
            # nothing streamed so far ever runs past the text before the stop sequence (+ it if included)
            assert expected.startswith(seen)
        assert seen == expected
        assert msgs[-1].stop_reason == g.STOP_SEQUENCE and msgs[-1].stop_sequence == stop
        unary = gen.Generate(batched([prompt], max_new_tokens=24, min_new_tokens=24, stop_sequences=[stop],
                                     include_stop_sequence=include)).responses[0]
        assert unary.text == expected and unary.stop_sequence == stop
    # fmaas default (TGIS): the matched stop sequence is included
    msgs = list(gen.GenerateStream(single(prompt, max_new_tokens=24, min_new_tokens=24, stop_sequences=[stop])))
    assert stream_text(msgs) == full[:at + 3]


def test_truncate_and_context_window(server, gen):
    long_prompt = "Hello world " * 700
    n = len(server.server.tokenizer.encode(long_prompt))
    assert n >= 1024
    with pytest.raises(grpc.RpcError) as e:
        gen.Generate(batched(["hi", long_prompt], max_new_tokens=4))
    assert _code(e) == SC.INVALID_ARGUMENT
    assert "requests[1].text" in e.value.details() and str(n) in e.value.details() and "1024" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(gen.GenerateStream(single(long_prompt, max_new_tokens=4)))
    assert _code(e) == SC.INVALID_ARGUMENT and str(n) in e.value.details() and "1024" in e.value.details()
    msgs = list(gen.GenerateStream(single(long_prompt, max_new_tokens=4, truncate_input_tokens=50)))
    assert msgs[0].input_token_count == 50 and msgs[-1].generated_token_count >= 1


@pytest.mark.parametrize("params,field", [
    (dict(temperature=0.5, top_p=1.5), "parameters.sampling.top_p"),
    (dict(temperature=-1.0, decoding_method="sample"), "parameters.sampling.temperature"),
    (dict(top_n_tokens=6, generated_tokens=True), "parameters.response.top_n_tokens"),
    (dict(stop_sequences=[str(i) for i in range(7)]), "parameters.stopping.stop_sequences"),
    (dict(stop_sequences=["x" * 241]), "parameters.stopping.stop_sequences"),
    (dict(max_new_tokens=5, min_new_tokens=6), "parameters.stopping.min_new_tokens"),
    (dict(max_new_tokens=5000), "parameters.stopping.max_new_tokens"),
    (dict(repetition_penalty=-2.0), "parameters.decoding.repetition_penalty"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_fmaas_fields(gen, params, field):
    for call in (lambda: gen.Generate(batched(["Hello"], **params)),
                 lambda: list(gen.GenerateStream(single("Hello", **params)))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert _code(e) == SC.INVALID_ARGUMENT and e.value.details().startswith(field + ":"), e.value.details()


def test_invalid_requests_and_unknown_model(gen, chat, server):
    for call, where in (
        (lambda: gen.Generate(batched(["ok", ""], max_new_tokens=2)), "requests[1].text"),
        (lambda: list(gen.GenerateStream(single("", max_new_tokens=2))), "request.text"),
        (lambda: chat.Chat(conversation("hi", top_p=2.0)), "top_p"),
        (lambda: chat.Chat(conversation("hi", max_new_tokens=3, min_new_tokens=4)), "min_new_tokens"),
        (lambda: chat.Chat(c.ChatRequest(conversation=c.Conversation())), "conversation.messages"),
        (lambda: chat.Chat(c.ChatRequest()), "prompt"),
        (lambda: chat.Chat(build_chat_request([{"role": "user", "content": "hi"}],
                                              tools=[{"type": "function", "function": {
                                                  "name": "f", "parameters": "{not json"}}])),
         "conversation.tools[0].function.parameters_json"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert _code(e) == SC.INVALID_ARGUMENT and e.value.details().startswith(where + ":"), e.value.details()
    # fmaas ignores model_id and answers an empty request list, as TGIS does (tests/serve/test_serve_tgis.py;
    # --strict-model-id restores NOT_FOUND); the chat service keeps checking it
    assert not gen.Generate(g.BatchedGenerationRequest()).responses
    assert gen.ModelInfo(g.ModelInfoRequest(model_id="nope")).max_sequence_length == 1024
    for call in (
        lambda: next(chat.ChatStream(build_chat_request([{"role": "user", "content": "x"}], model_id="nope"))),
        lambda: chat.ModelInfo(c.ModelInfoRequest(model_id="nope")),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert _code(e) == SC.NOT_FOUND and "nope" in e.value.details()
    # the served model id (the artifact folder name) and the empty id are accepted
    name = server.server.model_id
    resp = gen.Generate(g.BatchedGenerationRequest(model_id=name, requests=[g.GenerationRequest(text="x")],
                                                   params=build_parameters(max_new_tokens=2, min_new_tokens=2)))
    assert resp.responses[0].generated_token_count == 2
    assert server.server.metrics.value("rejections_total", reason="invalid_argument") >= 7
    assert server.server.metrics.value("rejections_total", reason="not_found") >= 2


def test_model_info_and_tokenize(gen, chat, server):
    info = gen.ModelInfo(g.ModelInfoRequest())
    assert info.model_kind == g.ModelInfoResponse.DECODER_ONLY and info.max_sequence_length == 1024
    assert info.max_new_tokens == 1023
    cinfo = chat.ModelInfo(c.ModelInfoRequest())
    assert (cinfo.context_length, cinfo.engine_kind, cinfo.precision) == (1024, "onnxruntime-cpu", "fp32")
    tok = server.server.tokenizer
    text = "Hello world, Café 東京"
    resp = gen.Tokenize(g.BatchedTokenizeRequest(requests=[g.TokenizeRequest(text=text)], return_tokens=True,
                                                 return_offsets=True)).responses[0]
    assert resp.token_count == len(tok.encode(text)) == len(resp.tokens) == len(resp.offsets)
    assert resp.offsets[0].start == 0 and resp.offsets[-1].end == len(text)
    short = gen.Tokenize(g.BatchedTokenizeRequest(requests=[g.TokenizeRequest(text=text)], truncate_input_tokens=3))
    assert short.responses[0].token_count == 3
    cresp = chat.Tokenize(c.TokenizeRequest(text=text, return_tokens=True))
    assert list(cresp.token_ids) == tok.encode(text)


def test_max_message_size(gen):
    big = "a" * (16 * 1024 * 1024 + 1024)
    with pytest.raises(grpc.RpcError) as e:
        gen.Tokenize(g.BatchedTokenizeRequest(requests=[g.TokenizeRequest(text=big)]))
    assert _code(e) == SC.RESOURCE_EXHAUSTED


def test_metrics_http_and_correlation_log(server, gen, caplog):
    caplog.set_level("INFO", logger="granite_deploy.serve.access")
    md = (("x-correlation-id", "corr-4711"),)
    list(gen.GenerateStream(single("Hello", max_new_tokens=5), metadata=md))
    gen.Generate(batched(["Hello"], max_new_tokens=5), metadata=md)
    records = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("correlation_id") == "corr-4711"]
    events = [(r["event"], r["rpc"].split("/")[-1]) for r in records]
    assert events.count(("request_start", "GenerateStream")) == 1 and ("request_end", "GenerateStream") in events
    assert ("request_start", "Generate") in events and ("request_end", "Generate") in events
    end = next(r for r in records if r["event"] == "request_end" and r["rpc"].endswith("GenerateStream"))
    assert end["status"] == "OK" and end["generated_tokens"] == 5 and end["stop_reason"] == "MAX_TOKENS"
    json.dumps(end)  # JSON-serialisable

    body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    engine = 'engine="onnxruntime-cpu/fp32"'
    for name in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "queue_time_seconds_count", "e2e_latency_seconds_count", "running_requests", "waiting_requests",
                 "cancellations_total", "requests_finished_total"):
        assert any(line.startswith(name + "{") and engine in line for line in body.splitlines()), name
    assert f'requests_finished_total{{{engine},stop_reason="MAX_TOKENS"}}' in body
    assert server.server.metrics.value("e2e_latency_seconds_count") >= 2


# ============================================================================ chat

def test_chat_event_conversion_tool_calls():
    """The exact conversion the server applies to ChatStream/Chat, fed with model-like deltas."""
    pieces = ["Sure", ", checking.", "\n<tool", "_call>\n{\"name\": \"get_weather\", ",
              "\"arguments\": \"{\\\"city\\\": \\\"Paris\\\"}\"}\n</tool_call>",
              "\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>", " Done."]

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return f"<{ids[0]}>"

    ids = iter(range(100))
    builder = ChatEventBuilder(Tok(), logprobs=True, top_n=2, sample=True, call_id=lambda: f"call_{next(ids)}")
    events = builder.events([Event("start", prompt_token_count=7, seed=42)])
    for i, p in enumerate(pieces):
        tok = SampledToken(i, -0.5, 1, [(i, -0.5), (99, -2.0)])
        events += builder.events([Event("token", text=p, token=tok, generated_count=i + 1)])
    events += builder.events([Event("final", stop_reason=StopReason.EOS_TOKEN, generated_count=len(pieces),
                                    prompt_token_count=7, seed=42, queue_time_s=0.002,
                                    time_to_first_token_s=0.01)])
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "start" and kinds[-1] == "final" and kinds.count("final") == 1
    assert events[0].start.seed == 42 and events[0].start.prompt_token_count == 7
    calls = [e.tool_call for e in events if e.HasField("tool_call")]
    assert [(x.index, x.name, json.loads(x.arguments_json)) for x in calls] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_time", {})]  # JSON-string arguments decoded
    assert [x.id for x in calls] == ["call_0", "call_1"]
    text = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
    assert text == "Sure, checking.Done."  # no markup; whitespace around the calls dropped
    assert all(e.text_delta.text for e in events[1:-2] if e.HasField("text_delta"))
    # every token's details arrive once, in order
    tokens = [t for e in events if e.HasField("text_delta") for t in e.text_delta.tokens]
    assert [t.token_id for t in tokens] == list(range(len(pieces)))
    assert tokens[0].text == "<0>" and tokens[0].rank == 1 and tokens[0].top_tokens[1].token_id == 99
    # tool call comes after the text before it, and before the text after it
    assert kinds.index("tool_call") > kinds.index("text_delta")
    final = events[-1].final
    assert (final.stop_reason, final.completion_token_count, final.prompt_token_count) == (c.EOS_TOKEN, 7, 7)
    assert final.queue_time_ms == pytest.approx(2.0) and final.time_to_first_token_ms == pytest.approx(10.0)
    unary = accumulate_chat(events)  # what Chat returns
    assert unary.content == text and len(unary.tool_calls) == 2 and unary.seed == 42 and len(unary.tokens) == 7

    # a malformed block stays text; an unterminated one is flushed as text at the end
    b = ChatEventBuilder(sample=False, request_seed=None)
    evs = b.events([Event("start", prompt_token_count=1, seed=9)])
    evs += b.events([Event("token", text="<tool_call>{bad json}</tool_call> x <tool_call>{\"name\": ")])
    evs += b.events([Event("final", stop_reason=StopReason.MAX_TOKENS, generated_count=1)])
    assert evs[0].start.seed == 0  # greedy: no seed in use
    assert "".join(e.text_delta.text for e in evs if e.HasField("text_delta")) == \
        "<tool_call>{bad json}</tool_call> x <tool_call>{\"name\": "
    assert not any(e.HasField("tool_call") for e in evs)


def test_fmaas_message_conversion():
    p = Prepared(requests=[], texts=["x"], sample=False)
    b = FmaasStreamBuilder(None, p)
    assert b.messages([Event("token", text="", token=SampledToken(3), generated_count=1)]) == []  # held back
    (m,) = b.messages([Event("token", text="ab", token=SampledToken(4), generated_count=2),
                       Event("final", stop_reason=StopReason.STOP_SEQUENCE, stop_sequence="c", generated_count=2)])
    assert (m.text, m.generated_token_count, m.stop_reason, m.stop_sequence) == ("ab", 2, g.STOP_SEQUENCE, "c")
    (m,) = FmaasStreamBuilder(None, p).messages([Event("final", stop_reason=StopReason.CANCELLED, generated_count=3)])
    assert (m.text, m.stop_reason, m.generated_token_count) == ("", g.CANCELLED, 3)


def test_chat_stream_round_trip(chat, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    documents = [{"id": "doc-1", "title": "Paris", "text": "Paris is the capital of France."}]
    req = build_chat_request(messages, tools, documents, max_new_tokens=12, temperature=0.8, seed=11, logprobs=True)
    events = list(chat.ChatStream(req))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "start" and kinds[-1] == "final"
    assert set(kinds[1:-1]) <= {"text_delta", "tool_call"} and "start" not in kinds[1:] and kinds.count("final") == 1
    start, final = events[0].start, events[-1].final
    rendered = server.server.tokenizer.render_chat(
        messages, tools=[{"type": "function", "function": {**tools[0]["function"]}}],
        documents=[{"doc_id": "doc-1", "title": "Paris", "text": "Paris is the capital of France."}])
    assert start.prompt_token_count == final.prompt_token_count == len(server.server.tokenizer.encode(rendered))
    counted = chat.Tokenize(c.TokenizeRequest(conversation=req.conversation))
    assert counted.token_count == start.prompt_token_count
    assert start.seed == 11
    assert final.completion_token_count == 12 or final.stop_reason == c.EOS_TOKEN
    assert final.time_to_first_token_ms > 0
    n_tokens = sum(len(e.text_delta.tokens) for e in events if e.HasField("text_delta"))
    assert n_tokens == final.completion_token_count
    unary = chat.Chat(req)
    assert unary.content == "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
    assert (unary.stop_reason, unary.completion_token_count, unary.seed) == (final.stop_reason,
                                                                             final.completion_token_count, 11)
    fim = chat.Chat(build_chat_request(fim=("def add(a, b):\n    return ", "\n"), max_new_tokens=5))
    assert fim.prompt_token_count > 0 and fim.completion_token_count >= 1


# ============================================================================ cancellation, deadlines, overload, errors

def test_cancel_frees_slot(slowed):
    st, engine = slowed
    m, sched = st.server.metrics, st.server.scheduler
    channel, stub, _ = _stubs(st.target)
    cancelled_before = m.value("cancellations_total")
    a = stub.GenerateStream(single("Hello", **LONG))
    assert next(a).input_token_count > 0 and next(a).generated_token_count >= 1
    result = {}
    b = threading.Thread(target=lambda: result.update(msgs=list(stub.GenerateStream(single("The", max_new_tokens=5)))))
    b.start()
    _wait(lambda: sched.counts() == {"running": 1, "waiting": 1})
    t0 = time.monotonic()
    a.cancel()
    b.join(10)
    assert result["msgs"][-1].stop_reason == g.MAX_TOKENS and result["msgs"][-1].generated_token_count == 5
    assert time.monotonic() - t0 < 5  # the long one (>= 10 s) did not run on
    _wait(lambda: m.value("cancellations_total") == cancelled_before + 1)
    assert m.value("requests_finished_total", stop_reason="CANCELLED") >= 1
    with pytest.raises(grpc.RpcError) as e:
        list(a)
    assert _code(e) == SC.CANCELLED
    # a request cancelled while still queued leaves the queue at once
    a = stub.GenerateStream(single("Hello", **LONG))
    next(a)
    queued = stub.GenerateStream(single("Queued", **LONG))
    _wait(lambda: sched.counts()["waiting"] == 1)
    queued.cancel()
    _wait(lambda: sched.counts()["waiting"] == 0, 2)
    a.cancel()
    _wait(sched.idle, 5)
    channel.close()


def test_deadline_exceeded_frees_slot(slowed):
    st, engine = slowed
    m, sched = st.server.metrics, st.server.scheduler
    channel, stub, chat_stub = _stubs(st.target)
    before = m.value("cancellations_total")
    for call in (lambda: list(stub.GenerateStream(single("Hello", **LONG), timeout=0.4)),
                 lambda: stub.Generate(batched(["Hello"], **LONG), timeout=0.4),
                 lambda: chat_stub.Chat(conversation("Hello", **LONG), timeout=0.4)):
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert _code(e) == SC.DEADLINE_EXCEEDED and time.monotonic() - t0 < 3
        _wait(sched.idle, 2)  # the sequence left the batch (within a step or so)
    _wait(lambda: m.value("cancellations_total") == before + 3, 3)
    resp = stub.Generate(batched(["Hello"], max_new_tokens=3), timeout=10).responses[0]
    assert resp.generated_token_count == 3
    channel.close()


def test_overload_rejects_fast_while_admitted_complete(slowed):
    st, engine = slowed
    m, sched = st.server.metrics, st.server.scheduler
    channel, stub, chat_stub = _stubs(st.target)
    before = m.value("rejections_total", reason="overloaded")
    results = {}

    def run(name):
        results[name] = list(stub.GenerateStream(single(name, max_new_tokens=100, min_new_tokens=100)))

    first = threading.Thread(target=run, args=("Hello",))
    first.start()
    _wait(lambda: sched.counts()["running"] == 1)
    second = threading.Thread(target=run, args=("World",))
    second.start()
    _wait(lambda: sched.counts()["waiting"] == 1)
    for call in (lambda: stub.Generate(batched(["x"], max_new_tokens=5)),
                 lambda: list(stub.GenerateStream(single("x", max_new_tokens=5))),
                 lambda: chat_stub.Chat(conversation("x", max_new_tokens=5))):
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert _code(e) == SC.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 1.0
    assert m.value("rejections_total", reason="overloaded") == before + 3
    first.join(30)
    second.join(30)
    for name in ("Hello", "World"):
        assert results[name][-1].stop_reason == g.MAX_TOKENS and results[name][-1].generated_token_count == 100
    channel.close()


def test_engine_error_ends_request_and_server_keeps_serving(slow):
    st, engine = slow
    channel, stub, chat_stub = _stubs(st.target)
    engine.fail_steps = 1
    msgs = list(stub.GenerateStream(single("Hello", max_new_tokens=5)))
    assert msgs[-1].stop_reason == g.ERROR
    engine.fail_steps = 1
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(batched(["Hello"], max_new_tokens=5))
    assert _code(e) == SC.INTERNAL and "injected engine failure" in e.value.details()
    engine.fail_steps = 1
    events = list(chat_stub.ChatStream(conversation("Hello", max_new_tokens=5)))
    assert events[-1].final.stop_reason == c.ERROR
    assert stub.Generate(batched(["Hello"], max_new_tokens=5)).responses[0].generated_token_count == 5
    channel.close()


# ============================================================================ health, drain, reflection

def _health(channel, service=""):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_warmup_and_drain(tiny_artifact):
    engine = _controlled(tiny_artifact, 2)
    engine.delay = 0.3  # a slow warm-up generation
    st = ServerThread(_config(tiny_artifact, max_batch=2), engine=engine, wait=False)
    _wait(lambda: st.server.port is not None, 30)
    channel = grpc.insecure_channel(st.target)
    seen = []
    while not seen or seen[-1] != health_pb2.HealthCheckResponse.SERVING:
        try:
            seen.append(_health(channel))
        except grpc.RpcError:  # not listening yet
            pass
        time.sleep(0.02)
        assert len(seen) < 2000
    assert seen[0] == health_pb2.HealthCheckResponse.NOT_SERVING  # not SERVING before the warm-up generation
    st.wait_ready()
    engine.delay = 0.01
    for service in (FMAAS_SERVICE, CHAT_SERVICE):
        assert _health(channel, service) == health_pb2.HealthCheckResponse.SERVING
    stub = gg.GenerationServiceStub(channel)
    stream = stub.GenerateStream(single("Hello", max_new_tokens=80, min_new_tokens=80))
    msgs = [next(stream), next(stream)]
    drained = st.drain_async(grace=20)
    _wait(lambda: _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
    assert _health(channel, FMAAS_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(batched(["new"], max_new_tokens=2))
    assert _code(e) == SC.UNAVAILABLE
    msgs += list(stream)  # the in-flight stream still completes
    assert msgs[-1].stop_reason == g.MAX_TOKENS and msgs[-1].generated_token_count == 80
    drained.result(30)
    channel.close()
    st.stop()


def test_reflection_lists_services(server):
    channel = grpc.insecure_channel(server.target)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10))
    names = {s.name for s in resp.list_services_response.service}
    assert {"fmaas.GenerationService", "granite.v1.ChatService", "grpc.health.v1.Health"} <= names
    (resp,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="fmaas.GenerationService")]), timeout=10))
    assert resp.file_descriptor_response.file_descriptor_proto
    channel.close()


# ============================================================================ TLS and auth

def _make_pki(tmp_path):
    """A throwaway CA, a server certificate (localhost, 127.0.0.1) and a client certificate:
    with the `cryptography` package when installed, else with the openssl command."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return _make_pki_openssl(tmp_path)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def cert(subject_key, cn, issuer_key=None, issuer_name=None, ca=False, san=None, usage=None):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
             .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer_key or subject_key, hashes.SHA256())

    def write(name, obj):
        path = tmp_path / name
        if hasattr(obj, "private_bytes"):
            path.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        else:
            path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        return str(path)

    ca_key = key()
    ca = cert(ca_key, "granite-test-ca", ca=True)
    server_key, client_key = key(), key()
    server = cert(server_key, "localhost", ca_key, ca.subject,
                  san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                  usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = cert(client_key, "granite-client", ca_key, ca.subject, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return {"ca": write("ca.pem", ca), "server_cert": write("server.pem", server),
            "server_key": write("server.key", server_key), "client_cert": write("client.pem", client),
            "client_key": write("client.key", client_key)}


def _make_pki_openssl(tmp_path):
    import shutil
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("neither the cryptography package nor the openssl command is available")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    def key(name):
        run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name)

    key("ca.key")
    run("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=granite-test-ca", "-days", "1", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, cn, ext in (
        ("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "granite-client", "extendedKeyUsage=clientAuth"),
    ):
        key(f"{name}.key")
        run("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr")
        (tmp_path / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n" + ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext")
    return {"ca": str(tmp_path / "ca.pem"), "server_cert": str(tmp_path / "server.pem"),
            "server_key": str(tmp_path / "server.key"), "client_cert": str(tmp_path / "client.pem"),
            "client_key": str(tmp_path / "client.key")}


def test_tls_and_mutual_tls(tiny_artifact, tmp_path):
    pki = _make_pki(tmp_path)
    with ServerThread(_config(tiny_artifact, max_batch=2, tls_cert=pki["server_cert"],
                              tls_key=pki["server_key"])) as st:
        target = f"localhost:{st.port}"
        with GraniteClient(target, tls_ca=pki["ca"], timeout=20) as client:
            assert client.generate("Hello", max_new_tokens=4).generated_token_count == 4
            assert "".join(client.generate_stream("Hello", max_new_tokens=4, text_only=True)) == \
                client.generate("Hello", max_new_tokens=4).text
        with GraniteClient(target, timeout=5) as plain:  # plaintext client against a TLS server
            with pytest.raises(grpc.RpcError) as e:
                plain.generate("Hello", max_new_tokens=2)
            assert _code(e) == SC.UNAVAILABLE
    with ServerThread(_config(tiny_artifact, max_batch=2, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                              tls_client_ca=pki["ca"])) as st:
        target = f"localhost:{st.port}"
        with GraniteClient(target, tls_ca=pki["ca"], client_cert=pki["client_cert"], client_key=pki["client_key"],
                           timeout=20) as client:
            assert client.chat([{"role": "user", "content": "hi"}], max_new_tokens=3).completion_token_count == 3
            assert client.model_info().context_length == 1024
        with GraniteClient(target, tls_ca=pki["ca"], timeout=5) as no_cert:
            with pytest.raises(grpc.RpcError) as e:
                no_cert.generate("Hello", max_new_tokens=2)
            assert _code(e) == SC.UNAVAILABLE


def test_bearer_token(tiny_artifact):
    with ServerThread(_config(tiny_artifact, max_batch=2, auth_token="s3cret")) as st:
        channel, stub, chat_stub = _stubs(st.target)
        for md in (None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            for call in (lambda: stub.Generate(batched(["Hello"], max_new_tokens=2), metadata=md),
                         lambda: list(stub.GenerateStream(single("Hello", max_new_tokens=2), metadata=md)),
                         lambda: chat_stub.ModelInfo(c.ModelInfoRequest(), metadata=md)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert _code(e) == SC.UNAUTHENTICATED
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING  # health checks are exempt
        good = (("authorization", "Bearer s3cret"),)
        assert stub.Generate(batched(["Hello"], max_new_tokens=2), metadata=good).responses[0].generated_token_count == 2
        assert len(list(stub.GenerateStream(single("Hello", max_new_tokens=2), metadata=good))) >= 2
        with GraniteClient(st.target, token="s3cret", timeout=20) as client:
            assert client.tokenize("Hello world").token_count > 0
        assert st.server.metrics.value("rejections_total", reason="unauthenticated") == 9
        channel.close()


# ============================================================================ soak

def _soak_specs():
    rng = random.Random(1234)
    prompts = ["Hello world", "The quick brown fox", "def add(a, b):\n    return", "Café naïve 東京 🙂",
               "What is the weather like in Boston?", "Granite models are", "1 2 3 4", "Paris is the capital of"]
    specs = []
    for i in range(32):
        kind = ("gen_stream", "gen_unary", "chat_stream", "chat_unary")[i % 4]
        params = {"max_new_tokens": rng.randint(2, 16)}
        if i % 3:
            params.update(temperature=rng.choice([0.5, 0.9, 1.3]), seed=rng.randrange(2**32))
            if i % 5 == 0:
                params["top_k"] = 20
            if i % 7 == 0:
                params["top_p"] = 0.9
        if i % 6 == 0:
            params["stop_sequences"] = ["e", "at"]
        if i % 8 == 1:
            params["min_new_tokens"] = params["max_new_tokens"]
        specs.append((kind, prompts[i % len(prompts)] + " " * (i // 8), params))
    return specs


def _run_spec(stubs, spec, cancel=False):
    """Returns (text, stop_reason, generated) or None when cancelled by the client."""
    _, gen_stub, chat_stub = stubs
    kind, prompt, params = spec
    if kind == "gen_unary":
        r = gen_stub.Generate(batched([prompt], **params), timeout=60).responses[0]
        return r.text, r.stop_reason, r.generated_token_count
    if kind == "chat_unary":
        r = chat_stub.Chat(conversation(prompt, **params), timeout=60)
        return r.content, r.stop_reason, r.completion_token_count
    call = (gen_stub.GenerateStream(single(prompt, **params), timeout=60) if kind == "gen_stream"
            else chat_stub.ChatStream(conversation(prompt, **params), timeout=60))
    items = []
    for item in call:
        items.append(item)
        if cancel and len(items) == 2:
            call.cancel()
            return None
    if kind == "gen_stream":
        return stream_text(items), items[-1].stop_reason, items[-1].generated_token_count
    assert items[0].HasField("start") and items[-1].HasField("final")
    text = "".join(e.text_delta.text for e in items if e.HasField("text_delta"))
    return text, items[-1].final.stop_reason, items[-1].final.completion_token_count


def test_soak_mixed_requests_match_alone(tiny_artifact, slow):
    specs = _soak_specs()
    alone_server, _ = slow  # max_batch=1: each request really runs alone
    stubs = _stubs(alone_server.target)
    alone = [_run_spec(stubs, spec) for spec in specs]
    stubs[0].close()

    rng = random.Random(99)
    streams = [i for i, spec in enumerate(specs) if spec[0].endswith("stream")]
    plan = []
    for _ in range(200):
        cancel = rng.random() < 0.1  # the client cancels after the first output
        plan.append((rng.choice(streams) if cancel else rng.randrange(len(specs)), cancel))
    t0 = time.monotonic()
    with ServerThread(_config(tiny_artifact, max_batch=4, max_queue=64)) as st:
        stubs = _stubs(st.target)
        with ThreadPoolExecutor(max_workers=12) as pool:
            futures = [pool.submit(_run_spec, stubs, specs[i], cancel) for i, cancel in plan]
            results = [f.result(120) for f in futures]
        completed = 0
        for (i, _), result in zip(plan, results):
            if result is None:
                continue
            completed += 1
            assert result == alone[i], (specs[i], result, alone[i])
        assert 160 <= completed < 200
        _wait(st.server.scheduler.idle, 5)
        m = st.server.metrics
        # the gauges are set at the end of each scheduler step, a moment after the last final event
        _wait(lambda: m.value("running_requests") == 0 and m.value("waiting_requests") == 0, 5)
        _wait(lambda: sum(m.value("requests_finished_total", stop_reason=r.name) for r in StopReason) == 200, 5)
        assert m.value("cancellations_total") >= 1
        stubs[0].close()
    assert time.monotonic() - t0 < 90
