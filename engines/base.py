"""The engine interface the server depends on, and nothing else.

An engine owns the model and the KV cache. Sequences are named by an integer
id chosen by the caller. One `step` runs a batch of chunks: a chunk is some
tokens of one sequence (a piece of its prompt, or the one token it decoded
last step) starting at the position where that sequence's cache ends. It
returns next-token logits for the last token of every chunk. Sampling,
stopping and text are not the engine's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


class EngineError(RuntimeError):
    """The engine failed to run a step (the sequences in it are lost, the engine is not)."""


class CacheFull(EngineError):
    """No free cache slot, or a sequence would outgrow its capacity."""


@dataclass(frozen=True)
class Chunk:
    seq_id: int
    token_ids: tuple[int, ...]
    start: int  # position of token_ids[0]; equals the number of tokens already cached
    # tgis (prompt logprobs): also return the logits of EVERY position of this chunk; the engine
    # puts them in `engine.chunk_logits[seq_id]` (float32 [len(token_ids), vocab]) during step().
    # Engines that cannot leave `supports_all_logits` False (the scheduler then refuses the request).
    all_logits: bool = False


@dataclass(frozen=True)
class EngineInfo:
    kind: str  # "onnxruntime" or "tensorrt"
    device: str  # "cpu", "cuda:0", ...
    precision: str  # "fp32", "fp16", "int8", ...
    max_batch: int  # cache slots: sequences alive at once
    max_seq_len: int  # tokens one sequence may hold (prompt + generated)
    vocab_size: int
    reason: str = ""  # why this engine was chosen


@dataclass(eq=False)
class StateSnapshot:
    """A copy of part of one sequence's cache, on the engine's device, for the prefix cache.

    kind "kv": the attention KV of positions [start, end). kind "recurrent": the Mamba
    conv/ssm state after `end` tokens (it cannot be cut at another position). Immutable
    once made; `nbytes` is what it holds."""

    kind: str  # "kv" | "recurrent"
    start: int
    end: int
    buffers: dict
    nbytes: int


class Engine(ABC):
    info: EngineInfo
    # Engines that can copy a sequence's state out and back (prefix caching) set this.
    supports_snapshots: bool = False
    # Engines that honour Chunk.all_logits set this (tgis: prompt-token logprobs).
    supports_all_logits: bool = False
    recurrent: bool = False  # has Mamba-style state that only snapshots at exact positions

    @abstractmethod
    def reserve(self, seq_id: int) -> None:
        """Give seq_id a cache slot; raises CacheFull when none is free."""

    @abstractmethod
    def step(self, chunks: list[Chunk]) -> np.ndarray:
        """Run the chunks; returns float32 logits [len(chunks), vocab] for each chunk's last token."""

    @abstractmethod
    def release(self, seq_id: int) -> None:
        """Free seq_id's slot at once (idempotent). A reused slot starts empty."""

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget seq_id's cached tokens past `length` (speculative rollback). The in-place KV
        cache masks every position past a row's length, so for attention this is a length reset;
        recurrent (Mamba) state cannot be cut at an earlier position, so engines with it refuse."""
        raise EngineError(f"{type(self).__name__} cannot roll a sequence back")

    def close(self) -> None:
        pass

    # --- prefix caching (engines with supports_snapshots) ----------------------------------
    def save_kv(self, seq_id: int, start: int, end: int) -> StateSnapshot:
        """A copy of seq_id's KV cache at positions [start, end) (end <= tokens cached)."""
        raise NotImplementedError

    def save_recurrent(self, seq_id: int) -> StateSnapshot | None:
        """A copy of seq_id's recurrent state as it is now (None for attention-only models)."""
        raise NotImplementedError

    def restore(self, seq_id: int, length: int, kv: list[StateSnapshot], recurrent: StateSnapshot | None) -> None:
        """Start the freshly reserved seq_id from cached state: KV positions [0, length) from the
        `kv` segments (which cover them), and the recurrent state (taken after `length` tokens).
        Afterwards the sequence holds `length` tokens."""
        raise NotImplementedError

    def cache_bytes(self) -> int:
        return 0

    def free_memory_bytes(self) -> int | None:
        """Free memory on the device that holds this engine's state (None: unknown)."""
        return None


def check_chunks(chunks: list[Chunk], cached: dict[int, int], max_seq_len: int) -> None:
    """Refuse a step the cache cannot take: unknown sequence, a gap or overlap with what is
    cached (`cached`: seq_id -> tokens held), an empty chunk, or a sequence past max_seq_len."""
    for c in chunks:
        if c.seq_id not in cached:
            raise EngineError(f"sequence {c.seq_id} has no cache slot (reserve it first)")
        if c.start != cached[c.seq_id]:
            raise EngineError(f"sequence {c.seq_id}: chunk starts at {c.start}, cache holds {cached[c.seq_id]}")
        if not c.token_ids:
            raise EngineError(f"sequence {c.seq_id}: empty chunk")
        if c.start + len(c.token_ids) > max_seq_len:
            raise CacheFull(f"sequence {c.seq_id} would exceed {max_seq_len} tokens")
