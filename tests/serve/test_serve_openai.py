"""The OpenAI-compatible HTTP API end to end: `GraniteServer` with ``http_port`` (gRPC and HTTP in one
process, over one session and scheduler) on a tiny random Granite artifact, called with the real
`openai` client (and plain HTTP where a client would hide the wire).

``ScriptedEngine`` wraps the real engine: it can slow steps down (so a request is really long on a
tiny model), record which sequences ran in each step, and force a token script (so the random
model "writes" a tool call)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import openai
import pytest

from granite_deploy.engines.base import Engine
from granite_deploy.protos import generation_pb2 as g
from granite_deploy.protos import generation_pb2_grpc as gg
from granite_deploy.protos import granite_chat_pb2 as c
from granite_deploy.protos import granite_chat_pb2_grpc as cg
from granite_deploy.serve.openai_api import constraints_available
from granite_deploy.serve.server import ServerConfig, ServerThread

MSG = [{"role": "user", "content": "What is the weather like in Boston?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}]
CALL = {"name": "get_current_weather", "arguments": {"city": "Boston", "unit": "celsius"}}
SCRIPT_TEXT = "Let me check.\n<tool_call>\n" + json.dumps(CALL) + "\n</tool_call>"


# ============================================================================ fixtures and helpers

@pytest.fixture(scope="module")
def tiny_artifact(tiny_checkpoint, tmp_path_factory):
    from granite_deploy.export.exporter import export

    return export(str(tiny_checkpoint), tmp_path_factory.mktemp("oai-artifact") / "tiny", validate=False)


class ScriptedEngine(Engine):
    """The real engine, plus: a delay per step, a log of the sequence ids in each step, and an
    optional token script forced on sequences reserved while it is set (logits of the next script
    token raised far above the rest; then EOS)."""

    def __init__(self, inner, eos: int):
        self.inner, self.info, self.eos = inner, inner.info, eos
        self.delay = 0.0
        self.script: list[int] | None = None
        self.steps: list[tuple[int, ...]] = []
        self._forced: dict[int, list] = {}  # seq id -> [script, tokens consumed]

    def __getattr__(self, name):  # whatever else the scheduler asks of an engine
        return getattr(self.inner, name)

    # what the base class defines itself: the inner engine's (prefix caching, prompt logprobs)
    supports_snapshots = property(lambda self: self.inner.supports_snapshots)
    supports_all_logits = property(lambda self: self.inner.supports_all_logits)

    def save_kv(self, *args):
        return self.inner.save_kv(*args)

    def save_recurrent(self, *args):
        return self.inner.save_recurrent(*args)

    def restore(self, *args):
        return self.inner.restore(*args)

    def cache_bytes(self):
        return self.inner.cache_bytes()

    def free_memory_bytes(self):
        return self.inner.free_memory_bytes()

    def close(self):
        self.inner.close()

    def reserve(self, seq_id):
        self.inner.reserve(seq_id)
        if self.script:
            self._forced[seq_id] = [list(self.script), 0]

    def release(self, seq_id):
        self._forced.pop(seq_id, None)
        self.inner.release(seq_id)

    def step(self, chunks):
        self.steps.append(tuple(ch.seq_id for ch in chunks))
        if self.delay:
            time.sleep(self.delay)
        logits = self.inner.step(chunks)
        if not self._forced:
            return logits
        logits = np.array(logits, dtype=np.float32, copy=True)
        for row, ch in enumerate(chunks):
            state = self._forced.get(ch.seq_id)
            if state is None:
                continue
            script, k = state
            if k < len(script) and len(ch.token_ids) == 1 and ch.token_ids[0] == script[k]:
                k = state[1] = k + 1  # the forced token came back as input: force the next one
            target = script[k] if k < len(script) else self.eos
            logits[row] = -30.0
            logits[row, target] = 30.0
        return logits


def _config(artifact, **kw):
    kw.setdefault("threads", 1)
    return ServerConfig(str(artifact), host="127.0.0.1", port=0, http_port=0, **kw)


def _engine(artifact, max_batch):
    from granite_deploy.engines import load_engine
    from granite_deploy.serve.tokenizer import GraniteTokenizer

    tok = GraniteTokenizer.from_dir(artifact)
    inner = load_engine(artifact, engine="onnxruntime-cpu", max_batch=max_batch, threads=1)
    return ScriptedEngine(inner, tok.eos_token_id), tok


@pytest.fixture(scope="module")
def server(tiny_artifact):
    engine, _ = _engine(tiny_artifact, 8)
    st = ServerThread(_config(tiny_artifact, max_batch=8, prefill_chunk=256), engine=engine)
    yield st, engine
    st.stop()


@pytest.fixture(scope="module")
def slow(tiny_artifact):
    """max_batch=1, max_queue=1, a 4 KiB body limit; the engine's delay is set per test."""
    engine, _ = _engine(tiny_artifact, 1)
    st = ServerThread(_config(tiny_artifact, max_batch=1, max_queue=1, max_message_bytes=4096), engine=engine)
    yield st, engine
    st.stop()


@pytest.fixture
def slowed(slow):
    st, engine = slow
    engine.delay = 0.02
    yield st, engine
    engine.delay = 0.0
    _wait(lambda: st.server.scheduler.idle(), 30)


def _client(st, key="none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{st.server.http_port}/v1", api_key=key, max_retries=0,
                         timeout=kw.pop("timeout", 60), **kw)


@pytest.fixture(scope="module")
def client(server):
    with _client(server[0]) as cl:
        yield cl


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_checkpoint))


def _wait(cond, timeout=10.0, interval=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def _raw(st, method, path, body=None, headers=None, raw_body: bytes | None = None):
    """(status, headers, parsed JSON or text) over plain HTTP."""
    conn = http.client.HTTPConnection("127.0.0.1", st.server.http_port, timeout=60)
    data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"content-type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed


def _error_shape(body, param=None):
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def _stream_chat(client, **kw):
    chunks = list(client.chat.completions.create(stream=True, **kw))
    return chunks, "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


# ============================================================================ models, health, metrics

def test_models_health_ready_metrics(server, client):
    st, _ = server
    models = client.models.list()
    assert [m.id for m in models.data] == [st.server.model_id]
    assert client.models.retrieve(st.server.model_id).id == st.server.model_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert _raw(st, "GET", "/health")[:1] == (200,)
    assert _raw(st, "GET", "/ready")[0] == 200
    status, headers, text = _raw(st, "GET", "/metrics")
    assert status == 200 and "time_to_first_token_seconds" in text
    assert headers["content-type"].startswith("text/plain")


def test_model_naming_a_loaded_adapter_routes_to_it(server, client):
    st, _ = server
    adapters = st.server.session.adapters
    adapters["granite-lora-test"] = st.server.scheduler  # a stand-in: routing is what is tested here
    try:
        ids = {m.id: m for m in client.models.list().data}
        assert set(ids) == {st.server.model_id, "granite-lora-test"}
        assert ids["granite-lora-test"].model_extra["parent"] == st.server.model_id
        r = client.chat.completions.create(model="granite-lora-test", messages=MSG, temperature=0, max_tokens=3)
        assert r.model == "granite-lora-test" and r.usage.completion_tokens == 3
    finally:
        adapters.pop("granite-lora-test", None)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="granite-lora-test", messages=MSG, max_tokens=3)


def test_access_log_carries_correlation_id_and_user(server, client, caplog):
    import logging

    st, _ = server
    with caplog.at_level(logging.INFO, logger="granite_deploy.serve.access"):
        client.chat.completions.create(model=st.server.model_id, messages=MSG, max_tokens=2, user="alice",
                                       extra_headers={"x-correlation-id": "corr-42"})
        _wait(lambda: any(getattr(r, "fields", {}).get("event") == "request_end" and
                          r.fields.get("correlation_id") == "corr-42" for r in caplog.records))
    [end] = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("correlation_id") == "corr-42"
             and r.fields["event"] == "request_end"]
    assert (end["rpc"], end["status"], end["user"], end["generated_tokens"]) == \
        ("POST /v1/chat/completions", 200, "alice", 2)


# ============================================================================ chat

def test_chat_stream_equals_unary_and_usage_counts_the_template(server, client, hf_tokenizer):
    st, _ = server
    kw = dict(model=st.server.model_id, messages=MSG, temperature=0, max_tokens=24)
    unary = client.chat.completions.create(**kw)
    chunks, streamed = _stream_chat(client, stream_options={"include_usage": True}, **kw)
    assert unary.object == "chat.completion" and unary.choices[0].message.role == "assistant"
    assert streamed == unary.choices[0].message.content
    assert len(streamed) > 0
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.id == chunks[0].id and ch.object == "chat.completion.chunk" for ch in chunks)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [unary.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # include_usage: the last chunk
    assert all(ch.usage is None for ch in chunks[:-1])
    expected = len(hf_tokenizer.apply_chat_template(MSG, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
    for usage in (unary.usage, chunks[-1].usage):
        assert usage.prompt_tokens == expected
        assert usage.completion_tokens == (24 if unary.choices[0].finish_reason == "length" else usage.completion_tokens)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.prompt_tokens_details.cached_tokens >= 0
    assert unary.usage.completion_tokens == chunks[-1].usage.completion_tokens


def test_cached_tokens_come_from_the_prefix_cache(server, client):
    st, _ = server
    if getattr(st.server.scheduler, "prefix_cache", None) is None:
        pytest.skip("this build serves without a prefix cache")
    messages = [{"role": "system", "content": "You answer about the weather, briefly. " * 6}, *MSG]
    kw = dict(model=st.server.model_id, messages=messages, temperature=0, max_tokens=4)
    first = client.chat.completions.create(**kw)
    second = client.chat.completions.create(**kw)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= second.usage.prompt_tokens == first.usage.prompt_tokens
    assert second.choices[0].message.content == first.choices[0].message.content


def test_chat_with_tools_and_documents_counts_the_template(server, client, hf_tokenizer):
    st, _ = server
    docs = [{"doc_id": "1", "title": "Weather", "text": "It is sunny in Boston."}]
    messages = [{"role": "system", "content": "Be brief."}, *MSG]
    r = client.chat.completions.create(model=st.server.model_id, messages=messages, tools=TOOLS, temperature=0,
                                       max_tokens=4, extra_body={"documents": docs})
    expected = hf_tokenizer.apply_chat_template(messages, tools=TOOLS, documents=docs, add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
    assert r.usage.prompt_tokens == len(expected)


def test_n_seed_stop_and_max_tokens(server, client):
    st, _ = server
    kw = dict(model=st.server.model_id, messages=MSG, temperature=1.0, top_p=0.9, max_tokens=12, seed=11, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]  # seeded
    assert 3 <= a.usage.completion_tokens <= 36 and a.usage.completion_tokens == b.usage.completion_tokens
    # streamed n=3: every index's deltas add up to the unary choice
    chunks = list(client.chat.completions.create(stream=True, **kw))
    texts = {i: "" for i in range(3)}
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[i] for i in range(3)] == [ch.message.content for ch in a.choices]
    # max_tokens / max_completion_tokens
    r = client.chat.completions.create(model=st.server.model_id, messages=MSG, temperature=0,
                                       max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    # a stop string taken from the greedy text ends the reply right before it
    full = client.chat.completions.create(model=st.server.model_id, messages=MSG, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        cut = client.chat.completions.create(model=st.server.model_id, messages=MSG, temperature=0, max_tokens=24,
                                             stop=[stop])
        assert cut.choices[0].message.content == text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_chat_logprobs_match_the_grpc_chat_service(server, client):
    st, _ = server
    r = client.chat.completions.create(model=st.server.model_id, messages=MSG, temperature=0, max_tokens=8,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob == t.logprob for t in content)  # greedy: the top token is chosen
    channel = grpc.insecure_channel(st.target)
    conv = c.Conversation(messages=[c.ChatMessage(role=m["role"], content=m["content"]) for m in MSG])
    resp = cg.ChatServiceStub(channel).Chat(c.ChatRequest(conversation=conv, max_new_tokens=8, logprobs=True,
                                                          top_n_tokens=3), timeout=60)
    channel.close()
    assert resp.content == r.choices[0].message.content
    assert [t.logprob for t in resp.tokens] == pytest.approx([t.logprob for t in content], abs=1e-5)
    assert [t.text for t in resp.tokens] == [t.token for t in content]


# ============================================================================ completions

def test_completions_equal_transformers_generate(server, client, tiny_checkpoint, hf_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    st, _ = server
    prompt = "The capital of France is"
    r = client.completions.create(model=st.server.model_id, prompt=prompt, temperature=0, max_tokens=10, logprobs=2)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint)).eval()
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=hf_tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    choice = r.choices[0]
    assert r.usage.prompt_tokens == ids.shape[1]
    eos = hf_tokenizer.eos_token_id
    expect_ids = new[:new.index(eos)] if eos in new else new
    assert choice.text == hf_tokenizer.decode(expect_ids, skip_special_tokens=True)
    lp = choice.logprobs
    assert all(v <= 0 for v in lp.token_logprobs)
    ref = [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(out.scores, expect_ids)]
    assert lp.token_logprobs[:len(ref)] == pytest.approx(ref, abs=2e-3)
    assert all(len(d) <= 2 for d in lp.top_logprobs)
    # the same numbers as the fmaas gRPC service
    channel = grpc.insecure_channel(st.target)
    params = g.Parameters(stopping=g.StoppingCriteria(max_new_tokens=10),
                          response=g.ResponseOptions(generated_tokens=True, token_logprobs=True))
    resp = gg.GenerationServiceStub(channel).Generate(
        g.BatchedGenerationRequest(requests=[g.GenerationRequest(text=prompt)], params=params), timeout=60)
    channel.close()
    grpc_resp = resp.responses[0]
    assert grpc_resp.text == choice.text
    assert [t.logprob for t in grpc_resp.tokens] == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_completions_token_prompt_echo_batch_and_suffix(server, client, hf_tokenizer):
    st, _ = server
    prompt = "Hello world"
    ids = hf_tokenizer(prompt).input_ids
    by_text = client.completions.create(model=st.server.model_id, prompt=prompt, temperature=0, max_tokens=6)
    by_ids = client.completions.create(model=st.server.model_id, prompt=ids, temperature=0, max_tokens=6)
    assert by_ids.choices[0].text == by_text.choices[0].text
    echo = client.completions.create(model=st.server.model_id, prompt=prompt, temperature=0, max_tokens=6, echo=True)
    assert echo.choices[0].text == prompt + by_text.choices[0].text
    batch = client.completions.create(model=st.server.model_id, prompt=[prompt, "The quick"], temperature=0,
                                      max_tokens=6, n=2)
    assert [ch.index for ch in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == by_text.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + len(hf_tokenizer("The quick").input_ids)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=st.server.model_id, prompt=prompt, temperature=0, max_tokens=6, stream=True) if ch.choices)
    assert streamed == by_text.choices[0].text
    fim = client.completions.create(model=st.server.model_id, prompt="def add(a, b):\n", suffix="\n    return c",
                                    temperature=0, max_tokens=4)
    expected = hf_tokenizer("<|fim_prefix|>def add(a, b):\n<|fim_suffix|>\n    return c<|fim_middle|>").input_ids
    assert fim.usage.prompt_tokens == len(expected)


# ============================================================================ tool calls

def _script(st, engine, text):
    tok = st.server.tokenizer
    engine.script = tok.encode(text)


def test_tool_calls_unary_and_streamed(server, client):
    st, engine = server
    _script(st, engine, SCRIPT_TEXT)
    try:
        kw = dict(model=st.server.model_id, messages=MSG, tools=TOOLS, temperature=0, max_tokens=200)
        r = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(stream=True, **kw))
        none = client.chat.completions.create(tool_choice="none", **kw)
    finally:
        engine.script = None
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == CALL["name"]
    assert json.loads(call.function.arguments) == CALL["arguments"]
    # streamed: OpenAI's delta shape (header with index/id/type/name and "" arguments, then arguments)
    deltas = [ch.choices[0].delta.tool_calls[0] for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls]
    assert len(deltas) == 2
    head, body = deltas
    assert (head.index, head.type, head.function.name, head.function.arguments) == (0, "function", CALL["name"], "")
    assert head.id.startswith("call_")
    assert body.index == 0 and body.id is None and body.function.name is None
    assert json.loads(body.function.arguments) == CALL["arguments"]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Let me check."
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        ["tool_calls"]
    # tool_choice "none": no call; with structured generation the model cannot even write the tag
    assert none.choices[0].message.tool_calls is None
    if constraints_available(st.server.tokenizer):
        assert "<tool_call>" not in none.choices[0].message.content
        assert none.choices[0].message.content.startswith("Let me check.")
    else:
        assert none.choices[0].message.content == SCRIPT_TEXT
        assert none.choices[0].finish_reason == "stop"


def test_tool_call_round_trip_counts_the_template(server, client, hf_tokenizer):
    st, _ = server
    messages = [*MSG,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": CALL["name"], "arguments": json.dumps(CALL["arguments"])}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "25 C and sunny"}]
    r = client.chat.completions.create(model=st.server.model_id, messages=messages, tools=TOOLS, temperature=0,
                                       max_tokens=2)
    expected = hf_tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
    assert r.usage.prompt_tokens == len(expected)


# Bounded schemas: on random weights only the constraint makes the output valid, and an enum keeps it short.
ENUM_TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Boston", "Paris"]}},
                                                 "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "pick", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                                             "maximum": 9}},
                                       "required": ["n"], "additionalProperties": False}}}]
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 100}},
          "required": ["answer", "n"], "additionalProperties": False}


def _needs_constraints(st, client, kw, param):
    """Without structured generation in this build: a 400 naming the field, never a silent free run."""
    if constraints_available(st.server.tokenizer):
        return False
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    assert e.value.body["param"].startswith(param) and "not supported yet" in e.value.body["message"]
    return True


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "pick"}}],
                         ids=["required", "named"])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_forced_tool_choice(server, client, tool_choice, temperature):
    st, _ = server
    kw = dict(model=st.server.model_id, messages=MSG, tools=ENUM_TOOLS, tool_choice=tool_choice,
              temperature=temperature, seed=5, max_tokens=200)
    if _needs_constraints(st, client, kw, "tool_choice"):
        return
    r = client.chat.completions.create(**kw)
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for call in calls:
        args = json.loads(call.function.arguments)
        if call.function.name == "get_current_weather":
            assert args["city"] in ("Boston", "Paris")
        else:
            assert call.function.name == "pick" and 0 <= args["n"] <= 9
    if isinstance(tool_choice, dict):
        assert [cl.function.name for cl in calls] == ["pick"]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    heads = [d for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls
             for d in ch.choices[0].delta.tool_calls if d.function.name]
    assert [h.function.name for h in heads] == [cl.function.name for cl in calls]
    args = "".join(d.function.arguments or "" for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls
                   for d in ch.choices[0].delta.tool_calls)
    assert args == "".join(cl.function.arguments for cl in calls)


def test_response_format_and_guided_decoding(server, client):
    st, _ = server
    base = dict(model=st.server.model_id, messages=MSG, max_tokens=100, temperature=1.0, seed=3)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    if _needs_constraints(st, client, dict(base, response_format=fmt), "response_format.json_schema"):
        return
    out = json.loads(client.chat.completions.create(response_format=fmt, **base).choices[0].message.content)
    assert out["answer"] in ("yes", "no") and 0 <= out["n"] <= 100 and set(out) == {"answer", "n"}
    open_schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    strict = {"type": "json_schema", "json_schema": {"name": "flag", "schema": open_schema, "strict": True}}
    out = json.loads(client.chat.completions.create(response_format=strict, **base).choices[0].message.content)
    assert set(out) == {"ok"} and isinstance(out["ok"], bool)  # strict: the open object schema is closed
    r = client.chat.completions.create(extra_body={"guided_choice": ["red", "green"]}, **base)
    assert r.choices[0].message.content in ("red", "green")
    r = client.chat.completions.create(extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"}, **base)
    assert __import__("re").fullmatch("[0-9]{3}-[a-z]{2}", r.choices[0].message.content)
    r = client.completions.create(model=st.server.model_id, prompt="Answer:", max_tokens=20, temperature=1.0,
                                  extra_body={"guided_choice": ["alpha", "beta"]})
    assert r.choices[0].text in ("alpha", "beta")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(extra_body={"guided_regex": "[0-9"}, **base)
    assert e.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}, **base)
    assert e.value.body["param"].startswith("response_format")


# ============================================================================ errors

def test_bad_fields_are_400_naming_the_param(server, client):
    st, _ = server
    model = st.server.model_id
    cases = [
        (dict(messages=MSG, temperature=5), "temperature"),
        (dict(messages=MSG, frequency_penalty=0.5), "frequency_penalty"),
        (dict(messages=MSG, logprobs=True, top_logprobs=9), "top_logprobs"),
        (dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (dict(messages=MSG, max_tokens=100000), "max_tokens"),
        (dict(messages=MSG, extra_body={"no_such_parameter": 1}), "no_such_parameter"),
        (dict(messages=MSG, tool_choice={"type": "function", "function": {"name": "nope"}}, tools=TOOLS),
         "tool_choice.function.name"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, **kw)
        assert e.value.status_code == 400
        assert e.value.body["param"] == param, (kw, e.value.body)
    status, _, body = _raw(st, "POST", "/v1/chat/completions", raw_body=b"{not json")
    assert status == 400 and _error_shape(body)["code"] == "invalid_json"
    status, _, body = _raw(st, "POST", "/v1/completions", {"prompt": [10 ** 7]})
    assert status == 400 and _error_shape(body, "prompt")
    status, _, body = _raw(st, "GET", "/v1/nothing-here")
    assert status == 404 and _error_shape(body)


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert e.value.status_code == 404 and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x")


def test_too_large_overload_and_retry_after(slowed):
    st, engine = slowed
    status, _, body = _raw(st, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "x" * 8000}]})
    assert status == 413 and _error_shape(body)["code"] == "request_too_large"
    long = {"messages": MSG, "max_tokens": 500, "min_tokens": 500, "stream": True}
    conns = []
    for _ in range(2):  # one running, one queued: the queue is full
        conn = http.client.HTTPConnection("127.0.0.1", st.server.http_port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(long), headers={"content-type": "application/json"})
        conns.append(conn)
    _wait(lambda: st.server.scheduler.counts()["waiting"] == 1 and st.server.scheduler.counts()["running"] == 1, 20)
    status, headers, body = _raw(st, "POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": 2})
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert _error_shape(body)["code"] == "overloaded"
    with _client(st) as cl, pytest.raises(openai.RateLimitError):
        cl.chat.completions.create(model=st.server.model_id, messages=MSG, max_tokens=2)
    for conn in conns:
        conn.close()  # client disconnect: both generations are cancelled
    _wait(lambda: st.server.scheduler.idle(), 20)


def test_disconnect_cancels_stream_and_unary(slowed):
    st, engine = slowed
    cancelled = st.server.metrics.value("cancellations_total")
    # streamed: read the first chunks, then drop the connection
    conn = http.client.HTTPConnection("127.0.0.1", st.server.http_port, timeout=60)
    conn.request("POST", "/v1/chat/completions", headers={"content-type": "application/json"},
                 body=json.dumps({"messages": MSG, "max_tokens": 500, "min_tokens": 500, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    first = resp.readline()
    assert first.startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    _wait(lambda: st.server.scheduler.idle(), 10)
    assert st.server.metrics.value("cancellations_total") == cancelled + 1
    # non-streamed: the client times out and goes away
    with _client(st, timeout=0.5) as cl, pytest.raises(openai.APITimeoutError):
        cl.chat.completions.create(model=st.server.model_id, messages=MSG, max_tokens=500,
                                   extra_body={"min_tokens": 500})
    _wait(lambda: st.server.scheduler.idle(), 10)
    assert st.server.metrics.value("cancellations_total") == cancelled + 2


def test_drain_refuses_new_requests_with_503(tiny_artifact):
    engine, _ = _engine(tiny_artifact, 2)
    engine.delay = 0.02
    st = ServerThread(_config(tiny_artifact, max_batch=2, drain_grace_s=30), engine=engine)
    try:
        with _client(st) as cl:
            result = {}

            def long():
                result["r"] = cl.chat.completions.create(model=st.server.model_id, messages=MSG, max_tokens=40,
                                                         extra_body={"min_tokens": 40})

            t = threading.Thread(target=long)
            t.start()
            _wait(lambda: st.server.scheduler.counts()["running"] == 1, 20)
            drained = st.drain_async()
            _wait(lambda: _raw(st, "GET", "/ready")[0] == 503, 10)
            status, headers, body = _raw(st, "POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": 2})
            assert status == 503 and _error_shape(body)["type"] == "service_unavailable"
            t.join(60)
            assert result["r"].usage.completion_tokens == 40  # the in-flight request finished
            drained.result(60)
    finally:
        st.stop()


# ============================================================================ auth, TLS, the CLI

def test_bearer_token(tiny_artifact):
    with ServerThread(_config(tiny_artifact, max_batch=2, auth_token="s3cret")) as st:
        with _client(st, key="wrong") as cl, pytest.raises(openai.AuthenticationError) as e:
            cl.chat.completions.create(model=st.server.model_id, messages=MSG, max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with _client(st, key="wrong") as cl, pytest.raises(openai.AuthenticationError):
            cl.models.list()
        with _client(st, key="s3cret") as cl:
            assert cl.chat.completions.create(model=st.server.model_id, messages=MSG,
                                              max_tokens=2).usage.completion_tokens == 2
        assert _raw(st, "GET", "/health")[0] == 200  # probes need no token
        assert _raw(st, "GET", "/ready")[0] == 200


def _make_pki(tmp_path):
    """A throwaway CA and a server certificate for localhost / 127.0.0.1 (the openssl command)."""
    import shutil

    if not shutil.which("openssl"):
        pytest.skip("the openssl command is not available")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ca.key")
    run("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=granite-test-ca", "-days", "1", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "server.key")
    run("req", "-new", "-key", "server.key", "-subj", "/CN=localhost", "-out", "server.csr")
    (tmp_path / "server.ext").write_text("basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                         "extendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-out", "server.pem", "-extfile", "server.ext")
    run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "client.key")
    run("req", "-new", "-key", "client.key", "-subj", "/CN=granite-client", "-out", "client.csr")
    (tmp_path / "client.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-out", "client.pem", "-extfile", "client.ext")
    return {k: str(tmp_path / v) for k, v in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"),
                                              ("client_cert", "client.pem"), ("client_key", "client.key"))}


def test_tls(tiny_artifact, tmp_path):
    pki = _make_pki(tmp_path)
    with ServerThread(_config(tiny_artifact, max_batch=2, tls_cert=pki["cert"], tls_key=pki["key"])) as st:
        base = f"https://localhost:{st.server.http_port}/v1"
        with openai.OpenAI(base_url=base, api_key="x", max_retries=0,
                           http_client=openai.DefaultHttpx2Client(verify=pki["ca"])) as cl:
            r = cl.chat.completions.create(model=st.server.model_id, messages=MSG, max_tokens=3, temperature=0)
            assert r.usage.completion_tokens == 3
            _, text = _stream_chat(cl, model=st.server.model_id, messages=MSG, max_tokens=3, temperature=0)
            assert text == r.choices[0].message.content
        with openai.OpenAI(base_url=base, api_key="x", max_retries=0) as untrusted, \
                pytest.raises(openai.APIConnectionError):
            untrusted.models.list()  # the test CA is not trusted by default
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            _raw(st, "GET", "/health")  # plaintext against TLS
    with ServerThread(_config(tiny_artifact, max_batch=2, tls_cert=pki["cert"], tls_key=pki["key"],
                              tls_client_ca=pki["ca"])) as st:  # mutual TLS: a client certificate is required
        base = f"https://localhost:{st.server.http_port}/v1"
        import ssl

        ctx = ssl.create_default_context(cafile=pki["ca"])
        ctx.load_cert_chain(pki["client_cert"], pki["client_key"])
        http_client = openai.DefaultHttpx2Client(verify=ctx)
        with openai.OpenAI(base_url=base, api_key="x", max_retries=0, http_client=http_client) as cl:
            assert cl.models.list().data[0].id == st.server.model_id
        with openai.OpenAI(base_url=base, api_key="x", max_retries=0,
                           http_client=openai.DefaultHttpx2Client(verify=pki["ca"])) as no_cert, \
                pytest.raises(openai.APIConnectionError):
            no_cert.models.list()


def test_cli_serve_http_with_token_from_the_environment(tiny_artifact):
    env = {**os.environ, "GRANITE_DEPLOY_AUTH_TOKEN": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "granite_deploy.cli", "serve", str(tiny_artifact), "--port", "0",
                             "--http-port", "0", "--threads", "1", "--max-batch", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "OpenAI-compatible HTTP on" in line, line
        port = int(line.rsplit(":", 1)[1].split(")")[0].split(",")[0])
        base = f"http://127.0.0.1:{port}/v1"
        with openai.OpenAI(base_url=base, api_key="wrong", max_retries=0) as cl, \
                pytest.raises(openai.AuthenticationError):
            cl.models.list()
        with openai.OpenAI(base_url=base, api_key="from-env", max_retries=0) as cl:
            assert cl.completions.create(model=cl.models.list().data[0].id, prompt="Hello",
                                         max_tokens=2).usage.completion_tokens == 2
    finally:
        proc.terminate()
        proc.wait(30)


# ============================================================================ one batch for both protocols

def test_http_and_grpc_share_the_batch(server, client):
    st, engine = server
    engine.delay = 0.01
    engine.steps.clear()
    try:
        channel = grpc.insecure_channel(st.target)
        stub = gg.GenerationServiceStub(channel)
        params = g.Parameters(stopping=g.StoppingCriteria(max_new_tokens=30, min_new_tokens=30))
        with ThreadPoolExecutor(4) as pool:
            grpc_jobs = [pool.submit(lambda: list(stub.GenerateStream(
                g.SingleGenerationRequest(request=g.GenerationRequest(text="Hello"), params=params), timeout=60)))
                for _ in range(2)]
            http_jobs = [pool.submit(lambda: client.chat.completions.create(
                model=st.server.model_id, messages=MSG, max_tokens=30, temperature=0,
                extra_body={"min_tokens": 30})) for _ in range(2)]
            grpc_out = [j.result(120) for j in grpc_jobs]
            http_out = [j.result(120) for j in http_jobs]
        channel.close()
    finally:
        engine.delay = 0.0
    assert all(sum(m.generated_token_count > 0 for m in msgs) and msgs[-1].generated_token_count == 30
               for msgs in grpc_out)
    assert all(r.usage.completion_tokens == 30 for r in http_out)
    assert max(len(s) for s in engine.steps) == 4  # all four sequences decoded in the same steps
