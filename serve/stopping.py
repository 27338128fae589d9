"""Engine-independent stopping logic (pure Python, no numpy needed).

* :class:`StoppingParams` - per-request limits, validated with field-named errors.
* :class:`StopReason` - the fmaas ``StopReason`` enum values.
* :class:`StopSequenceMatcher` - stop sequences over the detokenized text stream,
  holding back text that might still become a stop sequence.
* :class:`StoppingCriteria` - token-level checks (EOS, max tokens, context
  window, time limit).

Stop-sequence semantics ("earliest match wins"): the match that *completes*
first in the text wins, i.e. the one with the smallest end offset, so a
server can stop generating the moment a stop sequence appears and never has to
look past it. When several stop sequences complete at the same offset (one is
a suffix of the other, e.g. "abc" and "bc") the longest one wins, i.e. the one
that starts earliest. A stop sequence that is a prefix of another ("ab" vs
"abc") therefore wins as soon as it completes. Output is the text before the
match (plus the match itself with ``include_stop_sequence``), nothing after.
"""

from __future__ import annotations

import enum
import math
import numbers
import time
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "StopReason",
    "StopSequenceMatcher",
    "StoppingCriteria",
    "StoppingParams",
    "find_stop_sequence",
    "fmaas_stop_reason",
]


class StopReason(enum.IntEnum):
    """Why a sequence finished (values 0-7 match ``fmaas.StopReason``)."""

    NOT_FINISHED = 0
    MAX_TOKENS = 1
    EOS_TOKEN = 2
    CANCELLED = 3
    TIME_LIMIT = 4
    STOP_SEQUENCE = 5
    TOKEN_LIMIT = 6
    ERROR = 7
    # the output constraint (serve/constraints.py) was not complete when max_new_tokens or the
    # context window ran out: the text is a valid prefix, not a valid whole (granite-deploy's own;
    # fmaas has no such value and reports MAX_TOKENS, OpenAI "length")
    CONSTRAINT_UNMET = 8


def fmaas_stop_reason(reason: StopReason) -> StopReason:
    """The reason as fmaas.StopReason can say it (CONSTRAINT_UNMET -> MAX_TOKENS)."""
    return StopReason.MAX_TOKENS if reason == StopReason.CONSTRAINT_UNMET else reason


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class StoppingParams:
    """Per-request stopping settings.

    ``stop_token_ids`` end generation (EOS) once ``min_new_tokens`` tokens have
    been generated before them; until then they should be suppressed at sampling
    time (:meth:`StoppingCriteria.suppressed_token_ids`). Lists/sets given for
    ``stop_token_ids`` / ``stop_sequences`` are normalised to frozenset / tuple.
    ``time_limit_s=None`` means no time limit.
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = False
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.stop_token_ids, frozenset):
            try:
                object.__setattr__(self, "stop_token_ids", frozenset(self.stop_token_ids))
            except TypeError:
                pass  # reported by validate()
        if not isinstance(self.stop_sequences, (tuple, str)):
            try:
                object.__setattr__(self, "stop_sequences", tuple(self.stop_sequences))
            except TypeError:
                pass

    def validate(self, max_stop_sequences: int = 6, max_stop_sequence_len: int = 240) -> StoppingParams:
        """Raise ``ValueError("<field>: ...")`` on the first bad field; return self.

        ``max_stop_sequence_len`` counts characters (code points).
        """
        mx, mn = self.max_new_tokens, self.min_new_tokens
        if not _is_int(mx) or mx < 1:
            raise ValueError(f"max_new_tokens: must be an integer >= 1, got {mx!r}")
        if not _is_int(mn) or mn < 0:
            raise ValueError(f"min_new_tokens: must be an integer >= 0, got {mn!r}")
        if mn > mx:
            raise ValueError(f"min_new_tokens: must be <= max_new_tokens ({mx}), got {mn}")
        ids = self.stop_token_ids
        if not isinstance(ids, frozenset) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"stop_token_ids: must be a set of integers >= 0, got {ids!r}")
        seqs = self.stop_sequences
        if not isinstance(seqs, tuple) or not all(isinstance(s, str) for s in seqs):
            raise ValueError(f"stop_sequences: must be a sequence of strings, got {seqs!r}")
        if len(seqs) > max_stop_sequences:
            raise ValueError(f"stop_sequences: at most {max_stop_sequences} allowed, got {len(seqs)}")
        for s in seqs:
            if not s:
                raise ValueError("stop_sequences: must not contain an empty string")
            if len(s) > max_stop_sequence_len:
                raise ValueError(
                    f"stop_sequences: each must be at most {max_stop_sequence_len} characters, "
                    f"got one of {len(s)}"
                )
        if not isinstance(self.include_stop_sequence, bool):
            raise ValueError(f"include_stop_sequence: must be a bool, got {self.include_stop_sequence!r}")
        t = self.time_limit_s
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t <= 0
        ):
            raise ValueError(f"time_limit_s: must be a finite number > 0 or None, got {t!r}")
        return self


def find_stop_sequence(text: str, stop_sequences: Iterable[str]) -> tuple[int, str] | None:
    """One-shot reference search: ``(start, sequence)`` of the match that ends
    first in ``text`` (longest on a tie), or None."""
    best: tuple[int, int, str] | None = None  # (end, start, seq)
    for s in stop_sequences:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
            best = (i + len(s), i, s)
    return None if best is None else (best[1], best[2])


class StopSequenceMatcher:
    """Streaming stop-sequence matcher over detokenized text deltas.

    ``feed(delta) -> (safe_text, matched)``: ``safe_text`` may be streamed to
    the client now; any suffix that is still a proper prefix of some stop
    sequence is held back until it is resolved. On a match, ``safe_text`` ends
    right before the stop sequence (or includes it with
    ``include_stop_sequence``), ``matched`` is the sequence, and the matcher is
    finished: later ``feed`` calls return ``("", None)`` and ``flush()`` ``""``.
    ``flush()`` returns the held-back text when generation ends without a match.

    The concatenation of everything returned equals the one-shot result
    (:func:`find_stop_sequence`) over the concatenated deltas. Each feed costs
    O((longest stop sequence + len(delta)) * number of stop sequences).
    """

    def __init__(self, stop_sequences: Iterable[str], include_stop_sequence: bool = False):
        seqs = tuple(dict.fromkeys(stop_sequences))
        for s in seqs:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop_sequences: must be non-empty strings, got {s!r}")
        self.stop_sequences = seqs
        self.include_stop_sequence = bool(include_stop_sequence)
        self.matched: str | None = None
        self._max_len = max((len(s) for s in seqs), default=0)
        self._by_first: dict[str, tuple[str, ...]] = {}
        for s in seqs:
            self._by_first[s[0]] = self._by_first.get(s[0], ()) + (s,)
        self._held = ""

    @property
    def held(self) -> str:
        """Text received but not yet released."""
        return self._held

    @property
    def finished(self) -> bool:
        return self.matched is not None

    def feed(self, text_delta: str) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", None
        if not self.stop_sequences:
            return text_delta, None
        held_len = len(self._held)
        text = self._held + text_delta
        # Anything wholly inside the held text was already ruled out, so a new
        # match must end after held_len. Per sequence, its first such
        # occurrence ends earliest.
        best: tuple[int, int, str] | None = None  # (end, start, seq)
        for s in self.stop_sequences:
            i = text.find(s, max(0, held_len - len(s) + 1))
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            end, start, s = best
            self._held = ""
            self.matched = s
            return (text[:end] if self.include_stop_sequence else text[:start]), s
        # Hold back the longest suffix that is a proper prefix of a stop
        # sequence (only the last max_len - 1 characters can be one).
        n = len(text)
        cut = n
        for i in range(max(0, n - self._max_len + 1), n):
            cands = self._by_first.get(text[i])
            if cands is not None:
                suffix = text[i:]
                if any(len(c) > len(suffix) and c.startswith(suffix) for c in cands):
                    cut = i
                    break
        self._held = text[cut:]
        return text[:cut], None

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


class StoppingCriteria:
    """Token-level stop checks for one request.

    ``check(token_id, generated_count, now)`` is called after each generated
    token; ``generated_count`` includes that token, ``now`` is a
    ``time.monotonic()`` reading (defaults to the current one), as is
    ``start_time``. When several reasons apply to the same token the priority
    is EOS_TOKEN > MAX_TOKENS > TOKEN_LIMIT > TIME_LIMIT. Stop sequences are
    the :class:`StopSequenceMatcher`'s business (STOP_SEQUENCE).

    ``min_new_tokens`` follows HF semantics: a stop token only ends generation
    when at least ``min_new_tokens`` tokens were generated before it; use
    :meth:`suppressed_token_ids` to mask stop tokens while sampling until then.
    """

    def __init__(
        self,
        params: StoppingParams,
        context_window: int,
        prompt_len: int,
        start_time: float | None = None,
    ):
        if not _is_int(context_window) or context_window < 1:
            raise ValueError(f"context_window: must be an integer >= 1, got {context_window!r}")
        if not _is_int(prompt_len) or not (0 <= prompt_len < context_window):
            raise ValueError(f"prompt_len: must be in [0, context_window={context_window}), got {prompt_len!r}")
        self.params = params
        self.context_window = int(context_window)
        self.prompt_len = int(prompt_len)
        self.start_time = time.monotonic() if start_time is None else float(start_time)
        self.deadline: float | None = (
            None if params.time_limit_s is None else self.start_time + params.time_limit_s
        )
        self._stop_ids = params.stop_token_ids

    @property
    def max_generated(self) -> int:
        """Most tokens this request can generate (max_new_tokens, capped by the context window)."""
        return min(self.params.max_new_tokens, self.context_window - self.prompt_len)

    def suppressed_token_ids(self, generated_count: int) -> frozenset[int]:
        """Stop token ids to mask when sampling the next token, given the number
        of tokens generated so far (empty once ``min_new_tokens`` is reached)."""
        return self._stop_ids if generated_count < self.params.min_new_tokens else frozenset()

    def check(self, token_id: int, generated_count: int, now: float | None = None) -> StopReason:
        p = self.params
        if token_id in self._stop_ids and generated_count > p.min_new_tokens:
            return StopReason.EOS_TOKEN
        if generated_count >= p.max_new_tokens:
            return StopReason.MAX_TOKENS
        if self.prompt_len + generated_count >= self.context_window:
            return StopReason.TOKEN_LIMIT
        if self.deadline is not None:
            if (time.monotonic() if now is None else now) >= self.deadline:
                return StopReason.TIME_LIMIT
        return StopReason.NOT_FINISHED

    def time_exceeded(self, now: float | None = None) -> bool:
        """True once the time limit has passed (for checks between tokens)."""
        return self.deadline is not None and (time.monotonic() if now is None else now) >= self.deadline
