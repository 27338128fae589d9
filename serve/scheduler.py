"""Continuous batching over the engine interface.

One thread owns the engine. Each iteration it admits waiting requests into
free cache slots, drops cancelled or timed-out ones (freeing their slots at
once), builds one step, runs it, and turns each sequence's logits into tokens,
text and maybe a stop. Requests join the batch at the next step and leave the
moment they finish.

A step is planned against a token budget (``token_budget``, tokens fed to the
engine in one step; the server's default is device-dependent, see
serve/server.py): first every decoding sequence's token (or its speculative
verification chunk: the token plus its draft), then prompt chunks of the
sequences still prefilling, oldest first, until the budget is spent. Decode
tokens always run; drafts are cut (oldest sequences draft first) to what the
budget leaves after a reserve for waiting prompts; prompts always get at least
that reserve, ``max(1, token_budget // 4)`` tokens, so that many decoding
sequences never starve a new prompt (a step may then exceed the budget by up to
the reserve). With ragged engines the whole step is one graph call, so the
budget bounds both how long running streams stall behind a new prompt and how
many weight passes a long prompt costs.

Prompt-lookup speculative decoding (``speculative``, serve/speculative.py; off
by default): a decoding sequence whose last n tokens occurred earlier in its
prompt or output sends ``[last token, *draft]`` with ``all_logits``; the tokens
the target agrees with (greedy: argmax; sampling: the distribution-preserving
rule) are emitted one by one through the usual path (stop tokens and sequences,
max_new_tokens, logprobs, detokenisation, streaming behave exactly as if they
came one per step, and a stop inside the draft ends the request there), and the
engine forgets the rejected tail (``Engine.truncate``). Not speculated:
constrained requests, and engines with recurrent (Mamba) state (refused at
construction: their state cannot be rolled back).

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
from .speculative import SpeculativeConfig, draft_length, propose
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
    # speculative decoding: most draft tokens per step for this request (None: the server's
    # --speculative-tokens; 0: off; larger values are capped at the server's). > 0 on a scheduler
    # without speculation is refused (InvalidField "speculative_tokens")
    speculative_tokens: int | None = None


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


DEFAULT_TOKEN_BUDGET = 256
# Steps in which nothing decodes have no stream to stall: prompts prefill up to this many tokens
# (bench_ragged load at concurrency 1: a lone 300-token prompt took 7.8 s to its first token at a
# budget of 32 a step, 5.6 s at main's 256-token idle chunks).
IDLE_TOKEN_BUDGET = 256


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
        token_budget: int | None = None,
        on_step: Callable[[dict], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        max_consecutive_failures: int = 5,
        prefix_cache: PrefixCache | None = None,
        speculative: SpeculativeConfig | None = None,
        *,
        idle_token_budget: int | None = None,
        prefill_chunk: int | None = None,
        idle_prefill_chunk: int | None = None,
    ):
        """``token_budget``: tokens per step (decodes, drafts, prompt chunks; see the module
        docstring); None: ``prefill_chunk`` if given, else DEFAULT_TOKEN_BUDGET (256).
        ``prefill_chunk`` is the old name of ``token_budget`` (kept as an alias: before the budget
        it counted prompt tokens only). ``idle_token_budget``: the budget of steps in which no sequence
        decodes (nothing to stall), at least ``token_budget``; None: max(token_budget,
        IDLE_TOKEN_BUDGET). ``idle_prefill_chunk`` is its old name.
        ``speculative``: prompt-lookup speculative decoding (None: off); refused (ValueError) on an
        engine with recurrent state or without Chunk.all_logits."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.max_running = min(max_running or engine.info.max_batch, engine.info.max_batch)
        budget = token_budget if token_budget is not None else prefill_chunk
        self.token_budget = int(budget) if budget is not None else DEFAULT_TOKEN_BUDGET
        if self.token_budget < 1:
            raise ValueError(f"token_budget: must be >= 1, got {self.token_budget}")
        idle = idle_token_budget if idle_token_budget is not None else idle_prefill_chunk
        self.idle_token_budget = max(self.token_budget, int(idle) if idle is not None else IDLE_TOKEN_BUDGET)
        # prompts get at least this much of every step, however many sequences decode or draft
        self.prefill_reserve = max(1, self.token_budget // 4)
        self.speculative = speculative.validate() if speculative is not None else None
        if self.speculative is not None:
            if getattr(engine, "recurrent", False):
                raise ValueError("--speculative: this model has recurrent (Mamba) state, which cannot be rolled "
                                 "back to an earlier position; speculative decoding needs an attention-only model")
            if not getattr(engine, "supports_all_logits", False):
                raise ValueError(f"--speculative: the {engine.info.kind} engine cannot return the logits of every "
                                 "position of a chunk (Chunk.all_logits), which verification needs")
            sp = self.speculative
            log.info("speculative decoding: prompt lookup (n-gram %d..%d), up to %d draft tokens per step; "
                     "constrained requests are not speculated", sp.ngram_max, sp.ngram_min, sp.num_tokens,
                     extra={"fields": {"event": "speculative_decoding", "method": sp.method,
                                       "num_tokens": sp.num_tokens, "ngram_max": sp.ngram_max,
                                       "ngram_min": sp.ngram_min}})
        # speculation counters (read by serve/metrics.py at scrape time; scheduler thread writes)
        self.draft_steps = 0  # verification chunks run
        self.draft_tokens_proposed = 0
        self.draft_tokens_accepted = 0
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
        self._check_speculative(request.speculative_tokens)
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

    def _check_speculative(self, k) -> None:
        if k is None:
            return
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise errors.InvalidField("speculative_tokens", f"must be an integer >= 0, got {k!r}")
        if k > 0 and self.speculative is None:
            raise errors.InvalidField("speculative_tokens", "speculative decoding is off on this server (it is "
                                      "started with --speculative ngram); give 0 or leave the field out")

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

    def _draft_tokens(self, seq: _Sequence) -> int:
        """How many draft tokens seq may verify this step (0: no speculation for it)."""
        sp = self.speculative
        if sp is None or seq.constraint is not None or seq.prefilling or not seq.output:
            return 0
        asked = seq.request.speculative_tokens
        k = sp.num_tokens if asked is None else min(int(asked), sp.num_tokens)
        return draft_length(k, seq.criteria.max_generated - len(seq.output))

    def _plan(self) -> tuple[list[Chunk], list[_Sequence], dict]:
        """The step: decodes (with their drafts) first, then prompt chunks oldest first, within the budget."""
        decoding = [seq for seq in self._running if not seq.prefilling]
        waiting_prompt = sum(len(seq.request.prompt_ids) - seq.cached for seq in self._running if seq.prefilling)
        budget = self.token_budget if decoding else self.idle_token_budget
        used = len(decoding)
        drafts: dict[_Sequence, list[int]] = {}
        if self.speculative is not None:
            sp = self.speculative
            room = budget - used - min(self.prefill_reserve, waiting_prompt)
            for seq in decoding:  # oldest first
                if room <= 0:
                    break
                k = min(self._draft_tokens(seq), room)
                if k <= 0:
                    continue
                draft = propose(seq.request.prompt_ids + tuple(seq.output), k, sp.ngram_max, sp.ngram_min)
                if draft:
                    drafts[seq] = draft
                    room -= len(draft)
                    used += len(draft)
        prefill = max(budget - used, self.prefill_reserve) if waiting_prompt else 0
        chunks, seqs = [], []
        for seq in self._running:
            if seq.prefilling:
                if prefill <= 0:
                    continue
                tokens = seq.pending(self._prefill_limit(seq, prefill))
                prefill -= len(tokens)
                chunk = Chunk(seq.seq_id, tokens, seq.cached, all_logits=seq.request.prompt_logprobs)
            else:
                draft = drafts.get(seq)
                chunk = Chunk(seq.seq_id, (seq.output[-1], *draft) if draft else (seq.output[-1],), seq.cached,
                              all_logits=bool(draft))
            chunks.append(chunk)
            seqs.append(seq)
        return chunks, seqs, drafts

    def _step(self) -> None:
        for seq, row in self._cached_logits:  # prefix-cache hits of whole prompts: no prefill at all
            if not seq.done:
                self._advance_contained(seq, row)
        self._cached_logits.clear()
        if not self._running:
            return
        chunks, seqs, drafts = self._plan()
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
            prompt_len = len(seq.request.prompt_ids)
            if chunk.start >= prompt_len:  # a decode, maybe with a draft to verify
                sampled += 1
                draft = drafts.get(seq)
                ok = (self._verify(seq, chunk, draft) if draft
                      else self._decode(seq, chunk, row, masks.get(seq)))
                failed += not ok
                continue
            seq.cached += len(chunk.token_ids)
            if self.prefix_cache is not None:
                self.prefix_cache.after_prefill(seq.seq_id, seq.request.prompt_ids, seq.cached, prompt_len, row)
            if chunk.all_logits and not self._score_prompt(seq, chunk):
                continue
            if not seq.prefilling:  # the prompt's last chunk: its first token
                sampled += 1
                if not self._advance_contained(seq, row, masks.get(seq)):
                    failed += 1
        # every row that should have produced a token failed: count it as a failed engine step
        if sampled and failed == sampled:
            self._failed_step(f"every sampled row of the step failed ({failed} sequences)")
        elif sampled:
            self._failures = 0

    def _decode(self, seq: _Sequence, chunk: Chunk, row, allowed) -> bool:
        seq.cached += len(chunk.token_ids)
        return self._advance_contained(seq, row, allowed)

    def _verify(self, seq: _Sequence, chunk: Chunk, draft: list[int]) -> bool:
        """Emit the verified tokens of a speculative chunk [last, *draft], one by one, and drop the
        rejected tail from the engine's cache. False: the sequence failed."""
        rows = getattr(self.engine, "chunk_logits", {}).get(seq.seq_id)
        if rows is None or len(rows) != len(chunk.token_ids):
            self._fail([seq], f"speculative verification: the engine returned "
                              f"{'no' if rows is None else len(rows)} logit rows for {len(chunk.token_ids)} positions")
            return False
        base, accepted = chunk.start, 0
        self.draft_steps += 1
        self.draft_tokens_proposed += len(draft)
        for i in range(len(draft) + 1):
            seq.cached = base + 1 + i  # the cache holds the last token and the i drafts accepted so far
            proposal = draft[i] if i < len(draft) else None
            if not self._advance_contained(seq, rows[i], draft=proposal):
                return False
            if seq.done or proposal is None or seq.output[-1] != proposal:
                break
            accepted += 1
        self.draft_tokens_accepted += accepted
        if not seq.done and accepted < len(draft):
            try:
                self.engine.truncate(seq.seq_id, seq.cached)
            except Exception as exc:  # noqa: BLE001 - a cache the rollback failed on is not usable for seq
                self._fail([seq], f"speculative rollback failed: {_describe(exc)}")
                return False
        return True

    # --- fault containment (serve-core) ------------------------------------------------------------
    def _advance_contained(self, seq: _Sequence, row, allowed=None, draft: int | None = None) -> bool:
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
            self._advance(seq, row, allowed, draft)
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

    def _advance(self, seq: _Sequence, logits, allowed=None, draft: int | None = None) -> None:
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
            draft=draft,  # speculative: verified against this position's distribution (serve/speculative.py)
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
