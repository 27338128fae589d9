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

import numpy as np

from .. import errors
from ..engines.base import Chunk, Engine, EngineError
from ..engines.prefix_cache import PrefixCache
from .constraints import ConstraintSpec, ConstraintState, MaskFiller, compile_constraint, warm_up
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
    cached_prompt_tokens: int = 0  # final event: prompt tokens served from the prefix cache (not prefilled)


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
    constraint: ConstraintState | None = None  # structured: where the output is in its grammar
    prefix_hit: int = 0  # prompt tokens restored from the prefix cache
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
    # Request.constraint is applied (serve/constraints.py, _compile/_advance); front ends that map
    # guided-decoding fields probe this instead of silently dropping them (tgis)
    supports_constraints = True

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        max_queue: int = 64,
        max_running: int | None = None,
        prefill_chunk: int = 256,
        idle_prefill_chunk: int = 256,
        on_step: Callable[[dict], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        max_consecutive_failures: int = 5,
        prefix_cache: PrefixCache | None = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.max_running = min(max_running or engine.info.max_batch, engine.info.max_batch)
        self.prefill_chunk = prefill_chunk
        self.idle_prefill_chunk = idle_prefill_chunk
        self.context_window = engine.info.max_seq_len
        self.on_step = on_step  # metrics hook: called with counts after every step
        # fault containment: a failed step fails its requests only; after this many failed steps in a
        # row the engine is declared unusable: on_fatal(reason) is called once and submit refuses
        self.on_fatal = on_fatal
        self.max_consecutive_failures = max(1, int(max_consecutive_failures))
        self.unusable: str | None = None
        self._failures = 0
        self.prefix_cache = prefix_cache  # None: off (the server makes one unless --prefix-cache-mb 0)
        self._cached_logits: list[tuple[_Sequence, object]] = []  # whole prompt cached: first token from these
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.stop_token_ids = frozenset(tokenizer.stop_token_ids)
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)  # tgis length penalty boosts this one
        self._mask_filler: MaskFiller | None = None  # structured: made on the first constrained request

    # --- public API (any thread) ----------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="granite-scheduler", daemon=True)
        self._thread.start()
        # The grammar tokenizer is built off the request path; shutdown joins it, because a
        # daemon thread still inside the grammar engine's native code when the interpreter
        # exits crashes the process (seen: `generate` exiting 139 about one run in four).
        self._warm_thread = warm_up(self.tokenizer, self.engine.info.vocab_size)
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
        constraint = self._compile(request)  # structured: a bad constraint is refused before any token
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
            constraint=constraint,
        )
        with self._lock:
            if self.unusable:
                raise errors.Unavailable(f"the engine is unusable ({self.unusable})")
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
        if getattr(self, "_warm_thread", None) is not None:
            self._warm_thread.join(timeout)

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
                try:
                    self._admit()
                except Exception as exc:  # noqa: BLE001 - never let the thread die (see _contain)
                    self._contain(exc, "admitting requests", list(self._running))
            try:
                self._drop_finished_early()
                if self._running:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a bug in a step fails the running requests only
                self._contain(exc, "scheduler step", list(self._running))
            if self._stopped:
                for seq in list(self._running):
                    self._finish(seq, StopReason.CANCELLED)
                with self._lock:
                    for seq in list(self._waiting):
                        self._waiting.remove(seq)
                        self._emit_final(seq, StopReason.CANCELLED)
            if self.on_step:
                try:
                    self.on_step(self.counts())
                except Exception:  # noqa: BLE001 - a metrics hook must not stop generation
                    log.exception("scheduler on_step hook failed")

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
            try:
                self.engine.reserve(seq.seq_id)
                if self.prefix_cache is not None:
                    self._reuse_prefix(seq)
            except Exception as exc:  # noqa: BLE001 - CacheFull & co fail this request, not the loop
                self._fail([seq], f"cannot reserve a cache slot: {_describe(exc)}", admitted=False)
                try:
                    self.engine.release(seq.seq_id)
                except Exception:  # noqa: BLE001 - nothing was reserved
                    pass
                continue
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

    # --- prefix cache (engine owner) -------------------------------------------------------------
    def _reuse_prefix(self, seq: _Sequence) -> None:
        """Start seq from the longest cached prefix of its prompt (engines/prefix_cache.py)."""
        cache, prompt = self.prefix_cache, seq.request.prompt_ids
        hit = None if seq.request.prompt_logprobs else cache.lookup(prompt)  # prompt scores need every position
        if hit is not None:
            try:
                self.engine.restore(seq.seq_id, hit.length, list(hit.kv), hit.recurrent)
            except EngineError as exc:
                log.warning("prefix cache: restore of %d tokens failed, prefilling instead: %s", hit.length, exc)
                hit = None
        cache.begin(seq.seq_id, prompt, hit)
        if hit is not None:
            seq.cached = seq.prefix_hit = hit.length
            if hit.logits is not None:  # the whole prompt: its next-token logits are cached too
                self._cached_logits.append((seq, hit.logits))

    def _prefill_limit(self, seq: _Sequence, budget: int) -> int:
        """Recurrent state is snapshot only between steps: pause the prefill at the cache's next point."""
        stop = self.prefix_cache.next_snapshot(seq.seq_id, seq.cached) if self.prefix_cache is not None else None
        return budget if stop is None else max(1, min(budget, stop - seq.cached))

    def _step(self) -> None:
        chunks, seqs = [], []
        for seq, row in self._cached_logits:  # prefix-cache hits of whole prompts: no prefill at all
            if not seq.done:
                self._advance_contained(seq, row)
        self._cached_logits.clear()
        if not self._running:
            return
        # The chunk limit exists so that running streams are not stalled by a new prompt;
        # with nobody decoding there is nobody to stall, so prompts then go in big pieces.
        decoding = any(not seq.prefilling for seq in self._running)
        budget = self.prefill_chunk if decoding else max(self.prefill_chunk, self.idle_prefill_chunk)
        for seq in self._running:
            if seq.prefilling:
                if budget <= 0:
                    continue
                tokens = seq.pending(self._prefill_limit(seq, budget))
                budget -= len(tokens)
            else:
                tokens = seq.pending(1)
            chunks.append(Chunk(seq.seq_id, tokens, seq.cached,
                                all_logits=seq.request.prompt_logprobs and seq.prefilling))
            seqs.append(seq)
        pending = self._start_masks(seqs, chunks)  # structured: masks fill while the engine runs
        try:
            logits = self.engine.step(chunks)
            if len(logits) != len(chunks):
                raise EngineError(f"engine returned {len(logits)} logit rows for {len(chunks)} chunks")
        except Exception as exc:  # noqa: BLE001 - EngineError, MemoryError, ValueError, CacheFull, ...
            self._contain(exc, "engine step", seqs)
            return
        masks = self._masks(pending)
        failed = sampled = 0
        for seq, chunk, row in zip(seqs, chunks, logits):
            seq.cached += len(chunk.token_ids)
            if self.prefix_cache is not None and chunk.start < len(seq.request.prompt_ids):
                self.prefix_cache.after_prefill(seq.seq_id, seq.request.prompt_ids, seq.cached,
                                                len(seq.request.prompt_ids), row)
            if chunk.all_logits and not self._score_prompt(seq, chunk):
                continue
            if not seq.prefilling:
                sampled += 1
                if not self._advance_contained(seq, row, masks.get(seq)):
                    failed += 1
        # every row that should have produced a token failed: count it as a failed engine step
        if sampled and failed == sampled:
            self._failed_step(f"every sampled row of the step failed ({failed} sequences)")
        elif sampled:
            self._failures = 0

    # --- fault containment (serve-core) ------------------------------------------------------------
    def _advance_contained(self, seq: _Sequence, row, allowed=None) -> bool:
        """_advance, except that non-finite logits or any exception end this sequence only
        (ERROR, the cause in the message); False when the row failed."""
        step = len(seq.output)
        try:
            row_array = np.asarray(row)
            if not np.isfinite(row_array).all():  # -inf alone is a masked token, not a fault
                kind = ("NaN" if np.isnan(row_array).any() else "+inf" if np.isposinf(row_array).any()
                        else None if np.isfinite(row_array).any() else "no finite value")
                if kind is not None:
                    self._fail([seq], f"logits contain {kind} at step {step}")
                    return False
            self._advance(seq, row, allowed)
            return True
        except Exception as exc:  # noqa: BLE001 - a sampler / detokenizer / sink failure ends this request
            self._fail([seq], f"generation failed at step {step}: {_describe(exc)}")
            return False

    def _fail(self, seqs: list[_Sequence], error: str, admitted: bool = True) -> None:
        """End `seqs` with stop reason ERROR and `error`, logged once with their request ids."""
        seqs = [seq for seq in seqs if not seq.done]
        if not seqs:
            return
        log.error("%s; failing %d request(s): %s", error, len(seqs),
                  ", ".join(seq.request.request_id or f"#{seq.seq_id}" for seq in seqs),
                  extra={"fields": {"event": "request_failed", "error": error,
                                    "request_ids": [seq.request.request_id or f"#{seq.seq_id}" for seq in seqs]}})
        for seq in seqs:
            try:
                if admitted:
                    self._finish(seq, StopReason.ERROR, error=error)
                else:
                    self._emit_final(seq, StopReason.ERROR, error=error)
            except Exception:  # noqa: BLE001 - a failing release/sink must not stop the others
                seq.done = True
                if seq in self._running:
                    self._running.remove(seq)
                log.exception("ending request %s failed", seq.request.request_id or seq.seq_id)

    def _contain(self, exc: BaseException, where: str, seqs: list[_Sequence]) -> None:
        """An exception in `where`: fail the affected sequences, count a failed step."""
        reason = f"{where} failed: {_describe(exc)}"
        log.debug("%s", reason, exc_info=exc)
        self._fail(seqs, reason)
        self._failed_step(reason)

    def _failed_step(self, reason: str) -> None:
        self._failures += 1
        if self._failures < self.max_consecutive_failures or self.unusable:
            return
        self.unusable = f"{self._failures} engine steps in a row failed; last: {reason}"
        log.error("the engine is unusable: %s", self.unusable, extra={"fields": {
            "event": "engine_unusable", "reason": self.unusable}})
        with self._lock:
            self._accepting = False
            waiting = list(self._waiting)
            self._waiting.clear()
        self._fail(waiting, f"the engine is unusable ({self.unusable})", admitted=False)
        self._fail(list(self._running), f"the engine is unusable ({self.unusable})")
        if self.on_fatal is not None:
            try:
                self.on_fatal(self.unusable)
            except Exception:  # noqa: BLE001
                log.exception("scheduler on_fatal hook failed")

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

    def _advance(self, seq: _Sequence, logits, allowed=None) -> None:
        n = len(seq.output)
        if seq.constraint is not None:
            allowed = self._allowed(seq, allowed)
            if allowed is None:
                return
        lp = seq.request.length_penalty
        if lp is not None and n >= seq.request.stopping.min_new_tokens:  # TGIS: not while EOS is suppressed
            logits = apply_length_penalty(logits, n, lp[0], lp[1], self.eos_token_id)
        sampled = seq.sampler.sample(
            logits,
            list(seq.request.prompt_ids) + seq.output if seq.request.sampling.repetition_penalty_active else None,
            suppress_token_ids=seq.criteria.suppressed_token_ids(n),
            allowed=allowed,
        )
        now = time.monotonic()
        if not seq.output:
            seq.first_token = now
        seq.output.append(sampled.token_id)
        reason = seq.criteria.check(sampled.token_id, n + 1, now)
        if seq.constraint is not None:
            reason = self._constraint_reason(seq, sampled.token_id, reason)
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
            error = seq.constraint.error if seq.constraint is not None and reason == StopReason.ERROR else ""
            self._finish(seq, reason, stop_sequence=matched or "", error=error)

    # --- structured generation (serve/constraints.py) -------------------------------------
    def _compile(self, request: Request) -> ConstraintState | None:
        if request.constraint is None:
            return None
        compiled = compile_constraint(request.constraint, self.tokenizer, self.engine.info.vocab_size)
        return compiled.new_state()

    def _start_masks(self, seqs: list[_Sequence], chunks: list[Chunk]):
        """Start filling next-token masks for the constrained rows that sample after this step."""
        rows = [seq for seq, chunk in zip(seqs, chunks) if seq.constraint is not None
                and chunk.start + len(chunk.token_ids) >= len(seq.request.prompt_ids)]
        if not rows:
            return None
        if self._mask_filler is None:
            self._mask_filler = MaskFiller()
        return rows, self._mask_filler.start([seq.constraint for seq in rows])

    def _masks(self, pending) -> dict:
        if pending is None:
            return {}
        rows, future = pending
        try:
            bits = future.result()
        except Exception as exc:  # noqa: BLE001 - each row then computes its own mask (and reports)
            log.warning("constraint mask fill failed for %d sequences: %s", len(rows), exc)
            return {}
        return {seq: bits[i] for i, seq in enumerate(rows)}

    def _allowed(self, seq: _Sequence, allowed):
        """The row's token mask (computed here when it was not prefetched); None: the row ended."""
        try:
            if allowed is None:
                allowed = seq.constraint.allowed()
        except Exception as exc:  # noqa: BLE001 - a library failure ends this sequence, not the loop
            seq.constraint.error = f"constraint: {exc}"
            allowed = None
        if allowed is None or (allowed.dtype == bool and not allowed.any()):  # float: MaskFiller checked
            error = seq.constraint.error or seq.constraint.matcher.get_error() or "no token is allowed"
            self._finish(seq, StopReason.ERROR, error=f"constraint: {error}" if not error.startswith("constraint")
                         else error)
            return None
        return allowed

    def _constraint_reason(self, seq: _Sequence, token_id: int, reason: StopReason) -> StopReason:
        """The stop reason once the grammar has seen the sampled token."""
        c = seq.constraint
        if reason == StopReason.EOS_TOKEN:  # the mask allowed EOS: the output is complete
            return reason
        if not c.consume(token_id):
            return StopReason.ERROR
        if reason == StopReason.NOT_FINISHED and c.finished:
            return StopReason.EOS_TOKEN  # complete, and nothing else may follow: stop as at EOS
        if reason in (StopReason.MAX_TOKENS, StopReason.TOKEN_LIMIT) and not c.accepting:
            return StopReason.CONSTRAINT_UNMET
        return reason

    def _finish(self, seq: _Sequence, reason: StopReason, stop_sequence: str = "", error: str = "") -> None:
        if seq.done:
            return
        seq.done = True
        if seq in self._running:
            self._running.remove(seq)
        if self.prefix_cache is not None:  # the generation's end is cached before the slot goes
            self.prefix_cache.finish(seq.seq_id, seq.request.prompt_ids + tuple(seq.output), seq.cached,
                                     ok=reason != StopReason.ERROR)
        self.engine.release(seq.seq_id)
        self._emit_final(seq, reason, stop_sequence, error)

    def _emit_final(self, seq: _Sequence, reason: StopReason, stop_sequence: str = "", error: str = "") -> None:
        seq.done = True
        ttft = (seq.first_token - seq.arrival) if seq.first_token else 0.0
        queue = ((seq.admitted or time.monotonic()) - seq.arrival)
        seq.sink(Event("final", generated_count=len(seq.output), prompt_token_count=len(seq.request.prompt_ids),
                       seed=seq.sampler.seed, stop_reason=reason, stop_sequence=stop_sequence,
                       queue_time_s=queue, time_to_first_token_s=ttft, error=error,
                       cached_prompt_tokens=seq.prefix_hit))


def _describe(exc: BaseException) -> str:
    """An exception as one line: its class and message (MemoryError often has none)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
