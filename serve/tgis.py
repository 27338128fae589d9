"""TGIS numerics the scheduler applies on request (numpy only): the exponential-decay length
penalty and prompt-token logprobs / ranks / top-n.

Length penalty, as IBM's TGIS (server/text_generation_server/utils/tokens.py,
``HeterogeneousNextTokenChooser._process_logits``): once ``generated`` tokens have been
produced, with ``tokens_past = generated - start_index > 0``, the EOS logit becomes
``eos + |eos| * (decay_factor ** tokens_past - 1)``. It is applied to the raw logits, on steps
where min_new_tokens does not already suppress EOS, before the repetition penalty and the
temperature / top-k / top-p warpers (so the reported logprobs include it, as TGIS's do).
TGIS accepts decay factors in [1, 10] (router/src/validation.rs); 1.0 is a no-op.

Prompt tokens, as TGIS (``get_input_tokens_info``): the logits at prompt position ``j``
score prompt token ``j + 1``; token 0 has no score (logprob NaN, rank 0, no top tokens).
They are the raw log-softmax of the model's logits (no penalties, no temperature). Ranks are
1 + the number of tokens with a strictly larger logprob. Top-n: the n most likely, highest
first, ties by lower token id (TGIS may return more than n on an exact tie; we never do).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidField
from .sampling import SampledToken

_F32_MAX = float(np.finfo(np.float32).max)
LENGTH_PENALTY_RANGE = (1.0, 10.0)


def length_penalty_boost(eos_logit: float, generated: int, start_index: int, decay_factor: float) -> float:
    """The EOS logit after TGIS's length penalty (unchanged until ``generated > start_index``)."""
    tokens_past = generated - start_index
    if tokens_past <= 0 or decay_factor == 1.0 or eos_logit == 0.0:
        return eos_logit
    try:
        growth = math.pow(decay_factor, tokens_past) - 1.0
    except OverflowError:
        growth = math.inf
    value = eos_logit + abs(eos_logit) * growth
    # Past float32's range EOS is simply certain; an infinite logit would turn softmax into NaN.
    return max(-_F32_MAX, min(_F32_MAX, value))


def apply_length_penalty(logits: np.ndarray, generated: int, start_index: int, decay_factor: float,
                         eos_token_id: int | None) -> np.ndarray:
    """``logits`` with the EOS logit boosted (a copy when it changes; the input is never written)."""
    if eos_token_id is None or not 0 <= eos_token_id < logits.shape[-1]:
        return logits
    old = float(logits[eos_token_id])
    new = length_penalty_boost(old, generated, start_index, decay_factor)
    if new == old:
        return logits
    out = np.array(logits, dtype=np.float32, copy=True)
    out[eos_token_id] = new
    return out


def check_tgis_fields(length_penalty, prompt_logprobs: bool, engine) -> None:
    """Raise InvalidField for a Request's tgis fields the scheduler cannot honour."""
    if length_penalty is not None:
        start, decay = length_penalty
        lo, hi = LENGTH_PENALTY_RANGE
        if not (isinstance(start, int) and start >= 0 and isinstance(decay, (int, float)) and lo <= decay <= hi):
            raise InvalidField("length_penalty", f"start_index must be >= 0 and decay_factor in [{lo:g}, {hi:g}], "
                               f"got ({start!r}, {decay!r})")
    if prompt_logprobs and not getattr(engine, "supports_all_logits", False):
        raise InvalidField("prompt_logprobs", f"the {engine.info.kind} engine cannot score prompt tokens")


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def prompt_token_infos(logits: np.ndarray, prompt_ids, first: int, top_n: int) -> list[SampledToken]:
    """Scores of prompt tokens ``first+1 .. first+len(logits)`` (those that exist) from the logits of
    prompt positions ``first .. first+len(logits)-1``; with ``first == 0`` the list starts with
    token 0's empty entry (logprob NaN, rank 0).

    logits: float32 ``[positions, vocab]`` for consecutive prompt positions starting at ``first``.
    """
    out: list[SampledToken] = []
    if first == 0:
        out.append(SampledToken(int(prompt_ids[0]), logprob=float("nan"), rank=0))
    n = len(prompt_ids)
    rows = logits[: max(0, min(len(logits), n - 1 - first))]
    if not len(rows):
        return out
    targets = np.asarray(prompt_ids[first + 1: first + 1 + len(rows)], dtype=np.int64)
    logprobs = _log_softmax(rows)
    chosen = logprobs[np.arange(len(rows)), targets]
    ranks = (logprobs > chosen[:, None]).sum(axis=-1) + 1
    tops: list[list[tuple[int, float]]] = [[] for _ in range(len(rows))]
    if top_n:
        k = min(top_n, logprobs.shape[-1])
        part = np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
        for i, ids in enumerate(part):
            vals = logprobs[i, ids]
            order = np.lexsort((ids, -vals))  # highest first, ties by lower id
            tops[i] = [(int(ids[j]), float(vals[j])) for j in order]
    for i in range(len(rows)):
        out.append(SampledToken(int(targets[i]), logprob=float(chosen[i]), rank=int(ranks[i]), top_tokens=tops[i]))
    return out
