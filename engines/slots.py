"""The slot table every engine shares: which cache row each sequence lives in, how many
tokens it holds, the row moves that keep rows compact, and which rows each call of a
step covers. Plain data and plain Python: no model, no device, no ONNX Runtime.

An engine keeps one `[max_batch, ...]` buffer per state tensor; sequence s lives in
row `rows[s]`. Rows are kept compact (rows 0..n-1 are in use): when a sequence leaves,
the highest row moves into its place (`Move`), so a decode call over rows [0, n) never
reads a dead row. An engine only has to "run these rows" (`Call`) and "copy rows"
(`Move`, or a restore from a prefix-cache snapshot).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import CacheFull, Chunk, EngineError, check_chunks


@dataclass(frozen=True)
class Move:
    """Copy row `src` into row `dst`: the first `length` positions of each KV state, and the
    whole row of each recurrent state."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class Call:
    """One graph call over rows [lo, hi) of every state buffer.

    `members` are the indices (into the step's chunk list) whose logits this call returns,
    `member_rows` their row offsets within the call (logits row), in the same order.
    `input_ids`/`position_ids` are [hi - lo, tokens]. Rows of a KV-only decode call that
    have nothing to decode get a harmless write at their first free position, which a
    later step overwrites before it is read.
    """

    lo: int
    hi: int
    members: tuple[int, ...]
    member_rows: tuple[int, ...]
    input_ids: np.ndarray
    position_ids: np.ndarray
    decode: bool

    @property
    def rows(self) -> slice:
        return slice(self.lo, self.hi)


# --- the ragged step: one graph call per step (graph flavour decoder_ragged, docs/ragged-step.md) ---------
class RaggedInfeasible(EngineError):
    """No two-group layout of the step keeps every row's cache writes inside max_seq_len (a row close
    to the end in a group padded wider than its chunk). The engine then runs each chunk alone:
    `plan_ragged([chunk])` always fits."""


@dataclass(frozen=True)
class Swap:
    """Exchange rows `a` and `b`: the first `length_a` positions of row a's KV with the first
    `length_b` of row b's, and the whole recurrent state of both (run before the call)."""

    a: int
    b: int
    length_a: int
    length_b: int


@dataclass(frozen=True)
class RaggedGroup:
    """Rows [lo, hi) of every state buffer, `width` slots each (the padded layout of the graph's
    group: `token_index`, `position_ids` [hi - lo, width], `lengths` [hi - lo]). `lo == hi`: the
    group is empty (the engine binds a spare row instead where zero-size inputs do not run)."""

    lo: int
    hi: int
    width: int
    token_index: np.ndarray
    position_ids: np.ndarray
    lengths: np.ndarray

    @property
    def rows(self) -> slice:
        return slice(self.lo, self.hi)


@dataclass(frozen=True)
class RaggedCall:
    """One call of the ragged graph for a whole step.

    `input_ids`/`position_ids` [1, tokens]: every chunk's tokens, group 0's rows first, then
    group 1's, rows in order. `unpad_index` [tokens]: each token's slot in group 0's slots
    (row-major) then group 1's. `logits_index` [logits]: the tokens that get logits; chunk i's
    are output rows [logits_offsets[i], logits_offsets[i + 1]) (its last token last; every token
    when Chunk.all_logits). `swaps` run first (the table's rows already reflect them);
    `capacity` is the cache capacity the call needs (start + width of every row of a group)."""

    groups: tuple[RaggedGroup, RaggedGroup]
    input_ids: np.ndarray
    position_ids: np.ndarray
    unpad_index: np.ndarray
    logits_index: np.ndarray
    logits_offsets: tuple[int, ...]
    swaps: tuple[Swap, ...]
    capacity: int

    @property
    def padded_slots(self) -> int:
        return sum((g.hi - g.lo) * g.width for g in self.groups)


class SlotTable:
    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.rows: dict[int, int] = {}  # seq_id -> row
        self.lengths: dict[int, int] = {}  # seq_id -> tokens cached

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.rows

    def longest(self) -> int:
        return max(self.lengths.values(), default=0)

    def reserve(self, seq_id: int) -> int:
        """The row seq_id gets (the lowest free one); raises CacheFull when all are in use."""
        if seq_id in self.rows:
            raise EngineError(f"sequence {seq_id} already has a cache slot")
        if len(self.rows) >= self.max_batch:
            raise CacheFull(f"all {self.max_batch} cache slots are in use")
        row = len(self.rows)
        self.rows[seq_id] = row
        self.lengths[seq_id] = 0
        return row

    def release(self, seq_id: int) -> Move | None:
        """Forget seq_id (idempotent). Returns the move that keeps rows compact, if any: the
        engine must copy `src` into `dst` before the next call."""
        row = self.rows.pop(seq_id, None)
        if row is None:
            return None
        self.lengths.pop(seq_id)
        last = len(self.rows)  # the highest row still in use, before compaction
        if row == last:
            return None
        mover = next(s for s, r in self.rows.items() if r == last)
        self.rows[mover] = row
        return Move(src=last, dst=row, length=self.lengths[mover])

    def set_length(self, seq_id: int, length: int) -> None:
        """Declare that seq_id's row already holds `length` tokens (restored from a prefix cache)."""
        if seq_id not in self.rows:
            raise EngineError(f"sequence {seq_id} has no cache slot (reserve it first)")
        self.lengths[seq_id] = length

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget seq_id's tokens past `length` (0 <= length <= tokens cached)."""
        if seq_id not in self.rows:
            raise EngineError(f"sequence {seq_id} has no cache slot (reserve it first)")
        if not 0 <= length <= self.lengths[seq_id]:
            raise EngineError(f"sequence {seq_id}: cannot truncate {self.lengths[seq_id]} cached tokens to {length}")
        self.lengths[seq_id] = length

    def plan(self, chunks: list[Chunk], capacity: int, max_seq_len: int, recurrent: bool) -> list[Call]:
        """The calls of one step, decodes first.

        Decodes (one-token chunks) of all sequences go in one call over rows [0, last decoding
        row] for KV-only models; with recurrent state (which changes with every token fed),
        one call per run of consecutive decoding rows, so no row is fed a dummy token. Every
        multi-token chunk is its own call over its single row (decode rows are never padded
        to a prompt's length). Raises EngineError/CacheFull for a step the cache cannot take.
        """
        check_chunks(chunks, self.lengths, max_seq_len)
        calls = []
        decodes = sorted((i for i, c in enumerate(chunks) if len(c.token_ids) == 1),
                         key=lambda i: self.rows[chunks[i].seq_id])
        for lo, hi, members in self._decode_ranges(decodes, chunks, recurrent):
            ids = np.zeros((hi - lo, 1), np.int64)
            pos = np.zeros((hi - lo, 1), np.int64)
            for seq, row in self.rows.items():
                if lo <= row < hi:
                    pos[row - lo, 0] = min(self.lengths[seq], capacity - 1)
            offsets = []
            for i in members:
                c = chunks[i]
                r = self.rows[c.seq_id] - lo
                ids[r, 0], pos[r, 0] = c.token_ids[0], c.start
                offsets.append(r)
            calls.append(Call(lo, hi, tuple(members), tuple(offsets), ids, pos, decode=True))
        for i, c in enumerate(chunks):
            if len(c.token_ids) > 1:
                row = self.rows[c.seq_id]
                ids = np.asarray(c.token_ids, np.int64)[None]
                pos = np.arange(c.start, c.start + len(c.token_ids), dtype=np.int64)[None]
                calls.append(Call(row, row + 1, (i,), (0,), ids, pos, decode=False))
        return calls

    def plan_ragged(self, chunks: list[Chunk], capacity: int, max_seq_len: int,
                    spare_row: int | None = None) -> RaggedCall:
        """The one call of a step on the ragged graph (docs/ragged-step.md).

        Chunks go into two groups by a threshold on their length (group 0: the short ones), the
        threshold that minimises the padded slots (rows x width of each group's row range, idle
        rows inside a range included: attention costs about that times the capacity). Each group
        is a contiguous row range, the two disjoint; where the chosen groups' rows interleave,
        rows are swapped (`Swap`, applied to `rows` here; the engine copies the state before the
        call), the swaps weighed against the padding they save. Live rows inside a range without
        a chunk get length 0 (the graph leaves them unchanged). An empty group 1 has rows [0, 0) (width 1),
        or, with `spare_row`, that one row with a 1-slot, 0-length dummy. Raises EngineError /
        CacheFull for a step the cache cannot take, RaggedInfeasible when no layout keeps every
        row's writes (start + width) within max_seq_len.
        """
        check_chunks(chunks, self.lengths, max_seq_len)
        if len({c.seq_id for c in chunks}) != len(chunks):
            raise EngineError("a sequence has two chunks in one step")
        n = len(self.rows)
        seq_at = {r: s for s, r in self.rows.items()}
        length = [self.lengths[seq_at[r]] for r in range(n)]
        chunk_at = {self.rows[c.seq_id]: i for i, c in enumerate(chunks)}
        size = {r: len(chunks[i].token_ids) for r, i in chunk_at.items()}
        widths = sorted(set(size.values()))
        weight = max(capacity, 1)
        best = None
        for t in widths:  # group 0: chunks of at most t tokens
            label = [None if r not in size else (0 if size[r] <= t else 1) for r in range(n)]
            width = (t, widths[-1] if t < widths[-1] else 0)
            # The rows as they are when that works; swaps only when the groups interleave (or a row
            # would write past max_seq_len).
            for arrangement in ([((), label)], self._arrangements(label)):
                found = False
                for swaps, lab in arrangement:
                    ranges = _ranges(lab)
                    if ranges is None:
                        continue
                    ln = list(length)
                    for a, b in swaps:
                        ln[a], ln[b] = ln[b], ln[a]
                    if any(ln[r] + width[g] > max_seq_len for g in (0, 1) for r in range(*ranges[g])):
                        continue
                    found = True
                    slots = sum((hi - lo) * width[g] for g, (lo, hi) in enumerate(ranges))
                    cost = slots * weight + 2 * sum(length[a] + length[b] for a, b in swaps)
                    key = (cost, t < widths[-1], len(swaps))
                    if best is None or key < best[0]:
                        best = (key, swaps, ranges, width)
                if found:
                    break
        if best is None:
            raise RaggedInfeasible(f"no two-group layout of {len(chunks)} chunks keeps every row within "
                                   f"{max_seq_len} positions")
        _, swaps, ranges, width = best
        # Apply the swaps to the table.
        out_swaps = []
        for a, b in swaps:
            sa, sb = seq_at[a], seq_at[b]
            out_swaps.append(Swap(a, b, self.lengths[sa], self.lengths[sb]))
            self.rows[sa], self.rows[sb] = b, a
            seq_at[a], seq_at[b] = sb, sa
        chunk_at = {self.rows[c.seq_id]: i for i, c in enumerate(chunks)}
        # Flat layout: group 0's rows, then group 1's, each row's tokens in order.
        offset = [0] * len(chunks)
        ids, pos, unpad = [], [], []
        slot_base = 0
        for g, (lo, hi) in enumerate(ranges):
            for r in range(lo, hi):
                i = chunk_at.get(r)
                if i is None:
                    continue
                c = chunks[i]
                offset[i] = len(ids)
                ids.extend(c.token_ids)
                pos.extend(range(c.start, c.start + len(c.token_ids)))
                unpad.extend(slot_base + (r - lo) * width[g] + j for j in range(len(c.token_ids)))
            slot_base += (hi - lo) * width[g]
        groups = []
        for g, (lo, hi) in enumerate(ranges):
            w = width[g]
            token_index = np.zeros((hi - lo, w), np.int64)
            position_ids = np.zeros((hi - lo, w), np.int64)
            lengths = np.zeros(hi - lo, np.int64)
            for r in range(lo, hi):
                position_ids[r - lo] = np.arange(self.lengths[seq_at[r]], self.lengths[seq_at[r]] + w)
                i = chunk_at.get(r)
                if i is not None:
                    k = len(chunks[i].token_ids)
                    token_index[r - lo] = offset[i] + np.minimum(np.arange(w), k - 1)
                    lengths[r - lo] = k
            groups.append(RaggedGroup(lo, hi, w, token_index, position_ids, lengths))
        if groups[1].lo == groups[1].hi:
            if spare_row is not None:
                one = np.zeros((1, 1), np.int64)
                groups[1] = RaggedGroup(spare_row, spare_row + 1, 1, one, one.copy(), np.zeros(1, np.int64))
            else:
                groups[1] = RaggedGroup(0, 0, 1, np.zeros((0, 1), np.int64), np.zeros((0, 1), np.int64),
                                        np.zeros(0, np.int64))
        logits, offsets = [], [0]
        for i, c in enumerate(chunks):
            k = len(c.token_ids)
            logits.extend(range(offset[i], offset[i] + k) if c.all_logits else [offset[i] + k - 1])
            offsets.append(len(logits))
        needed = max([self.lengths[seq_at[r]] + g.width for g in groups
                      for r in range(g.lo, g.hi) if r in seq_at] + [1])
        return RaggedCall((groups[0], groups[1]), np.asarray(ids, np.int64)[None], np.asarray(pos, np.int64)[None],
                          np.asarray(unpad, np.int64), np.asarray(logits, np.int64), tuple(offsets),
                          tuple(out_swaps), needed)

    @staticmethod
    def _arrangements(label: list):
        """Row layouts with swaps for group labels (0, 1, None: idle) per row: for every split point
        p with one group below and the other at p or above, the misplaced rows swapped with each
        other (or with idle rows on the right side, the ones nearest p). Yields (swaps as (a, b)
        row pairs, the labels afterwards)."""
        n = len(label)
        for low, high in ((0, 1), (1, 0)):
            n_low, n_high = label.count(low), label.count(high)
            for p in range(n_low, n - n_high + 1):
                up = [r for r in range(p, n) if label[r] == low]  # must go below p
                down = [r for r in range(p) if label[r] == high]  # must go to p or above
                if not up and not down:
                    continue
                pairs = list(zip(up, down))
                idle_below = [r for r in range(p - 1, -1, -1) if label[r] is None]
                idle_above = [r for r in range(p, n) if label[r] is None]
                pairs += list(zip(up[len(down):], idle_below))
                pairs += list(zip(down[len(up):], idle_above))
                lab = list(label)
                for a, b in pairs:
                    lab[a], lab[b] = lab[b], lab[a]
                yield tuple(pairs), lab

    def advance(self, chunks: list[Chunk]) -> None:
        """Record that the step ran: each chunk's tokens are now cached."""
        for c in chunks:
            self.lengths[c.seq_id] = c.start + len(c.token_ids)

    def _decode_ranges(self, decodes: list[int], chunks: list[Chunk], recurrent: bool):
        if not decodes:
            return []
        rows = [self.rows[chunks[i].seq_id] for i in decodes]
        if not recurrent:
            return [(0, rows[-1] + 1, decodes)]
        ranges, start = [], 0
        for k in range(1, len(rows) + 1):
            if k == len(rows) or rows[k] != rows[k - 1] + 1:
                ranges.append((rows[start], rows[k - 1] + 1, decodes[start:k]))
                start = k
        return ranges


def _ranges(label: list) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The row range [lo, hi) of group 0 and of group 1 ((0, 0) when empty) for per-row labels, or
    None when the two ranges overlap."""
    out = []
    for g in (0, 1):
        rows = [r for r, x in enumerate(label) if x == g]
        out.append((rows[0], rows[-1] + 1) if rows else (0, 0))
    (lo0, hi0), (lo1, hi1) = out
    if lo1 < hi1 and lo0 < hi1 and lo1 < hi0:
        return None
    return out[0], out[1]


def blocks(needed: int, block: int, limit: int) -> int:
    """`needed` rounded up to whole blocks, at most `limit`."""
    return min(limit, -(-needed // block) * block)
