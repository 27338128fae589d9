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


@dataclass(frozen=True)
class EngineInfo:
    kind: str  # "onnxruntime" or "tensorrt"
    device: str  # "cpu", "cuda:0", ...
    precision: str  # "fp32", "fp16", "int8", ...
    max_batch: int  # cache slots: sequences alive at once
    max_seq_len: int  # tokens one sequence may hold (prompt + generated)
    vocab_size: int
    reason: str = ""  # why this engine was chosen


class Engine(ABC):
    info: EngineInfo

    @abstractmethod
    def reserve(self, seq_id: int) -> None:
        """Give seq_id a cache slot; raises CacheFull when none is free."""

    @abstractmethod
    def step(self, chunks: list[Chunk]) -> np.ndarray:
        """Run the chunks; returns float32 logits [len(chunks), vocab] for each chunk's last token."""

    @abstractmethod
    def release(self, seq_id: int) -> None:
        """Free seq_id's slot at once (idempotent). A reused slot starts empty."""

    def close(self) -> None:
        pass


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
