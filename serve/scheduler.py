"""Continuous batching over the engine interface.

One thread owns the engine. Each iteration it admits waiting requests into
free cache slots, drops cancelled or timed-out ones (freeing their slots at
once), builds one step (a decode token for every running sequence plus up to
`prefill_chunk` prompt tokens of the sequences still prefilling, oldest
first; `idle_prefill_chunk` when no sequence is decoding), runs it, and
turns each sequence's logits into a token, text and maybe a stop. Requests join the batch at the next step and leave the moment
they finish, so a long prompt stalls running streams for at most one chunk.

Everything the caller sees is an `Event` (plain data) handed to the request's
sink from the scheduler thread; the gRPC layer forwards events to asyncio.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .. import errors
from ..engines.base import Chunk, Engine, EngineError
from .constraints import ConstraintSpec
from .detokenizer import IncrementalDetokenizer
from .sampling import SampledToken, SamplingParams, TokenSampler
from .stopping import StoppingCriteria, StoppingParams, StopReason, StopSequenceMatcher
from .tgis import apply_length_penalty, check_tgis_fields, prompt_token_infos
from .validation import validate_request

log = logging.getLogger(__name__)


class Overloaded(errors.Overloaded):
    """The queue is full: the caller should answer RESOURCE_EXHAUSTED."""


class ShuttingDown(errors.Unavailable):
    """The scheduler is draining and takes no new requests."""

    reason = "shutting_down"


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    stopping: StoppingParams = StoppingParams()
    request_id: str = ""
    constraint: ConstraintSpec | None = None
    adapter: str = ""  # tgis: the adapter artifact that serves it ("" = the base model); routing is the session's
    prompt_logprobs: bool = False  # tgis: score every prompt token (Event.prompt_tokens on the first token event)
    length_penalty: tuple[int, float] | None = None  # tgis: (start_index, decay_factor), see serve/tgis.py


@dataclass
class Event:
    kind: str  # "start" | "token" | "final"
    text: str = ""
    token: SampledToken | None = None
    token_text: str = ""
    generated_count: int = 0
    prompt_token_count: int = 0
    seed: int | None = None
    stop_reason: StopReason = StopReason.NOT_FINISHED
    stop_sequence: str = ""
    queue_time_s: float = 0.0
    time_to_first_token_s: float = 0.0
    error: str = ""
    # first "token" event of a Request(prompt_logprobs=True): one SampledToken per prompt token
    # (token 0: logprob NaN, rank 0), from serve/tgis.prompt_token_infos
    prompt_tokens: list[SampledToken] | None = None


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    request: Request
    sink: Callable[[Event], None]
    sampler: TokenSampler
    criteria: StoppingCriteria
    detok: IncrementalDetokenizer
    matcher: StopSequenceMatcher
    arrival: float
    admitted: float = 0.0
    first_token: float = 0.0
    cached: int = 0  # tokens in the engine's cache
    output: list[int] = field(default_factory=list)
    prompt_infos: list[SampledToken] | None = None  # tgis: prompt-token scores, filled while prefilling
    cancelled: bool = False
    done: bool = False

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.request.prompt_ids)

    def pending(self, budget: int) -> tuple[int, ...]:
        if self.prefilling:
            return tuple(self.request.prompt_ids[self.cached : self.cached + budget])
        return (self.output[-1],)


class Ticket:
    """The caller's handle on a submitted request."""

    def __init__(self, scheduler: "Scheduler", seq: _Sequence):
        self._scheduler, self._seq = scheduler, seq

    @property
    def seed(self) -> int:
        return self._seq.sampler.seed

    def cancel(self) -> None:
        """Stop generating within one engine step; the sink gets a CANCELLED final event."""
        self._seq.cancelled = True
        self._scheduler._wake()


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        tokenizer,
        max_queue: int = 64,
        max_running: int | None = None,
        prefill_chunk: int = 256,
        idle_prefill_chunk: int = 256,
        on_step: Callable[[dict], None] | None = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.max_running = min(max_running or engine.info.max_batch, engine.info.max_batch)
        self.prefill_chunk = prefill_chunk
        self.idle_prefill_chunk = idle_prefill_chunk
        self.context_window = engine.info.max_seq_len
        self.on_step = on_step  # metrics hook: called with counts after every step
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.stop_token_ids = frozenset(tokenizer.stop_token_ids)
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)  # tgis length penalty boosts this one

    # --- public API (any thread) ----------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="granite-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: Request, sink: Callable[[Event], None], params_checked: bool = False) -> Ticket:
        """Queue a request; raises InvalidField (a ValueError naming the field), Overloaded or
        ShuttingDown (an Unavailable). ``params_checked``: the front end already ran
        :func:`~.validation.validate_params` on the request's sampling / stopping parameters."""
        if request.stopping.stop_token_ids:
            stopping = request.stopping
        else:
            stopping = StoppingParams(**{**request.stopping.__dict__, "stop_token_ids": self.stop_token_ids})
            request = dataclasses.replace(request, stopping=stopping)  # keeps every other field
        vocab = self.engine.info.vocab_size
        validate_request(request, self.context_window, vocab, params_checked=params_checked)
        check_tgis_fields(request.length_penalty, request.prompt_logprobs, self.engine)
        now = time.monotonic()
        seq = _Sequence(
            seq_id=next(self._ids),
            request=request,
            sink=sink,
            sampler=TokenSampler(request.sampling, vocab, checked=True),
            criteria=StoppingCriteria(stopping, self.context_window, len(request.prompt_ids), start_time=now),
            detok=IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True),
            matcher=StopSequenceMatcher(stopping.stop_sequences, stopping.include_stop_sequence),
            arrival=now,
        )
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("server is shutting down")
            free = self.max_running - len(self._running)
            if len(self._waiting) - max(free, 0) >= self.max_queue:
                raise Overloaded(
                    f"{len(self._running)} requests running and {len(self._waiting)} queued (limit {self.max_queue})"
                )
            self._waiting.append(seq)
            self._lock.notify()
        return Ticket(self, seq)

    def counts(self) -> dict:
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def idle(self) -> bool:
        with self._lock:
            return not self._running and not self._waiting

    def shutdown(self, timeout: float | None = None) -> None:
        """Cancel everything and stop the thread."""
        with self._lock:
            self._accepting = False
            for seq in list(self._waiting) + self._running:
                seq.cancelled = True
            self._stopped = True
            self._lock.notify()
        if self._thread:
            self._thread.join(timeout)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # --- the loop (scheduler thread) ----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._waiting and not self._running:
                    self._lock.wait()
                if self._stopped and not self._waiting and not self._running:
                    return
                self._admit()
            self._drop_finished_early()
            if self._running:
                self._step()
            if self._stopped:
                for seq in list(self._running):
                    self._finish(seq, StopReason.CANCELLED)
                with self._lock:
                    for seq in list(self._waiting):
                        self._waiting.remove(seq)
                        self._emit_final(seq, StopReason.CANCELLED)
            if self.on_step:
                self.on_step(self.counts())

    def _admit(self) -> None:
        # A request cancelled while queued leaves the queue now (and gets its final event),
        # not when a slot frees up: it must not hold queue capacity or its caller.
        if any(seq.cancelled for seq in self._waiting):
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                self._emit_final(seq, StopReason.CANCELLED)
        while self._waiting and len(self._running) < self.max_running:
            seq = self._waiting.popleft()
            if seq.cancelled:
                self._emit_final(seq, StopReason.CANCELLED)
                continue
            self.engine.reserve(seq.seq_id)
            seq.admitted = time.monotonic()
            self._running.append(seq)
            seq.sink(Event("start", prompt_token_count=len(seq.request.prompt_ids), seed=seq.sampler.seed,
                           queue_time_s=seq.admitted - seq.arrival))

    def _drop_finished_early(self) -> None:
        now = time.monotonic()
        for seq in list(self._running):
            if seq.cancelled:
                self._finish(seq, StopReason.CANCELLED)
            elif seq.criteria.time_exceeded(now):
                self._finish(seq, StopReason.TIME_LIMIT)

    def _step(self) -> None:
        chunks, seqs = [], []
        # The chunk limit exists so that running streams are not stalled by a new prompt;
        # with nobody decoding there is nobody to stall, so prompts then go in big pieces.
        decoding = any(not seq.prefilling for seq in self._running)
        budget = self.prefill_chunk if decoding else max(self.prefill_chunk, self.idle_prefill_chunk)
        for seq in self._running:
            if seq.prefilling:
                if budget <= 0:
                    continue
                tokens = seq.pending(budget)
                budget -= len(tokens)
            else:
                tokens = seq.pending(1)
            chunks.append(Chunk(seq.seq_id, tokens, seq.cached,
                                all_logits=seq.request.prompt_logprobs and seq.prefilling))
            seqs.append(seq)
        try:
            logits = self.engine.step(chunks)
        except EngineError as exc:
            log.error("engine step failed for %d sequences: %s", len(seqs), exc)
            for seq in seqs:
                self._finish(seq, StopReason.ERROR, error=str(exc))
            return
        for seq, chunk, row in zip(seqs, chunks, logits):
            seq.cached += len(chunk.token_ids)
            if chunk.all_logits and not self._score_prompt(seq, chunk):
                continue
            if not seq.prefilling:
                self._advance(seq, row)

    def _score_prompt(self, seq: _Sequence, chunk: Chunk) -> bool:
        """tgis: turn this prefill chunk's all-position logits into prompt-token scores."""
        rows = getattr(self.engine, "chunk_logits", {}).get(seq.seq_id)
        have = len(seq.prompt_infos or ())
        if rows is None or have != (chunk.start + 1 if chunk.start else 0):
            # an engine without Chunk.all_logits, or prompt positions that were not computed here
            self._finish(seq, StopReason.ERROR, error="prompt-token logprobs are not available for this request")
            return False
        infos = prompt_token_infos(rows, seq.request.prompt_ids, chunk.start, seq.request.sampling.top_n_tokens)
        seq.prompt_infos = (seq.prompt_infos or []) + infos
        return True

    def _advance(self, seq: _Sequence, logits) -> None:
        n = len(seq.output)
        lp = seq.request.length_penalty
        if lp is not None and n >= seq.request.stopping.min_new_tokens:  # TGIS: not while EOS is suppressed
            logits = apply_length_penalty(logits, n, lp[0], lp[1], self.eos_token_id)
        sampled = seq.sampler.sample(
            logits,
            list(seq.request.prompt_ids) + seq.output if seq.request.sampling.repetition_penalty_active else None,
            suppress_token_ids=seq.criteria.suppressed_token_ids(n),
        )
        now = time.monotonic()
        if not seq.output:
            seq.first_token = now
        seq.output.append(sampled.token_id)
        reason = seq.criteria.check(sampled.token_id, n + 1, now)
        delta = seq.detok.push(sampled.token_id)
        if reason != StopReason.NOT_FINISHED:  # last token: release bytes the detokenizer held back
            delta += seq.detok.flush()
        text, matched = seq.matcher.feed(delta)
        if matched is not None:
            reason = StopReason.STOP_SEQUENCE
        elif reason != StopReason.NOT_FINISHED:
            text += seq.matcher.flush()
        token_text = self.tokenizer.decode([sampled.token_id]) if seq.request.sampling.logprobs else ""
        prompt_tokens, seq.prompt_infos = (seq.prompt_infos, None) if n == 0 else (None, seq.prompt_infos)
        seq.sink(Event("token", text=text, token=sampled, token_text=token_text, generated_count=n + 1,
                       prompt_tokens=prompt_tokens))
        if reason != StopReason.NOT_FINISHED:
            self._finish(seq, reason, stop_sequence=matched or "")

    def _finish(self, seq: _Sequence, reason: StopReason, stop_sequence: str = "", error: str = "") -> None:
        if seq.done:
            return
        seq.done = True
        if seq in self._running:
            self._running.remove(seq)
        self.engine.release(seq.seq_id)
        self._emit_final(seq, reason, stop_sequence, error)

    def _emit_final(self, seq: _Sequence, reason: StopReason, stop_sequence: str = "", error: str = "") -> None:
        seq.done = True
        ttft = (seq.first_token - seq.arrival) if seq.first_token else 0.0
        queue = ((seq.admitted or time.monotonic()) - seq.arrival)
        seq.sink(Event("final", generated_count=len(seq.output), prompt_token_count=len(seq.request.prompt_ids),
                       seed=seq.sampler.seed, stop_reason=reason, stop_sequence=stop_sequence,
                       queue_time_s=queue, time_to_first_token_s=ttft, error=error))
