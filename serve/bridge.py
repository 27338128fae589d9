"""gRPC bookkeeping shared by every handler: status mapping, access logs, malformed requests.

* :func:`grpc_status` - the project's error classes (:mod:`granite_deploy.errors`) as
  gRPC status codes (and the ``rejections_total`` metric reason); the HTTP front end
  maps the same classes to its own statuses.
* :func:`rpc` - the decorator every servicer method wears: it opens a :class:`Call`
  (``request_start`` / ``request_end`` access-log records carrying the client's
  ``x-correlation-id``), turns a malformed request message into INVALID_ARGUMENT,
  maps raised errors to statuses, logs unexpected ones once (INTERNAL, never a
  traceback to the client) and runs the handler's clean-ups (cancelling its
  generations) however it ends.
* :class:`MalformedRequestInterceptor` - wraps the request deserializers of the
  project's services so that bytes that are not the request message reach
  :func:`rpc` as a :class:`Malformed` marker instead of failing inside grpc.
* :class:`Prepared` - a request validated and tokenized: the scheduler requests
  plus what the response builders need to know about it.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import grpc

from ..errors import GraniteDeployError, InvalidField, NotFound, Overloaded, TooLarge, Unavailable, VerificationFailed
from .scheduler import Event, Request

access_log = logging.getLogger("granite_deploy.serve.access")
log = logging.getLogger(__name__)


# ============================================================================ errors -> statuses

class GenerationFailed(GraniteDeployError):
    """A generation ended with stop reason ERROR (the engine or the sampler failed)."""

    reason = None  # not a rejection


_STATUS: tuple[tuple[type, grpc.StatusCode, str], ...] = (
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large"),
    (InvalidField, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
    (NotFound, grpc.StatusCode.NOT_FOUND, "not_found"),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, "unavailable"),
    (VerificationFailed, grpc.StatusCode.FAILED_PRECONDITION, "failed_precondition"),
)


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str | None]:
    """(status code, rejections_total reason or None) for an error raised while serving an RPC."""
    for cls, code, reason in _STATUS:
        if isinstance(exc, cls):
            return code, getattr(exc, "reason", None) or reason
    return grpc.StatusCode.INTERNAL, getattr(exc, "reason", None)


# ============================================================================ prepared requests

@dataclass
class Prepared:
    requests: list[Request]
    texts: list[str]
    sample: bool
    seed: int | None = None  # the request's own seed (echoed for greedy chat requests)
    want_info: bool = False
    logprobs: bool = False
    ranks: bool = False
    input_text: bool = False
    input_tokens: bool = False


def final_fields(final: Event | None) -> dict:
    """The access-log fields of a finished generation."""
    if final is None:
        return {}
    out = {"stop_reason": final.stop_reason.name, "prompt_tokens": final.prompt_token_count,
           "generated_tokens": final.generated_count, "queue_ms": round(final.queue_time_s * 1000, 3),
           "ttft_ms": round(final.time_to_first_token_s * 1000, 3), "seed": final.seed}
    if final.error:
        out["error"] = final.error
    return out


# ============================================================================ access logs

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


def metadata_dict(metadata) -> dict[str, str]:
    """Invocation metadata as a dict with lower-cased keys (binary values decoded)."""
    md = {}
    for item in metadata or ():
        key, value = item[0], item[1]
        md[key.lower()] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return md


class Call:
    """Bookkeeping of one RPC: ids, timing, the start/end access-log records, clean-ups.

    A handler adds log fields with ``call.fields.update(...)`` or a callable with
    ``call.fields_from(fn)`` (evaluated when the record is written), and registers
    clean-ups with ``call.on_close(fn)`` (``call.watch(stream)`` also cancels the
    stream when the client goes away).
    """

    def __init__(self, context, rpc: str, on_reject: Callable[[str], None] | None = None):
        self.context, self.rpc, self.on_reject = context, rpc, on_reject
        self.t0 = time.monotonic()
        self.correlation_id = metadata_dict(context.invocation_metadata()).get("x-correlation-id", "")
        self.request_id = uuid.uuid4().hex[:16]
        self.ended = False
        self.fields: dict = {}
        self._field_fns: list[Callable[[], dict]] = []
        self._cleanups: list[Callable[[], None]] = []
        self._log("request_start", peer=context.peer())

    def _log(self, event: str, **fields) -> None:
        rec = {"event": event, "rpc": self.rpc, "request_id": self.request_id,
               "correlation_id": self.correlation_id, **fields}
        access_log.info(event, extra={"fields": rec})

    def fields_from(self, fn: Callable[[], dict]) -> None:
        self._field_fns.append(fn)

    def on_close(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def watch(self, stream) -> None:
        """Cancel `stream` when the client goes away or the handler ends (frees its slot)."""
        self.context.add_done_callback(lambda _ctx: stream.cancel())
        self.on_close(stream.cancel)

    def current_fields(self) -> dict:
        extra = dict(self.fields)
        for fn in self._field_fns:
            try:
                extra.update(fn())
            except Exception:
                log.exception("access-log fields of %s failed", self.rpc)
        return extra

    def end(self, status: str, **fields) -> None:
        if self.ended:
            return
        self.ended = True
        for fn in self._cleanups:
            try:
                fn()
            except Exception:  # a clean-up must not hide the RPC's own outcome
                log.exception("clean-up of %s failed", self.rpc)
        extra = self.current_fields()
        extra.update(fields)
        self._log("request_end", status=status, duration_ms=round((time.monotonic() - self.t0) * 1000, 3), **extra)

    def error_status(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """Record `exc` (metrics, end record, log for unexpected ones) and return (code, message)."""
        code, reason = grpc_status(exc)
        if isinstance(exc, GraniteDeployError):
            message = str(exc)
        else:  # a bug, not the client's fault: log it once with the ids, tell the client little
            log.error("%s failed: %s: %s", self.rpc, type(exc).__name__, exc, exc_info=exc,
                      extra={"fields": {"request_id": self.request_id, "correlation_id": self.correlation_id}})
            message = f"internal error ({type(exc).__name__}); request id {self.request_id}"
        if reason and self.on_reject:
            self.on_reject(reason)
        self.end(code.name, error=message)
        return code, message


# ============================================================================ malformed requests

class Malformed:
    """What a wrapped deserializer returns for bytes that are not the request message."""

    def __init__(self, error: str):
        self.error = error


def _safe_deserializer(deserialize):
    if deserialize is None:
        return None

    def safe(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # google.protobuf.message.DecodeError, RecursionError, ...
            return Malformed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

    return safe


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Request bytes of the given services that do not parse reach the handler as :class:`Malformed`."""

    def __init__(self, services: tuple[str, ...]):
        self._prefixes = tuple(f"/{s}/" for s in services)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not (handler_call_details.method or "").startswith(self._prefixes):
            return handler
        return handler._replace(request_deserializer=_safe_deserializer(handler.request_deserializer))


def _check_request(request) -> None:
    if isinstance(request, Malformed):
        raise InvalidField("request", f"malformed protobuf message ({request.error})")


# ============================================================================ the decorator

def rpc(name: str):
    """Wrap a servicer method ``(self, request, context, call)`` (coroutine or async generator).

    The servicer needs ``self.session`` (its ``rejected(reason)`` counts refusals).
    Errors raised by the body become the status :func:`grpc_status` gives; the
    client's cancellation ends the record as CANCELLED; clean-ups always run.
    """

    def decorate(fn):
        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def stream_handler(self, request, context):
                call = Call(context, name, self.session.rejected)
                status = "CANCELLED"  # the generator closed early: the client went away
                try:
                    _check_request(request)
                    async for message in fn(self, request, context, call):
                        yield message
                    status = "OK"
                    error = call.current_fields().get("error")
                    if error:  # the stream ended with stop reason ERROR: say why in the trailers
                        context.set_trailing_metadata((("granite-error", str(error)[:1024]),))
                except grpc.aio.AbortError:
                    status = "ABORTED_BY_HANDLER"
                    raise
                except Exception as exc:
                    code, message = call.error_status(exc)
                    await context.abort(code, message)
                finally:
                    call.end(status)

            return stream_handler

        @functools.wraps(fn)
        async def unary_handler(self, request, context):
            call = Call(context, name, self.session.rejected)
            try:
                _check_request(request)
                result = await fn(self, request, context, call)
            except grpc.aio.AbortError:
                call.end("ABORTED_BY_HANDLER")
                raise
            except BaseException as exc:
                if not isinstance(exc, Exception):  # CancelledError: the client went away
                    call.end("CANCELLED")
                    raise
                code, message = call.error_status(exc)
                await context.abort(code, message)
            call.end("OK")
            return result

        return unary_handler

    return decorate
