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


def blocks(needed: int, block: int, limit: int) -> int:
    """`needed` rounded up to whole blocks, at most `limit`."""
    return min(limit, -(-needed // block) * block)
