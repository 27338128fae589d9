"""Bounded work on untrusted input: byte limits before tokenising, tokenising off the event loop,
chat templates with time and size limits, over-deep JSON and malformed protobuf refused
with INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the field (never UNKNOWN)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from granite_deploy.protos import generation_pb2 as g
from granite_deploy.protos import generation_pb2_grpc as gg
from granite_deploy.protos import granite_chat_pb2 as c
from granite_deploy.protos import granite_chat_pb2_grpc as cg
from granite_deploy.serve.client import build_chat_request, build_parameters
from granite_deploy.serve.server import ServerConfig, ServerThread
from granite_deploy.serve.tokenizer import GraniteTokenizer

SC = grpc.StatusCode
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    from granite_deploy.export.exporter import export

    return export(str(tiny_checkpoint), tmp_path_factory.mktemp("limits") / "tiny", validate=False)


@pytest.fixture(scope="module")
def served(artifact):
    """A server whose tokenizer's chat template a test may swap (tok.chat_templates)."""
    tok = GraniteTokenizer.from_dir(artifact)
    st = ServerThread(ServerConfig(str(artifact), port=0, max_batch=2, threads=1, template_time_s=0.5,
                                   max_prompt_bytes=8 << 20), tokenizer=tok)
    original = tok.chat_templates
    channel = grpc.insecure_channel(st.target)
    yield st, tok, channel
    tok.chat_templates = original
    channel.close()
    st.stop()


@pytest.fixture
def template(served):
    st, tok, channel = served
    original = tok.chat_templates

    def use(source):
        tok.chat_templates = source

    yield use
    tok.chat_templates = original


def _code(e):
    return e.value.code()


def _chat(channel, messages=HI, **kw):
    return cg.ChatServiceStub(channel).Chat(build_chat_request(messages, max_new_tokens=2, **kw), timeout=30)


@pytest.mark.parametrize("source,code,words", [
    ("{% for i in range(100000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
     SC.RESOURCE_EXHAUSTED, "took longer than 0.5 s"),
    ("{{ 'x' * 20000000 }}", SC.RESOURCE_EXHAUSTED, "over the limit"),
    ("{% set s = 'x' * 1000 %}{% for i in range(100000) %}{{ s }}{% endfor %}", SC.RESOURCE_EXHAUSTED,
     "over the limit"),
    ("{% for i in range(10**9) %}{% endfor %}", SC.RESOURCE_EXHAUSTED, "range"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", SC.INVALID_ARGUMENT, "recursion too deep"),
    ("{{ 2 ** 100000000 }}", SC.RESOURCE_EXHAUSTED, "power too large"),
], ids=["loop-1e8", "repeat-20M", "output-100M", "range-1e9", "recursive-macro", "power"])
def test_hostile_templates_are_refused_fast(served, template, source, code, words):
    st, tok, channel = served
    template(source)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        _chat(channel)
    assert _code(e) == code, e.value.details()
    assert e.value.details().startswith("conversation.messages: the chat template failed"), e.value.details()
    assert words in e.value.details()
    assert "Traceback" not in e.value.details()
    assert time.monotonic() - t0 < 10
    template(None)
    # the server is fine afterwards
    with grpc.insecure_channel(st.target) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_deep_tool_json_is_invalid_argument(served):
    st, tok, channel = served
    deep = '{"a": ' * 900 + "1" + "}" * 900
    with pytest.raises(grpc.RpcError) as e:
        _chat(channel, tools=[{"type": "function", "function": {"name": "f", "parameters": deep}}])
    assert _code(e) == SC.INVALID_ARGUMENT
    assert e.value.details() == ("conversation.tools[0].function.parameters_json: is nested deeper than 64 levels")
    args = '[' * 900 + ']' * 900
    conv = build_chat_request(HI, max_new_tokens=2)
    m = conv.conversation.messages.add(role="assistant", content="")
    m.tool_calls.add(id="c1", name="f", arguments_json=args)
    with pytest.raises(grpc.RpcError) as e:
        cg.ChatServiceStub(channel).Chat(conv, timeout=30)
    assert _code(e) == SC.INVALID_ARGUMENT and "tool_calls[0].arguments_json: is nested deeper" in e.value.details()


def _raw_chat(messages, documents=()):
    """A ChatRequest built by hand (the client library would refuse these before sending)."""
    conv = c.Conversation(messages=[c.ChatMessage(role=r, content=t) for r, t in messages],
                          documents=[c.Document(text=d) for d in documents])
    return c.ChatRequest(conversation=conv, max_new_tokens=2)


def test_bad_role_and_limits_name_the_field(served):
    st, tok, channel = served
    stub = cg.ChatServiceStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Chat(_raw_chat([("wizard", "hi")]), timeout=30)
    assert _code(e) == SC.INVALID_ARGUMENT
    assert e.value.details().startswith("conversation.messages[0].role: must be one of system, user, assistant, tool")
    with pytest.raises(grpc.RpcError) as e:
        stub.Chat(_raw_chat([("", "hi")]), timeout=30)
    assert _code(e) == SC.INVALID_ARGUMENT and e.value.details().startswith("conversation.messages[0].role:")
    lim = st.server.session.limits
    with pytest.raises(grpc.RpcError) as e:
        stub.Chat(_raw_chat([("user", "x" * (lim.max_message_bytes + 1))]), timeout=30)
    assert _code(e) == SC.RESOURCE_EXHAUSTED and e.value.details().startswith("conversation.messages[0].content:")
    with pytest.raises(grpc.RpcError) as e:
        stub.Chat(_raw_chat([("user", "hi")], documents=["d"] * (lim.max_documents + 1)), timeout=30)
    assert _code(e) == SC.RESOURCE_EXHAUSTED and e.value.details().startswith("conversation.documents:")


@pytest.mark.parametrize("method,streaming", [
    ("/fmaas.GenerationService/Generate", False),
    ("/fmaas.GenerationService/GenerateStream", True),
    ("/granite.v1.ChatService/Chat", False),
    ("/granite.v1.ChatService/ChatStream", True),
    ("/granite.v1.ChatService/Tokenize", False),
])
def test_garbage_protobuf_is_invalid_argument(served, method, streaming):
    st, tok, channel = served
    call = (channel.unary_stream if streaming else channel.unary_unary)(method)  # raw bytes in and out
    with pytest.raises(grpc.RpcError) as e:
        result = call(b"\xff\xff\xff\xff\x0f garbage", timeout=10)
        if streaming:
            list(result)
    assert _code(e) == SC.INVALID_ARGUMENT, e.value.details()
    assert e.value.details().startswith("request: malformed protobuf message")


def test_prompt_over_the_byte_limit_is_refused_before_tokenising(artifact):
    st = ServerThread(ServerConfig(str(artifact), port=0, max_batch=1, threads=1))
    try:
        limit = st.server.session.limits.max_prompt_bytes
        assert limit == 1 << 20  # 16 bytes a token of a 1024-token window is under the 1 MiB floor
        with grpc.insecure_channel(st.target) as ch:
            stub = gg.GenerationServiceStub(ch)
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(g.BatchedGenerationRequest(requests=[g.GenerationRequest(text="é" * 3_000_000)],
                                                         params=build_parameters(max_new_tokens=2)), timeout=30)
            assert _code(e) == SC.RESOURCE_EXHAUSTED
            assert e.value.details().startswith("requests[0].text: is over")
            assert time.monotonic() - t0 < 5
    finally:
        st.stop()


def test_5mb_prompt_does_not_stall_health(served):
    st, tok, channel = served
    text = "Hello world, this is a long prompt. " * 145_000  # ~5.2 MB
    assert len(text.encode()) > 5_000_000
    result = {}

    def big():
        stub = gg.GenerationServiceStub(channel)
        result["r"] = stub.Generate(g.BatchedGenerationRequest(
            requests=[g.GenerationRequest(text=text)],
            params=build_parameters(max_new_tokens=2, min_new_tokens=2, truncate_input_tokens=50)), timeout=120)

    worker = threading.Thread(target=big)
    latencies = []
    with grpc.insecure_channel(st.target) as probe_channel:
        health = health_pb2_grpc.HealthStub(probe_channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        worker.start()
        while worker.is_alive():
            t0 = time.monotonic()
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
    worker.join()
    r = result["r"].responses[0]
    assert r.input_token_count == 50 and r.generated_token_count == 2
    assert len(latencies) >= 3  # the prompt really took a while
    assert max(latencies) < 1.0, max(latencies)


def test_tokenize_rpc_uses_the_same_limits(served):
    st, tok, channel = served
    stub = cg.ChatServiceStub(channel)
    resp = stub.Tokenize(c.TokenizeRequest(text="Hello world", return_tokens=True), timeout=10)
    assert resp.token_count == len(tok.encode("Hello world"))
    big = "x" * (st.server.session.limits.max_prompt_bytes + 1)
    with pytest.raises(grpc.RpcError) as e:
        stub.Tokenize(c.TokenizeRequest(text=big), timeout=10)
    assert _code(e) == SC.RESOURCE_EXHAUSTED and e.value.details().startswith("text: is over")
