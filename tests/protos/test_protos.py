"""The gRPC contracts in protos/: committed stubs are fresh, fmaas field numbers are
IBM's (SERVING.md), granite.v1 is frozen, and the stubs work over a real grpc.aio server."""

from __future__ import annotations

import asyncio
import importlib.util
import re

import grpc
import pytest
from google.protobuf import descriptor_pb2

from granite_deploy.protos import (
    generate,
    generation_pb2,
    generation_pb2_grpc,
    granite_chat_pb2,
    granite_chat_pb2_grpc,
)

# ---------------------------------------------------------------------------
# (a) The committed stubs are exactly what the committed .proto files generate.


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpc_tools (grpcio-tools, a dev extra) is not installed: cannot regenerate the stubs",
)
def test_committed_stubs_are_fresh(tmp_path):
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(generate.generated_files())
    stale = [
        p.name
        for p in written
        if p.read_bytes() != (generate.PROTO_DIR / p.name).read_bytes()
    ]
    assert not stale, (
        f"committed stubs differ from the .proto files: {stale}; "
        "run `python -m granite_deploy.protos.generate` and commit the result"
    )


def test_stubs_use_package_relative_imports():
    for name in generate.generated_files():
        text = (generate.PROTO_DIR / name).read_text(encoding="utf-8")
        assert not re.search(r"^import \w+_pb2\b", text, re.MULTILINE), name
    assert generation_pb2_grpc.generation__pb2 is generation_pb2
    assert granite_chat_pb2_grpc.granite__chat__pb2 is granite_chat_pb2


# ---------------------------------------------------------------------------
# (b) Wire contract, table-driven from SERVING.md and the vendored upstream protos
# (protos/upstream/: IBM's generation.proto for the types SERVING.md leaves implicit,
# vllm-tgis-adapter's for adapter_id, guided decoding and the optional temperature;
# tests/protos/test_protos_upstream.py checks the same against the .proto files themselves). card: "" singular, "repeated", or
# "optional" (proto3 explicit presence). Type: scalar name, or the full name of
# a message / enum type.

FMAAS_SERVICE = "fmaas.GenerationService"
# rpc -> (request, response, server_streaming)
FMAAS_RPCS = {
    "Generate": ("fmaas.BatchedGenerationRequest", "fmaas.BatchedGenerationResponse", False),
    "GenerateStream": ("fmaas.SingleGenerationRequest", "fmaas.GenerationResponse", True),
    "Tokenize": ("fmaas.BatchedTokenizeRequest", "fmaas.BatchedTokenizeResponse", False),
    "ModelInfo": ("fmaas.ModelInfoRequest", "fmaas.ModelInfoResponse", False),
}

FMAAS_FIELDS = {
    "fmaas.BatchedGenerationRequest": [
        ("model_id", 1, "string", ""),
        ("prefix_id", 2, "string", "optional"),
        ("adapter_id", 4, "string", "optional"),
        ("requests", 3, "fmaas.GenerationRequest", "repeated"),
        ("params", 10, "fmaas.Parameters", ""),
    ],
    "fmaas.SingleGenerationRequest": [
        ("model_id", 1, "string", ""),
        ("prefix_id", 2, "string", "optional"),
        ("adapter_id", 4, "string", "optional"),
        ("request", 3, "fmaas.GenerationRequest", ""),
        ("params", 10, "fmaas.Parameters", ""),
    ],
    "fmaas.BatchedGenerationResponse": [
        ("responses", 1, "fmaas.GenerationResponse", "repeated"),
    ],
    "fmaas.GenerationRequest": [
        ("text", 2, "string", ""),
    ],
    "fmaas.GenerationResponse": [
        ("input_token_count", 6, "uint32", ""),
        ("generated_token_count", 2, "uint32", ""),
        ("text", 4, "string", ""),
        ("stop_reason", 7, "fmaas.StopReason", ""),
        ("stop_sequence", 11, "string", ""),
        ("seed", 10, "uint64", ""),
        ("tokens", 8, "fmaas.TokenInfo", "repeated"),
        ("input_tokens", 9, "fmaas.TokenInfo", "repeated"),
    ],
    "fmaas.Parameters": [
        ("method", 1, "fmaas.DecodingMethod", ""),
        ("sampling", 2, "fmaas.SamplingParameters", ""),
        ("stopping", 3, "fmaas.StoppingCriteria", ""),
        ("response", 4, "fmaas.ResponseOptions", ""),
        ("decoding", 5, "fmaas.DecodingParameters", ""),
        ("truncate_input_tokens", 6, "uint32", ""),
    ],
    "fmaas.DecodingParameters": [
        ("repetition_penalty", 1, "float", ""),
        ("length_penalty", 2, "fmaas.DecodingParameters.LengthPenalty", "optional"),
        ("format", 3, "fmaas.DecodingParameters.ResponseFormat", "oneof guided"),
        ("json_schema", 4, "string", "oneof guided"),
        ("regex", 5, "string", "oneof guided"),
        ("choice", 6, "fmaas.DecodingParameters.StringChoices", "oneof guided"),
        ("grammar", 7, "string", "oneof guided"),
    ],
    "fmaas.DecodingParameters.StringChoices": [
        ("choices", 1, "string", "repeated"),
    ],
    "fmaas.DecodingParameters.LengthPenalty": [
        ("start_index", 1, "uint32", ""),
        ("decay_factor", 2, "float", ""),
    ],
    "fmaas.SamplingParameters": [
        ("temperature", 1, "float", "optional"),
        ("top_k", 2, "uint32", ""),
        ("top_p", 3, "float", ""),
        ("typical_p", 4, "float", ""),
        ("seed", 5, "uint64", "optional"),
    ],
    "fmaas.StoppingCriteria": [
        ("max_new_tokens", 1, "uint32", ""),
        ("min_new_tokens", 2, "uint32", ""),
        ("time_limit_millis", 3, "uint32", ""),
        ("stop_sequences", 4, "string", "repeated"),
        ("include_stop_sequence", 5, "bool", "optional"),
    ],
    "fmaas.ResponseOptions": [
        ("input_text", 1, "bool", ""),
        ("generated_tokens", 2, "bool", ""),
        ("input_tokens", 3, "bool", ""),
        ("token_logprobs", 4, "bool", ""),
        ("token_ranks", 5, "bool", ""),
        ("top_n_tokens", 6, "uint32", ""),
    ],
    "fmaas.TokenInfo": [
        ("text", 2, "string", ""),
        ("logprob", 3, "float", ""),
        ("rank", 4, "uint32", ""),
        ("top_tokens", 5, "fmaas.TokenInfo.TopToken", "repeated"),
    ],
    "fmaas.TokenInfo.TopToken": [
        ("text", 2, "string", ""),
        ("logprob", 3, "float", ""),
    ],
    "fmaas.BatchedTokenizeRequest": [
        ("model_id", 1, "string", ""),
        ("prefix_id", 6, "string", "optional"),
        ("adapter_id", 7, "string", "optional"),
        ("requests", 2, "fmaas.TokenizeRequest", "repeated"),
        ("return_tokens", 3, "bool", ""),
        ("return_offsets", 4, "bool", ""),
        ("truncate_input_tokens", 5, "uint32", ""),
    ],
    "fmaas.TokenizeRequest": [
        ("text", 1, "string", ""),
    ],
    "fmaas.BatchedTokenizeResponse": [
        ("responses", 1, "fmaas.TokenizeResponse", "repeated"),
    ],
    "fmaas.TokenizeResponse": [
        ("token_count", 1, "uint32", ""),
        ("tokens", 2, "string", "repeated"),
        ("offsets", 3, "fmaas.TokenizeResponse.Offset", "repeated"),
    ],
    "fmaas.TokenizeResponse.Offset": [
        ("start", 1, "uint32", ""),
        ("end", 2, "uint32", ""),
    ],
    "fmaas.ModelInfoRequest": [
        ("model_id", 1, "string", ""),
    ],
    "fmaas.ModelInfoResponse": [
        ("model_kind", 1, "fmaas.ModelInfoResponse.ModelKind", ""),
        ("max_sequence_length", 2, "uint32", ""),
        ("max_new_tokens", 3, "uint32", ""),
    ],
}

FMAAS_ENUMS = {
    "fmaas.DecodingMethod": {"GREEDY": 0, "SAMPLE": 1},
    "fmaas.StopReason": {
        "NOT_FINISHED": 0,
        "MAX_TOKENS": 1,
        "EOS_TOKEN": 2,
        "CANCELLED": 3,
        "TIME_LIMIT": 4,
        "STOP_SEQUENCE": 5,
        "TOKEN_LIMIT": 6,
        "ERROR": 7,
    },
    "fmaas.ModelInfoResponse.ModelKind": {"DECODER_ONLY": 0, "ENCODER_DECODER": 1},
    "fmaas.DecodingParameters.ResponseFormat": {"TEXT": 0, "JSON": 1},
}

# granite.v1 is ours, but clients build against it: freeze it the same way.
GRANITE_SERVICE = "granite.v1.ChatService"
GRANITE_RPCS = {
    "ChatStream": ("granite.v1.ChatRequest", "granite.v1.ChatEvent", True),
    "Chat": ("granite.v1.ChatRequest", "granite.v1.ChatResponse", False),
    "Tokenize": ("granite.v1.TokenizeRequest", "granite.v1.TokenizeResponse", False),
    "ModelInfo": ("granite.v1.ModelInfoRequest", "granite.v1.ModelInfoResponse", False),
}

_TOOL_CALL = "granite.v1.ToolCall"
_TOKEN_INFO = "granite.v1.TokenInfo"
_STOP_REASON = "granite.v1.StopReason"
GRANITE_FIELDS = {
    "granite.v1.ChatRequest": [
        ("model_id", 1, "string", ""),
        ("conversation", 2, "granite.v1.Conversation", "oneof prompt"),
        ("fim", 3, "granite.v1.FillInTheMiddle", "oneof prompt"),
        ("temperature", 10, "float", ""),
        ("top_k", 11, "uint32", ""),
        ("top_p", 12, "float", ""),
        ("typical_p", 13, "float", ""),
        ("repetition_penalty", 14, "float", ""),
        ("seed", 15, "uint64", "optional"),
        ("max_new_tokens", 20, "uint32", ""),
        ("min_new_tokens", 21, "uint32", ""),
        ("stop_sequences", 22, "string", "repeated"),
        ("include_stop_sequence", 23, "bool", "optional"),
        ("time_limit_millis", 24, "uint64", ""),
        ("logprobs", 30, "bool", ""),
        ("top_n_tokens", 31, "uint32", ""),
        ("response_format", 40, "granite.v1.ResponseFormat", ""),
        ("tool_choice", 41, "granite.v1.ToolChoice", ""),
    ],
    # structured output (serve/constraints.py)
    "granite.v1.ResponseFormat": [
        ("json_object", 1, "granite.v1.ResponseFormat.JsonObject", "oneof format"),
        ("json_schema", 2, "granite.v1.ResponseFormat.JsonSchema", "oneof format"),
        ("regex", 3, "string", "oneof format"),
        ("choice", 4, "granite.v1.ResponseFormat.Choice", "oneof format"),
        ("grammar", 5, "string", "oneof format"),
    ],
    "granite.v1.ResponseFormat.JsonObject": [],
    "granite.v1.ResponseFormat.JsonSchema": [
        ("name", 1, "string", ""),
        ("description", 2, "string", ""),
        ("schema_json", 3, "string", ""),
        ("strict", 4, "bool", ""),
    ],
    "granite.v1.ResponseFormat.Choice": [
        ("choices", 1, "string", "repeated"),
    ],
    "granite.v1.ToolChoice": [
        ("mode", 1, "granite.v1.ToolChoice.Mode", ""),
        ("function_name", 2, "string", ""),
    ],
    "granite.v1.Conversation": [
        ("messages", 1, "granite.v1.ChatMessage", "repeated"),
        ("tools", 2, "granite.v1.Tool", "repeated"),
        ("documents", 3, "granite.v1.Document", "repeated"),
    ],
    "granite.v1.ChatMessage": [
        ("role", 1, "string", ""),
        ("content", 2, "string", ""),
        ("name", 3, "string", "optional"),
        ("tool_calls", 4, _TOOL_CALL, "repeated"),
        ("tool_call_id", 5, "string", ""),
    ],
    "granite.v1.Tool": [
        ("type", 1, "string", ""),
        ("function", 2, "granite.v1.FunctionDefinition", ""),
    ],
    "granite.v1.FunctionDefinition": [
        ("name", 1, "string", ""),
        ("description", 2, "string", ""),
        ("parameters_json", 3, "string", ""),
    ],
    "granite.v1.Document": [
        ("id", 1, "string", ""),
        ("title", 2, "string", ""),
        ("text", 3, "string", ""),
        ("metadata", 4, "granite.v1.Document.MetadataEntry", "repeated"),
    ],
    "granite.v1.FillInTheMiddle": [
        ("prefix", 1, "string", ""),
        ("suffix", 2, "string", ""),
    ],
    _TOOL_CALL: [
        ("index", 1, "uint32", ""),
        ("id", 2, "string", ""),
        ("name", 3, "string", ""),
        ("arguments_json", 4, "string", ""),
    ],
    _TOKEN_INFO: [
        ("token_id", 1, "uint32", ""),
        ("text", 2, "string", ""),
        ("logprob", 3, "float", ""),
        ("rank", 4, "uint32", ""),
        ("top_tokens", 5, "granite.v1.TokenInfo.TopToken", "repeated"),
    ],
    "granite.v1.TokenInfo.TopToken": [
        ("token_id", 1, "uint32", ""),
        ("text", 2, "string", ""),
        ("logprob", 3, "float", ""),
    ],
    "granite.v1.ChatEvent": [
        ("start", 1, "granite.v1.ChatEvent.Start", "oneof event"),
        ("text_delta", 2, "granite.v1.ChatEvent.TextDelta", "oneof event"),
        ("tool_call", 3, _TOOL_CALL, "oneof event"),
        ("final", 4, "granite.v1.ChatEvent.Final", "oneof event"),
    ],
    "granite.v1.ChatEvent.Start": [
        ("prompt_token_count", 1, "uint32", ""),
        ("seed", 2, "uint64", ""),
    ],
    "granite.v1.ChatEvent.TextDelta": [
        ("text", 1, "string", ""),
        ("tokens", 2, _TOKEN_INFO, "repeated"),
    ],
    "granite.v1.ChatEvent.Final": [
        ("stop_reason", 1, _STOP_REASON, ""),
        ("stop_sequence", 2, "string", ""),
        ("prompt_token_count", 3, "uint32", ""),
        ("completion_token_count", 4, "uint32", ""),
        ("queue_time_ms", 5, "double", ""),
        ("time_to_first_token_ms", 6, "double", ""),
        ("cached_prompt_tokens", 7, "uint32", ""),
    ],
    "granite.v1.ChatResponse": [
        ("content", 1, "string", ""),
        ("tool_calls", 2, _TOOL_CALL, "repeated"),
        ("stop_reason", 3, _STOP_REASON, ""),
        ("stop_sequence", 4, "string", ""),
        ("prompt_token_count", 5, "uint32", ""),
        ("completion_token_count", 6, "uint32", ""),
        ("seed", 7, "uint64", ""),
        ("queue_time_ms", 8, "double", ""),
        ("time_to_first_token_ms", 9, "double", ""),
        ("tokens", 10, _TOKEN_INFO, "repeated"),
    ],
    "granite.v1.TokenizeRequest": [
        ("model_id", 1, "string", ""),
        ("text", 2, "string", "oneof input"),
        ("conversation", 3, "granite.v1.Conversation", "oneof input"),
        ("return_tokens", 4, "bool", ""),
        ("return_offsets", 5, "bool", ""),
    ],
    "granite.v1.TokenizeResponse": [
        ("token_count", 1, "uint32", ""),
        ("token_ids", 2, "uint32", "repeated"),
        ("tokens", 3, "string", "repeated"),
        ("offsets", 4, "granite.v1.TokenizeResponse.Offset", "repeated"),
    ],
    "granite.v1.TokenizeResponse.Offset": [
        ("start", 1, "uint32", ""),
        ("end", 2, "uint32", ""),
    ],
    "granite.v1.ModelInfoRequest": [
        ("model_id", 1, "string", ""),
    ],
    "granite.v1.ModelInfoResponse": [
        ("model_id", 1, "string", ""),
        ("context_length", 2, "uint32", ""),
        ("max_new_tokens", 3, "uint32", ""),
        ("engine_kind", 4, "string", ""),
        ("precision", 5, "string", ""),
    ],
}

GRANITE_ENUMS = {
    # granite.v1 adds CONSTRAINT_UNMET (structured output) to fmaas's reasons
    "granite.v1.StopReason": {**FMAAS_ENUMS["fmaas.StopReason"], "CONSTRAINT_UNMET": 8},
    "granite.v1.ToolChoice.Mode": {"AUTO": 0, "NONE": 1, "REQUIRED": 2},
}

_SCALARS = {
    getattr(descriptor_pb2.FieldDescriptorProto, "TYPE_" + name.upper()): name
    for name in ("string", "bytes", "bool", "float", "double", "int32", "int64", "uint32", "uint64")
}


def _messages(file):
    """Every message type declared in a file (nested ones too), except map entries."""
    stack = list(file.message_types_by_name.values())
    while stack:
        msg = stack.pop()
        if not msg.GetOptions().map_entry:
            yield msg
        stack.extend(msg.nested_types)


def _enum_names(file):
    names = {e.full_name for e in file.enum_types_by_name.values()}
    for msg in _messages(file):
        names |= {e.full_name for e in msg.enum_types}
    return names


def _field_layout(field):
    """(name, number, type, card) of a field, in the tables' vocabulary."""
    if field.message_type is not None:
        type_name = field.message_type.full_name
    elif field.enum_type is not None:
        type_name = field.enum_type.full_name
    else:
        type_name = _SCALARS[field.type]
    proto = descriptor_pb2.DescriptorProto()
    field.containing_type.CopyToProto(proto)
    (field_proto,) = [f for f in proto.field if f.name == field.name]
    if field.is_repeated:
        card = "repeated"
    elif field_proto.proto3_optional:
        card = "optional"
    elif field.containing_oneof is not None:
        card = f"oneof {field.containing_oneof.name}"
    else:
        card = ""
    return (field.name, field.number, type_name, card)


CONTRACTS = {
    "fmaas": (generation_pb2, "fmaas", FMAAS_SERVICE, FMAAS_RPCS, FMAAS_FIELDS, FMAAS_ENUMS),
    "granite.v1": (
        granite_chat_pb2,
        "granite.v1",
        GRANITE_SERVICE,
        GRANITE_RPCS,
        GRANITE_FIELDS,
        GRANITE_ENUMS,
    ),
}


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_service_and_methods(contract):
    module, package, service_name, rpcs, _, _ = CONTRACTS[contract]
    file = module.DESCRIPTOR
    file_proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(file_proto)
    assert file_proto.syntax == "proto3"
    assert file.package == package
    assert [s.full_name for s in file.services_by_name.values()] == [service_name]
    service = file.services_by_name[service_name.rsplit(".", 1)[1]]
    assert set(service.methods_by_name) == set(rpcs)
    for name, (request, response, server_streaming) in rpcs.items():
        method = service.methods_by_name[name]
        assert method.input_type.full_name == request, name
        assert method.output_type.full_name == response, name
        assert method.client_streaming is False, name
        assert method.server_streaming is server_streaming, name


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_every_message_and_enum_is_in_the_tables(contract):
    module, _, _, _, fields, enums = CONTRACTS[contract]
    assert sorted(m.full_name for m in _messages(module.DESCRIPTOR)) == sorted(fields)
    assert _enum_names(module.DESCRIPTOR) == set(enums)


@pytest.mark.parametrize(
    "message,expected",
    [(m, f) for c in CONTRACTS.values() for m, f in c[4].items()],
    ids=[m for c in CONTRACTS.values() for m in c[4]],
)
def test_message_fields(message, expected):
    descriptor = generation_pb2.DESCRIPTOR.pool.FindMessageTypeByName(message)
    actual = sorted((_field_layout(f) for f in descriptor.fields), key=lambda x: x[1])
    assert actual == sorted(expected, key=lambda x: x[1])


@pytest.mark.parametrize(
    "enum,expected",
    [(e, v) for c in CONTRACTS.values() for e, v in c[5].items()],
    ids=[e for c in CONTRACTS.values() for e in c[5]],
)
def test_enum_values(enum, expected):
    descriptor = generation_pb2.DESCRIPTOR.pool.FindEnumTypeByName(enum)
    assert {v.name: v.number for v in descriptor.values} == expected


def test_map_field_document_metadata():
    doc = granite_chat_pb2.Document(id="d1", title="T", text="body", metadata={"url": "u"})
    again = granite_chat_pb2.Document.FromString(doc.SerializeToString())
    assert dict(again.metadata) == {"url": "u"}


# ---------------------------------------------------------------------------
# (c) Round trip through the generated stubs over a real grpc.aio server.


class _EchoGeneration(generation_pb2_grpc.GenerationServiceServicer):
    """Splits the prompt into words and 'generates' them back, TGIS-style."""

    async def GenerateStream(self, request, context):
        words = request.request.text.split()
        limit = request.params.stopping.max_new_tokens or 20
        yield generation_pb2.GenerationResponse(
            input_token_count=len(words), seed=request.params.sampling.seed
        )
        out = words[:limit]
        for i, word in enumerate(out, 1):
            tok = generation_pb2.TokenInfo(
                text=word,
                logprob=-0.5,
                rank=1,
                top_tokens=[generation_pb2.TokenInfo.TopToken(text=word, logprob=-0.5)],
            )
            yield generation_pb2.GenerationResponse(
                text=word + " ", generated_token_count=i, tokens=[tok]
            )
        stop = (
            generation_pb2.MAX_TOKENS if len(words) > limit else generation_pb2.EOS_TOKEN
        )
        yield generation_pb2.GenerationResponse(
            generated_token_count=len(out), stop_reason=stop
        )

    async def Generate(self, request, context):
        if not request.requests:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no requests")
        return generation_pb2.BatchedGenerationResponse(
            responses=[
                generation_pb2.GenerationResponse(
                    input_token_count=len(r.text.split()),
                    generated_token_count=1,
                    text=r.text.upper(),
                    stop_reason=generation_pb2.STOP_SEQUENCE,
                    stop_sequence="\n",
                )
                for r in request.requests
            ]
        )


class _CannedChat(granite_chat_pb2_grpc.ChatServiceServicer):
    async def ChatStream(self, request, context):
        pb = granite_chat_pb2
        ev = pb.ChatEvent
        yield ev(start=ev.Start(prompt_token_count=7, seed=request.seed))
        token = pb.TokenInfo(token_id=5, text="Hello")
        yield ev(text_delta=ev.TextDelta(text="Hello", tokens=[token]))
        call = pb.ToolCall(index=0, id="call_0", name="weather", arguments_json='{"city":"Paris"}')
        yield ev(tool_call=call)
        final = ev.Final(stop_reason=pb.EOS_TOKEN, prompt_token_count=7, completion_token_count=3)
        yield ev(final=final)

    async def Chat(self, request, context):
        kind = request.WhichOneof("prompt")
        text = request.fim.prefix + "X" + request.fim.suffix if kind == "fim" else "Hello"
        return granite_chat_pb2.ChatResponse(
            content=text, stop_reason=granite_chat_pb2.MAX_TOKENS, completion_token_count=1
        )


async def _with_server(servicer, add_fn, client_fn):
    server = grpc.aio.server()
    add_fn(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await client_fn(channel)
    finally:
        await server.stop(None)


def test_generation_service_round_trip():
    async def client(channel):
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        params = generation_pb2.Parameters(
            method=generation_pb2.SAMPLE,
            sampling=generation_pb2.SamplingParameters(seed=42),
            stopping=generation_pb2.StoppingCriteria(max_new_tokens=3),
            response=generation_pb2.ResponseOptions(generated_tokens=True, token_logprobs=True),
        )
        stream_req = generation_pb2.SingleGenerationRequest(
            model_id="m",
            request=generation_pb2.GenerationRequest(text="one two three four"),
            params=params,
        )
        chunks = [c async for c in stub.GenerateStream(stream_req, timeout=10)]

        batch = generation_pb2.BatchedGenerationRequest(
            model_id="m",
            requests=[generation_pb2.GenerationRequest(text=t) for t in ("a b", "c")],
            params=params,
        )
        unary = await stub.Generate(batch, timeout=10)

        # The wire path is IBM's, independent of our stubs.
        raw = channel.unary_unary(
            "/fmaas.GenerationService/Generate",
            request_serializer=generation_pb2.BatchedGenerationRequest.SerializeToString,
            response_deserializer=generation_pb2.BatchedGenerationResponse.FromString,
        )
        raw_unary = await raw(batch, timeout=10)

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(generation_pb2.BatchedGenerationRequest(model_id="m"), timeout=10)
        return chunks, unary, raw_unary, err.value.code()

    chunks, unary, raw_unary, code = asyncio.run(
        _with_server(
            _EchoGeneration(), generation_pb2_grpc.add_GenerationServiceServicer_to_server, client
        )
    )

    assert chunks[0].input_token_count == 4 and chunks[0].seed == 42
    assert "".join(c.text for c in chunks) == "one two three "
    assert [c.generated_token_count for c in chunks[1:-1]] == [1, 2, 3]
    assert all(len(c.tokens) == 1 for c in chunks[1:-1])
    assert chunks[1].tokens[0].top_tokens[0].text == "one"
    assert chunks[-1].stop_reason == generation_pb2.MAX_TOKENS
    assert all(c.stop_reason == generation_pb2.NOT_FINISHED for c in chunks[:-1])

    assert [r.text for r in unary.responses] == ["A B", "C"]
    assert unary.responses[0].stop_reason == generation_pb2.STOP_SEQUENCE
    assert unary.responses[0].stop_sequence == "\n"
    assert raw_unary == unary
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_chat_service_round_trip():
    async def client(channel):
        stub = granite_chat_pb2_grpc.ChatServiceStub(channel)
        conv = granite_chat_pb2.Conversation(
            messages=[granite_chat_pb2.ChatMessage(role="user", content="weather in Paris?")],
            tools=[
                granite_chat_pb2.Tool(
                    type="function",
                    function=granite_chat_pb2.FunctionDefinition(
                        name="weather", parameters_json='{"type":"object"}'
                    ),
                )
            ],
        )
        request = granite_chat_pb2.ChatRequest(conversation=conv, seed=9)
        events = [e async for e in stub.ChatStream(request, timeout=10)]
        fim_input = granite_chat_pb2.FillInTheMiddle(prefix="a", suffix="b")
        fim = await stub.Chat(granite_chat_pb2.ChatRequest(fim=fim_input), timeout=10)
        return events, fim

    add = granite_chat_pb2_grpc.add_ChatServiceServicer_to_server
    events, fim = asyncio.run(_with_server(_CannedChat(), add, client))
    assert [e.WhichOneof("event") for e in events] == ["start", "text_delta", "tool_call", "final"]
    assert events[0].start.seed == 9
    assert events[1].text_delta.tokens[0].token_id == 5
    assert events[2].tool_call.name == "weather"
    assert events[3].final.stop_reason == granite_chat_pb2.EOS_TOKEN
    assert fim.content == "aXb" and fim.stop_reason == granite_chat_pb2.MAX_TOKENS
