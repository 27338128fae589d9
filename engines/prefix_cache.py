"""Automatic prefix caching: a new sequence starts from state the server already computed.

What is cached: for each sequence the scheduler has run (running or finished), the tokens
it fed the engine and copies of its state (engine snapshots, on the engine's device):

- attention KV as contiguous position segments `[start, end)` that together cover the
  entry's tokens. A KV segment is valid for any sequence sharing those positions'
  tokens, so entries share segments by reference: a sequence that reused 600 cached
  positions and then prefilled 40 adds only a 40-position segment. Memory is counted
  once per segment however many entries hold it (this is block sharing on the host, with
  blocks as long as the prefills that made them).
- for hybrid (Mamba2) models, recurrent conv/ssm snapshots at exact positions: every
  `interval` prefill tokens (the scheduler cuts prefill chunks there), at the end of the
  prompt and at the end of the generation. A hit resumes from the longest snapshot not
  past the shared prefix, whatever the interval.
- the logits after the whole prompt, so an identical prompt needs no prefill at all.

Reuse copies the state into the new sequence's own slot (the engine's graphs have a
fixed-capacity, per-row cache, not a paged one, so a slot cannot point at shared
blocks); the cached copy stays untouched, so nothing a running sequence uses can be
evicted under it. Eviction is LRU over finished entries, by bytes, until the cache fits
its budget; entries of running sequences are not evicted (their snapshots stop growing
when the budget is full).

Exactness: a restored state holds exactly the values the earlier sequence computed for
the same tokens at the same positions, so the rest of the computation is the one a cache
miss would run (up to the float rounding of how a prompt was split into prefill calls,
the same freedom chunked prefill already has).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np

from .base import Engine, StateSnapshot

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 128  # recurrent snapshot every N prefill tokens: see the README (bench/bench_prefix_cache.py sweep)
MIN_HIT = 4  # reuse at least this many tokens, so that a shared first token or two is not called a hit
_AUTO_FRACTION = 0.2  # default budget: this share of the memory free when the server starts...
_AUTO_CAP_MB = 8192  # ...at most this much


def auto_budget_mb(free_bytes: int | None) -> int:
    """The default `--prefix-cache-mb`: 20% of the free memory of the engine's device, at most 8 GiB."""
    if not free_bytes:
        return 1024
    return int(min(_AUTO_CAP_MB, free_bytes * _AUTO_FRACTION / 2**20))


@dataclass(eq=False)
class _Entry:
    tokens: np.ndarray  # the tokens whose state is covered, positions [0, len)
    kv: list[StateSnapshot] = field(default_factory=list)  # ordered by start; later ones win on overlap
    recurrent: dict[int, StateSnapshot] = field(default_factory=dict)  # position -> state after it
    logits: dict[int, np.ndarray] = field(default_factory=dict)  # position -> logits of the next token
    live: bool = True  # a running sequence still extends it
    used: int = 0  # LRU clock

    @property
    def covered(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Hit:
    length: int  # tokens restored
    kv: tuple[StateSnapshot, ...]
    recurrent: StateSnapshot | None
    logits: np.ndarray | None  # set when the whole prompt was cached: no prefill needed
    source: object = field(default=None, repr=False, compare=False)  # the entry it came from


class PrefixCache:
    def __init__(self, engine: Engine, budget_bytes: int, interval: int = DEFAULT_INTERVAL,
                 min_hit: int = MIN_HIT):
        if not engine.supports_snapshots:
            raise ValueError(f"the {engine.info.kind} engine cannot copy state out and back (no prefix cache)")
        self.engine = engine
        self.budget = int(budget_bytes)
        self.recurrent = bool(engine.recurrent)
        self.interval = max(1, int(interval))
        self.min_hit = max(1, int(min_hit))
        self._entries: list[_Entry] = []
        self._live: dict[int, _Entry] = {}  # seq_id -> its entry
        self._refs: dict[int, int] = {}  # id(snapshot) -> entries holding it
        self._snaps: dict[int, StateSnapshot] = {}
        self._clock = itertools.count(1)
        self.bytes = 0
        # counters (read by the metrics collector)
        self.lookups = 0
        self.looked_up_tokens = 0
        self.hits = 0
        self.hit_tokens = 0
        self.evictions = 0

    # --- accounting ------------------------------------------------------------------------------
    def _hold(self, snap: StateSnapshot) -> None:
        key = id(snap)
        if key not in self._refs:
            self._refs[key] = 0
            self._snaps[key] = snap
            self.bytes += snap.nbytes
        self._refs[key] += 1

    def _drop(self, snap: StateSnapshot) -> None:
        key = id(snap)
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key], self._snaps[key]
            self.bytes -= snap.nbytes

    def _snapshots(self, entry: _Entry) -> list[StateSnapshot]:
        return entry.kv + list(entry.recurrent.values())

    def _remove(self, entry: _Entry) -> None:
        self._entries.remove(entry)
        for snap in self._snapshots(entry):
            self._drop(snap)

    def _evict(self) -> None:
        """Finished entries, least recently used first, until the cache fits its budget."""
        if self.bytes <= self.budget:
            return
        for entry in sorted((e for e in self._entries if not e.live), key=lambda e: e.used):
            self._remove(entry)
            self.evictions += 1
            if self.bytes <= self.budget:
                return

    def entries(self) -> int:
        return len(self._entries)

    # --- lookup ----------------------------------------------------------------------------------
    def lookup(self, prompt: tuple[int, ...]) -> Hit | None:
        """The longest usable cached prefix of `prompt` (counted in the lookup counters)."""
        self.lookups += 1
        self.looked_up_tokens += len(prompt)
        p = np.asarray(prompt, np.int64)
        best, best_entry = None, None
        for entry in self._entries:
            hit = self._usable(entry, p)
            if hit is not None and (best is None or hit.length > best.length):
                best, best_entry = hit, entry
        if best is None:
            return None
        best_entry.used = next(self._clock)
        self.hits += 1
        self.hit_tokens += best.length
        return best

    def _usable(self, entry: _Entry, p: np.ndarray) -> Hit | None:
        n = min(entry.covered, len(p))
        if n < self.min_hit:
            return None
        diff = np.flatnonzero(entry.tokens[:n] != p[:n])
        lcp = int(diff[0]) if len(diff) else n
        full = lcp == len(p) and len(p) in entry.logits
        limit = len(p) if full else min(lcp, len(p) - 1)  # at least one token to prefill, unless logits are cached
        if self.recurrent:
            points = [q for q in entry.recurrent if q <= limit and (q < len(p) or full)]
            if not points:
                return None
            length = max(points)
            recurrent = entry.recurrent[length]
        else:
            length, recurrent = limit, None
        if length < self.min_hit:
            return None
        kv = tuple(s for s in entry.kv if s.start < length)
        logits = entry.logits.get(length) if length == len(p) else None
        return Hit(length, kv, recurrent, logits, entry)

    # --- the sequences the scheduler runs ------------------------------------------------------------
    def begin(self, seq_id: int, prompt: tuple[int, ...], hit: Hit | None) -> None:
        """seq_id starts (restored from `hit`, or empty): its entry inherits what it reused."""
        entry = _Entry(tokens=np.zeros(0, np.int64), used=next(self._clock))
        if hit is not None:
            entry.tokens = np.asarray(prompt[:hit.length], np.int64)
            entry.kv = list(hit.kv)
            source = hit.source if hit.source in self._entries else None
            if source is not None:  # recurrent snapshots and logits within the shared part stay valid
                entry.recurrent = {q: s for q, s in source.recurrent.items() if q <= hit.length}
                entry.logits = {q: v for q, v in source.logits.items() if q <= hit.length}
            if hit.recurrent is not None:
                entry.recurrent[hit.length] = hit.recurrent
            if hit.logits is not None:
                entry.logits[hit.length] = hit.logits
            for snap in self._snapshots(entry):
                self._hold(snap)
        self._entries.append(entry)
        self._live[seq_id] = entry

    def next_snapshot(self, seq_id: int, cached: int) -> int | None:
        """For recurrent models: the position where the prefill of seq_id must pause for a snapshot."""
        if not self.recurrent or seq_id not in self._live:
            return None
        return (cached // self.interval + 1) * self.interval

    def after_prefill(self, seq_id: int, tokens: tuple[int, ...], cached: int, prompt_len: int,
                      logits: np.ndarray | None) -> None:
        """seq_id's cache now holds `cached` tokens (the first `cached` of `tokens`): snapshot at an
        interval point or at the end of the prompt (with the prompt's last logits)."""
        entry = self._live.get(seq_id)
        if entry is None:
            return
        at_end = cached == prompt_len
        if self.recurrent:  # the scheduler pauses the prefill at every interval point
            due = at_end or cached % self.interval == 0
        else:  # KV can be cut anywhere: a segment once an interval's worth of tokens is new
            due = at_end or cached - entry.covered >= self.interval
        if not due:
            return
        self._extend(seq_id, entry, tokens, cached, logits if at_end else None)

    def finish(self, seq_id: int, tokens: tuple[int, ...], cached: int, ok: bool = True) -> None:
        """seq_id leaves (call before the engine releases its slot). `ok`: its state is sound (not after
        an engine error), so the generation's end is snapshot too."""
        entry = self._live.pop(seq_id, None)
        if entry is None:
            return
        if ok and cached > entry.covered:
            self._extend(seq_id, entry, tokens, cached, None)
        entry.live = False
        if not entry.covered:
            self._remove(entry)
            return
        self._absorb(entry)
        self._evict()

    def _extend(self, seq_id: int, entry: _Entry, tokens, cached: int, logits) -> None:
        new = []
        if cached > entry.covered:
            new.append(self.engine.save_kv(seq_id, entry.covered, cached))
        rec = self.engine.save_recurrent(seq_id) if self.recurrent and cached not in entry.recurrent else None
        if rec is not None:
            new.append(rec)
        for snap in new:
            self._hold(snap)
        self._evict()
        if self.bytes > self.budget:  # does not fit even after evicting every finished entry
            for snap in new:
                self._drop(snap)
            return
        if new and new[0].kind == "kv":
            entry.kv.append(new[0])
            entry.tokens = np.asarray(tokens[:cached], np.int64)
        if rec is not None:
            entry.recurrent[cached] = rec
        if logits is not None and entry.covered == cached:
            entry.logits[cached] = np.array(logits, np.float32)
        entry.used = next(self._clock)

    def _absorb(self, entry: _Entry) -> None:
        """Finished entries whose tokens are a prefix of `entry`'s are redundant: fold their
        snapshots into it and drop them (their KV segments are shared with it already)."""
        for other in [e for e in self._entries if e is not entry and not e.live and e.covered <= entry.covered]:
            if not np.array_equal(other.tokens, entry.tokens[:other.covered]):
                continue
            if not all(any(s is t for t in entry.kv) for s in other.kv):
                continue  # its KV is its own copy: keep it only as long as LRU says
            for q, snap in other.recurrent.items():
                if q not in entry.recurrent:
                    entry.recurrent[q] = snap
                    self._hold(snap)
            for q, v in other.logits.items():
                entry.logits.setdefault(q, v)
            self._remove(other)


def make_prefix_cache(engine: Engine, budget_mb: int | None, interval: int = DEFAULT_INTERVAL) -> PrefixCache | None:
    """The server's prefix cache: None when `budget_mb` is 0 or the engine cannot snapshot state;
    `budget_mb` None sizes it from the engine device's free memory (`auto_budget_mb`). Logs the choice."""
    if budget_mb == 0:
        log.info("prefix cache: off (--prefix-cache-mb 0)")
        return None
    if not engine.supports_snapshots:
        log.info("prefix cache: off (the %s engine cannot snapshot state)", engine.info.kind)
        return None
    how = "--prefix-cache-mb"
    if budget_mb is None:
        free = engine.free_memory_bytes()
        budget_mb = auto_budget_mb(free)
        how = (f"20% of {free / 2**30:.1f} GiB free on {engine.info.device}, at most {_AUTO_CAP_MB} MiB"
               if free else "free memory unknown: default")
    cache = PrefixCache(engine, budget_mb * 2**20, interval=interval)
    log.info("prefix cache: %d MiB (%s)%s", budget_mb, how,
             f", recurrent-state snapshots every {cache.interval} prefill tokens" if cache.recurrent else "")
    return cache
