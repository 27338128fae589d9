"""The gRPC server: fmaas.GenerationService and granite.v1.ChatService over the Scheduler.

A thin asyncio layer (``grpc.aio``): requests are validated and tokenized on
the event loop, handed to the :class:`~.scheduler.Scheduler` (one thread that
owns the engine), and the scheduler's events come back through
``loop.call_soon_threadsafe``. Nothing here blocks the loop for longer than a
tokenization or a chat-template render.

Wire behaviour (see SERVING.md):

* fmaas streaming: the first message carries ``input_token_count`` (+ seed for
  sampling, input text / input tokens when asked); then one message per token
  with the text delta, the running ``generated_token_count`` and at most one
  TokenInfo; the last one adds ``stop_reason`` / ``stop_sequence`` (it is the
  last token's message when the request ended on a token). Token events whose
  delta is empty (half a UTF-8 character, a possible stop-sequence prefix) are
  not sent unless TokenInfo was requested. Unary text is the concatenation of
  the streamed texts, by construction (both are built from the same events).
* Chat: Start, TextDelta / ToolCall events (text goes through
  :class:`~.tool_calls.ToolCallStreamParser`, so a complete ``<tool_call>``
  block becomes a ToolCall), then exactly one Final.
* Errors: bad fields -> INVALID_ARGUMENT naming the field; unknown model ->
  NOT_FOUND; queue full -> RESOURCE_EXHAUSTED; draining -> UNAVAILABLE; an
  engine failure ends a stream with stop reason ERROR (INTERNAL for unary)
  and the server keeps serving.
* A client that cancels, or whose deadline passes, cancels its scheduler
  ticket (try/finally around the stream plus ``context.add_done_callback``),
  so the sequence leaves the batch within one engine step.

Also: grpc.health.v1 (NOT_SERVING until a real warm-up generation succeeded,
and again while draining), server reflection, TLS / mutual TLS, an optional
bearer token (health checks exempt), keepalive settings that keep long silent
prefills alive, explicit message-size limits, JSON-lines access logs carrying
the client's ``x-correlation-id``, Prometheus metrics and a graceful drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as _health_aio
from grpc_reflection.v1alpha import reflection

from ..protos import generation_pb2 as gen_pb2
from ..protos import generation_pb2_grpc as gen_grpc
from ..protos import granite_chat_pb2 as chat_pb2
from ..protos import granite_chat_pb2_grpc as chat_grpc
from .metrics import Metrics, engine_label
from .sampling import SamplingParams
from .scheduler import Event, Overloaded, Request, Scheduler, ShuttingDown
from .stopping import StoppingParams, StopReason
from .tool_calls import ToolCallStreamParser

log = logging.getLogger(__name__)
access_log = logging.getLogger("granite_deploy.serve.access")

FMAAS_SERVICE = gen_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name  # fmaas.GenerationService
CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name  # granite.v1.ChatService
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health
SERVICE_NAMES = (FMAAS_SERVICE, CHAT_SERVICE)

DEFAULT_MAX_NEW_TOKENS = 20  # fmaas: "max_new_tokens 0 means the server default, 20"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_STOP_SEQUENCES = 6
MAX_STOP_SEQUENCE_CHARS = 240


# ============================================================================ configuration

@dataclass
class ServerConfig:
    artifact: str
    host: str = "127.0.0.1"
    port: int = 8033  # 0: any free port (see GraniteServer.port)
    max_batch: int = 8
    max_queue: int = 64
    prefill_chunk: int = 256
    max_seq_len: int | None = None
    engine: str = "auto"
    threads: int | None = None
    metrics_port: int | None = None  # None: off; 0: any free port (the CLI's 0 means off)
    metrics_host: str | None = None  # default: the gRPC host
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: mutual TLS (client certificates required)
    auth_token: str | None = None
    model_id: str | None = None  # default: the artifact folder's name
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_new_tokens_limit: int | None = None  # default: min(1024, context - 1)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # fmaas: TGIS includes a matched stop sequence in the text unless told otherwise;
    # chat: OpenAI-style, excluded by default.
    fmaas_include_stop_sequence: bool = True
    chat_include_stop_sequence: bool = False
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 20_000
    min_client_ping_interval_ms: int = 5_000
    drain_grace_s: float = 30.0
    warmup: bool = True


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments of the server.

    Keepalive: the server pings idle connections every ``keepalive_time_ms``
    (also with no call active, and with no limit on pings without data), so a
    stream that is silent for minutes during a long prefill is neither
    reaped by a proxy nor mistaken for a dead peer; clients may ping as often
    as every ``min_client_ping_interval_ms`` without getting a GOAWAY
    ("too_many_pings"), which gRPC's 5-minute default would send.
    """
    return [
        ("grpc.max_receive_message_length", int(config.max_message_bytes)),
        ("grpc.max_send_message_length", int(config.max_message_bytes)),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_ms)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", int(config.min_client_ping_interval_ms)),
        ("grpc.so_reuseport", 0),
    ]


def _read_bytes(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (None: plaintext). A client CA turns on mutual TLS."""
    if not (config.tls_cert or config.tls_key or config.tls_client_ca):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("--tls-cert/--tls-key: both are needed for TLS (and for --tls-client-ca)")
    cert = _read_bytes(config.tls_cert, "--tls-cert")
    key = _read_bytes(config.tls_key, "--tls-key")
    ca = _read_bytes(config.tls_client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


# ============================================================================ errors and logs

class RpcReject(Exception):
    """A request refused before (or instead of) generation."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str):
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason


def _invalid(message: str) -> RpcReject:
    return RpcReject(grpc.StatusCode.INVALID_ARGUMENT, message, "invalid_argument")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus a record's ``fields`` dict."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _metadata(context) -> dict[str, str]:
    md = {}
    for item in context.invocation_metadata() or ():
        key, value = item[0], item[1]
        md[key.lower()] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return md


class _Call:
    """Bookkeeping of one RPC: ids, timing and the start/end access-log records."""

    def __init__(self, server: "GraniteServer", context, rpc: str):
        self.server, self.context, self.rpc = server, context, rpc
        self.t0 = time.monotonic()
        md = _metadata(context)
        self.correlation_id = md.get("x-correlation-id", "")
        self.request_id = uuid.uuid4().hex[:16]
        self.ended = False
        self._log("request_start", peer=context.peer())

    def _log(self, event: str, **fields) -> None:
        rec = {"event": event, "rpc": self.rpc, "request_id": self.request_id,
               "correlation_id": self.correlation_id, **fields}
        access_log.info(event, extra={"fields": rec})

    def end(self, status: str, **fields) -> None:
        if self.ended:
            return
        self.ended = True
        self._log("request_end", status=status, duration_ms=round((time.monotonic() - self.t0) * 1000, 3), **fields)

    async def reject(self, exc: RpcReject):
        self.server.metrics_rejected(exc.reason)
        self.end(exc.code.name, error=exc.message)
        await self.context.abort(exc.code, exc.message)


def _final_fields(final: Event | None) -> dict:
    if final is None:
        return {}
    out = {"stop_reason": final.stop_reason.name, "prompt_tokens": final.prompt_token_count,
           "generated_tokens": final.generated_count, "queue_ms": round(final.queue_time_s * 1000, 3),
           "ttft_ms": round(final.time_to_first_token_s * 1000, 3), "seed": final.seed}
    if final.error:
        out["error"] = final.error
    return out


# ============================================================================ scheduler <-> asyncio

class _Bridge:
    """Carries one request's scheduler events to the event loop.

    ``sink`` runs on the scheduler thread. A token event is held until the end
    of the scheduler step (``flush`` from the on_step hook) so that when it is
    the request's last token it travels together with the final event and the
    client gets one message carrying both the delta and the stop reason.
    Items on the queue are lists of events: [start], [token], [token, final]
    or [final].
    """

    def __init__(self, server: "GraniteServer", loop: asyncio.AbstractEventLoop, metrics: Metrics | None):
        self.server, self.loop, self.metrics = server, loop, metrics
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.arrival = time.monotonic()
        self._last_token = 0.0
        self._pending: Event | None = None  # scheduler thread only
        self.ticket = None
        self.finished = False  # the final event reached the consumer

    # --- scheduler thread -------------------------------------------------------------
    def sink(self, event: Event) -> None:
        m, now = self.metrics, time.monotonic()
        if event.kind == "start":
            if m:
                m.observe_queue(event.queue_time_s)
            self._put([event])
        elif event.kind == "token":
            if m:
                if self._last_token:
                    m.observe_itl(now - self._last_token)
                else:
                    m.observe_ttft(now - self.arrival)
            self._last_token = now
            if self._pending is not None:
                self._put([self._pending])
            self._pending = event
            self.server._held.add(self)
        else:
            if m:
                m.observe_finished(event.stop_reason.name, now - self.arrival)
            batch = [self._pending, event] if self._pending is not None else [event]
            self._pending = None
            self.server._held.discard(self)
            self._put(batch)

    def flush(self) -> None:
        if self._pending is not None:
            event, self._pending = self._pending, None
            self._put([event])

    def _put(self, events: list[Event]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, events)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # --- event loop -------------------------------------------------------------------------
    async def get(self) -> list[Event]:
        batch = await self.queue.get()
        if batch[-1].kind == "final":
            self.finished = True
        return batch

    def cancel(self) -> None:
        if self.ticket is not None and not self.finished:
            self.ticket.cancel()


# ============================================================================ request preparation

@dataclass
class _Prepared:
    requests: list[Request]
    texts: list[str]
    sample: bool
    seed: int | None = None  # the request's own seed (echoed for greedy chat requests)
    want_info: bool = False
    logprobs: bool = False
    ranks: bool = False
    top_n: int = 0
    input_text: bool = False
    input_tokens: bool = False
    meta: dict = field(default_factory=dict)


_FMAAS_FIELDS = {
    "temperature": "parameters.sampling.temperature",
    "top_k": "parameters.sampling.top_k",
    "top_p": "parameters.sampling.top_p",
    "typical_p": "parameters.sampling.typical_p",
    "seed": "parameters.sampling.seed",
    "repetition_penalty": "parameters.decoding.repetition_penalty",
    "logprobs": "parameters.response.token_logprobs",
    "top_n_tokens": "parameters.response.top_n_tokens",
    "max_new_tokens": "parameters.stopping.max_new_tokens",
    "min_new_tokens": "parameters.stopping.min_new_tokens",
    "stop_sequences": "parameters.stopping.stop_sequences",
    "include_stop_sequence": "parameters.stopping.include_stop_sequence",
    "time_limit_s": "parameters.stopping.time_limit_millis",
}
_CHAT_FIELDS = {"time_limit_s": "time_limit_millis"}


def _renamed(exc: ValueError, names: dict[str, str]) -> RpcReject:
    """A validate() message "<field>: ..." with the field renamed to its wire path."""
    msg = str(exc)
    name, sep, rest = msg.partition(":")
    if sep and name in names:
        msg = f"{names[name]}:{rest}"
    return _invalid(msg)


def _validated(sampling: SamplingParams, stopping: StoppingParams, names: dict[str, str]):
    try:
        sampling.validate()
    except ValueError as exc:
        raise _renamed(exc, names) from None
    try:
        stopping.validate(MAX_STOP_SEQUENCES, MAX_STOP_SEQUENCE_CHARS)
    except ValueError as exc:
        raise _renamed(exc, names) from None
    return sampling, stopping


# ============================================================================ message building

def _fmaas_token_info(tokenizer, token, prepared: _Prepared) -> gen_pb2.TokenInfo:
    info = gen_pb2.TokenInfo(text=tokenizer.decode([token.token_id]))
    if prepared.logprobs and token.logprob is not None:
        info.logprob = token.logprob
    if prepared.ranks and token.rank is not None:
        info.rank = token.rank
    for tid, lp in token.top_tokens:
        info.top_tokens.add(text=tokenizer.decode([tid]), logprob=lp)
    return info


def _chat_token_info(tokenizer, token, logprobs: bool) -> chat_pb2.TokenInfo:
    info = chat_pb2.TokenInfo(token_id=token.token_id, text=tokenizer.decode([token.token_id]))
    if logprobs and token.logprob is not None:
        info.logprob = token.logprob
        info.rank = token.rank or 0
    for tid, lp in token.top_tokens:
        info.top_tokens.add(token_id=tid, text=tokenizer.decode([tid]), logprob=lp)
    return info


class FmaasStreamBuilder:
    """Scheduler events -> fmaas GenerationResponse messages (stream) and the unary response."""

    def __init__(self, tokenizer, prepared: _Prepared, index: int = 0):
        self.tokenizer, self.p, self.index = tokenizer, prepared, index
        self.final: Event | None = None

    def messages(self, batch: list[Event]) -> list[gen_pb2.GenerationResponse]:
        p = self.p
        first = batch[0]
        if first.kind == "start":
            msg = gen_pb2.GenerationResponse(input_token_count=first.prompt_token_count,
                                             seed=(first.seed or 0) if p.sample else 0)
            if p.input_text:
                msg.text = p.texts[self.index]
            if p.input_tokens:
                for tid in p.requests[self.index].prompt_ids:
                    msg.input_tokens.add(text=self.tokenizer.decode([tid]))
            return [msg]
        token = first if first.kind == "token" else None
        final = batch[-1] if batch[-1].kind == "final" else None
        if final is None and token is not None and not token.text and not p.want_info:
            return []  # held back: nothing visible yet
        msg = gen_pb2.GenerationResponse()
        if token is not None:
            msg.text = token.text
            msg.generated_token_count = token.generated_count
            if p.want_info and token.token is not None:
                msg.tokens.append(_fmaas_token_info(self.tokenizer, token.token, p))
        if final is not None:
            self.final = final
            msg.generated_token_count = final.generated_count
            msg.stop_reason = int(final.stop_reason)
            msg.stop_sequence = final.stop_sequence
        return [msg]


def accumulate_fmaas(messages: list[gen_pb2.GenerationResponse]) -> gen_pb2.GenerationResponse:
    """The unary response equivalent to a stream of messages (text concatenated)."""
    out = gen_pb2.GenerationResponse()
    text = []
    for m in messages:
        if m.input_token_count:
            out.input_token_count = m.input_token_count
        if m.seed:
            out.seed = m.seed
        out.input_tokens.extend(m.input_tokens)
        text.append(m.text)
        out.tokens.extend(m.tokens)
        out.generated_token_count = max(out.generated_token_count, m.generated_token_count)
        if m.stop_reason:
            out.stop_reason = m.stop_reason
            out.stop_sequence = m.stop_sequence
    out.text = "".join(text)
    return out


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
                    self._pending_tokens.append(_chat_token_info(self.tokenizer, event.token, self.logprobs))
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
                    time_to_first_token_ms=event.time_to_first_token_s * 1000.0)))
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


def _conversation_dicts(conv: chat_pb2.Conversation) -> tuple[list[dict], list[dict] | None, list[dict] | None]:
    """A Conversation as the chat template's messages / tools / documents (OpenAI shapes)."""
    if not conv.messages:
        raise _invalid("conversation.messages: is empty (give at least one message)")
    messages = []
    for i, m in enumerate(conv.messages):
        if not m.role:
            raise _invalid(f"conversation.messages[{i}].role: is empty")
        d: dict = {"role": m.role, "content": m.content}
        if m.HasField("name"):
            d["name"] = m.name
        if m.tool_calls:
            calls = []
            for j, c in enumerate(m.tool_calls):
                try:
                    args = json.loads(c.arguments_json) if c.arguments_json.strip() else {}
                except ValueError as exc:
                    raise _invalid(f"conversation.messages[{i}].tool_calls[{j}].arguments_json: "
                                   f"not valid JSON ({exc})") from None
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
                raise _invalid(f"conversation.tools[{i}].type: only \"function\" is supported, got {kind!r}")
            if not t.function.name:
                raise _invalid(f"conversation.tools[{i}].function.name: is empty")
            try:
                params = json.loads(t.function.parameters_json) if t.function.parameters_json.strip() else {}
            except ValueError as exc:
                raise _invalid(f"conversation.tools[{i}].function.parameters_json: not valid JSON ({exc})") from None
            if not isinstance(params, dict):
                raise _invalid(f"conversation.tools[{i}].function.parameters_json: must be a JSON object")
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


# ============================================================================ servicers

class GenerationServicer(gen_grpc.GenerationServiceServicer):
    """fmaas.GenerationService."""

    def __init__(self, server: "GraniteServer"):
        self.s = server

    async def Generate(self, request, context):
        call = _Call(self.s, context, "fmaas.GenerationService/Generate")
        try:
            self.s._check_model(request.model_id, request.prefix_id if request.HasField("prefix_id") else "")
            if not request.requests:
                raise _invalid("requests: is empty (give at least one GenerationRequest)")
            prepared = self.s._prepare_fmaas([r.text for r in request.requests], request.params, batched=True)
        except RpcReject as exc:
            return await call.reject(exc)
        bridges: list[_Bridge] = []
        context.add_done_callback(lambda _ctx: [b.cancel() for b in bridges])
        status = "CANCELLED"
        try:
            try:
                for r in prepared.requests:
                    bridges.append(self.s._submit(r))
            except RpcReject as exc:
                for b in bridges:
                    b.cancel()
                return await call.reject(exc)

            async def collect(i: int, bridge: _Bridge):
                builder = FmaasStreamBuilder(self.s.tokenizer, prepared, i)
                msgs = []
                while builder.final is None:
                    msgs.extend(builder.messages(await bridge.get()))
                return accumulate_fmaas(msgs), builder.final

            results = await asyncio.gather(*(collect(i, b) for i, b in enumerate(bridges)))
            errors = [f.error for _, f in results if f.stop_reason == StopReason.ERROR]
            if errors:
                status = "INTERNAL"
                call.end(status, error=errors[0], n=len(results))
                await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {errors[0]}")
            status = "OK"
            call.end(status, n=len(results), generated_tokens=sum(f.generated_count for _, f in results),
                     stop_reasons=[f.stop_reason.name for _, f in results])
            return gen_pb2.BatchedGenerationResponse(responses=[r for r, _ in results])
        except grpc.aio.AbortError:
            raise
        except Exception:
            status = "INTERNAL"
            log.exception("%s failed", call.rpc, extra={"fields": {"request_id": call.request_id}})
            raise
        finally:
            for b in bridges:
                b.cancel()
            call.end(status)

    async def GenerateStream(self, request, context):
        call = _Call(self.s, context, "fmaas.GenerationService/GenerateStream")
        try:
            self.s._check_model(request.model_id, request.prefix_id if request.HasField("prefix_id") else "")
            prepared = self.s._prepare_fmaas([request.request.text], request.params, batched=False)
            bridge = self.s._submit(prepared.requests[0])
        except RpcReject as exc:
            await call.reject(exc)
            return
        context.add_done_callback(lambda _ctx: bridge.cancel())
        builder = FmaasStreamBuilder(self.s.tokenizer, prepared)
        status = "CANCELLED"
        try:
            while builder.final is None:
                for msg in builder.messages(await bridge.get()):
                    yield msg
            status = "OK"
        except grpc.aio.AbortError:
            raise
        except Exception:
            status = "INTERNAL"
            log.exception("%s failed", call.rpc, extra={"fields": {"request_id": call.request_id}})
            raise
        finally:
            bridge.cancel()
            call.end(status, **_final_fields(builder.final))

    async def Tokenize(self, request, context):
        call = _Call(self.s, context, "fmaas.GenerationService/Tokenize")
        try:
            self.s._check_ready()
            self.s._check_model(request.model_id, "")
            out = gen_pb2.BatchedTokenizeResponse()
            n = request.truncate_input_tokens
            for r in request.requests:
                ids, offsets = self.s._encode_with_offsets(r.text)
                if n and len(ids) > n:
                    ids, offsets = ids[-n:], offsets[-n:]
                resp = out.responses.add(token_count=len(ids))
                if request.return_tokens:
                    resp.tokens.extend(self.s._token_strings(ids))
                if request.return_offsets:
                    for a, b in offsets:
                        resp.offsets.add(start=a, end=b)
        except RpcReject as exc:
            return await call.reject(exc)
        call.end("OK", n=len(request.requests))
        return out

    async def ModelInfo(self, request, context):
        call = _Call(self.s, context, "fmaas.GenerationService/ModelInfo")
        try:
            self.s._check_ready()
            self.s._check_model(request.model_id, "")
        except RpcReject as exc:
            return await call.reject(exc)
        call.end("OK")
        return gen_pb2.ModelInfoResponse(model_kind=gen_pb2.ModelInfoResponse.DECODER_ONLY,
                                         max_sequence_length=self.s.context_window,
                                         max_new_tokens=self.s.max_new_tokens_limit)


class ChatServicer(chat_grpc.ChatServiceServicer):
    """granite.v1.ChatService."""

    def __init__(self, server: "GraniteServer"):
        self.s = server

    async def ChatStream(self, request, context):
        call = _Call(self.s, context, "granite.v1.ChatService/ChatStream")
        try:
            self.s._check_model(request.model_id, "")
            prepared = self.s._prepare_chat(request)
            bridge = self.s._submit(prepared.requests[0])
        except RpcReject as exc:
            await call.reject(exc)
            return
        context.add_done_callback(lambda _ctx: bridge.cancel())
        builder = ChatEventBuilder(self.s.tokenizer, logprobs=request.logprobs, top_n=request.top_n_tokens,
                                   sample=prepared.sample, request_seed=prepared.seed)
        status = "CANCELLED"
        try:
            while builder.final is None:
                for ev in builder.events(await bridge.get()):
                    yield ev
            status = "OK"
        except grpc.aio.AbortError:
            raise
        except Exception:
            status = "INTERNAL"
            log.exception("%s failed", call.rpc, extra={"fields": {"request_id": call.request_id}})
            raise
        finally:
            bridge.cancel()
            call.end(status, tool_calls=builder.n_calls, **_final_fields(builder.final))

    async def Chat(self, request, context):
        call = _Call(self.s, context, "granite.v1.ChatService/Chat")
        try:
            self.s._check_model(request.model_id, "")
            prepared = self.s._prepare_chat(request)
            bridge = self.s._submit(prepared.requests[0])
        except RpcReject as exc:
            return await call.reject(exc)
        context.add_done_callback(lambda _ctx: bridge.cancel())
        builder = ChatEventBuilder(self.s.tokenizer, logprobs=request.logprobs, top_n=request.top_n_tokens,
                                   sample=prepared.sample, request_seed=prepared.seed)
        events: list[chat_pb2.ChatEvent] = []
        status = "CANCELLED"
        try:
            while builder.final is None:
                events.extend(builder.events(await bridge.get()))
            final = builder.final
            if final.stop_reason == StopReason.ERROR:
                status = "INTERNAL"
                call.end(status, **_final_fields(final))
                await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {final.error}")
            status = "OK"
            return accumulate_chat(events)
        except grpc.aio.AbortError:
            raise
        except Exception:
            status = "INTERNAL"
            log.exception("%s failed", call.rpc, extra={"fields": {"request_id": call.request_id}})
            raise
        finally:
            bridge.cancel()
            call.end(status, tool_calls=builder.n_calls, **_final_fields(builder.final))

    async def Tokenize(self, request, context):
        call = _Call(self.s, context, "granite.v1.ChatService/Tokenize")
        try:
            self.s._check_ready()
            self.s._check_model(request.model_id, "")
            which = request.WhichOneof("input")
            if which == "text":
                text = request.text
            elif which == "conversation":
                text = self.s._render_conversation(request.conversation)
            else:
                raise _invalid("input: give text or conversation")
            ids, offsets = self.s._encode_with_offsets(text)
            out = chat_pb2.TokenizeResponse(token_count=len(ids))
            if request.return_tokens:
                out.token_ids.extend(ids)
                out.tokens.extend(self.s._token_strings(ids))
            if request.return_offsets:
                for a, b in offsets:
                    out.offsets.add(start=a, end=b)
        except RpcReject as exc:
            return await call.reject(exc)
        call.end("OK", prompt_tokens=len(ids))
        return out

    async def ModelInfo(self, request, context):
        call = _Call(self.s, context, "granite.v1.ChatService/ModelInfo")
        try:
            self.s._check_ready()
            self.s._check_model(request.model_id, "")
        except RpcReject as exc:
            return await call.reject(exc)
        call.end("OK")
        info = self.s.engine.info
        device = str(info.device).split(":")[0]
        return chat_pb2.ModelInfoResponse(model_id=self.s.model_id, context_length=self.s.context_window,
                                          max_new_tokens=self.s.max_new_tokens_limit,
                                          engine_kind=f"{info.kind}-{device}", precision=info.precision)


# ============================================================================ auth

def _deny_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with `code`."""

    async def deny(_request, context):
        await context.abort(code, message)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` metadata; health checks are exempt."""

    def __init__(self, token: str, exempt_prefixes: tuple[str, ...] = (f"/{HEALTH_SERVICE}/",),
                 on_reject: Callable[[], None] | None = None):
        if not token:
            raise ValueError("--auth-token: must not be empty")
        self._token = token.encode("utf-8")
        self._exempt = exempt_prefixes
        self._on_reject = on_reject

    def _authorized(self, metadata) -> bool:
        for item in metadata or ():
            if item[0].lower() == "authorization":
                value = item[1].decode("utf-8", "replace") if isinstance(item[1], bytes) else item[1]
                scheme, _, credential = value.strip().partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode("utf-8"), self._token):
                    return True
        return False

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._exempt) or self._authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if self._on_reject:
            self._on_reject()
        access_log.info("request_rejected", extra={"fields": {
            "event": "request_rejected", "rpc": method.strip("/"), "status": "UNAUTHENTICATED",
            "correlation_id": dict((k.lower(), v) for k, v in (handler_call_details.invocation_metadata or ()))
            .get("x-correlation-id", "")}})
        return _deny_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token "
                             "(send metadata 'authorization: Bearer <token>')")


# ============================================================================ the server

class GraniteServer:
    """One artifact served over gRPC. Use from a running event loop:

        server = GraniteServer(ServerConfig(artifact, port=0))
        await server.start()          # listening, warmed up, health SERVING
        ...
        await server.drain()          # NOT_SERVING, finish in-flight, stop

    `engine` / `tokenizer` may be given (tests, embedding); otherwise they are
    loaded from the artifact.
    """

    def __init__(self, config: ServerConfig, engine=None, tokenizer=None):
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.scheduler: Scheduler | None = None
        self.metrics: Metrics | None = None
        self.metrics_port: int | None = None
        self.health = _health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.ready = False
        self.draining = False
        self.model_id = config.model_id or Path(config.artifact).resolve().name
        self._model_ids = {self.model_id}
        self.context_window = 0
        self.max_new_tokens_limit = 0
        self._held: set[_Bridge] = set()  # bridges holding a token until the step ends (scheduler thread)
        self._stopped = asyncio.Event()
        self._shut_down = False
        self._drain_task: asyncio.Task | None = None

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> "GraniteServer":
        cfg = self.config
        credentials = server_credentials(cfg)  # fail fast on bad TLS files, before loading the model
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        interceptors = []
        if cfg.auth_token:
            interceptors.append(BearerTokenInterceptor(cfg.auth_token,
                                                       on_reject=lambda: self.metrics_rejected("unauthenticated")))
        self.server = grpc.aio.server(interceptors=interceptors, options=server_options(cfg))
        gen_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(self), self.server)
        chat_grpc.add_ChatServiceServicer_to_server(ChatServicer(self), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(SERVICE_NAMES + (HEALTH_SERVICE, reflection.SERVICE_NAME), self.server)
        host = f"[{cfg.host}]" if ":" in cfg.host and not cfg.host.startswith("[") else cfg.host
        address = f"{host}:{cfg.port}"
        try:
            port = (self.server.add_secure_port(address, credentials) if credentials
                    else self.server.add_insecure_port(address))
        except RuntimeError as exc:
            raise ValueError(f"--port: cannot listen on {address}: {exc}") from None
        if not port:
            raise ValueError(f"--port: cannot listen on {address}")
        self.port = port
        await self.server.start()  # health answers NOT_SERVING while the model loads and warms up
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._load)
            if cfg.metrics_port is not None:
                self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_host or cfg.host)
            self.scheduler.start()
            if cfg.warmup:
                await self._warm_up()
        except BaseException:
            await self.server.stop(None)
            if self.scheduler:
                self.scheduler.shutdown(timeout=5)
            if self.metrics:
                self.metrics.close()
            raise
        self.ready = True
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d", cfg.artifact, cfg.host, port, extra={"fields": {
            "event": "serving", "artifact": str(cfg.artifact), "port": port, "model_id": self.model_id,
            "engine": self.engine_description()}})
        return self

    def _load(self) -> None:
        cfg = self.config
        if self.tokenizer is None:
            from .tokenizer import GraniteTokenizer

            self.tokenizer = GraniteTokenizer.from_dir(cfg.artifact)
        if self.engine is None:
            from ..artifact import load_manifest
            from ..engines import load_engine

            manifest = load_manifest(cfg.artifact)
            source = (manifest.get("source") or {}).get("model")
            if isinstance(source, str) and source:
                self._model_ids.add(source)
            self.engine = load_engine(cfg.artifact, engine=cfg.engine, max_batch=cfg.max_batch,
                                      max_seq_len=cfg.max_seq_len, threads=cfg.threads)
        info = self.engine.info
        self.context_window = int(info.max_seq_len)
        limit = cfg.max_new_tokens_limit or min(1024, self.context_window - 1)
        if limit < 1:
            raise ValueError(f"--max-new-tokens-limit: must be >= 1, got {limit}")
        self.max_new_tokens_limit = min(int(limit), max(1, self.context_window - 1))
        self.default_max_new_tokens = max(1, min(cfg.default_max_new_tokens, self.max_new_tokens_limit))
        self.metrics = Metrics(engine_label(info))
        self.scheduler = Scheduler(self.engine, self.tokenizer, max_queue=cfg.max_queue,
                                   max_running=cfg.max_batch, prefill_chunk=cfg.prefill_chunk,
                                   on_step=self._on_step)

    def engine_description(self) -> str:
        info = self.engine.info
        return f"{info.kind} {info.device} {info.precision}, max batch {info.max_batch}, context {info.max_seq_len}"

    async def _warm_up(self) -> None:
        """One real tiny generation through the whole path before reporting SERVING."""
        ids = tuple(self.tokenizer.encode("Hello")) or (0,)
        request = Request(ids, SamplingParams(), StoppingParams(max_new_tokens=2), request_id="warmup")
        bridge = _Bridge(self, asyncio.get_running_loop(), None)
        bridge.ticket = self.scheduler.submit(request, bridge.sink)
        while True:
            batch = await bridge.get()
            if batch[-1].kind == "final":
                final = batch[-1]
                break
        if final.stop_reason == StopReason.ERROR:
            raise RuntimeError(f"warm-up generation failed: {final.error}")

    def _on_step(self, counts: dict) -> None:  # scheduler thread
        if self.metrics:
            self.metrics.on_step(counts)
        if self._held:
            for bridge in list(self._held):
                bridge.flush()
            self._held.clear()

    async def drain(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new generations, let in-flight ones finish
        (up to `grace` seconds), then stop the server and the scheduler."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain(self.config.drain_grace_s if grace is None else grace))
        await asyncio.shield(self._drain_task)

    async def _drain(self, grace: float) -> None:
        self.draining = True
        log.info("draining (grace %.1f s)", grace, extra={"fields": {"event": "draining", "grace_s": grace}})
        await self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + grace
        if self.scheduler is not None:
            self.scheduler.stop_accepting()
            while not self.scheduler.idle() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        if self.server is not None:
            # in-flight handlers only have their last messages left to write
            await self.server.stop(max(0.5, deadline - time.monotonic()))
        await self._shutdown_rest()
        log.info("stopped", extra={"fields": {"event": "stopped"}})

    async def stop(self) -> None:
        """Immediate stop: cancels everything in flight."""
        self.draining = True
        if self.scheduler is not None:
            self.scheduler.stop_accepting()
        if self.server is not None:
            await self.server.stop(None)
        await self._shutdown_rest()

    async def _shutdown_rest(self) -> None:
        if self._shut_down:
            return await self._stopped.wait()
        self._shut_down = True
        if self.scheduler is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.scheduler.shutdown, 10.0)
        if self.metrics is not None:
            self.metrics.close()
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --- helpers for the servicers ---------------------------------------------------------
    def metrics_rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(reason)

    def _check_ready(self) -> None:
        if not self.ready:
            raise RpcReject(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly", "not_ready")

    def _check_model(self, model_id: str, prefix_id: str) -> None:
        if model_id and model_id not in self._model_ids:
            raise RpcReject(grpc.StatusCode.NOT_FOUND,
                            f"model_id: {model_id!r} is not served here (this server serves {self.model_id!r})",
                            "not_found")
        if prefix_id:
            raise RpcReject(grpc.StatusCode.NOT_FOUND,
                            f"prefix_id: no prompt prefix {prefix_id!r} (this server has no prompt-tuning prefixes)",
                            "not_found")

    def _submit(self, request: Request) -> _Bridge:
        self._check_ready()
        bridge = _Bridge(self, asyncio.get_running_loop(), self.metrics)
        try:
            bridge.ticket = self.scheduler.submit(request, bridge.sink)
        except Overloaded as exc:
            raise RpcReject(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {exc}; retry later",
                            "overloaded") from None
        except ShuttingDown as exc:
            raise RpcReject(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry on another replica", "shutting_down") from None
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        return bridge

    def _encode_prompt(self, text: str, field_name: str, truncate: int = 0) -> tuple[int, ...]:
        if not text:
            raise _invalid(f"{field_name}: is empty")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise _invalid(f"{field_name}: encodes to no tokens")
        if truncate and len(ids) > truncate:
            ids = ids[-truncate:]  # keep the end of the prompt, like TGIS
        if len(ids) >= self.context_window:
            hint = "" if truncate else "; shorten it or set parameters.truncate_input_tokens"
            raise _invalid(f"{field_name}: the prompt is {len(ids)} tokens but the context window is "
                           f"{self.context_window} tokens (at least one token must remain for generation){hint}")
        return tuple(ids)

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids as the server encodes prompts, with [start, end) character offsets when the
        tokenizer can tell them ((0, 0) for tokens the tokenizer adds, such as a BOS)."""
        ids = list(self.tokenizer.encode(text))
        inner = getattr(self.tokenizer, "_tok", None)  # the `tokenizers` Tokenizer behind GraniteTokenizer
        if inner is not None:
            enc = inner.encode(text, add_special_tokens=False)
            inner_ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
            for lead in range(len(ids) - len(inner_ids) + 1):  # BOS/EOS the artifact adds around the text
                if ids[lead:lead + len(inner_ids)] == inner_ids:
                    tail = len(ids) - lead - len(inner_ids)
                    return ids, [(0, 0)] * lead + offsets + [(len(text), len(text))] * tail
        return ids, [(0, 0)] * len(ids)

    def _token_strings(self, ids: list[int]) -> list[str]:
        to_token = getattr(self.tokenizer, "id_to_token", None)
        return [(to_token(i) if to_token else None) or self.tokenizer.decode([i]) for i in ids]

    def _stopping(self, max_new: int, min_new: int, stops, include, time_limit_ms: int,
                  max_field: str) -> StoppingParams:
        if max_new > self.max_new_tokens_limit:
            raise _invalid(f"{max_field}: must be <= {self.max_new_tokens_limit} (this server's limit), got {max_new}")
        return StoppingParams(max_new_tokens=max_new or self.default_max_new_tokens, min_new_tokens=min_new,
                              stop_sequences=tuple(stops), include_stop_sequence=include,
                              time_limit_s=time_limit_ms / 1000.0 if time_limit_ms else None)

    def _prepare_fmaas(self, texts: list[str], params: gen_pb2.Parameters, batched: bool) -> _Prepared:
        self._check_ready()
        method = params.method
        if method not in (gen_pb2.GREEDY, gen_pb2.SAMPLE):
            raise _invalid(f"parameters.method: unknown decoding method {method}")
        sample = method == gen_pb2.SAMPLE
        s, st, r, d = params.sampling, params.stopping, params.response, params.decoding
        if d.HasField("length_penalty") and d.length_penalty.decay_factor not in (0.0, 1.0):
            raise _invalid("parameters.decoding.length_penalty: not supported by this server")
        seed = s.seed if s.HasField("seed") else None
        # fmaas: 0 means "disabled"; sampling fields are checked whatever the method
        sampling = SamplingParams(temperature=s.temperature or 1.0, top_k=s.top_k, top_p=s.top_p or 1.0,
                                  typical_p=s.typical_p or 1.0, repetition_penalty=d.repetition_penalty or 1.0,
                                  seed=seed, logprobs=bool(r.token_logprobs or r.token_ranks),
                                  top_n_tokens=r.top_n_tokens)
        include = st.include_stop_sequence if st.HasField("include_stop_sequence") else self.config.fmaas_include_stop_sequence
        stopping = self._stopping(st.max_new_tokens, st.min_new_tokens, st.stop_sequences, include,
                                  st.time_limit_millis, "parameters.stopping.max_new_tokens")
        sampling, stopping = _validated(sampling, stopping, _FMAAS_FIELDS)
        if not sample:
            sampling = dataclasses.replace(sampling, temperature=0.0)
        requests = []
        for i, text in enumerate(texts):
            name = f"requests[{i}].text" if batched else "request.text"
            ids = self._encode_prompt(text, name, params.truncate_input_tokens)
            requests.append(Request(ids, sampling, stopping))
        return _Prepared(requests=requests, texts=list(texts), sample=sample, seed=seed,
                         want_info=bool(r.generated_tokens or r.token_logprobs or r.token_ranks or r.top_n_tokens),
                         logprobs=r.token_logprobs, ranks=r.token_ranks, top_n=r.top_n_tokens,
                         input_text=r.input_text, input_tokens=r.input_tokens)

    def _render_conversation(self, conv: chat_pb2.Conversation) -> str:
        messages, tools, documents = _conversation_dicts(conv)
        try:
            return self.tokenizer.render_chat(messages, tools=tools, documents=documents, add_generation_prompt=True)
        except ValueError as exc:  # ChatTemplateError included
            raise _invalid(f"conversation: the chat template failed: {exc}") from None

    def _prepare_chat(self, request: chat_pb2.ChatRequest) -> _Prepared:
        self._check_ready()
        which = request.WhichOneof("prompt")
        if which == "conversation":
            text, name = self._render_conversation(request.conversation), "conversation"
        elif which == "fim":
            if not (request.fim.prefix or request.fim.suffix):
                raise _invalid("fim: prefix and suffix are both empty")
            try:
                text = self.tokenizer.fim_prompt(request.fim.prefix, request.fim.suffix)
            except ValueError as exc:
                raise _invalid(f"fim: {exc}") from None
            name = "fim"
        else:
            raise _invalid("prompt: give a conversation or a fim input")
        seed = request.seed if request.HasField("seed") else None
        sampling = SamplingParams(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p or 1.0,
                                  typical_p=request.typical_p or 1.0,
                                  repetition_penalty=request.repetition_penalty or 1.0, seed=seed,
                                  logprobs=request.logprobs, top_n_tokens=request.top_n_tokens)
        include = (request.include_stop_sequence if request.HasField("include_stop_sequence")
                   else self.config.chat_include_stop_sequence)
        stopping = self._stopping(request.max_new_tokens, request.min_new_tokens, request.stop_sequences, include,
                                  request.time_limit_millis, "max_new_tokens")
        sampling, stopping = _validated(sampling, stopping, _CHAT_FIELDS)
        ids = self._encode_prompt(text, name)
        return _Prepared(requests=[Request(ids, sampling, stopping)], texts=[text], sample=not sampling.greedy,
                         seed=seed)


# ============================================================================ running in a thread

class ServerThread:
    """A GraniteServer on its own event loop in a background thread (tests, embedding).

        with ServerThread(ServerConfig(artifact, port=0)) as st:
            channel = grpc.insecure_channel(f"127.0.0.1:{st.port}")
    """

    def __init__(self, config: ServerConfig, engine=None, tokenizer=None, start_timeout: float = 120.0,
                 wait: bool = True):
        self.server = GraniteServer(config, engine=engine, tokenizer=tokenizer)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="granite-grpc", daemon=True)
        self._thread.start()
        if wait:
            self.wait_ready(start_timeout)

    def wait_ready(self, timeout: float = 120.0) -> "ServerThread":
        """Block until start() finished (listening, warmed up, SERVING); re-raises its error."""
        if not self._ready.wait(timeout):
            raise TimeoutError("server did not start in time")
        if self._error is not None:
            self._thread.join(5)
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # reported to the constructor
            self._error = exc
            self._ready.set()
            self.loop.close()
            return
        self._ready.set()
        try:
            self.loop.run_until_complete(self.server.wait_stopped())
            # let handlers finishing after the stop write their last log lines
            self.loop.run_until_complete(asyncio.sleep(0))
        finally:
            self.loop.close()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def call(self, coro, timeout: float | None = 60):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def drain_async(self, grace: float | None = None):
        """Start draining; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(self.server.drain(grace), self.loop)

    def drain(self, grace: float | None = None, timeout: float | None = 120) -> None:
        self.drain_async(grace).result(timeout)
        self._thread.join(timeout)

    def stop(self, timeout: float = 60) -> None:
        """Stop at once (cancels what is in flight); a no-op after drain()."""
        if self._thread.is_alive() and not self.server._stopped.is_set():
            try:
                future = asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop)
            except RuntimeError:  # the loop is already closed
                future = None
            end = time.monotonic() + timeout
            while future is not None and not future.done() and self._thread.is_alive() and time.monotonic() < end:
                time.sleep(0.02)
        self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ============================================================================ CLI entry

async def serve_forever(config: ServerConfig, on_ready: Callable[[GraniteServer], None] | None = None) -> None:
    """Start, wait for SIGTERM/SIGINT, drain (a second signal stops at once)."""
    import signal

    server = GraniteServer(config)
    await server.start()
    if on_ready:
        on_ready(server)
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)

    def first_signal():
        signalled.set()
        for sig in signals:  # a second signal: stop now
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))

    for sig in signals:
        loop.add_signal_handler(sig, first_signal)
    try:
        stopped = asyncio.ensure_future(server.wait_stopped())
        waiter = asyncio.ensure_future(signalled.wait())
        await asyncio.wait({stopped, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not server._stopped.is_set():
            drain = asyncio.ensure_future(server.drain())
            await asyncio.wait({drain, stopped}, return_when=asyncio.FIRST_COMPLETED)
            await server.wait_stopped()
        waiter.cancel()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
