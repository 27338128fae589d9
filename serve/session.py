"""The protocol-free model session every front end receives (gRPC fmaas, gRPC chat, OpenAI HTTP).

A :class:`ModelSession` holds the tokenizer, the scheduler, the limits and the
model's identity, and does the work every front end needs before and after
generation:

* ``await encode_text(text, field)`` / ``await encode_chat(messages, ...)``:
  size checks first, then template rendering (time- and size-limited) and
  tokenising in a worker pool, never on the event loop;
* ``stopping_params(...)``: the server's max_new_tokens limit and default;
* ``submit(request)`` -> :class:`Stream`: the scheduler's events delivered to
  the event loop (``await stream.get()``, ``stream.finished``, ``stream.cancel()``).

Errors are the project's (:mod:`granite_deploy.errors`): ``InvalidField`` /
``TooLarge`` for bad input, ``NotFound`` for an unknown model, ``Overloaded``
for a full queue, ``Unavailable`` while loading, draining or after the engine
became unusable. Each front end maps the classes to its own statuses. Nothing
here imports grpc or an HTTP framework.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any, Iterable

from ..errors import InvalidField, NotFound, TooLarge, Unavailable
from .metrics import Metrics
from .scheduler import Event, Request, Scheduler
from .stopping import StoppingParams
from .validation import (InputLimits, check_text_bytes, validate_documents, validate_messages,
                         validate_tools)

__all__ = ["ModelSession", "Stream"]


class NotReady(Unavailable):
    """The model is still loading (or warming up)."""

    reason = "not_ready"


# ============================================================================ scheduler -> event loop

class Stream:
    """Carries one request's scheduler events to the event loop.

    ``sink`` runs on the scheduler thread. A token event is held until the end
    of the scheduler step (``flush`` from the on_step hook, for every stream in
    ``held``) so that when it is the request's last token it travels together
    with the final event and the client gets one message carrying both the
    delta and the stop reason. Items on the queue are lists of events:
    [start], [token], [token, final] or [final].
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics | None, held: set["Stream"]):
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


# ============================================================================ the session

class ModelSession:
    """One served model, as every front end sees it (see the module docstring)."""

    def __init__(self, tokenizer, scheduler: Scheduler | None = None, *, model_id: str,
                 model_ids: Iterable[str] = (), context_window: int = 0, max_new_tokens_limit: int = 0,
                 default_max_new_tokens: int = 20, metrics: Metrics | None = None,
                 limits: InputLimits | None = None, engine_info: Any = None, workers: int = 2):
        self.model_id = model_id
        self._model_ids = {model_id}
        # tgis: adapter name -> the scheduler of that adapter's own artifact (same tokenizer and context;
        # `serve --adapter NAME=ARTIFACT`); Request.adapter picks one, "" is the base model
        self.adapters: dict[str, Scheduler] = {}
        self.ready = False
        self.unusable: str | None = None  # why the engine cannot serve any more (set by the server)
        self._held: set[Stream] = set()  # streams holding a token until the step ends (scheduler thread)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers),
                                                           thread_name_prefix="granite-encode")
        self.configure(tokenizer, scheduler, model_ids=model_ids, context_window=context_window,
                       max_new_tokens_limit=max_new_tokens_limit, default_max_new_tokens=default_max_new_tokens,
                       metrics=metrics, limits=limits, engine_info=engine_info)

    def configure(self, tokenizer, scheduler: Scheduler | None, *, model_ids: Iterable[str] = (),
                  context_window: int, max_new_tokens_limit: int, default_max_new_tokens: int,
                  metrics: Metrics | None = None, limits: InputLimits | None = None, engine_info: Any = None) -> None:
        """Fill in what is known once the model is loaded (a server creates its session first,
        so its services can answer UNAVAILABLE while loading)."""
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._model_ids.update(model_ids)
        self.context_window = int(context_window)
        self.max_new_tokens_limit = int(max_new_tokens_limit)
        self.default_max_new_tokens = int(default_max_new_tokens)
        self.metrics = metrics
        self.limits = limits or InputLimits.for_context(self.context_window)
        self.engine_info = engine_info

    # --- identity and readiness --------------------------------------------------------------
    def accepts_model(self, name: str) -> bool:
        """An empty name means "the served model"."""
        return not name or name in self._model_ids

    def check_model(self, name: str, field: str = "model_id") -> None:
        if not self.accepts_model(name):
            raise NotFound(f"{field}: {name!r} is not served here (this server serves {self.model_id!r})")

    def check_ready(self) -> None:
        if self.unusable:
            raise Unavailable(f"the engine is unusable ({self.unusable}); retry on another replica")
        if not self.ready:
            raise NotReady("the model is still loading; retry shortly")

    def rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(reason)

    # --- hooks (scheduler thread) ------------------------------------------------------------
    def on_step(self, counts: dict) -> None:
        if self.metrics:
            self.metrics.on_step(counts)
        if self._held:
            for stream in list(self._held):
                stream.flush()
            self._held.clear()

    # --- prompt encoding (worker pool) -----------------------------------------------------------
    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _encode(self, text: str) -> list[int]:
        encode_big = getattr(self.tokenizer, "encode_nogil", None)  # releases the GIL on long texts
        return list(encode_big(text) if encode_big else self.tokenizer.encode(text))

    def _encode_checked(self, text: str, field: str, truncate: int = 0) -> tuple[int, ...]:
        if not text:
            raise InvalidField(field, "is empty")
        ids = self._encode(text)
        if not ids:
            raise InvalidField(field, "encodes to no tokens")
        if truncate and len(ids) > truncate:
            ids = ids[-truncate:]  # keep the end of the prompt, like TGIS
        if len(ids) >= self.context_window:
            hint = "" if truncate else "; shorten it or set parameters.truncate_input_tokens"
            raise InvalidField(field, f"the prompt is {len(ids)} tokens but the context window is "
                                      f"{self.context_window} tokens (at least one token must remain for "
                                      f"generation){hint}")
        return tuple(ids)

    async def encode_text(self, text: str, field: str, truncate: int = 0) -> tuple[int, ...]:
        """Prompt text -> token ids (size-checked here, tokenised in the pool)."""
        check_text_bytes(text, self.limits.max_prompt_bytes, field)
        return await self._run(self._encode_checked, text, field, truncate)

    def render_chat(self, messages, tools=None, documents=None, field: str = "messages",
                    **template_kwargs) -> str:
        """Validate and render a conversation with the artifact's template (blocking: in the pool)."""
        lim = self.limits
        # "messages" -> "tools"; "conversation.messages" -> "conversation.tools"
        prefix = field[: -len("messages")] if field.endswith("messages") else f"{field}."
        messages = validate_messages(messages, field, lim)
        tools = validate_tools(tools, f"{prefix}tools", lim)
        documents = validate_documents(documents, f"{prefix}documents", lim)
        template_kwargs.setdefault("add_generation_prompt", True)
        try:
            return self.tokenizer.render_chat(messages, tools=tools, documents=documents,
                                              time_limit_s=lim.template_time_s,
                                              max_output_chars=lim.max_rendered_bytes, **template_kwargs)
        except InvalidField:
            raise
        except (ValueError, RecursionError, MemoryError, OverflowError) as exc:  # ChatTemplateError included
            too_large = isinstance(exc, (MemoryError, OverflowError)) or getattr(exc, "too_large", False)
            cls = TooLarge if too_large else InvalidField
            raise cls(field, f"the chat template failed: {exc}") from None

    def _encode_chat(self, messages, tools, documents, field, template_kwargs) -> tuple[str, tuple[int, ...]]:
        text = self.render_chat(messages, tools, documents, field, **template_kwargs)
        check_text_bytes(text, self.limits.max_rendered_bytes, f"{field} (rendered)")
        return text, self._encode_checked(text, field)

    async def encode_chat(self, messages, tools=None, documents=None, field: str = "messages",
                          **template_kwargs) -> tuple[str, tuple[int, ...]]:
        """A conversation -> (prompt text, token ids): validated, rendered and tokenised in the pool."""
        return await self._run(self._encode_chat, messages, tools, documents, field, template_kwargs)

    async def render_text(self, fn, *args):
        """Run a blocking prompt-building function in the pool (FIM prompts, custom renderings)."""
        return await self._run(fn, *args)

    def _with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self._encode(text)
        with_offsets = getattr(self.tokenizer, "encode_with_offsets", None)  # GraniteTokenizer
        if with_offsets is not None:
            enc = with_offsets(text)
            inner_ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
            for lead in range(len(ids) - len(inner_ids) + 1):  # BOS/EOS the artifact adds around the text
                if ids[lead:lead + len(inner_ids)] == inner_ids:
                    tail = len(ids) - lead - len(inner_ids)
                    return ids, [(0, 0)] * lead + offsets + [(len(text), len(text))] * tail
        return ids, [(0, 0)] * len(ids)

    async def encode_with_offsets(self, text: str, field: str = "text") -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids as prompts are encoded, with [start, end) character offsets when the tokenizer
        can tell them ((0, 0) for tokens the tokenizer adds, such as a BOS)."""
        check_text_bytes(text, self.limits.max_prompt_bytes, field)
        return await self._run(self._with_offsets, text)

    def token_strings(self, ids: list[int]) -> list[str]:
        to_token = getattr(self.tokenizer, "id_to_token", None)
        return [(to_token(i) if to_token else None) or self.tokenizer.decode([i]) for i in ids]

    # --- generation ---------------------------------------------------------------------------
    def stopping_params(self, max_new: int, min_new: int, stops, include: bool, time_limit_ms: int,
                        max_field: str = "max_new_tokens") -> StoppingParams:
        if max_new > self.max_new_tokens_limit:
            raise InvalidField(max_field, f"must be <= {self.max_new_tokens_limit} (this server's limit), "
                                          f"got {max_new}")
        return StoppingParams(max_new_tokens=max_new or self.default_max_new_tokens, min_new_tokens=min_new,
                              stop_sequences=tuple(stops), include_stop_sequence=include,
                              time_limit_s=time_limit_ms / 1000.0 if time_limit_ms else None)

    def submit(self, request: Request, params_checked: bool = False, check_ready: bool = True) -> Stream:
        """Queue a request; raises InvalidField, Overloaded or Unavailable (call on the event loop).

        ``params_checked``: the caller ran :func:`~.validation.validate_params` already."""
        if check_ready:
            self.check_ready()
        elif self.unusable:
            raise Unavailable(f"the engine is unusable ({self.unusable})")
        stream = Stream(asyncio.get_running_loop(), self.metrics if check_ready else None, self._held)
        scheduler = self.scheduler
        if request.adapter:  # tgis: the adapter's artifact runs it
            scheduler = self.adapters.get(request.adapter)
            if scheduler is None:
                raise InvalidField("adapter_id", f"no adapter {request.adapter!r} is loaded")
        stream.ticket = scheduler.submit(request, stream.sink, params_checked=params_checked)
        return stream

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
