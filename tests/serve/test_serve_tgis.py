"""TGIS behaviour of fmaas.GenerationService, checked with clients compiled at test time from the
vendored upstream protos (IBM's TGIS and vllm-tgis-adapter's, tests/tgis_upstream.py), never the
project's stubs, against a real server on a tiny random Granite (plus one LoRA adapter artifact).

Table-driven: STATUS_CASES (the status code each request gets), then one test per behaviour that
needs more than a status (seeds, token strings, prompt scores, adapters, streams)."""

from __future__ import annotations

import math

import grpc
import pytest

from granite_deploy.export.exporter import export
from granite_deploy.serve.server import ServerConfig, ServerThread
from lora_adapters import make_lora_adapter
from tgis_upstream import NAMES, Upstream, UpstreamClient

SC = grpc.StatusCode
OK = "OK"
LONG_TEXT = "Hello world " * 100  # ~600 tokens of the 1024-token context (the tiny tokenizer)
ADAPTER = "lora-a"


# ============================================================================ fixtures

@pytest.fixture(scope="module")
def base_artifact(tiny_checkpoint, tmp_path_factory):
    return export(str(tiny_checkpoint), tmp_path_factory.mktemp("tgis-base") / "tiny", validate=False)


@pytest.fixture(scope="module")
def adapter_artifact(tiny_checkpoint, tmp_path_factory):
    adapter = make_lora_adapter(tiny_checkpoint, tmp_path_factory.mktemp("tgis-lora") / "adapter")
    return export(str(tiny_checkpoint), tmp_path_factory.mktemp("tgis-adapter") / "tiny-lora", adapter=adapter,
                  validate=False)


def _serve(artifact, **kw):
    return ServerThread(ServerConfig(str(artifact), host="127.0.0.1", port=0, threads=1, max_batch=4, **kw))


@pytest.fixture(scope="module")
def server(base_artifact, adapter_artifact):
    st = _serve(base_artifact, adapters=((ADAPTER, str(adapter_artifact)),))
    yield st
    st.stop()


@pytest.fixture(scope="module")
def ups(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upstream-clients")
    return {name: Upstream(name, tmp) for name in NAMES}


@pytest.fixture(scope="module")
def clients(server, ups):
    channel = grpc.insecure_channel(server.target)
    yield {name: UpstreamClient(up, channel) for name, up in ups.items()}
    channel.close()


def params(up, method="GREEDY", sampling=None, stopping=None, response=None, decoding=None, **top):
    """Parameters of an upstream proto from plain dicts (field names as in the proto)."""
    p = up.Parameters(method=getattr(up, method), **top)
    for name, values in (("sampling", sampling), ("stopping", stopping), ("response", response),
                         ("decoding", decoding)):
        if values is None:
            continue
        sub = getattr(p, name)
        sub.SetInParent()
        for key, value in values.items():
            if isinstance(value, dict):
                getattr(sub, key).SetInParent()
                for k2, v2 in value.items():
                    if isinstance(v2, list):
                        getattr(getattr(sub, key), k2).extend(v2)
                    else:
                        setattr(getattr(sub, key), k2, v2)
            elif isinstance(value, list):
                getattr(sub, key).extend(value)
            else:
                setattr(sub, key, value)
    return p


def batched(up, texts, **kw):
    extra = {k: kw.pop(k) for k in ("model_id", "prefix_id", "adapter_id") if k in kw}
    return up.BatchedGenerationRequest(requests=[up.GenerationRequest(text=t) for t in texts],
                                       params=params(up, **kw), **extra)


def single(up, text, **kw):
    extra = {k: kw.pop(k) for k in ("model_id", "prefix_id", "adapter_id") if k in kw}
    return up.SingleGenerationRequest(request=up.GenerationRequest(text=text), params=params(up, **kw), **extra)


def _code(fn):
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return OK, ""


def _both(client, up, texts_or_text, **kw):
    """(Generate outcome, GenerateStream outcome) for the same request."""
    texts = texts_or_text if isinstance(texts_or_text, list) else [texts_or_text]
    unary = _code(lambda: client.Generate(batched(up, texts, **kw), timeout=60))
    stream = _code(lambda: list(client.GenerateStream(single(up, texts[0], **kw), timeout=60))) if texts else None
    return unary, stream


# ============================================================================ statuses, table-driven

GEN = dict(stopping={"max_new_tokens": 3})
# (id, protos, kwargs, expected status, words the message must contain)
STATUS_CASES = [
    ("model_id-any-name", NAMES, dict(model_id="ibm/granite-13b-chat-v2", **GEN), OK, ()),
    ("model_id-empty", NAMES, dict(**GEN), OK, ()),
    ("prefix_id", NAMES, dict(prefix_id="my-prefix", **GEN), SC.INVALID_ARGUMENT, ("prefix_id", "my-prefix")),
    ("prefix_id-empty-string", NAMES, dict(prefix_id="", **GEN), SC.INVALID_ARGUMENT, ("prefix_id",)),
    ("adapter_id-unknown", ("vllm_tgis_adapter",), dict(adapter_id="x", **GEN), SC.INVALID_ARGUMENT,
     ("no adapter 'x' is loaded",)),
    ("adapter_id-loaded", ("vllm_tgis_adapter",), dict(adapter_id=ADAPTER, **GEN), OK, ()),
    ("prefix_id-names-loaded-adapter", ("vllm_tgis_adapter",), dict(prefix_id=ADAPTER, **GEN), OK, ()),
    ("length_penalty-below-1", NAMES, dict(decoding={"length_penalty": {"start_index": 2, "decay_factor": 0.5}}, **GEN),
     SC.INVALID_ARGUMENT, ("length_penalty",)),
    ("length_penalty-above-10", NAMES, dict(decoding={"length_penalty": {"decay_factor": 10.5}}, **GEN),
     SC.INVALID_ARGUMENT, ("length_penalty",)),
    ("length_penalty-present-factor-0", NAMES, dict(decoding={"length_penalty": {"start_index": 3}}, **GEN),
     SC.INVALID_ARGUMENT, ("length_penalty",)),
    ("length_penalty-1", NAMES, dict(decoding={"length_penalty": {"decay_factor": 1.0}}, **GEN), OK, ()),
    ("length_penalty-10", NAMES, dict(decoding={"length_penalty": {"start_index": 1, "decay_factor": 10.0}}, **GEN),
     OK, ()),
    ("logprobs-without-tokens", NAMES, dict(response={"token_logprobs": True}, **GEN), SC.INVALID_ARGUMENT,
     ("generated_tokens",)),
    ("ranks-without-tokens", NAMES, dict(response={"token_ranks": True}, **GEN), SC.INVALID_ARGUMENT, ()),
    ("top_n-without-tokens", NAMES, dict(response={"top_n_tokens": 2}, **GEN), SC.INVALID_ARGUMENT, ()),
    ("logprobs-with-input-tokens", NAMES, dict(response={"token_logprobs": True, "input_tokens": True}, **GEN), OK, ()),
    ("logprobs-with-generated-tokens", NAMES, dict(response={"token_logprobs": True, "generated_tokens": True}, **GEN),
     OK, ()),
    ("input-plus-min-new-over-context", NAMES, dict(stopping={"max_new_tokens": 600, "min_new_tokens": 600}),
     SC.INVALID_ARGUMENT, ("min_new_tokens", "1024")),
    ("min-over-max", NAMES, dict(stopping={"max_new_tokens": 5, "min_new_tokens": 6}), SC.INVALID_ARGUMENT, ()),
    ("min-over-default-max", NAMES, dict(stopping={"min_new_tokens": 21}), SC.INVALID_ARGUMENT, ()),
    ("max-new-over-limit", NAMES, dict(stopping={"max_new_tokens": 5000}), SC.INVALID_ARGUMENT, ()),
    ("greedy-ignores-sampling-fields", NAMES, dict(sampling={"top_p": 1.5, "typical_p": 3.0}, **GEN), OK, ()),
    ("sample-top_p-over-1", NAMES, dict(method="SAMPLE", sampling={"top_p": 1.5}, **GEN), SC.INVALID_ARGUMENT,
     ("top_p",)),
    ("sample-temperature-below-0.05", NAMES, dict(method="SAMPLE", sampling={"temperature": 0.01}, **GEN),
     SC.INVALID_ARGUMENT, ("temperature",)),
    ("sample-typical_p-over-1", NAMES, dict(method="SAMPLE", sampling={"typical_p": 1.5}, **GEN),
     SC.INVALID_ARGUMENT, ()),
    ("repetition_penalty-negative", NAMES, dict(decoding={"repetition_penalty": -1.0}, **GEN), SC.INVALID_ARGUMENT,
     ()),
    ("seven-stop-sequences", NAMES, dict(stopping={"max_new_tokens": 3, "stop_sequences": list("abcdefg")}),
     SC.INVALID_ARGUMENT, ()),
    ("empty-stop-sequence", NAMES, dict(stopping={"max_new_tokens": 3, "stop_sequences": [""]}),
     SC.INVALID_ARGUMENT, ()),
    ("stop-sequence-241-bytes", NAMES, dict(stopping={"max_new_tokens": 3, "stop_sequences": ["é" * 121]}),
     SC.INVALID_ARGUMENT, ("bytes",)),
    ("stop-sequence-240-bytes", NAMES, dict(stopping={"max_new_tokens": 3, "stop_sequences": ["é" * 120]}), OK, ()),
    ("top_n-over-5", NAMES, dict(response={"generated_tokens": True, "top_n_tokens": 6}, **GEN), SC.INVALID_ARGUMENT,
     ()),
    ("time_limit_millis-uint32-max", NAMES, dict(stopping={"max_new_tokens": 2, "time_limit_millis": 2**32 - 1}), OK,
     ()),
    ("guided-format-text", ("vllm_tgis_adapter",), dict(decoding={"format": 0}, **GEN), OK, ()),
]


@pytest.mark.parametrize("case", STATUS_CASES, ids=[c[0] for c in STATUS_CASES])
@pytest.mark.parametrize("proto", NAMES)
def test_status(clients, ups, proto, case):
    name, protos, kw, expected, words = case
    if proto not in protos:
        pytest.skip(f"{name}: not expressible with {proto}'s proto")
    text = LONG_TEXT if name.startswith("input-plus") else "The capital of France is"
    unary, stream = _both(clients[proto], ups[proto], [text], **kw)
    for code, details in (unary, stream):
        assert code == expected, (name, details)
        for word in words:
            assert word in details, (name, details)


def test_guided_decoding_is_never_silently_ignored(clients, ups, server):
    """Each guided-decoding field is honoured (a ConstraintSpec on Request.constraint) or refused."""
    up, client = ups["vllm_tgis_adapter"], clients["vllm_tgis_adapter"]
    supported = getattr(server.server.scheduler, "supports_constraints", False)
    cases = {
        "format": dict(decoding={"format": 1}),
        "json_schema": dict(decoding={"json_schema": '{"type": "object", "properties": {"a": {"type": "integer"}},'
                                                     ' "required": ["a"]}'}),
        "regex": dict(decoding={"regex": "[0-9]{3}"}),
        "choice": dict(decoding={"choice": {"choices": ["yes", "no"]}}),
        "grammar": dict(decoding={"grammar": 'start: "ab" | "cd"'}),
    }
    for kind, kw in cases.items():
        try:
            resp = client.Generate(batched(up, ["Answer:"], stopping={"max_new_tokens": 40}, **kw), timeout=60)
        except grpc.RpcError as e:
            assert not supported, (kind, e.details())
            assert e.code() == SC.INVALID_ARGUMENT and "not supported" in e.details(), (kind, e.details())
            assert f"parameters.decoding.{kind}" in e.details(), e.details()
            continue
        assert supported, kind
        text = resp.responses[0].text
        if kind == "choice":
            assert text in ("yes", "no")
        elif kind == "regex":
            assert len(text) == 3 and text.isdigit()
        elif kind == "grammar":
            assert text in ("ab", "cd")
        elif kind in ("format", "json_schema"):
            import json

            if resp.responses[0].stop_reason == up.EOS_TOKEN:  # complete: valid JSON
                value = json.loads(text)
                if kind == "json_schema":
                    assert isinstance(value["a"], int)
            else:  # cut by max_new_tokens: a JSON object's beginning
                assert text.lstrip().startswith("{"), text
    with pytest.raises(grpc.RpcError) as e:
        client.Generate(batched(up, ["x"], decoding={"choice": {}}, **GEN), timeout=60)
    assert e.value.code() == SC.INVALID_ARGUMENT


@pytest.mark.parametrize("proto", NAMES)
def test_empty_requests_are_ok_with_no_responses(clients, ups, proto):
    up, client = ups[proto], clients[proto]
    assert list(client.Generate(up.BatchedGenerationRequest(model_id="whatever"), timeout=30).responses) == []
    # TGIS answers before it looks at the parameters
    bad = up.BatchedGenerationRequest(params=params(up, stopping={"max_new_tokens": 5, "min_new_tokens": 9}))
    assert list(client.Generate(bad, timeout=30).responses) == []


@pytest.mark.parametrize("proto", NAMES)
def test_model_id_ignored_by_tokenize_and_model_info(clients, ups, proto):
    up, client = ups[proto], clients[proto]
    info = client.ModelInfo(up.ModelInfoRequest(model_id="not-this-one"), timeout=30)
    assert info.max_sequence_length == 1024 and info.model_kind == 0
    tok = client.Tokenize(up.BatchedTokenizeRequest(model_id="other", requests=[up.TokenizeRequest(text="hi")],
                                                   return_tokens=True), timeout=30)
    assert tok.responses[0].token_count >= 1


def test_tokenize_adapter_fields(clients, ups):
    up, client = ups["vllm_tgis_adapter"], clients["vllm_tgis_adapter"]
    req = up.BatchedTokenizeRequest(requests=[up.TokenizeRequest(text="hi")], adapter_id="nope")
    with pytest.raises(grpc.RpcError) as e:
        client.Tokenize(req, timeout=30)
    assert e.value.code() == SC.INVALID_ARGUMENT and "no adapter 'nope' is loaded" in e.value.details()
    ok = client.Tokenize(up.BatchedTokenizeRequest(requests=[up.TokenizeRequest(text="hi")], adapter_id=ADAPTER),
                         timeout=30)
    assert ok.responses[0].token_count >= 1


def test_strict_model_id_keeps_not_found(base_artifact, ups):
    st = _serve(base_artifact, strict_model_id=True, warmup=False)
    try:
        with grpc.insecure_channel(st.target) as channel:
            up = ups["ibm_tgis"]
            client = UpstreamClient(up, channel)
            for call in (lambda: client.Generate(batched(up, ["x"], model_id="nope", **GEN), timeout=30),
                         lambda: list(client.GenerateStream(single(up, "x", model_id="nope", **GEN), timeout=30)),
                         lambda: client.ModelInfo(up.ModelInfoRequest(model_id="nope"), timeout=30),
                         lambda: client.Tokenize(up.BatchedTokenizeRequest(model_id="nope"), timeout=30)):
                code, details = _code(call)
                assert code == SC.NOT_FOUND and "nope" in details
            assert client.Generate(batched(up, ["x"], model_id=st.server.model_id, **GEN), timeout=30).responses
    finally:
        st.stop()


# ============================================================================ seeds

@pytest.mark.parametrize("proto", NAMES)
def test_server_chosen_seed_is_echoed_and_below_2_63(clients, ups, proto):
    up, client = ups[proto], clients[proto]
    kw = dict(method="SAMPLE", stopping={"max_new_tokens": 4})
    msgs = list(client.GenerateStream(single(up, "Hello", **kw), timeout=60))
    seed = msgs[0].seed
    assert 0 < seed < 2**63
    assert msgs[-1].seed == seed and msgs[-1].stop_reason != 0  # TGIS: the final message echoes it too
    assert all(m.seed == 0 for m in msgs[1:-1])
    unary = client.Generate(batched(up, ["Hello"], **kw), timeout=60).responses[0]
    assert 0 < unary.seed < 2**63
    # the echoed seed reproduces the output
    again = client.Generate(batched(up, ["Hello"], method="SAMPLE", sampling={"seed": unary.seed},
                                    stopping={"max_new_tokens": 4}), timeout=60).responses[0]
    assert (again.text, again.seed) == (unary.text, unary.seed)


@pytest.mark.parametrize("proto", NAMES)
def test_greedy_seed_is_zero_everywhere(clients, ups, proto):
    up, client = ups[proto], clients[proto]
    kw = dict(sampling={"seed": 77}, stopping={"max_new_tokens": 3})  # greedy: TGIS ignores the seed
    msgs = list(client.GenerateStream(single(up, "Hello", **kw), timeout=60))
    assert all(m.seed == 0 for m in msgs)
    assert client.Generate(batched(up, ["Hello"], **kw), timeout=60).responses[0].seed == 0


def test_user_seed_echoed_on_first_and_final(clients, ups):
    up, client = ups["ibm_tgis"], clients["ibm_tgis"]
    msgs = list(client.GenerateStream(single(up, "Hello", method="SAMPLE", sampling={"seed": 2**63 + 5},
                                             stopping={"max_new_tokens": 3}), timeout=60))
    assert msgs[0].seed == msgs[-1].seed == 2**63 + 5  # a client's own uint64 seed is echoed as given


def test_adapter_explicit_temperature_zero_is_greedy(clients, ups):
    up, client = ups["vllm_tgis_adapter"], clients["vllm_tgis_adapter"]
    greedy = client.Generate(batched(up, ["Hello"], stopping={"max_new_tokens": 6, "min_new_tokens": 6}),
                             timeout=60).responses[0]
    zero = client.Generate(batched(up, ["Hello"], method="SAMPLE", sampling={"temperature": 0.0},
                                   stopping={"max_new_tokens": 6, "min_new_tokens": 6}), timeout=60).responses[0]
    assert (zero.text, zero.seed) == (greedy.text, 0)


# ============================================================================ token strings and scores

def _vocab_strings(server, ids):
    tok = server.server.tokenizer
    return [tok.id_to_token(i) for i in ids]


@pytest.mark.parametrize("proto", NAMES)
def test_token_texts_are_vocabulary_strings(clients, ups, server, proto):
    up, client = ups[proto], clients[proto]
    prompt = "The capital of France is Paris"
    kw = dict(stopping={"max_new_tokens": 8, "min_new_tokens": 8},
              response={"generated_tokens": True, "input_tokens": True, "top_n_tokens": 2})
    resp = client.Generate(batched(up, [prompt], **kw), timeout=60).responses[0]
    tok = server.server.tokenizer
    ids = tok.encode(prompt)
    assert [t.text for t in resp.input_tokens] == _vocab_strings(server, ids)
    assert any(t.text.startswith("Ġ") for t in resp.input_tokens)  # 'Ġcapital', not ' capital'
    for t in resp.tokens:
        assert tok.token_to_id(t.text) is not None, t.text
        assert all(tok.token_to_id(top.text) is not None for top in t.top_tokens)
        assert len(t.top_tokens) == 2 and all(top.logprob == 0.0 for top in t.top_tokens)  # no token_logprobs
    tokenized = client.Tokenize(up.BatchedTokenizeRequest(requests=[up.TokenizeRequest(text=prompt)],
                                                         return_tokens=True), timeout=30)
    assert list(tokenized.responses[0].tokens) == [t.text for t in resp.input_tokens]


@pytest.mark.parametrize("proto", NAMES)
def test_input_token_scores(clients, ups, server, proto):
    """NaN for the first prompt token, real logprobs/ranks/top-n after (values: test_serve_tgis_scores.py)."""
    up, client = ups[proto], clients[proto]
    prompt = "The capital of France is Paris. The capital of Japan is"
    kw = dict(stopping={"max_new_tokens": 3, "min_new_tokens": 3},
              response={"input_tokens": True, "token_logprobs": True, "token_ranks": True, "top_n_tokens": 3})
    resp = client.Generate(batched(up, [prompt], **kw), timeout=60).responses[0]
    n = len(server.server.tokenizer.encode(prompt))
    assert resp.input_token_count == len(resp.input_tokens) == n
    first, rest = resp.input_tokens[0], resp.input_tokens[1:]
    assert math.isnan(first.logprob) and first.rank == 0 and len(first.top_tokens) == 0
    assert all(t.logprob <= 0 and math.isfinite(t.logprob) and t.rank >= 1 and len(t.top_tokens) == 3 for t in rest)
    assert all(t.top_tokens[0].logprob >= t.logprob for t in rest)
    assert len(resp.tokens) == 0  # generated_tokens not asked for
    # the stream: start message, then TGIS's dedicated input-token message, then the tokens
    msgs = list(client.GenerateStream(single(up, prompt, **kw), timeout=60))
    assert msgs[0].input_token_count == n and len(msgs[0].input_tokens) == 0
    assert msgs[1].input_token_count == n and len(msgs[1].input_tokens) == n
    for a, b in zip(msgs[1].input_tokens[1:], rest):
        assert (a.text, a.rank) == (b.text, b.rank) and a.logprob == pytest.approx(b.logprob, abs=1e-6)
    assert math.isnan(msgs[1].input_tokens[0].logprob)
    # without any detail asked, input tokens are only their strings (and no prompt scoring happens)
    plain = client.Generate(batched(up, [prompt], stopping={"max_new_tokens": 2}, response={"input_tokens": True}),
                            timeout=60).responses[0]
    assert [t.text for t in plain.input_tokens] == [t.text for t in resp.input_tokens]
    assert all(t.logprob == 0.0 and t.rank == 0 for t in plain.input_tokens)


def test_ranks_without_logprobs(clients, ups):
    up, client = ups["ibm_tgis"], clients["ibm_tgis"]
    resp = client.Generate(batched(up, ["Hello world, how are"], stopping={"max_new_tokens": 2},
                                   response={"input_tokens": True, "generated_tokens": True, "token_ranks": True}),
                           timeout=60).responses[0]
    assert resp.input_tokens[0].rank == 0 and resp.input_tokens[0].logprob == 0.0  # no NaN unless logprobs asked
    assert all(t.rank >= 1 and t.logprob == 0.0 for t in list(resp.input_tokens[1:]) + list(resp.tokens))


# ============================================================================ generation behaviour

@pytest.mark.parametrize("proto", NAMES)
def test_length_penalty_ends_generation_sooner(clients, ups, proto):
    up, client = ups[proto], clients[proto]
    base = client.Generate(batched(up, ["The capital of France is"], stopping={"max_new_tokens": 40}),
                           timeout=60).responses[0]
    pushed = client.Generate(batched(up, ["The capital of France is"], stopping={"max_new_tokens": 40},
                                     decoding={"length_penalty": {"start_index": 1, "decay_factor": 10.0}}),
                             timeout=60).responses[0]
    assert pushed.stop_reason == up.EOS_TOKEN
    assert pushed.generated_token_count < base.generated_token_count or base.stop_reason == up.EOS_TOKEN


def test_token_limit_when_max_new_tokens_exceeds_the_context(clients, ups, server):
    up, client = ups["ibm_tgis"], clients["ibm_tgis"]
    n = len(server.server.tokenizer.encode(LONG_TEXT))
    resp = client.Generate(batched(up, [LONG_TEXT], stopping={"max_new_tokens": 1023, "min_new_tokens": 1024 - n}),
                           timeout=120).responses[0]
    assert resp.stop_reason == up.TOKEN_LIMIT and resp.input_token_count + resp.generated_token_count == 1024


def test_time_limit(clients, ups):
    up, client = ups["ibm_tgis"], clients["ibm_tgis"]
    resp = client.Generate(batched(up, ["Hello"], stopping={"max_new_tokens": 1000, "min_new_tokens": 1000,
                                                            "time_limit_millis": 1}), timeout=60).responses[0]
    assert resp.stop_reason == up.TIME_LIMIT and resp.generated_token_count < 1000


def test_adapter_id_routes_to_the_adapter_artifact(clients, ups, adapter_artifact):
    up, client = ups["vllm_tgis_adapter"], clients["vllm_tgis_adapter"]
    kw = dict(stopping={"max_new_tokens": 12, "min_new_tokens": 12})
    prompts = ["Hello world", "The capital of France is", "def add(a, b):"]
    base = client.Generate(batched(up, prompts, **kw), timeout=60).responses
    lora = client.Generate(batched(up, prompts, adapter_id=ADAPTER, **kw), timeout=60).responses
    streamed = "".join(m.text for m in client.GenerateStream(single(up, prompts[1], adapter_id=ADAPTER, **kw),
                                                              timeout=60))
    assert streamed == lora[1].text
    assert [r.text for r in base] != [r.text for r in lora]
    # what the adapter artifact generates on its own server is what adapter_id returned
    alone = _serve(adapter_artifact, warmup=False)
    try:
        with grpc.insecure_channel(alone.target) as channel:
            own = UpstreamClient(up, channel).Generate(batched(up, prompts, **kw), timeout=60).responses
    finally:
        alone.stop()
    assert [r.text for r in own] == [r.text for r in lora]


def test_input_text_and_stream_equals_unary(clients, ups):
    up, client = ups["ibm_tgis"], clients["ibm_tgis"]
    kw = dict(method="SAMPLE", sampling={"seed": 3, "temperature": 0.8}, stopping={"max_new_tokens": 10},
              response={"input_text": True, "generated_tokens": True, "token_logprobs": True})
    msgs = list(client.GenerateStream(single(up, "Tell me", **kw), timeout=60))
    unary = client.Generate(batched(up, ["Tell me"], **kw), timeout=60).responses[0]
    assert msgs[0].text == "Tell me" and unary.text.startswith("Tell me")
    assert "".join(m.text for m in msgs) == unary.text
    assert [t.text for m in msgs for t in m.tokens] == [t.text for t in unary.tokens]
    assert msgs[-1].stop_reason == unary.stop_reason and msgs[-1].generated_token_count == unary.generated_token_count


def test_missing_stream_request_is_invalid(clients, ups):
    up, client = ups["ibm_tgis"], clients["ibm_tgis"]
    code, details = _code(lambda: list(client.GenerateStream(up.SingleGenerationRequest(), timeout=30)))
    assert code == SC.INVALID_ARGUMENT and "request" in details
