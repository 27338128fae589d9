"""One RPC's plumbing between a servicer and the scheduler, shared by both services.

* :class:`RpcReject` - a request refused before (or instead of) generation, with
  the gRPC status it becomes; :func:`validated` checks sampling / stopping
  parameters and names the offending field by its wire path.
* :class:`Prepared` - a request validated and tokenized: the scheduler
  requests plus what the response builders need to know about it.
* :class:`Call` - the access-log records of one RPC (``request_start`` /
  ``request_end``, carrying the client's ``x-correlation-id``), written by
  :class:`JsonLogFormatter` as JSON lines.
* :class:`Bridge` - carries one request's scheduler events (scheduler thread)
  to the event loop, through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import grpc

from .metrics import Metrics
from .sampling import SamplingParams
from .scheduler import Event, Request
from .stopping import StoppingParams

if TYPE_CHECKING:
    from .server import GraniteServer

access_log = logging.getLogger("granite_deploy.serve.access")


# ============================================================================ errors

class RpcReject(Exception):
    """A request refused before (or instead of) generation."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str):
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason


def invalid(message: str) -> RpcReject:
    return RpcReject(grpc.StatusCode.INVALID_ARGUMENT, message, "invalid_argument")


def _renamed(exc: ValueError, names: dict[str, str]) -> RpcReject:
    """A validate() message "<field>: ..." with the field renamed to its wire path."""
    msg = str(exc)
    name, sep, rest = msg.partition(":")
    if sep and name in names:
        msg = f"{names[name]}:{rest}"
    return invalid(msg)


def validated(sampling: SamplingParams, stopping: StoppingParams,
              names: dict[str, str]) -> tuple[SamplingParams, StoppingParams]:
    # The same checks (and limits) the scheduler applies on submit, run first so that
    # errors name the wire field rather than the Python one.
    try:
        sampling.validate()
        stopping.validate()
    except ValueError as exc:
        raise _renamed(exc, names) from None
    return sampling, stopping


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
    """Bookkeeping of one RPC: ids, timing and the start/end access-log records."""

    def __init__(self, server: GraniteServer, context, rpc: str):
        self.server, self.context, self.rpc = server, context, rpc
        self.t0 = time.monotonic()
        self.correlation_id = metadata_dict(context.invocation_metadata()).get("x-correlation-id", "")
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

    @contextmanager
    def guard(self, cancel: Callable[[], None], fields: Callable[[], dict] = dict):
        """Run an RPC body: end record OK when it completes, CANCELLED when the client goes
        away (the generator is closed), INTERNAL (logged) on an error; an abort keeps the
        record the body already wrote. Always cancels the generation (frees its slot)."""
        status = "CANCELLED"
        try:
            yield
            status = "OK"
        except grpc.aio.AbortError:
            raise
        except Exception:
            status = "INTERNAL"
            logging.getLogger(__name__).exception("%s failed", self.rpc,
                                                  extra={"fields": {"request_id": self.request_id}})
            raise
        finally:
            cancel()
            self.end(status, **fields())

    async def reject(self, exc: RpcReject):
        self.server.metrics_rejected(exc.reason)
        self.end(exc.code.name, error=exc.message)
        await self.context.abort(exc.code, exc.message)


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


# ============================================================================ scheduler <-> asyncio

class Bridge:
    """Carries one request's scheduler events to the event loop.

    ``sink`` runs on the scheduler thread. A token event is held until the end
    of the scheduler step (``flush`` from the on_step hook, for every bridge in
    ``held``) so that when it is the request's last token it travels together
    with the final event and the client gets one message carrying both the
    delta and the stop reason. Items on the queue are lists of events:
    [start], [token], [token, final] or [final].
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics | None, held: set[Bridge]):
        self.loop, self.metrics, self.held = loop, metrics, held
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
            self.held.add(self)
        else:
            if m:
                m.observe_finished(event.stop_reason.name, now - self.arrival)
            batch = [self._pending, event] if self._pending is not None else [event]
            self._pending = None
            self.held.discard(self)
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
