"""granite.v1.ChatService: request conversion (conversation / FIM -> prompt), event building, the servicer.

A stream is Start, TextDelta / ToolCall events (text goes through
:class:`~.tool_calls.ToolCallStreamParser`, so a complete ``<tool_call>``
block becomes a ToolCall), then exactly one Final. The unary Chat response is
the accumulation of the same events.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Callable

from ..errors import InvalidField
from ..protos import granite_chat_pb2 as chat_pb2
from ..protos import granite_chat_pb2_grpc as chat_grpc
from .bridge import GenerationFailed, Prepared, final_fields, rpc
from .constraints import ConstraintSpec, openai_constraint, precompile
from .sampling import SamplingParams
from .scheduler import Event, Request
from .session import ModelSession
from .stopping import StopReason
from .tool_calls import ToolCallStreamParser
from .validation import InputLimits, check_text_bytes, parse_json_field, rename, validate_params


CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name  # granite.v1.ChatService

_CHAT_FIELDS = {"time_limit_s": "time_limit_millis"}


# ============================================================================ request conversion

def _conversation_dicts(conv: chat_pb2.Conversation, limits: InputLimits | None = None
                        ) -> tuple[list[dict], list[dict] | None, list[dict] | None]:
    """A Conversation as the chat template's messages / tools / documents (OpenAI shapes).

    JSON fields are parsed with a depth limit; roles, sizes and counts are checked by
    :func:`~.validation.validate_messages` (in the session, before rendering)."""
    depth = (limits or InputLimits()).max_json_depth
    if not conv.messages:
        raise InvalidField("conversation.messages", "is empty (give at least one message)")
    messages = []
    for i, m in enumerate(conv.messages):
        d: dict = {"role": m.role, "content": m.content}
        if m.HasField("name"):
            d["name"] = m.name
        if m.tool_calls:
            calls = []
            for j, c in enumerate(m.tool_calls):
                where = f"conversation.messages[{i}].tool_calls[{j}].arguments_json"
                args = parse_json_field(c.arguments_json, where, depth) if c.arguments_json.strip() else {}
                calls.append({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args}})
            d["tool_calls"] = calls
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        messages.append(d)
    tools = None
    if conv.tools:
        tools = []
        for i, t in enumerate(conv.tools):
            kind = t.type or "function"
            if kind != "function":
                raise InvalidField(f"conversation.tools[{i}].type", f"only \"function\" is supported, got {kind!r}")
            if not t.function.name:
                raise InvalidField(f"conversation.tools[{i}].function.name", "is empty")
            where = f"conversation.tools[{i}].function.parameters_json"
            params = parse_json_field(t.function.parameters_json, where, depth) if t.function.parameters_json.strip() else {}
            if not isinstance(params, dict):
                raise InvalidField(where, "must be a JSON object")
            fn = {"name": t.function.name, "description": t.function.description, "parameters": params}
            tools.append({"type": "function", "function": fn})
    documents = None
    if conv.documents:
        documents = []
        for d in conv.documents:
            doc: dict = {}
            if d.id:
                doc["doc_id"] = d.id
            if d.title:
                doc["title"] = d.title
            doc["text"] = d.text
            doc.update(dict(d.metadata))
            documents.append(doc)
    return messages, tools, documents


async def _encode_conversation(session: ModelSession, conv: chat_pb2.Conversation) -> tuple[str, tuple[int, ...]]:
    messages, tools, documents = _conversation_dicts(conv, session.limits)
    return await session.encode_chat(messages, tools=tools, documents=documents, field="conversation.messages")


def _chat_constraint(request: chat_pb2.ChatRequest, tools: list[dict] | None) -> ConstraintSpec | None:
    """response_format / tool_choice -> the ConstraintSpec the scheduler applies (structured output)."""
    rf = None
    which = request.response_format.WhichOneof("format") if request.HasField("response_format") else None
    if which == "json_object":
        rf = {"type": "json_object"}
    elif which == "json_schema":
        js = request.response_format.json_schema
        rf = {"type": "json_schema", "json_schema": {"name": js.name, "schema": js.schema_json, "strict": js.strict}}
    elif which == "choice":
        rf = {"type": "choice", "choices": list(request.response_format.choice.choices)}
    elif which in ("regex", "grammar"):
        rf = {"type": which, which: getattr(request.response_format, which)}
    tc = None
    if request.HasField("tool_choice"):
        mode, name = request.tool_choice.mode, request.tool_choice.function_name
        if name:
            if mode == chat_pb2.ToolChoice.NONE:
                raise InvalidField("tool_choice.function_name", "cannot be set with mode NONE")
            tc = {"type": "function", "function": {"name": name}}
        else:
            tc = {chat_pb2.ToolChoice.NONE: "none", chat_pb2.ToolChoice.REQUIRED: "required"}.get(mode, "auto")
    spec = openai_constraint(rf, tc, tools)
    if spec is not None:  # error messages name this API's fields
        field = {"response_format.json_schema.schema": "response_format.json_schema.schema_json"}.get(spec.field)
        if field:
            spec = ConstraintSpec(spec.kind, spec.value, spec.choices, spec.tools, spec.tool_name, field)
    return spec


# ============================================================================ event building

def _chat_token_info(tokenizer, event: Event, logprobs: bool) -> chat_pb2.TokenInfo:
    token = event.token
    # the scheduler already decoded the token when logprobs were asked for
    info = chat_pb2.TokenInfo(token_id=token.token_id, text=event.token_text or tokenizer.decode([token.token_id]))
    if logprobs and token.logprob is not None:
        info.logprob = token.logprob
        info.rank = token.rank or 0
    for tid, lp in token.top_tokens:
        info.top_tokens.add(token_id=tid, text=tokenizer.decode([tid]), logprob=lp)
    return info


class ChatEventBuilder:
    """Scheduler events -> ChatEvents: the conversion ChatStream and Chat both use.

    Text deltas go through a ToolCallStreamParser, so a complete
    ``<tool_call>...</tool_call>`` block comes out as one ToolCall event (name
    and JSON arguments, also when the model wrote the arguments as a JSON
    string) and never as text. Token details (logprobs / top_n_tokens) ride on
    the next TextDelta; any left when the stream ends (e.g. the tokens of a
    trailing tool call) come in one last TextDelta with empty text.
    """

    def __init__(self, tokenizer=None, logprobs: bool = False, top_n: int = 0, sample: bool = True,
                 request_seed: int | None = None, call_id: Callable[[], str] | None = None):
        self.tokenizer = tokenizer
        self.logprobs, self.want_tokens = logprobs, bool(logprobs or top_n)
        self.sample, self.request_seed = sample, request_seed
        self.parser = ToolCallStreamParser()
        self.n_calls = 0
        self._pending_tokens: list[chat_pb2.TokenInfo] = []
        self._call_id = call_id or (lambda: "call_" + secrets.token_hex(12))
        self.final: Event | None = None

    def _seed(self, seed: int | None) -> int:
        return (seed or 0) if self.sample else (self.request_seed or 0)

    def _tool_call(self, call) -> chat_pb2.ChatEvent:
        ev = chat_pb2.ChatEvent(tool_call=chat_pb2.ToolCall(
            index=self.n_calls, id=self._call_id(), name=call.name,
            arguments_json=json.dumps(call.arguments, ensure_ascii=False)))
        self.n_calls += 1
        return ev

    def _text(self, text: str, out: list) -> None:
        """A TextDelta with `text` and the token details gathered so far (skipped when both are empty)."""
        if not text and not self._pending_tokens:
            return
        out.append(chat_pb2.ChatEvent(text_delta=chat_pb2.ChatEvent.TextDelta(text=text, tokens=self._pending_tokens)))
        self._pending_tokens = []

    def events(self, batch: list[Event]) -> list[chat_pb2.ChatEvent]:
        out: list[chat_pb2.ChatEvent] = []
        for event in batch:
            if event.kind == "start":
                out.append(chat_pb2.ChatEvent(start=chat_pb2.ChatEvent.Start(
                    prompt_token_count=event.prompt_token_count, seed=self._seed(event.seed))))
            elif event.kind == "token":
                if self.want_tokens and event.token is not None and self.tokenizer is not None:
                    self._pending_tokens.append(_chat_token_info(self.tokenizer, event, self.logprobs))
                text, calls = self.parser.feed(event.text)
                if text:
                    self._text(text, out)
                out.extend(self._tool_call(c) for c in calls)
            else:
                tail, calls = self.parser.finish()
                self._text(tail, out)
                out.extend(self._tool_call(c) for c in calls)
                self.final = event
                out.append(chat_pb2.ChatEvent(final=chat_pb2.ChatEvent.Final(
                    stop_reason=int(event.stop_reason), stop_sequence=event.stop_sequence,
                    prompt_token_count=event.prompt_token_count, completion_token_count=event.generated_count,
                    queue_time_ms=event.queue_time_s * 1000.0,
                    time_to_first_token_ms=event.time_to_first_token_s * 1000.0,
                    cached_prompt_tokens=event.cached_prompt_tokens)))
        return out


def accumulate_chat(events: list[chat_pb2.ChatEvent]) -> chat_pb2.ChatResponse:
    """The ChatResponse equivalent to a ChatStream: content is the concatenated TextDelta texts."""
    out = chat_pb2.ChatResponse()
    content = []
    for ev in events:
        kind = ev.WhichOneof("event")
        if kind == "start":
            out.seed = ev.start.seed
            out.prompt_token_count = ev.start.prompt_token_count
        elif kind == "text_delta":
            content.append(ev.text_delta.text)
            out.tokens.extend(ev.text_delta.tokens)
        elif kind == "tool_call":
            out.tool_calls.append(ev.tool_call)
        elif kind == "final":
            f = ev.final
            out.stop_reason, out.stop_sequence = f.stop_reason, f.stop_sequence
            out.prompt_token_count, out.completion_token_count = f.prompt_token_count, f.completion_token_count
            out.queue_time_ms, out.time_to_first_token_ms = f.queue_time_ms, f.time_to_first_token_ms
    out.content = "".join(content)
    return out


# ============================================================================ the servicer

class ChatServicer(chat_grpc.ChatServiceServicer):
    """granite.v1.ChatService over a :class:`~.session.ModelSession`."""

    def __init__(self, session: ModelSession, include_stop_sequence: bool = False):
        self.session = session
        self.include_stop_sequence = include_stop_sequence  # OpenAI-style default: excluded

    async def _prepare(self, request: chat_pb2.ChatRequest) -> Prepared:
        """Render the prompt, validate the parameters and tokenize (raises InvalidField & co)."""
        s = self.session
        s.check_ready()
        which = request.WhichOneof("prompt")
        if which not in ("conversation", "fim"):
            raise InvalidField("prompt", "give a conversation or a fim input")
        seed = request.seed if request.HasField("seed") else None
        sampling = SamplingParams(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p or 1.0,
                                  typical_p=request.typical_p or 1.0,
                                  repetition_penalty=request.repetition_penalty or 1.0, seed=seed,
                                  logprobs=request.logprobs, top_n_tokens=request.top_n_tokens)
        include = (request.include_stop_sequence if request.HasField("include_stop_sequence")
                   else self.include_stop_sequence)
        stopping = s.stopping_params(request.max_new_tokens, request.min_new_tokens, request.stop_sequences,
                                     include, request.time_limit_millis, "max_new_tokens")
        # parameters first: a bad field is refused before any rendering or tokenising
        validate_params(sampling, stopping, _CHAT_FIELDS)
        tools = _conversation_dicts(request.conversation, s.limits)[1] if which == "conversation" else None
        constraint = _chat_constraint(request, tools)  # structured output; compiled at submit
        if which == "conversation":
            text, ids = await _encode_conversation(s, request.conversation)
        else:
            if not (request.fim.prefix or request.fim.suffix):
                raise InvalidField("fim", "prefix and suffix are both empty")
            check_text_bytes(request.fim.prefix, s.limits.max_prompt_bytes, "fim.prefix")
            check_text_bytes(request.fim.suffix, s.limits.max_prompt_bytes, "fim.suffix")
            try:
                text = s.tokenizer.fim_prompt(request.fim.prefix, request.fim.suffix)
            except ValueError as exc:
                raise InvalidField("fim", str(exc)) from None
            ids = await s.encode_text(text, "fim")
        if constraint is not None:  # compile off the event loop (submit then hits the cache)
            await s.render_text(precompile, constraint, s.scheduler)
        return Prepared(requests=[Request(ids, sampling, stopping, constraint=constraint)], texts=[text],
                        sample=not sampling.greedy, seed=seed)

    async def _start(self, request: chat_pb2.ChatRequest, call) -> ChatEventBuilder:
        """Check, prepare and submit a ChatStream / Chat request."""
        self.session.check_model(request.model_id)
        prepared = await self._prepare(request)
        try:
            request_ = dataclasses.replace(prepared.requests[0], request_id=call.request_id)
            stream = self.session.submit(request_, params_checked=True)
        except InvalidField as exc:
            raise rename(exc, _CHAT_FIELDS) from None
        call.watch(stream)
        builder = ChatEventBuilder(self.session.tokenizer, logprobs=request.logprobs, top_n=request.top_n_tokens,
                                   sample=prepared.sample, request_seed=prepared.seed)
        builder.stream = stream
        call.fields_from(lambda: {"tool_calls": builder.n_calls, **final_fields(builder.final)})
        return builder

    @rpc("granite.v1.ChatService/ChatStream")
    async def ChatStream(self, request, context, call):
        builder = await self._start(request, call)
        while builder.final is None:
            for ev in builder.events(await builder.stream.get()):
                yield ev

    @rpc("granite.v1.ChatService/Chat")
    async def Chat(self, request, context, call):
        builder = await self._start(request, call)
        events: list[chat_pb2.ChatEvent] = []
        while builder.final is None:
            events.extend(builder.events(await builder.stream.get()))
        if builder.final.stop_reason == StopReason.ERROR:
            raise GenerationFailed(f"generation failed: {builder.final.error}")
        return accumulate_chat(events)

    @rpc("granite.v1.ChatService/Tokenize")
    async def Tokenize(self, request, context, call):
        s = self.session
        s.check_ready()
        s.check_model(request.model_id)
        which = request.WhichOneof("input")
        if which == "text":
            ids, offsets = await s.encode_with_offsets(request.text, "text")
        elif which == "conversation":
            text, _ = await _encode_conversation(s, request.conversation)
            ids, offsets = await s.encode_with_offsets(text, "conversation")
        else:
            raise InvalidField("input", "give text or conversation")
        out = chat_pb2.TokenizeResponse(token_count=len(ids))
        if request.return_tokens:
            out.token_ids.extend(ids)
            out.tokens.extend(s.token_strings(ids))
        if request.return_offsets:
            for a, b in offsets:
                out.offsets.add(start=a, end=b)
        call.fields["prompt_tokens"] = len(ids)
        return out

    @rpc("granite.v1.ChatService/ModelInfo")
    async def ModelInfo(self, request, context, call):
        s = self.session
        s.check_ready()
        s.check_model(request.model_id)
        info = s.engine_info
        device = str(info.device).split(":")[0]
        return chat_pb2.ModelInfoResponse(model_id=s.model_id, context_length=s.context_window,
                                          max_new_tokens=s.max_new_tokens_limit,
                                          engine_kind=f"{info.kind}-{device}", precision=info.precision)
