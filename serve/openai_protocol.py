"""The OpenAI-compatible HTTP API's wire shapes: request models, errors, response and chunk builders.

Protocol only (pydantic + the standard library): nothing here touches the
scheduler or the event loop, so everything is unit-testable on plain data.
:mod:`.openai_api` is the FastAPI app that uses it over a ModelSession.

* Requests: :class:`ChatCompletionRequest`, :class:`CompletionRequest`. Every
  parameter OpenAI defines is either supported or refused with a 400 naming it
  (:data:`REFUSED`, :func:`check_parameters`); parameters nobody defines are
  refused too (``unknown parameter``). Nothing is silently ignored.
* Errors: :class:`OpenAIError` carries the status and OpenAI's body
  ``{"error": {"message", "type", "param", "code"}}``; :func:`error_from_exception`
  maps the project's error kinds (granite_deploy.errors) by class,
  :func:`error_from_validation` pydantic's errors (``param`` is the field's path,
  ``messages[1].content``).
* Streaming: :class:`ChatChoiceStream` / :class:`CompletionChoiceStream` turn one
  choice's scheduler events into OpenAI ``chat.completion.chunk`` /
  ``text_completion`` chunks; chat text goes through the gRPC chat service's
  :class:`~.tool_calls.ToolCallStreamParser`, so a ``<tool_call>`` block becomes
  ``delta.tool_calls`` (a header chunk with index/id/type/name and empty
  arguments, then the arguments) and ``finish_reason`` ``"tool_calls"``. The
  non-streamed response is the accumulation of the same chunks, so the two
  agree by construction.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import GraniteDeployError, InvalidField, NotFound, Overloaded, TooLarge, Unavailable
from .stopping import StopReason
from .tool_calls import ToolCallStreamParser

__all__ = [
    "ChatChoiceStream",
    "ChatCompletionRequest",
    "CompletionChoiceStream",
    "CompletionRequest",
    "OpenAIError",
    "REFUSED",
    "check_parameters",
    "error_from_exception",
    "error_from_validation",
    "finish_reason",
    "sse_data",
    "usage_dict",
]

MAX_TOP_LOGPROBS = 5  # = sampling.MAX_TOP_N_TOKENS; OpenAI allows 20, refused above 5 with a 400
RETRY_AFTER_S = 1


# ============================================================================ errors

class OpenAIError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @property
    def reason(self) -> str:
        """The rejection reason for metrics (the code, or the type)."""
        return self.code or self.type


def invalid(param: str | None, message: str, code: str = "invalid_value") -> OpenAIError:
    text = f"{param}: {message}" if param else message
    return OpenAIError(400, text, "invalid_request_error", param, code)


def error_from_exception(exc: BaseException) -> OpenAIError:
    """The project's error kinds (granite_deploy.errors) as HTTP errors, by class."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, TooLarge):  # before InvalidField: TooLarge is one
        return OpenAIError(413, str(exc), "invalid_request_error", exc.field or None, "request_too_large")
    if isinstance(exc, InvalidField):
        return OpenAIError(400, str(exc), "invalid_request_error", exc.field or None, "invalid_value")
    if isinstance(exc, NotFound):
        return OpenAIError(404, str(exc), "invalid_request_error", getattr(exc, "field", None) or "model",
                           "model_not_found")
    if isinstance(exc, Overloaded):
        return OpenAIError(429, f"server overloaded: {exc}; retry later", "rate_limit_error", None, "overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, Unavailable):
        return OpenAIError(503, f"{exc}; retry on another replica", "service_unavailable", None, "unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, GraniteDeployError):
        return OpenAIError(500, str(exc), "server_error", None, "internal_error")
    return OpenAIError(500, "internal server error", "server_error", None, "internal_error")


def field_path(loc) -> str:
    """A pydantic location as the caller's path: ('messages', 1, 'content') -> messages[1].content."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_union_tag(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "any"}


def _is_union_tag(part) -> bool:
    """pydantic's names for union members in a location (str, list[int], TextPart, literal[...])."""
    p = str(part)
    return not p.isidentifier() or p[0].isupper() or p in _TYPE_TAGS


def error_from_validation(exc: ValidationError) -> OpenAIError:
    """The first pydantic error as a 400 naming its field."""
    errors = exc.errors(include_url=False)
    # Union types report one error per branch; the most specific (longest path) is the useful one.
    first = max(errors, key=lambda e: len(field_path(e["loc"]))) if errors else None
    if first is None:
        return invalid(None, "invalid request body")
    param = field_path(first["loc"]) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        return invalid(param, "unknown parameter", "unknown_parameter")
    if first.get("type") == "missing":
        return invalid(param, "is required", "missing_required_parameter")
    return invalid(param, msg[0].lower() + msg[1:] if msg else "invalid value")


# ============================================================================ request models

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Model):
    name: str
    arguments: str = ""  # OpenAI sends the arguments as JSON text; given to the template verbatim


class ToolCallIn(_Model):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # accepted only as null (an earlier assistant turn read back)


class FunctionDef(_Model):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Model):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Model):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Model):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's name; accepted only as false/null


StopField = Union[str, list[str], None]


class _Common(_Model):
    """Parameters chat and completions share (OpenAI's, then the vLLM-style extensions)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    user: str | None = None  # logged (access log), as OpenAI uses it: to tell end users apart
    # Accepted only at their no-op value (a 400 otherwise): never silently ignored.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM's names)
    top_k: int | None = Field(default=None, ge=0)
    min_tokens: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    include_stop_str_in_output: bool | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # granite-deploy's extension: prompt-lookup speculative decoding (`serve --speculative ngram`).
    # Most draft tokens verified per step for this request: null = the server's --speculative-tokens,
    # 0 = off for this request, larger values are capped at the server's (a performance hint: the
    # output is distributed exactly as without speculation, greedy output is identical, so capping
    # changes nothing a client can observe but speed). A value > 0 on a server that runs without
    # speculation is a 400 naming the field rather than silently ignored, as every other parameter
    # here; 0 is always accepted. Constrained requests (guided_*, response_format, forced tools) are
    # never speculated, whatever this says.
    speculative_tokens: int | None = Field(default=None, ge=0)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None  # accepted only as true/null (the model may call several)
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    store: bool | None = None  # accepted only as false/null (nothing is stored)
    # Extensions
    documents: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = None  # accepted only equal to n (or null)


# Parameters OpenAI defines that this server refuses whenever they are given (with a 400 naming
# them and why). Parameters refused only at some values are checked in check_values.
REFUSED: dict[str, str] = {
    "functions": "the deprecated 'functions' API is not supported; use 'tools'",
    "function_call": "the deprecated 'function_call' is not supported; use 'tool_choice'",
    "modalities": "only text output is supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "not a reasoning model parameter this server supports",
    "service_tier": "service tiers are not supported",
    "metadata": "stored completions are not supported",
    "web_search_options": "web search is not supported",
    "verbosity": "not supported",
    "prompt_cache_key": "not supported (prompt caching, where enabled, is automatic)",
    "safety_identifier": "not supported",
}


def check_parameters(body: Any, model: type[_Model]) -> None:
    """Refuse top-level parameters the model does not define, naming them (before pydantic, so
    that known-but-unsupported OpenAI parameters get their reason rather than 'unknown')."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    fields = model.model_fields
    for key in body:
        if key in fields:
            continue
        if key in REFUSED:
            raise invalid(key, f"not supported by this server: {REFUSED[key]}", "unsupported_parameter")
        raise invalid(key, "unknown parameter", "unknown_parameter")


def parse_request(body: Any, model: type[_Model]):
    check_parameters(body, model)
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise error_from_validation(exc) from None
    check_values(request)
    return request


def _refuse(param: str, why: str) -> OpenAIError:
    return invalid(param, f"not supported by this server: {why}", "unsupported_parameter")


def check_values(r: _Common) -> None:
    """Parameters accepted only at their no-op values, and combinations that make no sense."""
    if r.frequency_penalty not in (None, 0):
        raise _refuse("frequency_penalty", "only 0 (use the repetition_penalty extension)")
    if r.presence_penalty not in (None, 0):
        raise _refuse("presence_penalty", "only 0 (use the repetition_penalty extension)")
    if r.logit_bias:
        raise _refuse("logit_bias", "only an empty map")
    if r.stream_options is not None:
        if not r.stream:
            raise invalid("stream_options", "only allowed with stream: true")
        if r.stream_options.continuous_usage_stats:
            raise _refuse("stream_options.continuous_usage_stats", "usage comes once, in the last chunk")
    if isinstance(r.stop, list) and any(not s for s in r.stop):
        raise invalid("stop", "must not contain an empty string")
    if r.stop == "":
        raise invalid("stop", "must not be an empty string")
    if sum(x is not None for x in (r.guided_json, r.guided_regex, r.guided_choice, r.guided_grammar)) > 1:
        raise invalid("guided_json", "give at most one of guided_json, guided_regex, guided_choice, guided_grammar")
    if r.guided_choice is not None and (not r.guided_choice or any(not c for c in r.guided_choice)):
        raise invalid("guided_choice", "must be a non-empty list of non-empty strings")
    if isinstance(r, ChatCompletionRequest):
        if r.max_tokens is not None and r.max_completion_tokens is not None and r.max_tokens != r.max_completion_tokens:
            raise invalid("max_completion_tokens", "differs from max_tokens (give one of them)")
        if r.top_logprobs is not None:
            if not r.logprobs:
                raise invalid("top_logprobs", "requires logprobs: true")
            if r.top_logprobs > MAX_TOP_LOGPROBS:
                raise _refuse("top_logprobs", f"at most {MAX_TOP_LOGPROBS} here, got {r.top_logprobs}")
        if r.parallel_tool_calls is False:
            raise _refuse("parallel_tool_calls", "only true (the model may return several calls)")
        if r.store:
            raise _refuse("store", "only false (nothing is stored)")
        if r.tool_choice is not None and r.tool_choice != "none" and not r.tools:
            raise invalid("tool_choice", "needs tools")
        if isinstance(r.tool_choice, NamedToolChoice):
            names = [t.function.name for t in r.tools or ()]
            if r.tool_choice.function.name not in names:
                raise invalid("tool_choice.function.name",
                              f"{r.tool_choice.function.name!r} is not one of the tools ({', '.join(names)})")
        for i, m in enumerate(r.messages):
            if m.refusal is not None:
                raise _refuse(f"messages[{i}].refusal", "only null")
            if m.tool_calls and m.role != "assistant":
                raise invalid(f"messages[{i}].tool_calls", "only assistant messages carry tool calls")
            if m.role == "tool" and m.tool_call_id is None:
                raise invalid(f"messages[{i}].tool_call_id", "is required for role 'tool'")
        rf = r.response_format
        if rf is not None:
            if rf.type == "json_schema" and rf.json_schema is None:
                raise invalid("response_format.json_schema", "is required for type 'json_schema'")
            if rf.type != "text" and any(x is not None for x in (r.guided_json, r.guided_regex, r.guided_choice,
                                                                  r.guided_grammar)):
                raise invalid("response_format", "give either response_format or a guided_* parameter")
            if rf.type != "text" and (r.tool_choice == "required" or isinstance(r.tool_choice, NamedToolChoice)):
                raise invalid("response_format", "cannot be combined with a forced tool_choice")
    else:
        if r.best_of is not None and r.best_of != r.n:
            raise _refuse("best_of", "only equal to n")
        if r.echo and r.logprobs is not None:
            raise _refuse("echo", "not together with logprobs (prompt logprobs are not returned)")
        if r.suffix is not None and r.echo:
            raise invalid("suffix", "cannot be combined with echo")
        p = r.prompt
        if isinstance(p, list) and not p:
            raise invalid("prompt", "is empty")


# ============================================================================ conversions

def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template receives them: OpenAI's shapes, with text parts joined by a
    newline (what Granite 4.0's own template does with a list of parts) and 'developer' read as
    'system'. Tool-call arguments stay JSON text, as the caller sent them (apply_chat_template
    gets the same)."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content)
        d: dict = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": c.function.arguments}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def tool_dicts(tools: list[ToolDef] | None) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for t in tools:
        fn: dict = {"name": t.function.name}
        if t.function.description is not None:
            fn["description"] = t.function.description
        fn["parameters"] = t.function.parameters if t.function.parameters is not None else {}
        out.append({"type": "function", "function": fn})
    return out


def stop_list(stop: StopField) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def finish_reason(stop_reason: StopReason, tool_calls: int = 0) -> str | None:
    """OpenAI's finish_reason for our stop reason ("tool_calls" when the reply made calls)."""
    if stop_reason in (StopReason.EOS_TOKEN, StopReason.STOP_SEQUENCE):
        return "tool_calls" if tool_calls else "stop"
    if stop_reason in (StopReason.MAX_TOKENS, StopReason.TOKEN_LIMIT, StopReason.TIME_LIMIT):
        return "length"
    if stop_reason == StopReason.NOT_FINISHED:
        return None
    name = getattr(stop_reason, "name", "")
    if "CONSTRAINT" in name or "GRAMMAR" in name:  # structured generation: constraint not met in time
        return "length"
    return "stop" if not tool_calls else "tool_calls"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse_data(obj: dict) -> str:
    """One chunk as SSE data (compact JSON, non-ASCII kept as is)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class ChunkEncoder:
    """One streamed response's SSE events as bytes. The fields every chunk repeats (id, object,
    created, model, ``usage: null`` with include_usage) are encoded once; per chunk only the
    choice is serialised."""

    def __init__(self, chunk_id: str, obj: str, created: int, model: str, include_usage: bool):
        head = {"id": chunk_id, "object": obj, "created": created, "model": model, "system_fingerprint": None}
        if include_usage:
            head["usage"] = None
        self._head = f'data: {sse_data(head)[:-1]},"choices":['.encode()

    def choice(self, choice: dict) -> bytes:
        return self._head + sse_data(choice).encode() + b"]}\n\n"

    @staticmethod
    def event(obj: dict) -> bytes:
        return b"data: " + sse_data(obj).encode() + b"\n\n"

    DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# ============================================================================ token logprobs

class TokenText:
    """A token's text and bytes for logprob entries (the tokenizer's decode of that one token)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        t = self._cache.get(token_id)
        if t is None:
            t = self._cache[token_id] = self.tokenizer.decode([token_id])
        return t

    def entry(self, token_id: int, logprob: float) -> dict:
        t = self.text(token_id)
        return {"token": t, "logprob": float(logprob), "bytes": list(t.encode("utf-8"))}


def chat_logprob_entry(texts: TokenText, token, top_n: int) -> dict:
    entry = texts.entry(token.token_id, token.logprob if token.logprob is not None else 0.0)
    entry["top_logprobs"] = [texts.entry(tid, lp) for tid, lp in token.top_tokens[:top_n]]
    return entry


# ============================================================================ chat streaming

class ChatChoiceStream:
    """One chat choice's scheduler events -> the choice objects of ``chat.completion.chunk``s.

    ``events(batch)`` returns choice dicts (``{"index", "delta", "logprobs",
    "finish_reason"}``) to put in chunks, in order. The first is the role
    delta; text deltas follow as the tool-call parser releases them; a tool
    call becomes two: ``{"index", "id", "type", "function": {"name",
    "arguments": ""}}`` then ``{"index", "function": {"arguments": ...}}``; the
    last carries the finish reason. Token logprobs ride on the next choice
    emitted (any left over come with the last). ``parse_tools=False``
    (tool_choice "none") leaves ``<tool_call>`` text as content.
    """

    def __init__(self, index: int, texts: TokenText | None = None, logprobs: bool = False, top_logprobs: int = 0,
                 parse_tools: bool = True, call_id: Callable[[], str] = new_call_id):
        self.index = index
        self.texts, self.logprobs, self.top_logprobs = texts, logprobs, top_logprobs
        self.parser = ToolCallStreamParser() if parse_tools else None
        self.call_id = call_id
        self.n_calls = 0
        self.final = None  # the final Event
        self.started = False
        self._pending_lp: list[dict] = []

    def _choice(self, delta: dict, finish: str | None = None) -> dict:
        lp = None
        if self.logprobs:
            lp = {"content": self._pending_lp, "refusal": None}
            self._pending_lp = []
        return {"index": self.index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def _calls(self, calls, out: list) -> None:
        for call in calls:
            i = self.n_calls
            self.n_calls += 1
            out.append(self._choice({"tool_calls": [{"index": i, "id": self.call_id(), "type": "function",
                                                     "function": {"name": call.name, "arguments": ""}}]}))
            args = json.dumps(call.arguments, ensure_ascii=False)
            out.append(self._choice({"tool_calls": [{"index": i, "function": {"arguments": args}}]}))

    def start(self) -> list[dict]:
        if self.started:
            return []
        self.started = True
        return [self._choice({"role": "assistant", "content": ""})]

    def events(self, batch) -> list[dict]:
        out: list[dict] = self.start()
        for event in batch:
            if event.kind == "token":
                if self.logprobs and event.token is not None and self.texts is not None:
                    self._pending_lp.append(chat_logprob_entry(self.texts, event.token, self.top_logprobs))
                if self.parser is None:
                    text, calls = event.text, []
                else:
                    text, calls = self.parser.feed(event.text)
                if text:
                    out.append(self._choice({"content": text}))
                self._calls(calls, out)
            elif event.kind == "final":
                if self.parser is not None:
                    tail, calls = self.parser.finish()
                    if tail:
                        out.append(self._choice({"content": tail}))
                    self._calls(calls, out)
                self.final = event
                out.append(self._choice({}, finish_reason(event.stop_reason, self.n_calls)))
        return out


def accumulate_chat(choices: list[dict], index: int) -> dict:
    """The ``chat.completion`` choice equivalent to a choice's streamed deltas."""
    content: list[str] = []
    calls: dict[int, dict] = {}
    logprobs: list[dict] | None = None
    finish = None
    for c in choices:
        d = c["delta"]
        if d.get("content"):
            content.append(d["content"])
        for tc in d.get("tool_calls", ()):
            slot = calls.setdefault(tc["index"], {"id": "", "type": "function",
                                                   "function": {"name": "", "arguments": ""}})
            if "id" in tc:
                slot["id"] = tc["id"]
            fn = tc.get("function", {})
            slot["function"]["name"] += fn.get("name", "")
            slot["function"]["arguments"] += fn.get("arguments", "")
        if c.get("logprobs") is not None:
            logprobs = (logprobs or []) + c["logprobs"]["content"]
        if c.get("finish_reason"):
            finish = c["finish_reason"]
    message: dict = {"role": "assistant", "content": "".join(content) if content or not calls else None,
                     "refusal": None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"index": index, "message": message,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish}


def chat_chunk(chunk_id: str, created: int, model: str, choices: list[dict], usage: dict | None = None,
               include_usage: bool = False) -> dict:
    out = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": None, "choices": choices}
    if include_usage:
        out["usage"] = usage
    return out


# ============================================================================ completions streaming

class CompletionChoiceStream:
    """One completion choice's events -> ``text_completion`` choice dicts
    (``{"index", "text", "logprobs", "finish_reason"}``), legacy logprobs format
    (tokens, token_logprobs, top_logprobs, text_offset). Without logprobs a chunk
    comes when there is text; with them, one per token (text may be empty while a
    character or a possible stop sequence is held back)."""

    def __init__(self, index: int, texts: TokenText | None = None, logprobs: int | None = None,
                 prefix: str = "", offset: int = 0):
        self.index, self.texts, self.logprobs = index, texts, logprobs
        self.prefix = prefix  # echo: the prompt text, sent first
        self.offset = offset + len(prefix)  # characters before the next token's text
        self.final = None
        self._pending: dict | None = None
        self.started = False

    def _lp(self) -> dict | None:
        if self.logprobs is None:
            return None
        out, self._pending = self._pending or _empty_lp(), None
        return out

    def events(self, batch) -> list[dict]:
        out: list[dict] = []
        if not self.started:
            self.started = True
            if self.prefix:
                out.append({"index": self.index, "text": self.prefix, "logprobs": self._lp(), "finish_reason": None})
        for event in batch:
            if event.kind == "token":
                if self.logprobs is not None and event.token is not None and self.texts is not None:
                    tok = event.token
                    lp = self._pending = self._pending or _empty_lp()
                    lp["tokens"].append(self.texts.text(tok.token_id))
                    lp["token_logprobs"].append(float(tok.logprob) if tok.logprob is not None else 0.0)
                    lp["top_logprobs"].append({self.texts.text(t): float(v) for t, v in tok.top_tokens[:self.logprobs]})
                    lp["text_offset"].append(self.offset)
                self.offset += len(event.text)
                if event.text or self.logprobs is not None:  # with logprobs: one chunk per token
                    out.append({"index": self.index, "text": event.text, "logprobs": self._lp(),
                                "finish_reason": None})
            elif event.kind == "final":
                self.final = event
                out.append({"index": self.index, "text": "", "logprobs": self._lp(),
                            "finish_reason": finish_reason(event.stop_reason)})
        return out


def _empty_lp() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def accumulate_completion(choices: list[dict], index: int) -> dict:
    text, finish = [], None
    lp = None
    for c in choices:
        text.append(c["text"])
        if c.get("logprobs") is not None:
            lp = lp or _empty_lp()
            for k in lp:
                lp[k].extend(c["logprobs"][k])
        if c.get("finish_reason"):
            finish = c["finish_reason"]
    return {"index": index, "text": "".join(text), "logprobs": lp, "finish_reason": finish}


def completion_chunk(chunk_id: str, created: int, model: str, choices: list[dict], usage: dict | None = None,
                     include_usage: bool = False) -> dict:
    out = {"id": chunk_id, "object": "text_completion", "created": created, "model": model,
           "system_fingerprint": None, "choices": choices}
    if include_usage:
        out["usage"] = usage
    return out


def now() -> int:
    return int(time.time())
