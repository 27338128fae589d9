"""Engine-independent token sampling (numpy only).

Every engine hands back next-token logits as a float32 ``[vocab]`` array per
sequence per step; :class:`TokenSampler` turns them into a token, one request
at a time.

Processing order follows Hugging Face ``generate``:

    (min-new-tokens suppression) -> repetition penalty -> temperature
    -> top_k -> top_p -> typical_p -> draw from the softmax

Greedy decoding (``temperature == 0``) is the argmax of the penalised logits;
top_k / top_p / typical_p are ignored there, as in HF with ``do_sample=False``.

Cost per token at vocab ~100k is a handful of vectorised O(vocab) passes
(~0.1-0.5 ms on one CPU core), no Python loop over the vocabulary and no
full-vocab sort unless the kept set itself is that large: top_k, top-n and
the top_p / typical_p prefixes select a candidate block with a threshold
taken from a strided subsample (cheaper than ``argpartition`` over 100k),
sort only that block, and grow it geometrically until the cumulative mass
(float64 sums) is reached; the final draw is an inverse-CDF search over
float64 block sums. Full-vocab temporaries live in per-thread scratch
buffers, so steady-state sampling allocates almost nothing large.

Reproducibility: each request owns one ``numpy.random.Generator(PCG64(seed))``
and every non-greedy :meth:`TokenSampler.sample` call consumes exactly one
uniform draw from it, so a request's tokens depend only on its seed and its
own logits, never on what else is batched with it.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "MAX_TOP_N_TOKENS",
    "SampledToken",
    "SamplingParams",
    "TokenSampler",
]

MAX_TOP_N_TOKENS = 5
_MAX_SEED = 2**64 - 1
# First block size for the partial sorts of top_p / typical_p; grown x8.
_BLOCK = 256


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings.

    ``temperature == 0`` means greedy. ``top_k == 0``, ``top_p`` / ``typical_p``
    in ``{0, 1}`` and ``repetition_penalty`` in ``{0, 1}`` mean "off".
    ``seed=None`` lets :class:`TokenSampler` draw one (reported as ``.seed``).
    ``logprobs`` asks for the chosen token's logprob and rank;
    ``top_n_tokens`` (0..5) for the n most likely alternatives.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: bool = False
    top_n_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def top_p_active(self) -> bool:
        return 0 < self.top_p < 1

    @property
    def typical_p_active(self) -> bool:
        return 0 < self.typical_p < 1

    @property
    def repetition_penalty_active(self) -> bool:
        return self.repetition_penalty not in (0, 1)

    def validate(self) -> SamplingParams:
        """Raise ``ValueError("<field>: ...")`` on the first bad field; return self."""
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature: must be a finite number >= 0, got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k: must be an integer >= 0, got {self.top_k!r}")
        for name in ("top_p", "typical_p"):
            v = getattr(self, name)
            if not _is_real(v) or not (0 <= v <= 1):  # NaN fails the comparison
                raise ValueError(f"{name}: must be in [0, 1], got {v!r}")
        rp = self.repetition_penalty
        if not _is_real(rp) or not math.isfinite(rp) or rp < 0:
            raise ValueError(f"repetition_penalty: must be a finite number >= 0, got {rp!r}")
        if self.seed is not None and (not _is_int(self.seed) or not (0 <= self.seed <= _MAX_SEED)):
            raise ValueError(f"seed: must be an integer in [0, 2**64-1] or None, got {self.seed!r}")
        if not isinstance(self.logprobs, (bool, np.bool_)):
            raise ValueError(f"logprobs: must be a bool, got {self.logprobs!r}")
        n = self.top_n_tokens
        if not _is_int(n) or not (0 <= n <= MAX_TOP_N_TOKENS):
            raise ValueError(f"top_n_tokens: must be an integer in [0, {MAX_TOP_N_TOKENS}], got {n!r}")
        return self


@dataclass(frozen=True, slots=True)
class SampledToken:
    """One sampled token.

    ``logprob`` / ``rank`` (1-based) are set when ``SamplingParams.logprobs``;
    ``top_tokens`` holds ``top_n_tokens`` ``(token_id, logprob)`` pairs, most
    likely first (ties by lower token id). The distribution they describe is
    the raw log-softmax for greedy and the penalised, temperature-scaled
    log-softmax (before top_k/top_p/typical_p truncation) for sampling.
    """

    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_tokens: list[tuple[int, float]] = field(default_factory=list)


# --------------------------------------------------------------------------- #
# Token-id helpers. (Full-vocab reference filters over the same kernels live in
# tests/sampling_filters.py: production samples through TokenSampler only.)
# --------------------------------------------------------------------------- #


def _ids_array(ids: Iterable[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids as int64, dropping ids outside ``[0, vocab_size)`` (they cannot be generated)."""
    if isinstance(ids, np.ndarray):
        arr = ids.astype(np.int64, copy=False).ravel()
    elif isinstance(ids, (set, frozenset)):
        arr = np.fromiter(ids, dtype=np.int64, count=len(ids))
    else:
        arr = np.asarray(ids if isinstance(ids, Sequence) else list(ids), dtype=np.int64).ravel()
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        arr = arr[(arr >= 0) & (arr < vocab_size)]
    return arr


def _penalise(out: np.ndarray, idx: np.ndarray, penalty: float) -> None:
    sel = out[idx]
    out[idx] = np.where(sel < 0, sel * np.float32(penalty), sel / np.float32(penalty))


# --------------------------------------------------------------------------- #
# Index-returning kernels shared by the filters and the sampler. Each takes a
# 1-D array of finite or -inf logits and returns kept positions, ascending.
# --------------------------------------------------------------------------- #


def _superset(key: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, bool]:
    """A prefix of the stable order of ``key`` (descending if ``largest``,
    ties by ascending position) holding at least ``min(k, n)`` elements.

    Returns ``(positions ascending, ties_cut)``. Normally the prefix is every
    element at least as extreme as a threshold; the k-th most extreme value
    of a strided subsample is no more extreme than the overall k-th, so it is
    a safe threshold: one O(n) comparison plus a partition of ~sqrt(k*n)
    elements instead of an O(n) argpartition of everything. When a huge run
    of ties sits at the threshold (padded-vocab or masked logits), only the
    first tied positions needed to reach k are taken and ``ties_cut`` is True.
    """
    n = key.size
    if k >= n:
        return np.arange(n), False
    stride = n // max(k, math.isqrt(k * n))
    sub = key[::stride] if stride >= 2 else key
    m = sub.size
    if largest:
        thr = np.partition(sub, m - k)[m - k]
        ge = key >= thr
    else:
        thr = np.partition(sub, k - 1)[k - 1]
        ge = key <= thr
    if np.count_nonzero(ge) <= 4 * k + 1024:
        return np.flatnonzero(ge), False
    strict = np.flatnonzero(key > thr if largest else key < thr)
    if strict.size >= k:
        return strict, False
    # fewer than k strictly beyond thr: the true k-th value *is* thr
    tied = np.flatnonzero(key == thr)[: k - strict.size]
    return np.sort(np.concatenate((strict, tied))), True


def _top_k_keep(x: np.ndarray, k: int) -> np.ndarray:
    cand, ties_cut = _superset(x, k, largest=True)
    v = x[cand]
    kth = np.partition(v, v.size - k)[v.size - k] if v.size > k else v.min()
    if ties_cut:  # HF keeps every logit >= the k-th largest, all ties included
        return np.flatnonzero(x >= kth)
    return cand[v >= kth]


def _sorted_prefix(key: np.ndarray, weights: np.ndarray, target: float, largest: bool) -> tuple[np.ndarray, int]:
    """Positions in ``key`` order (descending if ``largest``), only as far as needed.

    Returns ``(order, j)``: ``order`` is a prefix of the full stable ordering and
    ``j`` the first index with ``cumsum(weights[order])[j] >= target`` (float64
    sums), or ``len(order) == len(key)`` and ``j == len(key)`` when the total
    never reaches it.
    """
    n = key.size
    k = min(n, _BLOCK)
    while True:
        cand, _ = _superset(key, k, largest)
        v = key[cand]
        order = cand[np.argsort(-v if largest else v, kind="stable")]
        cum = np.cumsum(weights[order].astype(np.float64))
        j = int(np.searchsorted(cum, target, side="left"))
        if j < order.size or order.size == n:
            return order, j
        k = min(n, max(k * 8, order.size * 2))


def _softmax_parts(x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """``(w, total, m)`` with ``w = exp(x - m)`` (x's dtype, written to ``out``
    when given), ``m = max(x)`` and the float64 ``total``."""
    m = float(x.max())
    w = np.subtract(x, x.dtype.type(m), out=out)
    np.exp(w, out=w)
    return w, float(w.sum(dtype=np.float64)), m


def _top_p_keep(x: np.ndarray, top_p: float, scratch: np.ndarray | None = None) -> np.ndarray:
    # Keep token i iff the mass strictly more likely than i is < top_p: the
    # descending prefix through the first token where the running mass reaches
    # top_p (== HF's "ascending cumsum <= 1 - top_p is removed").
    w, total, _ = _softmax_parts(x, scratch)
    order, j = _sorted_prefix(x, w, top_p * total, largest=True)
    return np.sort(order[: j + 1])


def _typical_keep(x: np.ndarray, mass: float) -> np.ndarray:
    w, total, m = _softmax_parts(x)
    f = x.dtype.type
    p = w / f(total)
    logp = (x - f(m)) - f(math.log(total))
    # entropy; -inf logits have p == 0 and must contribute 0, not NaN
    ent = -float(np.dot(p, np.maximum(logp, f(-1e30))))
    shifted = np.abs(-logp - f(ent))  # +inf for -inf logits
    order, j = _sorted_prefix(shifted, p, mass, largest=False)
    thr = shifted[order[min(j, x.size - 1)]]
    return np.flatnonzero(shifted <= thr)


def _log_sum_exp(dist: np.ndarray, scratch: np.ndarray | None = None) -> float:
    """log-sum-exp of ``dist`` (float32 or float64), accumulated in float64."""
    _, total, m = _softmax_parts(dist, scratch)
    return m + math.log(total)


def _pick(w: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from non-negative weights ``w`` with ``u`` in [0, 1).

    Sums run in float64 over 1024-wide blocks (block sums, then a cumsum
    inside the one block that holds the target), far cheaper than a
    full-length cumsum at vocab size. Zero-weight entries are never picked.
    """
    n = w.size
    block = 1024
    if n <= block:
        cum = np.cumsum(w.astype(np.float64))
        base = 0
        target = u * float(cum[-1])
    else:
        sums = np.add.reduceat(w, np.arange(0, n, block), dtype=np.float64)
        csum = np.cumsum(sums)
        target = u * float(csum[-1])
        b = min(int(np.searchsorted(csum, target, side="right")), sums.size - 1)
        while b > 0 and sums[b] == 0:  # only reachable through rounding at the very top
            b -= 1
        base = b * block
        target -= float(csum[b - 1]) if b else 0.0
        cum = np.cumsum(w[base : base + block].astype(np.float64))
    i = int(np.searchsorted(cum, target, side="right"))
    if i >= cum.size:  # target rounded up to the block total
        i = int(np.flatnonzero(w[base : base + cum.size])[-1])
    return base + i


def accept_draft(weights: np.ndarray, draft: int, rng: np.random.Generator) -> int:
    """The speculative acceptance rule for one deterministic draft token.

    ``weights``: the final processed distribution at this position, unnormalised
    (non-negative, e.g. exp of the filtered logits); ``draft``: the draft token's index into
    ``weights``, or -1 when it has probability 0 there (filtered out by top-k/top-p/...).
    Returns the chosen index: ``draft`` with probability p(draft), otherwise a draw from p
    with the draft removed and renormalised. Consumes one uniform from ``rng`` (accepted),
    two (rejected). The result is distributed exactly as p.
    """
    w = np.asarray(weights)
    total = float(w.sum(dtype=np.float64))
    p = float(w[draft]) / total if draft >= 0 and total > 0 else 0.0
    if rng.random() < p:
        return int(draft)
    residual = w.astype(np.float64)  # a copy: the caller's weights stay intact
    if draft >= 0:
        residual[draft] = 0.0
    if not residual.any():  # only reachable through rounding with p(draft) ~ 1
        return int(draft)
    return int(_pick(residual, rng.random()))


# --------------------------------------------------------------------------- #
# Per-request sampler.
# --------------------------------------------------------------------------- #

# Full-vocab float32 temporaries are ~400 KB each at vocab 100k: big enough for
# glibc to mmap/munmap them on every allocation, and the resulting page faults
# cost several times the arithmetic. The sampler therefore works in per-thread
# scratch buffers (shared by every request that thread samples for).
_tls = threading.local()


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-thread ``(raw, proc, work)`` float32 and ``mask`` bool buffers of length n."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    b = bufs.get(n)
    if b is None:
        b = bufs[n] = (
            np.empty(n, np.float32),
            np.empty(n, np.float32),
            np.empty(n, np.float32),
            np.empty(n, np.bool_),
        )
    return b


class TokenSampler:
    """Per-request sampler: owns the request's RNG and its seen-token cache.

    ``sample(logits, context_token_ids)``: ``context_token_ids`` is the
    request's prompt + generated ids so far (list, tuple or int ndarray); it is
    only read when a repetition penalty is set. It is assumed to grow by
    appending between calls (true for a decoding request): only the new tail is
    scanned each step, so the penalty costs O(new tokens + seen ids) instead of
    O(context). A shorter context, or one whose last previously-seen id
    differs, rebuilds the cache from scratch.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, checked: bool = False):
        if not checked:  # the scheduler validated the request already (serve/validation.py)
            params.validate()
        if not _is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size: must be an integer >= 1, got {vocab_size!r}")
        self.params = params
        self.vocab_size = int(vocab_size)
        # server-chosen seeds stay below 2**63: clients that read the uint64 as a signed int64 see it intact
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(63)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        # repetition-penalty cache
        self._seen_mask: np.ndarray | None = None
        self._seen_ids = np.empty(0, dtype=np.int64)
        self._seen_count = 0  # ids of the buffer in use
        self._ctx_len = 0
        self._ctx_last: int | None = None

    # -- repetition penalty context --------------------------------------- #

    def _seen(self, context: Sequence[int] | np.ndarray) -> np.ndarray:
        n = len(context)
        if self._seen_mask is None:
            self._seen_mask = np.zeros(self.vocab_size, dtype=bool)
            self._seen_ids = np.empty(min(self.vocab_size, 1024), dtype=np.int64)
        if n < self._ctx_len or (self._ctx_len and int(context[self._ctx_len - 1]) != self._ctx_last):
            self._seen_mask[self._seen_ids[: self._seen_count]] = False
            self._seen_count = 0
            self._ctx_len = 0
        if n > self._ctx_len:
            new = _ids_array(context[self._ctx_len :], self.vocab_size)
            if new.size:
                new = np.unique(new)
                new = new[~self._seen_mask[new]]
            if new.size:
                self._seen_mask[new] = True
                need = self._seen_count + new.size
                if need > self._seen_ids.size:
                    grown = np.empty(min(self.vocab_size, max(need, 2 * self._seen_ids.size)), np.int64)
                    grown[: self._seen_count] = self._seen_ids[: self._seen_count]
                    self._seen_ids = grown
                self._seen_ids[self._seen_count : need] = new
                self._seen_count = need
            self._ctx_len = n
            self._ctx_last = int(context[n - 1])
        return self._seen_ids[: self._seen_count]

    # -- main entry -------------------------------------------------------- #

    def sample(
        self,
        logits: np.ndarray,
        context_token_ids: Sequence[int] | np.ndarray | None = None,
        *,
        suppress_token_ids: Iterable[int] | None = None,
        allowed: np.ndarray | None = None,
        draft: int | None = None,
    ) -> SampledToken:
        """Pick the next token from one sequence's ``[vocab]`` logits.

        ``allowed`` (a constraint's token mask: bool ``[vocab]``, or float
        ``[vocab]`` additive biases of 0 / -inf) sets every token it does not
        allow to -inf; ``suppress_token_ids`` (e.g.
        ``StoppingCriteria.suppressed_token_ids(n)`` before ``min_new_tokens``) are
        set to -inf next, unless that would leave no allowed token (the
        constraint wins: a finished grammar may allow only EOS). The "raw"
        distribution reported for greedy is the one after these masks.

        ``draft`` (speculative decoding, serve/speculative.py): a deterministic
        draft token proposed for this position. Greedy ignores it (the caller
        compares it with the argmax). Sampling verifies it against the final
        processed distribution p (after top_k / top_p / typical_p):
        :func:`accept_draft` keeps it with probability p(draft),
        else draws from p with the draft removed, so the token returned is
        distributed exactly as without a draft; it equals ``draft`` iff it was
        accepted. That path consumes one uniform draw, plus one on rejection.
        """
        p = self.params
        x = np.asarray(logits)
        if x.shape != (self.vocab_size,):
            raise ValueError(f"logits: expected shape ({self.vocab_size},), got {x.shape}")
        raw_buf, proc, work, mask = _scratch(self.vocab_size)
        if x.dtype != np.float32:
            np.copyto(raw_buf, x, casting="unsafe")
            x = raw_buf
        if allowed is not None:
            if allowed.shape != (self.vocab_size,):
                raise ValueError(f"allowed: expected shape ({self.vocab_size},), got {allowed.shape}")
            if allowed.dtype == np.bool_:
                if x is not raw_buf:
                    np.copyto(raw_buf, x)
                    x = raw_buf
                np.logical_not(allowed, out=mask)
                np.copyto(x, np.float32(-np.inf), where=mask)
            else:  # additive 0 / -inf biases (constraints.MaskFiller): one add
                x = np.add(x, allowed, out=raw_buf, dtype=np.float32, casting="unsafe")
        if suppress_token_ids is not None:
            sup = _ids_array(suppress_token_ids, self.vocab_size)
            if sup.size and allowed is not None:
                ok = allowed if allowed.dtype == np.bool_ else np.isfinite(allowed, out=mask)
                keep_some = np.count_nonzero(ok) > np.count_nonzero(ok[sup])
                sup = sup if keep_some else sup[:0]
            if sup.size:
                if x is not raw_buf:
                    np.copyto(raw_buf, x)
                    x = raw_buf
                x[sup] = -np.inf
        if not math.isfinite(float(x.max())):  # NaN / +inf anywhere, or everything -inf
            raise ValueError("logits: contain NaN/+inf or no finite value")

        pen = x
        if p.repetition_penalty_active and context_token_ids is not None and len(context_token_ids):
            seen = self._seen(context_token_ids)
            if seen.size:
                np.copyto(proc, x)
                _penalise(proc, seen, p.repetition_penalty)
                pen = proc

        if p.greedy:
            token = int(np.argmax(pen))
            dist = x
        else:
            # processed logits, shifted so the max is 0: (pen - max) / T never
            # overflows, even for tiny temperatures; softmax is shift-invariant
            z = np.subtract(pen, pen.max(), out=proc)
            if p.temperature != 1:
                t32 = np.float32(p.temperature)
                if t32 > 0:
                    z /= t32
                else:  # below float32's smallest subnormal: the limit is greedy
                    np.copyto(z, np.where(z < 0, np.float32(-np.inf), np.float32(0)))
            token = self._draw(z, work, draft)
            dist = z

        if not (p.logprobs or p.top_n_tokens):
            return SampledToken(token)
        lse = _log_sum_exp(dist, work)
        logprob = rank = None
        if p.logprobs:
            logprob = float(dist[token]) - lse
            rank = 1 + int(np.count_nonzero(np.greater(dist, dist[token], out=mask)))
        top: list[tuple[int, float]] = []
        if p.top_n_tokens:
            n = min(p.top_n_tokens, dist.size)
            cand, _ = _superset(dist, n, largest=True)
            cand = cand[np.lexsort((cand, -dist[cand]))][:n]
            top = [(int(i), float(dist[i]) - lse) for i in cand]
        return SampledToken(token, logprob, rank, top)

    def _draw(self, z: np.ndarray, work: np.ndarray, draft: int | None = None) -> int:
        """Apply top_k -> top_p -> typical_p to processed logits ``z`` and draw (or verify
        ``draft``, see :meth:`sample`). ``work`` is a full-vocab scratch buffer (``z`` itself is
        left intact)."""
        p = self.params
        idx: np.ndarray | None = None
        vals = z
        if 0 < p.top_k < vals.size:
            idx = _top_k_keep(vals, p.top_k)
            vals = vals[idx]
        if p.top_p_active and vals.size > 1:
            keep = _top_p_keep(vals, p.top_p, work if idx is None else None)
            idx = keep if idx is None else idx[keep]
            vals = vals[keep]
        if p.typical_p_active and vals.size > 1:
            keep = _typical_keep(vals, p.typical_p)
            idx = keep if idx is None else idx[keep]
            vals = vals[keep]
        if draft is not None:
            w, _, _ = _softmax_parts(vals, work[: vals.size])
            if idx is None:
                j = int(draft) if 0 <= draft < vals.size else -1
            else:
                j = int(np.searchsorted(idx, draft))  # kept positions are ascending
                j = j if j < idx.size and idx[j] == draft else -1
            i = accept_draft(w, j, self._rng)
            return int(i if idx is None else idx[i])
        u = self._rng.random()  # exactly one draw per step, whatever the path
        w, _, _ = _softmax_parts(vals, work[: vals.size])
        i = _pick(w, u)
        return int(i if idx is None else idx[i])
