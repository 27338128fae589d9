"""The OpenAI API's wire shapes on plain data (no server): parameter policy, error bodies and
statuses, chat/completion chunk building with tool calls and logprobs."""

from __future__ import annotations

import json
import random

import pytest

from granite_deploy.errors import InvalidField, NotFound, Overloaded, TooLarge, Unavailable
from granite_deploy.serve import openai_protocol as p
from granite_deploy.serve.sampling import SampledToken
from granite_deploy.serve.scheduler import Event
from granite_deploy.serve.stopping import StopReason

MSG = [{"role": "user", "content": "hi"}]


def _err(body, model=p.ChatCompletionRequest) -> p.OpenAIError:
    with pytest.raises(p.OpenAIError) as info:
        p.parse_request(body, model)
    return info.value


# ============================================================================ parameters

def test_supported_parameters_parse():
    r = p.parse_request({"model": "m", "messages": MSG, "max_tokens": 5, "temperature": 0, "top_p": 0.5,
                         "seed": 3, "stop": ["x"], "n": 2, "logprobs": True, "top_logprobs": 3,
                         "stream": True, "stream_options": {"include_usage": True},
                         "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                         "tool_choice": {"type": "function", "function": {"name": "f"}},
                         "documents": [{"doc_id": "1", "text": "t"}], "frequency_penalty": 0,
                         "presence_penalty": 0.0, "logit_bias": {}, "user": "u", "parallel_tool_calls": True},
                        p.ChatCompletionRequest)
    assert r.n == 2 and r.top_logprobs == 3 and r.tool_choice.function.name == "f"
    c = p.parse_request({"model": "m", "prompt": [1, 2, 3], "echo": True, "suffix": None}, p.CompletionRequest)
    assert c.prompt == [1, 2, 3]


@pytest.mark.parametrize("body, param, code", [
    ({"messages": MSG, "functions": []}, "functions", "unsupported_parameter"),
    ({"messages": MSG, "audio": {}}, "audio", "unsupported_parameter"),
    ({"messages": MSG, "bogus": 1}, "bogus", "unknown_parameter"),
    ({"messages": MSG, "frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
    ({"messages": MSG, "presence_penalty": -1}, "presence_penalty", "unsupported_parameter"),
    ({"messages": MSG, "logit_bias": {"1": 2}}, "logit_bias", "unsupported_parameter"),
    ({"messages": MSG, "logprobs": True, "top_logprobs": 6}, "top_logprobs", "unsupported_parameter"),
    ({"messages": MSG, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"messages": MSG, "parallel_tool_calls": False}, "parallel_tool_calls", "unsupported_parameter"),
    ({"messages": MSG, "store": True}, "store", "unsupported_parameter"),
    ({"messages": MSG, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"messages": MSG, "tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice.function.name", "invalid_value"),
    ({"messages": MSG, "temperature": 3}, "temperature", "invalid_value"),
    ({"messages": MSG, "n": 0}, "n", "invalid_value"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
    ({}, "messages", "missing_required_parameter"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra", "unknown_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]},
     "messages[0].content[1].type", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "invalid_value"),
    ({"messages": MSG, "stop": ["a", ""]}, "stop", "invalid_value"),
    ({"messages": MSG, "response_format": {"type": "json_schema"}}, "response_format.json_schema", "invalid_value"),
    ({"messages": MSG, "response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
    ({"messages": MSG, "guided_regex": "a", "guided_choice": ["a"]}, "guided_json", "invalid_value"),
])
def test_refused_parameters_name_the_field(body, param, code):
    err = _err(body)
    assert err.status == 400
    assert err.param == param
    assert err.code == code
    assert err.body()["error"]["param"] == param
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert err.message.startswith(param)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "suffix": "y", "echo": True}, "suffix"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "messages": MSG}, "messages"),
])
def test_refused_completion_parameters(body, param):
    err = _err(body, p.CompletionRequest)
    assert (err.status, err.param) == (400, param)


def test_body_must_be_an_object():
    assert _err([1, 2]).status == 400


# ============================================================================ errors

def test_error_mapping_by_class():
    cases = [(InvalidField("messages[0].content", "bad"), 400, "messages[0].content"),
             (TooLarge("messages", "too big"), 413, "messages"),
             (NotFound("model: 'x' is not served here"), 404, "model"),
             (Overloaded("full"), 429, None),
             (Unavailable("draining"), 503, None),
             (RuntimeError("boom"), 500, None)]
    for exc, status, param in cases:
        err = p.error_from_exception(exc)
        assert err.status == status, exc
        assert err.param == param
    assert p.error_from_exception(Overloaded("x")).headers["Retry-After"] == str(p.RETRY_AFTER_S)
    assert "boom" not in p.error_from_exception(RuntimeError("boom")).message  # no internals leak


def test_finish_reasons():
    assert p.finish_reason(StopReason.EOS_TOKEN) == "stop"
    assert p.finish_reason(StopReason.STOP_SEQUENCE) == "stop"
    assert p.finish_reason(StopReason.EOS_TOKEN, tool_calls=1) == "tool_calls"
    assert p.finish_reason(StopReason.MAX_TOKENS) == "length"
    assert p.finish_reason(StopReason.TOKEN_LIMIT) == "length"


# ============================================================================ messages

def test_message_dicts_join_text_parts_and_keep_tool_call_arguments_verbatim():
    r = p.parse_request({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}]}, p.ChatCompletionRequest)
    m = p.message_dicts(r.messages)
    assert m[0] == {"role": "system", "content": "a\nb"}
    assert m[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert m[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}


# ============================================================================ chat chunks

class _Tok:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids)


def _events(pieces, reason=StopReason.EOS_TOKEN, logprobs=False):
    out = [Event("start", prompt_token_count=7)]
    for i, text in enumerate(pieces):
        tok = SampledToken(i, logprob=-0.5 - i, rank=1, top_tokens=[(i, -0.5 - i), (99, -3.0)]) if logprobs \
            else SampledToken(i)
        out.append(Event("token", text=text, token=tok, generated_count=i + 1))
    out.append(Event("final", generated_count=len(pieces), prompt_token_count=7, stop_reason=reason))
    return out


CALL_TEXT = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _split(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def test_tool_call_deltas_in_openai_chunk_shape():
    ids = iter(["call_a", "call_b"])
    s = p.ChatChoiceStream(0, call_id=lambda: next(ids))
    events = _events(_split(CALL_TEXT, random.Random(1)))
    choices = []
    for e in events:
        choices += s.events([e])
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    calls = [c["delta"]["tool_calls"][0] for c in choices if "tool_calls" in c["delta"]]
    assert calls == [{"index": 0, "id": "call_a", "type": "function",
                      "function": {"name": "get_weather", "arguments": ""}},
                     {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]
    assert "".join(c["delta"].get("content", "") for c in choices) == "Sure."
    assert choices[-1]["finish_reason"] == "tool_calls" and choices[-1]["delta"] == {}
    assert all(c["finish_reason"] is None for c in choices[:-1])
    msg = p.accumulate_chat(choices, 0)
    assert msg["message"]["content"] == "Sure."
    assert msg["message"]["tool_calls"] == [{"id": "call_a", "type": "function",
                                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert msg["finish_reason"] == "tool_calls"


def test_any_split_gives_the_same_message():
    text = CALL_TEXT + "\n" + CALL_TEXT.replace("Sure.\n", "").replace("Paris", "Rome")
    first = None
    for seed in range(8):
        n = iter(range(100))
        s = p.ChatChoiceStream(0, call_id=lambda: f"call_{next(n)}")
        choices = []
        for e in _events(_split(text, random.Random(seed))):
            choices += s.events([e])
        msg = p.accumulate_chat(choices, 0)
        assert [c["function"]["name"] for c in msg["message"]["tool_calls"]] == ["get_weather", "get_weather"]
        assert [json.loads(c["function"]["arguments"])["city"] for c in msg["message"]["tool_calls"]] == \
            ["Paris", "Rome"]
        indexes = [c["delta"]["tool_calls"][0]["index"] for c in choices if "tool_calls" in c["delta"]]
        assert indexes == [0, 0, 1, 1]
        first = first or msg
        assert msg == first


def test_tool_choice_none_keeps_the_text():
    s = p.ChatChoiceStream(0, parse_tools=False)
    choices = []
    for e in _events([CALL_TEXT]):
        choices += s.events([e])
    msg = p.accumulate_chat(choices, 0)
    assert msg["message"]["content"] == CALL_TEXT and "tool_calls" not in msg["message"]
    assert msg["finish_reason"] == "stop"


def test_chat_logprobs_ride_on_chunks():
    s = p.ChatChoiceStream(0, p.TokenText(_Tok()), logprobs=True, top_logprobs=2)
    choices = []
    for e in _events(["a", "", "b"], logprobs=True):
        choices += s.events([e])
    msg = p.accumulate_chat(choices, 0)
    content = msg["logprobs"]["content"]
    assert [c["token"] for c in content] == ["<0>", "<1>", "<2>"]
    assert [c["logprob"] for c in content] == [-0.5, -1.5, -2.5]
    assert content[0]["top_logprobs"] == [{"token": "<0>", "logprob": -0.5, "bytes": list(b"<0>")},
                                          {"token": "<99>", "logprob": -3.0, "bytes": list(b"<99>")}]
    assert content[1]["bytes"] == list(b"<1>")


def test_completion_chunks_and_legacy_logprobs():
    s = p.CompletionChoiceStream(0, p.TokenText(_Tok()), logprobs=1, prefix="P:")
    choices = []
    for e in _events(["ab", "c"], StopReason.MAX_TOKENS, logprobs=True):
        choices += s.events([e])
    out = p.accumulate_completion(choices, 0)
    assert out["text"] == "P:abc" and out["finish_reason"] == "length"
    assert out["logprobs"]["tokens"] == ["<0>", "<1>"]
    assert out["logprobs"]["token_logprobs"] == [-0.5, -1.5]
    assert out["logprobs"]["top_logprobs"] == [{"<0>": -0.5}, {"<1>": -1.5}]
    assert out["logprobs"]["text_offset"] == [2, 4]


def test_usage_shape():
    assert p.usage_dict(5, 3, 2) == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                                     "prompt_tokens_details": {"cached_tokens": 2}}


def test_http_api_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import granite_deploy.serve.openai_api, granite_deploy.serve.server\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_chunk_encoder_bytes_parse_to_the_chunk():
    enc = p.ChunkEncoder("chatcmpl-1", "chat.completion.chunk", 7, "m", include_usage=True)
    choice = {"index": 0, "delta": {"content": "é\n"}, "logprobs": None, "finish_reason": None}
    raw = enc.choice(choice)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n") == 2
    assert json.loads(raw[6:]) == p.chat_chunk("chatcmpl-1", 7, "m", [choice], None, True)
    assert p.ChunkEncoder.DONE == b"data: [DONE]\n\n"
