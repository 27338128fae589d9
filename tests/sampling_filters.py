"""Full-vocab logits filters over serve/sampling.py's kernels, for the tests only.

Each takes full-vocab logits and returns full-vocab logits (-inf where a token is
dropped), the shape of Hugging Face's logits processors/warpers, so the tests can
compare :class:`TokenSampler`'s kernels with transformers' one for one. Production
never calls these: it samples through ``TokenSampler``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from granite_deploy.serve.sampling import _ids_array, _penalise, _top_k_keep, _top_p_keep, _typical_keep


def suppress_tokens(logits: np.ndarray, ids: Iterable[int], *, inplace: bool = False) -> np.ndarray:
    """Set ``logits[ids] = -inf`` (e.g. stop tokens before ``min_new_tokens``).

    Returns a float32 copy unless ``inplace``; ids outside the vocabulary are ignored.
    """
    out = logits if inplace else np.array(logits, dtype=np.float32, copy=True)
    idx = _ids_array(ids, out.shape[-1])
    if idx.size:
        out[..., idx] = -np.inf
    return out


def apply_repetition_penalty(
    logits: np.ndarray, context_token_ids: Iterable[int], penalty: float
) -> np.ndarray:
    """HF ``RepetitionPenaltyLogitsProcessor``: over every token id seen in the
    context, positive logits are divided by ``penalty`` and negative ones
    multiplied. Returns a float32 copy; ``penalty`` 0 or 1 is a no-op."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty in (0, 1):
        return out
    idx = _ids_array(context_token_ids, out.shape[-1])
    if idx.size:
        _penalise(out, idx, penalty)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``logits / temperature`` in float64 (temperature must be > 0)."""
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0 to scale logits, got {temperature!r}")
    out = np.asarray(logits, dtype=np.float64)
    return out / temperature if temperature != 1 else out.copy()


def _mask_outside(logits: np.ndarray, keep: np.ndarray) -> np.ndarray:
    out = np.full(logits.shape, -np.inf, dtype=logits.dtype)
    out[keep] = logits[keep]
    return out


def top_k_filter(logits: np.ndarray, top_k: int) -> np.ndarray:
    """HF ``TopKLogitsWarper``: -inf for every logit below the k-th largest (ties kept)."""
    x = np.asarray(logits)
    if top_k <= 0 or top_k >= x.shape[-1]:
        return x.copy()
    return _mask_outside(x, _top_k_keep(x, top_k))


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """HF ``TopPLogitsWarper``: keep the smallest most-likely set whose mass reaches ``top_p``."""
    x = np.asarray(logits)
    if not 0 < top_p < 1:
        return x.copy()
    return _mask_outside(x, _top_p_keep(x, top_p))


def typical_p_filter(logits: np.ndarray, typical_p: float) -> np.ndarray:
    """HF ``TypicalLogitsWarper`` (locally typical sampling, mass ``typical_p``)."""
    x = np.asarray(logits)
    if not 0 < typical_p < 1:
        return x.copy()
    return _mask_outside(x, _typical_keep(x, typical_p))
