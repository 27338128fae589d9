"""Structured generation (serve/constraints.py): JSON, JSON schema, regex, choice, grammar and forced
Granite tool calls, through the scheduler and the chat gRPC service, on a tiny RANDOM-weight Granite.

A random model's free output is garbage (the tests check that it does not parse), so an output that
parses and validates did so because of the constraint.
"""

from __future__ import annotations

import json
import re
import threading

import grpc
import jsonschema
import pytest
from harness import run_concurrently

from granite_deploy.errors import InvalidField
from granite_deploy.serve import constraints as C
from granite_deploy.serve.constraints import ConstraintSpec, compile_constraint, grammar_tokenizer, openai_constraint
from granite_deploy.serve.generate import stream
from granite_deploy.serve.sampling import SamplingParams
from granite_deploy.serve.scheduler import Request, Scheduler
from granite_deploy.serve.stopping import StoppingParams, StopReason
from granite_deploy.serve.tool_calls import parse_tool_calls

PROMPTS = ["hello", "def add(a, b):", "The weather in Paris is", "Write JSON:", "1, 2, 3,"]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12},
                       "unit": {"enum": ["celsius", "fahrenheit"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "search_flights", "parameters": {
        "type": "object",
        "properties": {"origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                       "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                       "passengers": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["origin", "destination"]}}},
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


# ============================================================================ fixtures and helpers

@pytest.fixture(scope="module")
def structured_artifact(tiny_checkpoint, tmp_path_factory):
    from granite_deploy.export.exporter import export

    return export(str(tiny_checkpoint), tmp_path_factory.mktemp("structured-artifact") / "tiny", validate=False)


@pytest.fixture(scope="module")
def tokenizer(structured_artifact):
    from granite_deploy.serve.tokenizer import GraniteTokenizer

    return GraniteTokenizer.from_dir(structured_artifact)


@pytest.fixture(scope="module")
def engine(structured_artifact):
    from granite_deploy.engines import load_engine

    return load_engine(structured_artifact, engine="onnxruntime-cpu", max_batch=8, threads=1)


@pytest.fixture(scope="module")
def scheduler(engine, tokenizer):
    s = Scheduler(engine, tokenizer).start()
    yield s
    s.shutdown(10)


def _request(tokenizer, prompt, spec, temperature=0.0, seed=0, **stopping):
    stopping.setdefault("max_new_tokens", 200)
    return Request(tuple(tokenizer.encode(prompt)), SamplingParams(temperature=temperature, seed=seed),
                   StoppingParams(**stopping), constraint=spec)


def _run(scheduler, request):
    """(text, token ids, final event)."""
    text, ids = "", []
    for ev in stream(scheduler, request):
        if ev.kind == "token":
            text += ev.text
            ids.append(ev.token.token_id)
        elif ev.kind == "final":
            return text, ids, ev


def _cases():
    """(prompt, temperature, seed): greedy and sampled, several prompts and seeds."""
    return [(p, 0.0, 0) for p in PROMPTS] + [(p, 1.0, seed) for p in PROMPTS[:3] for seed in (1, 2, 3)]


def _parses(text: str) -> bool:
    """Whether the text is a JSON object (a random model may well write a bare number)."""
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


# ============================================================================ compilation, errors, mapping

def test_tiny_tokenizer_has_granite_tool_call_tokens(tokenizer):
    gt = grammar_tokenizer(tokenizer)
    assert gt.open_id == tokenizer.token_to_id("<tool_call>") is not None
    assert gt.close_id == tokenizer.token_to_id("</tool_call>") == gt.open_id + 1
    assert tokenizer.encode("<tool_call>") == [gt.open_id]  # one vocabulary token, not special:
    assert tokenizer.decode([gt.open_id], skip_special_tokens=True) == "<tool_call>"
    assert gt.eos_token_ids == (tokenizer.eos_token_id,)
    assert gt.vocab_size == tokenizer.vocab_size


@pytest.mark.parametrize("spec, field, reason", [
    (ConstraintSpec("json_schema", '{"type": "object", "if": {"required": ["a"]}}', field="response_format"),
     "response_format", 'Unimplemented keys: ["if"]'),
    (ConstraintSpec("json_schema", '{"type": "strin"}', field="decoding.json_schema"), "decoding.json_schema",
     "strin"),
    (ConstraintSpec("json_schema", "{not json", field="s"), "s", "not valid JSON"),
    (ConstraintSpec("json_schema", "[1, 2]", field="s"), "s", "must be a JSON object"),
    (ConstraintSpec("json_schema", "", field="s"), "s", "empty"),
    (ConstraintSpec("regex", "a(b", field="guided_regex"), "guided_regex", "unclosed group"),
    (ConstraintSpec("grammar", "start: foo", field="guided_grammar"), "guided_grammar", 'unknown name: "foo"'),
    (ConstraintSpec("choice", field="guided_choice"), "guided_choice", "no choices"),
    (ConstraintSpec("choice", choices=("a", ""), field="guided_choice"), "guided_choice.choices[1]", "non-empty"),
    (ConstraintSpec("tool_call", tools=tuple(TOOLS), tool_name="nope", field="tool_choice"), "tool_choice",
     "'nope', which is not one of the given tools"),
    (ConstraintSpec("tool_call", field="tool_choice"), "tool_choice", "no tools"),
    (ConstraintSpec("tool_call", tools=({"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "object", "dependentRequired": {"x": ["y"]}}}}}},),
        field="tools"), "tools", "dependentRequired"),
    (ConstraintSpec("jsn"), "constraint", "unknown constraint kind 'jsn'"),
])
def test_invalid_constraints_are_refused_naming_the_field(tokenizer, scheduler, spec, field, reason):
    with pytest.raises(InvalidField) as exc:
        compile_constraint(spec, tokenizer)
    assert exc.value.field == field and reason in str(exc.value), str(exc.value)
    # through the scheduler: refused at submit, before any event reaches the sink
    events = []
    with pytest.raises(InvalidField) as exc2:
        scheduler.submit(_request(tokenizer, "hello", spec), events.append)
    assert exc2.value.field == field and not events


def test_compiled_constraints_are_cached_by_hash(tokenizer):
    a = compile_constraint(ConstraintSpec("json_schema", json.dumps(PERSON), field="x"), tokenizer)
    b = compile_constraint(ConstraintSpec("json_schema", json.dumps(PERSON), field="y"), tokenizer)
    c = compile_constraint(ConstraintSpec("json_schema", json.dumps({**PERSON, "required": ["name", "age"]})), tokenizer)
    assert a._template is b._template and a.key == b.key and b.spec.field == "y"
    assert c.key != a.key and c._template is not a._template


def test_compilation_has_a_time_limit(tokenizer, monkeypatch):
    release = threading.Event()
    real = C._build

    def slow_build(grammar, gt):
        release.wait(30)
        return real(grammar, gt)

    monkeypatch.setattr(C, "_build", slow_build)
    try:
        with pytest.raises(InvalidField) as exc:
            compile_constraint(ConstraintSpec("regex", "[0-9]{1,7}x", field="guided_regex"), tokenizer, timeout_s=0.05)
        assert exc.value.field == "guided_regex" and "longer than 0.05 s to compile" in exc.value.problem
    finally:
        release.set()


def test_openai_shaped_mapping():
    assert openai_constraint() is None
    assert openai_constraint({"type": "text"}, "auto", TOOLS) is None
    assert openai_constraint({"type": "json_object"}) == ConstraintSpec("json", field="response_format")
    strict = openai_constraint({"type": "json_schema", "json_schema": {
        "name": "p", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "object"}}}}})
    assert strict.kind == "json_schema" and strict.field == "response_format.json_schema.schema"
    assert json.loads(strict.value) == {"type": "object", "additionalProperties": False,
                                        "properties": {"a": {"type": "object", "additionalProperties": False}}}
    loose = openai_constraint({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}})
    assert json.loads(loose.value) == {"type": "object"}
    assert openai_constraint(None, "required", TOOLS) == ConstraintSpec("tool_call", tools=tuple(TOOLS),
                                                                        field="tool_choice")
    named = openai_constraint(None, {"type": "function", "function": {"name": "ping"}}, TOOLS)
    assert named.kind == "tool_call" and named.tool_name == "ping"
    assert openai_constraint(None, "none", TOOLS) == ConstraintSpec("no_tool_call", field="tool_choice")
    assert openai_constraint(None, "none", None) is None  # nothing to forbid
    assert openai_constraint({"type": "regex", "regex": "a+"}).kind == "regex"
    assert openai_constraint({"type": "choice", "choices": ["x"]}).choices == ("x",)
    for args, field in [
        (({"type": "json_object"}, "required", TOOLS), "response_format"),
        ((None, "required", None), "tool_choice"),
        ((None, "sometimes", TOOLS), "tool_choice"),
        ((None, {"type": "function"}, TOOLS), "tool_choice"),
        (({"type": "yaml"},), "response_format.type"),
        (({"type": "json_schema"},), "response_format.json_schema"),
    ]:
        with pytest.raises(InvalidField) as exc:
            openai_constraint(*args)
        assert exc.value.field == field


# ============================================================================ through the scheduler

def test_unconstrained_random_model_output_is_not_json(scheduler, tokenizer):
    for prompt, temperature, seed in _cases()[:6]:
        text, _, final = _run(scheduler, _request(tokenizer, prompt, None, temperature, seed, max_new_tokens=60))
        assert not _parses(text), text


def test_json_schema_outputs_validate(scheduler, tokenizer):
    spec = ConstraintSpec("json_schema", json.dumps(PERSON), field="response_format")
    outputs = set()
    for prompt, temperature, seed in _cases():
        text, _, final = _run(scheduler, _request(tokenizer, prompt, spec, temperature, seed))
        assert final.stop_reason == StopReason.EOS_TOKEN, (prompt, seed, text)
        jsonschema.validate(json.loads(text), PERSON)
        assert text.startswith('{"name": "')  # Granite's separators (the chat template's tojson)
        outputs.add(text)
    assert len(outputs) > 5  # really different outputs, not one lucky string


def test_json_object_outputs_parse(scheduler, tokenizer):
    spec = ConstraintSpec("json")
    done = 0
    for prompt, temperature, seed in _cases():
        text, _, final = _run(scheduler, _request(tokenizer, prompt, spec, temperature, seed, max_new_tokens=150))
        if final.stop_reason == StopReason.EOS_TOKEN:
            assert isinstance(json.loads(text), dict), text
            done += 1
        else:  # a random model may write a very long object: it is then a valid prefix, and says so
            assert final.stop_reason == StopReason.CONSTRAINT_UNMET and text.startswith("{") and not _parses(text)
    assert done >= 3


@pytest.mark.parametrize("spec, check", [
    (ConstraintSpec("regex", r"(yes|no), [0-9]{3}-[a-z]{2,5}"),
     lambda t: re.fullmatch(r"(yes|no), [0-9]{3}-[a-z]{2,5}", t)),
    (ConstraintSpec("choice", choices=("red", "green", "blue", "dark blue")),
     lambda t: t in ("red", "green", "blue", "dark blue")),
    (ConstraintSpec("grammar", 'start: expr\nexpr: NUM (OP NUM){0,3}\nOP: " + " | " * "\nNUM: /[1-9][0-9]{0,2}/\n'),
     lambda t: re.fullmatch(r"[1-9][0-9]{0,2}(( \+ | \* )[1-9][0-9]{0,2}){0,3}", t)),
    (ConstraintSpec("grammar", 'root ::= "call(" arg ("," arg)? ")"\narg ::= [a-z] [a-z0-9]? [a-z0-9]?'),
     lambda t: re.fullmatch(r"call\([a-z][a-z0-9]{0,2}(,[a-z][a-z0-9]{0,2})?\)", t)),  # GBNF is accepted too
])
def test_regex_choice_grammar_outputs_match(scheduler, tokenizer, spec, check):
    for prompt, temperature, seed in _cases():
        text, _, final = _run(scheduler, _request(tokenizer, prompt, spec, temperature, seed, max_new_tokens=60))
        assert final.stop_reason in (StopReason.EOS_TOKEN, StopReason.MAX_TOKENS), (text, final.stop_reason)
        if final.stop_reason == StopReason.EOS_TOKEN or spec.kind != "grammar":
            assert check(text), (prompt, seed, text)


def _check_calls(text, ids, tokenizer, names=None):
    parsed = parse_tool_calls(text)
    assert not parsed.malformed and parsed.content == "" and parsed.tool_calls, text
    gt = grammar_tokenizer(tokenizer)
    assert ids[0] == gt.open_id and gt.close_id in ids  # the single vocabulary tokens, as Granite writes them
    assert text.startswith('<tool_call>\n{"name": "') and text.endswith("}\n</tool_call>")
    for call in parsed.tool_calls:
        assert call.name in (names or TOOL_SCHEMAS)
        jsonschema.validate(call.arguments, TOOL_SCHEMAS[call.name])
        assert set(call.arguments) <= set(TOOL_SCHEMAS[call.name]["properties"])  # strict: no extra keys
    return parsed.tool_calls


def test_forced_tool_calls_named_and_required(scheduler, tokenizer):
    seen = set()
    for name in ("get_weather", "search_flights", "ping"):
        spec = ConstraintSpec("tool_call", tools=tuple(TOOLS), tool_name=name, field="tool_choice")
        for prompt, temperature, seed in _cases()[::2]:
            text, ids, final = _run(scheduler, _request(tokenizer, prompt, spec, temperature, seed, max_new_tokens=150))
            assert final.stop_reason == StopReason.EOS_TOKEN, text
            calls = _check_calls(text, ids, tokenizer, names=[name])
            assert len(calls) == 1
    spec = ConstraintSpec("tool_call", tools=tuple(TOOLS), field="tool_choice")
    for prompt, temperature, seed in _cases():
        text, ids, final = _run(scheduler, _request(tokenizer, prompt, spec, temperature, seed, max_new_tokens=300))
        if final.stop_reason == StopReason.EOS_TOKEN:
            seen.update(c.name for c in _check_calls(text, ids, tokenizer))
        else:  # one or more calls: a random model may keep calling until max_new_tokens
            assert final.stop_reason == StopReason.CONSTRAINT_UNMET
    assert len(seen) >= 2


def test_no_tool_call_never_opens_one(scheduler, tokenizer):
    gt = grammar_tokenizer(tokenizer)
    spec = ConstraintSpec("no_tool_call", field="tool_choice")
    for prompt, temperature, seed in _cases():
        text, ids, final = _run(scheduler, _request(tokenizer, prompt, spec, temperature, seed, max_new_tokens=80))
        assert gt.open_id not in ids and "<tool_call>" not in text


def test_constraint_with_stop_sequences_and_max_tokens(scheduler, tokenizer):
    spec = ConstraintSpec("json_schema", json.dumps(PERSON))
    full, full_ids, final = _run(scheduler, _request(tokenizer, "hello", spec))
    assert final.stop_reason == StopReason.EOS_TOKEN
    # a stop sequence inside the constrained text stops there (and the constraint does not complain)
    text, _, final = _run(scheduler, _request(tokenizer, "hello", spec, stop_sequences=('"age"',)))
    assert final.stop_reason == StopReason.STOP_SEQUENCE and final.stop_sequence == '"age"'
    assert text == full[: full.index('"age"')]
    # max_new_tokens before the object is complete: a valid prefix, and the reason says so
    text, ids, final = _run(scheduler, _request(tokenizer, "hello", spec, max_new_tokens=5))
    assert final.stop_reason == StopReason.CONSTRAINT_UNMET and ids == full_ids[:5] and full.startswith(text)
    # max_new_tokens exactly at completion: complete, so an ordinary stop
    text, _, final = _run(scheduler, _request(tokenizer, "hello", spec, max_new_tokens=len(full_ids)))
    assert text == full and final.stop_reason in (StopReason.EOS_TOKEN, StopReason.MAX_TOKENS)
    # a regex that is complete but could go on: max tokens is a plain MAX_TOKENS
    text, _, final = _run(scheduler, _request(tokenizer, "hello", ConstraintSpec("regex", "[a-z]+"), max_new_tokens=4))
    assert final.stop_reason in (StopReason.MAX_TOKENS, StopReason.EOS_TOKEN) and re.fullmatch("[a-z]+", text)
    # min_new_tokens cannot force a finished grammar on: the constraint ends it
    text, _, final = _run(scheduler, _request(tokenizer, "hello", ConstraintSpec("choice", choices=("yes", "no")),
                                              min_new_tokens=20))
    assert text in ("yes", "no") and final.stop_reason == StopReason.EOS_TOKEN


def test_batched_masks_equal_one_at_a_time(engine, tokenizer, scheduler):
    specs = [ConstraintSpec("json_schema", json.dumps(PERSON)), None,
             ConstraintSpec("tool_call", tools=tuple(TOOLS), tool_name="get_weather"),
             ConstraintSpec("regex", r"[a-z]{3,8}( [a-z]{2,6}){2}"), None,
             ConstraintSpec("choice", choices=("alpha", "beta")),
             ConstraintSpec("tool_call", tools=tuple(TOOLS)), ConstraintSpec("json")]
    requests = [_request(tokenizer, PROMPTS[i % len(PROMPTS)], spec, 1.0 if i % 2 else 0.0, i, max_new_tokens=60)
                for i, spec in enumerate(specs)]
    alone = [_run(scheduler, r) for r in requests]
    together = run_concurrently(engine, tokenizer, requests)
    for (text, ids, final), (ids2, text2, final2) in zip(alone, together):
        assert (ids2, text2, final2.stop_reason) == (ids, text, final.stop_reason)


# ============================================================================ through the chat gRPC service

@pytest.fixture(scope="module")
def chat(structured_artifact):
    from granite_deploy.protos import granite_chat_pb2_grpc as cg
    from granite_deploy.serve.server import ServerConfig, ServerThread

    st = ServerThread(ServerConfig(str(structured_artifact), host="127.0.0.1", port=0, threads=1, max_batch=4))
    channel = grpc.insecure_channel(st.target)
    yield cg.ChatServiceStub(channel)
    channel.close()
    st.stop()


def _chat_request(**kw):
    from granite_deploy.protos import granite_chat_pb2 as c

    tools = [c.Tool(type="function", function=c.FunctionDefinition(
        name=t["function"]["name"], description=t["function"].get("description", ""),
        parameters_json=json.dumps(t["function"]["parameters"]))) for t in TOOLS]
    conv = c.Conversation(messages=[c.ChatMessage(role="user", content=kw.pop("content", "Weather in Paris?"))],
                          tools=tools if kw.pop("with_tools", True) else [])
    kw.setdefault("max_new_tokens", 200)
    return c.ChatRequest(conversation=conv, **kw)


def test_chat_response_formats(chat):
    from granite_deploy.protos import granite_chat_pb2 as c

    rf = c.ResponseFormat(json_schema=c.ResponseFormat.JsonSchema(name="person", schema_json=json.dumps(PERSON)))
    for seed, temperature in ((0, 0.0), (5, 1.0), (6, 1.0)):
        out = chat.Chat(_chat_request(response_format=rf, seed=seed, temperature=temperature), timeout=60)
        jsonschema.validate(json.loads(out.content), PERSON)
        assert out.stop_reason == c.EOS_TOKEN and not out.tool_calls
    out = chat.Chat(_chat_request(response_format=c.ResponseFormat(regex="[A-Z][a-z]{2,6}!")), timeout=60)
    assert re.fullmatch("[A-Z][a-z]{2,6}!", out.content)
    out = chat.Chat(_chat_request(response_format=c.ResponseFormat(
        choice=c.ResponseFormat.Choice(choices=["sunny", "rainy"]))), timeout=60)
    assert out.content in ("sunny", "rainy")
    out = chat.Chat(_chat_request(response_format=rf, max_new_tokens=4), timeout=60)
    assert out.stop_reason == c.CONSTRAINT_UNMET and out.completion_token_count == 4


def test_chat_forced_tool_calls_streamed_and_unary(chat):
    from granite_deploy.protos import granite_chat_pb2 as c

    for choice in (c.ToolChoice(function_name="get_weather"), c.ToolChoice(mode=c.ToolChoice.REQUIRED)):
        for seed, temperature in ((0, 0.0), (3, 1.0)):
            req = _chat_request(tool_choice=choice, seed=seed, temperature=temperature, max_new_tokens=300)
            unary = chat.Chat(req, timeout=60)
            events = list(chat.ChatStream(req, timeout=60))
            streamed = [e.tool_call for e in events if e.WhichOneof("event") == "tool_call"]
            if unary.stop_reason == c.CONSTRAINT_UNMET:  # REQUIRED may go on calling past max_new_tokens
                assert choice.mode == c.ToolChoice.REQUIRED
                continue
            assert unary.stop_reason == c.EOS_TOKEN and unary.content == "" and unary.tool_calls
            assert [(t.name, t.arguments_json) for t in streamed] == [
                (t.name, t.arguments_json) for t in unary.tool_calls]
            for call in unary.tool_calls:
                assert call.name == "get_weather" or not choice.function_name
                jsonschema.validate(json.loads(call.arguments_json), TOOL_SCHEMAS[call.name])


def test_chat_tool_choice_none_and_invalid_requests(chat):
    from granite_deploy.protos import granite_chat_pb2 as c

    out = chat.Chat(_chat_request(tool_choice=c.ToolChoice(mode=c.ToolChoice.NONE), max_new_tokens=40), timeout=60)
    assert not out.tool_calls and "<tool_call>" not in out.content
    bad = [
        (_chat_request(response_format=c.ResponseFormat(json_schema=c.ResponseFormat.JsonSchema(
            schema_json='{"type": "object", "if": {}}'))), "response_format.json_schema.schema_json"),
        (_chat_request(response_format=c.ResponseFormat(regex="(")), "response_format.regex"),
        (_chat_request(response_format=c.ResponseFormat(grammar="start: nope")), "response_format.grammar"),
        (_chat_request(tool_choice=c.ToolChoice(function_name="nope")), "tool_choice"),
        (_chat_request(tool_choice=c.ToolChoice(mode=c.ToolChoice.REQUIRED), with_tools=False), "tool_choice"),
        (_chat_request(tool_choice=c.ToolChoice(mode=c.ToolChoice.NONE, function_name="ping")),
         "tool_choice.function_name"),
        (_chat_request(tool_choice=c.ToolChoice(mode=c.ToolChoice.REQUIRED),
                       response_format=c.ResponseFormat(json_object=c.ResponseFormat.JsonObject())),
         "response_format"),
    ]
    for req, field in bad:
        for call in (chat.Chat, lambda r, timeout: list(chat.ChatStream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as exc:
                call(req, timeout=60)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert exc.value.details().startswith(field + ":"), exc.value.details()
