"""The OpenAI-compatible HTTP API (FastAPI + uvicorn + sse-starlette) over a ModelSession.

``granite-deploy serve ARTIFACT --http-port N`` runs this next to the gRPC
services, in the same process and on the same event loop, over the same
:class:`~.session.ModelSession` (so the same scheduler and engine: HTTP and
gRPC requests are batched together).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health`` (the process is
up and the engine usable), ``GET /ready`` (200 only while serving: after the
warm-up, not while draining), ``GET /metrics`` (Prometheus, the server's
registry). Wire shapes, the parameter policy and errors: :mod:`.openai_protocol`.

* Prompts: chat messages go through the session's validation and the artifact's
  chat template (the gRPC chat service's code path); the reply's text goes
  through the same tool-call parser; detokenisation is the scheduler's.
* Errors: OpenAI's ``{"error": {...}}`` with 400 (``param`` names the field),
  401 (``Authorization: Bearer`` against ``--auth-token``; /health, /ready and
  /metrics exempt, as gRPC health is), 404 (unknown model or route), 413
  (body over ``max_body_bytes``, or input over the session's limits), 429 with
  ``Retry-After`` (queue full), 503 (loading, draining). A failure during a
  stream ends it with an ``{"error": ...}`` event.
* A client that disconnects cancels its generations at once (streamed: the
  SSE response's disconnect handling closes our generator; non-streamed: a
  task waits for ``http.disconnect``), so their slots are freed within one
  engine step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request as HttpRequest

from ..errors import GraniteDeployError, InvalidField, Overloaded, Unavailable
from . import openai_protocol as p
from .openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from .sampling import SamplingParams
from .scheduler import Request
from .session import ModelSession
from .stopping import StopReason
from .validation import rename, validate_request

__all__ = ["HttpConfig", "HttpServer", "create_app"]

log = logging.getLogger(__name__)
access_log = logging.getLogger("granite_deploy.serve.access")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions

# Python field names (SamplingParams / StoppingParams) -> this API's parameter names
_CHAT_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
               "repetition_penalty": "repetition_penalty", "top_n_tokens": "top_logprobs",
               "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "stop_sequences": "stop",
               "prompt": "messages"}
_COMPLETION_NAMES = {**_CHAT_NAMES, "top_n_tokens": "logprobs", "prompt": "prompt"}
_EXEMPT = frozenset({"/health", "/ready", "/metrics"})


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (HttpServer.port)
    auth_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    graceful_s: float = 30.0


# ============================================================================ request plumbing

class _Call:
    """One HTTP request's access-log records (request_start / request_end, x-correlation-id)."""

    def __init__(self, http: HttpRequest, route: str):
        self.t0 = time.monotonic()
        self.route = route
        self.correlation_id = http.headers.get("x-correlation-id", "")
        self.request_id = uuid.uuid4().hex[:16]
        self.ended = False
        self.fields: dict = {}
        peer = f"{http.client.host}:{http.client.port}" if http.client else ""
        self._log("request_start", peer=peer)

    def _log(self, event: str, **fields) -> None:
        access_log.info(event, extra={"fields": {"event": event, "rpc": self.route, "request_id": self.request_id,
                                                 "correlation_id": self.correlation_id, **fields}})

    def end(self, status: int | str, **fields) -> None:
        if not self.ended:
            self.ended = True
            self._log("request_end", status=status, duration_ms=round((time.monotonic() - self.t0) * 1000, 3),
                      **self.fields, **fields)


def _error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _read_json(http: HttpRequest, limit: int) -> Any:
    length = http.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise OpenAIError(413, f"the request body is {length} bytes, the limit is {limit} bytes",
                          "invalid_request_error", None, "request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in http.stream():
            size += len(chunk)
            if size > limit:
                raise OpenAIError(413, f"the request body is over {limit} bytes", "invalid_request_error", None,
                                  "request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise OpenAIError(400, "the client went away while sending the body") from None
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise p.invalid(None, f"the request body is not valid JSON ({exc})", "invalid_json") from None


def _cancel_all(streams) -> None:
    for s in streams:
        s.cancel()


async def _watch_disconnect(http: HttpRequest, streams) -> None:
    """Non-streamed requests: cancel the generations when the client goes away."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            _cancel_all(streams)
            return


def _ready(stream) -> list[list]:
    """Event batches already queued on `stream` (without waiting): sent in the same write as the one
    just received, so a client that lags behind (or a fast engine) costs one socket write, not one
    per token. (Reads the session Stream's asyncio queue; mirrors Stream.get.)"""
    out = []
    queue = getattr(stream, "queue", None)
    while queue is not None and not stream.finished and not queue.empty():
        batch = queue.get_nowait()
        if batch and batch[-1].kind == "final":
            stream.finished = True
        out.append(batch)
    return out


async def _merged(streams) -> AsyncIterator[list[tuple[int, list]]]:
    """Groups of (stream index, event batch): each group is what arrived since the last one
    (at least one batch), in order, until every stream finished."""
    if len(streams) == 1:
        s = streams[0]
        while not s.finished:
            first = await s.get()
            yield [(0, first)] + [(0, b) for b in _ready(s)]
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        while not s.finished:
            await queue.put((i, await s.get()))
            for b in _ready(s):
                await queue.put((i, b))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            group = [await queue.get()]
            while not queue.empty():
                group.append(queue.get_nowait())
            remaining -= sum(1 for _, b in group if b and b[-1].kind == "final")
            yield group
    finally:
        for t in tasks:
            t.cancel()


def _error_event(final) -> OpenAIError:
    return OpenAIError(500, f"generation failed: {final.error or 'engine error'}", "server_error", None,
                       "generation_failed")


# ============================================================================ building requests

@dataclass
class _Prepared:
    requests: list[Request]
    prompt_tokens: list[int]  # per prompt
    n: int
    echo: list[str] | None = None  # completions: the prompt texts to echo


def _sampling(r, i: int, logprobs: bool, top_n: int) -> SamplingParams:
    seed = None if r.seed is None else (r.seed + i) % (2**64)  # n > 1: choice i uses seed + i
    return SamplingParams(temperature=1.0 if r.temperature is None else float(r.temperature),
                          top_k=r.top_k or 0, top_p=1.0 if r.top_p is None else float(r.top_p),
                          repetition_penalty=r.repetition_penalty or 1.0, seed=seed, logprobs=logprobs,
                          top_n_tokens=top_n)


def _max_tokens(session: ModelSession, asked: int | None, field: str, prompt_len: int, default: int | None) -> int:
    room = session.context_window - prompt_len
    if asked is None:
        return max(1, min(default or session.max_new_tokens_limit, session.max_new_tokens_limit, room))
    if asked > session.max_new_tokens_limit:
        raise p.invalid(field, f"must be <= {session.max_new_tokens_limit} (this server's limit), got {asked}")
    if asked > room:
        raise p.invalid(field, f"the prompt is {prompt_len} tokens and the context window {session.context_window}: "
                               f"at most {room} new tokens fit, got {asked}")
    return asked


def _constraint(r, tools: list[dict] | None, available: bool = True):
    """The ConstraintSpec this request asks for (None: free generation). response_format and
    tool_choice go through constraints.openai_constraint, the mapping the gRPC chat service uses
    (strict schemas closed, tool_choice "none" = no <tool_call>); guided_* are vLLM's extensions."""
    from .constraints import ConstraintSpec, openai_constraint

    spec = None
    if isinstance(r, ChatCompletionRequest):
        rf = r.response_format.model_dump(by_alias=True, exclude_none=True) if r.response_format else None
        tc = r.tool_choice.model_dump() if isinstance(r.tool_choice, p.NamedToolChoice) else r.tool_choice
        spec = openai_constraint(rf, tc, tools)
        if spec is not None and spec.kind == "no_tool_call" and not available:
            spec = None  # without structured generation "none" still holds: the reply is not parsed for calls
    guided = None
    if r.guided_json is not None:
        value = r.guided_json if isinstance(r.guided_json, str) else json.dumps(r.guided_json)
        guided = ConstraintSpec(kind="json_schema", value=value, field="guided_json")
    elif r.guided_regex is not None:
        guided = ConstraintSpec(kind="regex", value=r.guided_regex, field="guided_regex")
    elif r.guided_choice is not None:
        guided = ConstraintSpec(kind="choice", choices=tuple(r.guided_choice), field="guided_choice")
    elif r.guided_grammar is not None:
        guided = ConstraintSpec(kind="grammar", value=r.guided_grammar, field="guided_grammar")
    if guided is not None:
        if spec is not None and spec.kind == "tool_call":
            raise p.invalid(guided.field, "cannot be combined with a tool_choice that forces a tool call")
        return guided  # (response_format other than text was refused with it already)
    return spec


def constraints_available(tokenizer) -> bool:
    """Whether this build applies ConstraintSpecs (structured generation is a separate component)."""
    try:
        from .constraints import ConstraintSpec, compile_constraint
    except ImportError:
        return False
    try:
        compile_constraint(ConstraintSpec(kind="json", field="probe"), tokenizer)
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 - anything but "not implemented" means the hook is there
        return True
    return True


def _adapter(session: ModelSession, model: str | None) -> str:
    """`model` naming a LoRA adapter the server loaded (`serve --adapter NAME=...`, vLLM's convention): its name."""
    return model if model and model in (getattr(session, "adapters", None) or {}) else ""


def _build(session: ModelSession, r, ids: tuple[int, ...], names: dict, logprobs: bool, top_n: int,
           max_tokens: int, constraint, field_prefix: int = 0) -> list[Request]:
    include = bool(r.include_stop_str_in_output)
    try:
        stopping = session.stopping_params(max_tokens, r.min_tokens or 0, p.stop_list(r.stop), include, 0,
                                           "max_tokens")
    except InvalidField as exc:
        raise p.error_from_exception(rename(exc, names)) from None
    if stopping.min_new_tokens > stopping.max_new_tokens:
        raise p.invalid("min_tokens", f"must be <= max_tokens ({stopping.max_new_tokens})")
    out = []
    for i in range(r.n):
        kw = {"constraint": constraint} if constraint is not None else {}
        if _adapter(session, r.model):
            kw["adapter"] = r.model
        if r.speculative_tokens is not None:
            kw["speculative_tokens"] = r.speculative_tokens
        req = Request(ids, _sampling(r, field_prefix + i, logprobs, top_n), stopping, **kw)
        try:
            validate_request(req, session.context_window)
        except InvalidField as exc:
            raise p.error_from_exception(rename(exc, names)) from None
        out.append(req)
    return out


# ============================================================================ the app

def create_app(session: ModelSession, config: HttpConfig | None = None) -> FastAPI:
    """The FastAPI app over `session` (mount it anywhere, or run it with :class:`HttpServer`)."""
    cfg = config or HttpConfig()
    app = FastAPI(title="granite-deploy OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    token = (cfg.auth_token or "").encode()
    state: dict = {}

    def constraints_ok() -> bool:
        if "constraints" not in state:
            state["constraints"] = constraints_available(session.tokenizer)
        return state["constraints"]

    @app.exception_handler(OpenAIError)
    async def _openai_error(_http, exc: OpenAIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_http, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return _error_response(OpenAIError(exc.status_code, str(exc.detail), "invalid_request_error", None, kind))

    def check_auth(http: HttpRequest) -> None:
        if not token:
            return
        header = http.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token):
            session.rejected("unauthenticated")
            raise OpenAIError(401, "invalid or missing API key: send 'Authorization: Bearer <token>'",
                              "invalid_request_error", None, "invalid_api_key")

    async def begin(http: HttpRequest, call: _Call, model_cls):
        """Auth, body, parameters, model and readiness: the checks every generation shares."""
        check_auth(http)
        body = await _read_json(http, cfg.max_body_bytes)
        r = p.parse_request(body, model_cls)
        if r.user:
            call.fields["user"] = r.user  # OpenAI's end-user id: it goes to the access log
        if not _adapter(session, r.model):
            session.check_model(r.model or "", "model")
        if app.state.draining:
            raise Unavailable("the server is draining")
        session.check_ready()
        return r

    def fail(call: _Call, exc: BaseException) -> JSONResponse:
        err = p.error_from_exception(exc)
        if err.status >= 500 and err.status != 503:
            log.error("%s failed", call.route, exc_info=exc, extra={"fields": {"request_id": call.request_id}})
        if err.status < 500 or err.status == 503:
            session.rejected(err.reason)
        call.end(err.status, error=err.message)
        return _error_response(err)

    def submit_all(requests: list[Request]) -> list:
        streams = []
        try:
            for req in requests:
                streams.append(session.submit(req))
        except BaseException as exc:
            _cancel_all(streams)
            raise _submit_error(exc) from None
        return streams

    def need_constraint(constraint) -> None:
        if constraint is not None and not constraints_ok():
            raise p.invalid(constraint.field or None, "not supported yet: constrained (structured) generation is not "
                                                      "available in this build", "unsupported_parameter")

    # --- chat ---------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        call = _Call(http, "POST /v1/chat/completions")
        try:
            r: ChatCompletionRequest = await begin(http, call, ChatCompletionRequest)
            tools = p.tool_dicts(r.tools)
            constraint = _constraint(r, tools, available=constraints_ok())
            need_constraint(constraint)
            kwargs = dict(r.chat_template_kwargs or {})
            for reserved in ("messages", "tools", "documents", "field"):
                if reserved in kwargs:
                    raise p.invalid(f"chat_template_kwargs.{reserved}", "is a request field of its own")
            _text, ids = await session.encode_chat(p.message_dicts(r.messages), tools=tools, documents=r.documents,
                                                   field="messages", **kwargs)
            max_tokens = _max_tokens(session, r.max_completion_tokens or r.max_tokens,
                                     "max_completion_tokens" if r.max_completion_tokens else "max_tokens",
                                     len(ids), None)
            requests = _build(session, r, ids, _CHAT_NAMES, r.logprobs, r.top_logprobs or 0, max_tokens, constraint)
            streams = submit_all(requests)
        except Exception as exc:  # noqa: BLE001 - every refusal becomes an OpenAI error body
            return fail(call, exc)
        texts = p.TokenText(session.tokenizer) if r.logprobs else None
        parse_tools = bool(tools) and r.tool_choice != "none"
        builders = [p.ChatChoiceStream(i, texts, r.logprobs, r.top_logprobs or 0, parse_tools) for i in range(r.n)]
        chunk_id, model = p.new_id("chatcmpl"), r.model or session.model_id
        created_at = p.now()
        if r.stream:
            include_usage = bool(r.stream_options and r.stream_options.include_usage)
            return EventSourceResponse(_chat_sse(call, streams, builders, chunk_id, created_at, model, include_usage),
                                       ping=15, sep="\n")
        return await _chat_unary(http, call, streams, builders, chunk_id, created_at, model)

    async def _sse(call, streams, builders, enc, head: bytes, usage_chunk):
        """The SSE body of chat and completions alike: `head`, each step's chunks in one write,
        an error event if a generation fails, the usage chunk (`usage_chunk()`, when asked) and
        [DONE]; however it ends, the generations are cancelled and the call logged."""
        status = "CANCELLED"
        try:
            if head:
                yield head
            async for group in _merged(streams):
                out = []
                for i, batch in group:
                    final = batch[-1] if batch[-1].kind == "final" else None
                    if final is not None and final.stop_reason == StopReason.ERROR:
                        yield b"".join(out) + enc.event(_error_event(final).body())
                        status = 500
                        return
                    out += [enc.choice(choice) for choice in builders[i].events(batch)]
                if out:
                    yield b"".join(out)
            yield (enc.event(usage_chunk()) if usage_chunk else b"") + enc.DONE
            status = 200
        finally:
            _cancel_all(streams)
            call.end(status, stream=True, **_log_fields(builders))

    def _chat_sse(call, streams, builders, chunk_id, created_at, model, include_usage):
        enc = p.ChunkEncoder(chunk_id, "chat.completion.chunk", created_at, model, include_usage)
        head = b"".join(enc.choice(choice) for b in builders for choice in b.start())
        usage = (lambda: p.chat_chunk(chunk_id, created_at, model, [], _usage(builders), True)) if include_usage \
            else None
        return _sse(call, streams, builders, enc, head, usage)

    async def _collect_unary(http, call, streams, builders):
        """Run a non-streamed request to its end: (the events of each choice, None), or
        (None, the response to send) when it failed or the client left."""
        watcher = asyncio.ensure_future(_watch_disconnect(http, streams))
        collected: list[list[dict]] = [[] for _ in builders]
        try:
            async for group in _merged(streams):
                for i, batch in group:
                    collected[i].extend(builders[i].events(batch))
                    final = builders[i].final
                    if final is not None and final.stop_reason == StopReason.ERROR:
                        return None, fail(call, _error_event(final))
        finally:
            watcher.cancel()
            _cancel_all(streams)
        if any(b.final is None or b.final.stop_reason == StopReason.CANCELLED for b in builders):
            call.end("CANCELLED", **_log_fields(builders))
            return None, Response(status_code=499)  # the client is gone; nobody reads this
        return collected, None

    async def _chat_unary(http, call, streams, builders, chunk_id, created_at, model):
        collected, response = await _collect_unary(http, call, streams, builders)
        if response is not None:
            return response
        body = {"id": chunk_id, "object": "chat.completion", "created": created_at, "model": model,
                "system_fingerprint": None,
                "choices": [p.accumulate_chat(collected[i], i) for i in range(len(builders))],
                "usage": _usage(builders)}
        call.end(200, **_log_fields(builders))
        return JSONResponse(body)

    # --- completions ----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        call = _Call(http, "POST /v1/completions")
        try:
            r: CompletionRequest = await begin(http, call, CompletionRequest)
            constraint = _constraint(r, None, available=constraints_ok())
            need_constraint(constraint)
            prompts = _prompts(r.prompt)
            top_n = min(r.logprobs or 0, p.MAX_TOP_LOGPROBS)
            requests, prompt_tokens, echo = [], [], []
            for k, prompt in enumerate(prompts):
                field = "prompt" if len(prompts) == 1 else f"prompt[{k}]"
                if isinstance(prompt, str):
                    if r.suffix is not None:
                        text = await session.render_text(session.tokenizer.fim_prompt, prompt, r.suffix)
                    else:
                        text = prompt
                    ids = await session.encode_text(text, field)
                    echo.append(prompt)
                else:
                    if r.suffix is not None:
                        raise p.invalid("suffix", "needs a text prompt (fill-in-the-middle renders the prompt)")
                    ids = tuple(int(t) for t in prompt)
                    if not ids:
                        raise p.invalid(field, "is empty")
                    vocab = getattr(session.engine_info, "vocab_size", None)
                    if vocab is not None and (max(ids) >= vocab or min(ids) < 0):
                        raise p.invalid(field, f"token ids must be in [0, {vocab})")
                    echo.append(session.tokenizer.decode(list(ids)) if r.echo else "")
                max_tokens = _max_tokens(session, r.max_tokens, "max_tokens", len(ids), COMPLETIONS_DEFAULT_MAX_TOKENS)
                names = {**_COMPLETION_NAMES, "prompt": field}
                requests += _build(session, r, ids, names, r.logprobs is not None, top_n, max_tokens, constraint,
                                   field_prefix=0)
                prompt_tokens.append(len(ids))
            streams = submit_all(requests)
        except ValueError as exc:  # fim_prompt: the tokenizer has no FIM tokens
            if isinstance(exc, GraniteDeployError):
                return fail(call, exc)
            return fail(call, p.invalid("suffix", str(exc)))
        except Exception as exc:  # noqa: BLE001
            return fail(call, exc)
        texts = p.TokenText(session.tokenizer) if r.logprobs is not None else None
        builders = []
        for k in range(len(prompts)):
            for j in range(r.n):
                builders.append(p.CompletionChoiceStream(k * r.n + j, texts, r.logprobs if r.logprobs is None
                                                         else top_n, prefix=echo[k] if r.echo else ""))
        chunk_id, model = p.new_id("cmpl"), r.model or session.model_id
        created_at = p.now()
        if r.stream:
            include_usage = bool(r.stream_options and r.stream_options.include_usage)
            return EventSourceResponse(_completion_sse(call, streams, builders, chunk_id, created_at, model,
                                                       include_usage, prompt_tokens, r.n), ping=15, sep="\n")
        collected, response = await _collect_unary(http, call, streams, builders)
        if response is not None:
            return response
        body = {"id": chunk_id, "object": "text_completion", "created": created_at, "model": model,
                "system_fingerprint": None,
                "choices": [p.accumulate_completion(collected[i], i) for i in range(len(builders))],
                "usage": _usage(builders, prompt_tokens, r.n)}
        call.end(200, **_log_fields(builders))
        return JSONResponse(body)

    def _completion_sse(call, streams, builders, chunk_id, created_at, model, include_usage, prompt_tokens, n):
        enc = p.ChunkEncoder(chunk_id, "text_completion", created_at, model, include_usage)
        usage = (lambda: p.completion_chunk(chunk_id, created_at, model, [], _usage(builders, prompt_tokens, n),
                                            True)) if include_usage else None
        return _sse(call, streams, builders, enc, b"", usage)

    # --- models, health, metrics -------------------------------------------------------------------
    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "granite-deploy",
                "max_model_len": session.context_window}
        if _adapter(session, name):
            card["parent"] = session.model_id  # vLLM's field for a LoRA adapter's base
        return card

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        try:
            check_auth(http)
        except OpenAIError as exc:
            return _error_response(exc)
        names = [session.model_id, *sorted(getattr(session, "adapters", None) or {})]
        return JSONResponse({"object": "list", "data": [model_card(n) for n in names]})

    @app.get("/v1/models/{name:path}")
    async def model(http: HttpRequest, name: str):
        try:
            check_auth(http)
            if not _adapter(session, name):
                session.check_model(name, "model")
        except Exception as exc:  # noqa: BLE001
            return _error_response(p.error_from_exception(exc))
        return JSONResponse(model_card(name))

    @app.get("/health")
    async def health():
        if getattr(session, "unusable", None):
            return JSONResponse({"status": "unusable", "reason": session.unusable}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready():
        try:
            if app.state.draining:
                raise Unavailable("the server is draining")
            session.check_ready()
        except Exception as exc:  # noqa: BLE001
            return JSONResponse({"status": "not_ready", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if session.metrics is None:
            return Response(b"", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(session.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.session = session
    app.state.draining = False
    return app


def _submit_error(exc: BaseException) -> BaseException:
    """The scheduler's own refusals (queue full, shutting down, a bad field) as the project's kinds."""
    if isinstance(exc, GraniteDeployError):
        return exc
    name = type(exc).__name__
    if name == "Overloaded":
        return Overloaded(str(exc))
    if name == "ShuttingDown":
        return Unavailable(f"{exc}")
    if isinstance(exc, ValueError):
        field, sep, problem = str(exc).partition(": ")
        return InvalidField(field, problem) if sep and " " not in field else InvalidField("", str(exc))
    return exc


def _prompts(prompt) -> list:
    """OpenAI's four prompt shapes -> a list of prompts (str or list of token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    return list(prompt)


def _usage(builders, prompt_tokens: list[int] | None = None, n: int = 1) -> dict:
    finals = [b.final for b in builders if b.final is not None]
    completion = sum(f.generated_count for f in finals)
    cached = sum(int(getattr(f, "cached_prompt_tokens", 0) or 0) for f in finals[::max(1, n)])
    if prompt_tokens is None:  # chat: one prompt, n choices
        prompt = finals[0].prompt_token_count if finals else 0
        cached = int(getattr(finals[0], "cached_prompt_tokens", 0) or 0) if finals else 0
    else:
        prompt = sum(prompt_tokens)
    return p.usage_dict(prompt, completion, cached)


def _log_fields(builders) -> dict:
    finals = [b.final for b in builders if b.final is not None]
    if not finals:
        return {}
    return {"stop_reason": ",".join(f.stop_reason.name for f in finals),
            "prompt_tokens": finals[0].prompt_token_count,
            "generated_tokens": sum(f.generated_count for f in finals),
            "tool_calls": sum(getattr(b, "n_calls", 0) for b in builders)}


# ============================================================================ the HTTP server

def ssl_kwargs(cfg: HttpConfig) -> dict:
    """uvicorn's TLS settings from the same PEM options as gRPC (a client CA: mutual TLS)."""
    if not (cfg.tls_cert or cfg.tls_key or cfg.tls_client_ca):
        return {}
    if not (cfg.tls_cert and cfg.tls_key):
        raise InvalidField("--tls-cert/--tls-key", "both are needed for TLS (and for --tls-client-ca)")
    out = {"ssl_certfile": cfg.tls_cert, "ssl_keyfile": cfg.tls_key}
    if cfg.tls_client_ca:
        out.update(ssl_ca_certs=cfg.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return out


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Created with proto=IPPROTO_TCP on purpose: asyncio turns Nagle off
    (TCP_NODELAY) only on accepted sockets whose proto says TCP, and socket.create_server's proto 0
    would leave it on, so on a kept-alive connection each streamed chunk after the first waited for
    the client's delayed ACK (~40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpServer:
    """The app on uvicorn, on the running event loop (no signal handlers of its own: the owner
    drains). ``await start()`` binds (port 0: any free port, see ``.port``) and serves."""

    def __init__(self, session: ModelSession, config: HttpConfig):
        self.session, self.config = session, config
        self.app = create_app(session, config)
        self.port: int | None = None
        self._server = None
        self._task: asyncio.Task | None = None
        self._socket: socket.socket | None = None

    async def start(self) -> "HttpServer":
        import uvicorn

        cfg = self.config
        tls = ssl_kwargs(cfg)
        host = cfg.host.strip("[]")
        try:
            sock = _listen(host, cfg.port)
        except OSError as exc:
            raise InvalidField("--http-port", f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        uv_config = uvicorn.Config(self.app, lifespan="off", log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=max(1, int(cfg.graceful_s)), server_header=False,
                                   **tls)
        try:
            uv_config.load()  # reads the TLS files now: fail fast, with the option named
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise InvalidField("--tls-cert/--tls-key", f"cannot load for HTTPS: {exc}") from None

        class _Server(uvicorn.Server):
            def capture_signals(self):  # the gRPC server's signal handling drains both
                import contextlib

                return contextlib.nullcontext()

        self._server = _Server(uv_config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the startup error
                raise RuntimeError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP API on %s://%s:%d", "https" if tls else "http", cfg.host, self.port,
                 extra={"fields": {"event": "http_serving", "port": self.port, "tls": bool(tls)}})
        return self

    def begin_drain(self) -> None:
        """Refuse new generations (503) and answer /ready 503; in-flight ones go on."""
        self.app.state.draining = True

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight responses finish (up to `grace` s, default the config's), close."""
        if self._server is None or self._task is None:
            return
        if grace is not None:
            self._server.config.timeout_graceful_shutdown = max(0.1, grace)
        self._server.should_exit = True
        if grace == 0:
            self._server.force_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=(grace or self.config.graceful_s) + 5)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        except Exception:  # noqa: BLE001 - already stopping
            log.exception("HTTP server failed while stopping")
        self._server = None
        for task in asyncio.all_tasks():  # sse-starlette's per-loop shutdown poller: nothing left to watch
            if getattr(task.get_coro(), "__qualname__", "") == "_shutdown_watcher":
                task.cancel()
