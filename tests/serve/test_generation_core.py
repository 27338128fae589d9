"""Generation core: token sampling (serve/sampling.py) and stopping (serve/stopping.py).

The serving code is numpy-only; these tests use torch + transformers as the
reference implementation of the HF logits processors/warpers.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from granite_deploy.serve.sampling import SampledToken, SamplingParams, TokenSampler
from sampling_filters import (
    apply_repetition_penalty,
    apply_temperature,
    suppress_tokens,
    top_k_filter,
    top_p_filter,
    typical_p_filter,
)

from granite_deploy.serve.stopping import (
    StoppingCriteria,
    StoppingParams,
    StopReason,
    StopSequenceMatcher,
    find_stop_sequence,
    fmaas_stop_reason,
)

# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_CRIT_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x[np.isfinite(x)].max()
    return x - (m + np.log(np.exp(x - m).sum()))


def _random_logits(rng: np.random.Generator, vocab: int, scale: float = 3.0) -> np.ndarray:
    return (rng.standard_normal(vocab) * scale).astype(np.float32)


# --------------------------------------------------------------------------- #
# Reference implementations (full sort, straight from the HF definitions).
# --------------------------------------------------------------------------- #


def _ref_top_p_keep(logits: np.ndarray, top_p: float) -> set[int]:
    p = np.exp(_log_softmax(logits))
    order = np.argsort(-p, kind="stable")
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.add(int(i))
        mass += p[i]
    return kept


def _ref_sampling_probs(logits, temperature, top_k=0, top_p=1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    if top_k:
        kth = np.sort(z)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    if 0 < top_p < 1:
        keep = _ref_top_p_keep(z, top_p)
        z = np.where(np.isin(np.arange(z.size), list(keep)), z, -np.inf)
    return np.exp(_log_softmax(z))


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    support = probs > 0
    n = counts.sum()
    expected = probs[support] * n
    stat = float((((counts[support] - expected) ** 2) / expected).sum())
    return stat, int(support.sum()) - 1


def _draw_counts(params: SamplingParams, logits: np.ndarray, n: int) -> np.ndarray:
    sampler = TokenSampler(params, logits.size)
    counts = np.zeros(logits.size, dtype=np.int64)
    for _ in range(n):
        counts[sampler.sample(logits, []).token_id] += 1
    return counts


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    for vocab in (7, 1000, 100352):
        sampler = TokenSampler(SamplingParams(), vocab)
        for _ in range(5):
            logits = _random_logits(rng, vocab)
            assert sampler.sample(logits, [1, 2, 3]).token_id == int(np.argmax(logits))


def test_greedy_uses_penalised_logits():
    logits = np.array([1.0, 3.0, 2.5, 0.0], np.float32)
    sampler = TokenSampler(SamplingParams(repetition_penalty=2.0), 4)
    assert sampler.sample(logits, [1]).token_id == 2  # 3.0 / 2 = 1.5 < 2.5
    assert TokenSampler(SamplingParams(), 4).sample(logits, [1]).token_id == 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=5, seed=11),
        SamplingParams(temperature=0.7, top_p=0.8, seed=12),
        SamplingParams(temperature=1.3, top_k=6, top_p=0.9, seed=13),
        SamplingParams(temperature=1.0, seed=14),
    ],
    ids=["temp+top_k", "temp+top_p", "temp+top_k+top_p", "pure"],
)
def test_sampling_distribution_matches_expected(params):
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 0.7], np.float32)
    expected = _ref_sampling_probs(logits, params.temperature, params.top_k, params.top_p)
    counts = _draw_counts(params, logits, 4000)
    assert counts[expected == 0].sum() == 0, "sampled a token outside the kept set"
    stat, dof = _chi_square(counts, expected)
    assert stat < CHI2_CRIT_001[dof], (stat, counts, expected)


def test_sampling_distribution_typical_p():
    # probs 0.4 0.3 0.2 0.1, typical_p=0.6 keeps {0,1,2} (see test_typical_p_handcrafted)
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1])).astype(np.float32)
    counts = _draw_counts(SamplingParams(temperature=1.0, typical_p=0.6, seed=5), logits, 4000)
    expected = np.array([0.4, 0.3, 0.2, 0.0]) / 0.9
    assert counts[3] == 0
    stat, dof = _chi_square(counts, expected)
    assert stat < CHI2_CRIT_001[dof]


def test_sampling_at_large_vocab_matches_distribution():
    # a few dominant tokens hidden in a 100k vocabulary: exercises the blocked
    # inverse-CDF draw and the index mapping of the partial sorts
    vocab = 100352
    rng = np.random.default_rng(3)
    logits = np.full(vocab, -30.0, np.float32)
    hot = rng.choice(vocab, 5, replace=False)
    logits[hot] = [3.0, 2.5, 2.0, 1.0, 0.0]
    for params in (
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=1.0, top_p=0.95, seed=2),
        SamplingParams(temperature=1.0, top_k=3, seed=3),
    ):
        expected = _ref_sampling_probs(logits[hot], 1.0, params.top_k, params.top_p)
        sampler = TokenSampler(params, vocab)
        counts = {int(h): 0 for h in hot}
        for _ in range(2000):
            tok = sampler.sample(logits).token_id
            assert tok in counts
            counts[tok] += 1
        c = np.array([counts[int(h)] for h in hot])
        stat, dof = _chi_square(c, expected)
        assert c[expected == 0].sum() == 0
        assert stat < CHI2_CRIT_001[dof], (params, c, expected)


def test_top_k_1_equals_greedy():
    rng = np.random.default_rng(1)
    vocab = 5000
    greedy = TokenSampler(SamplingParams(repetition_penalty=1.3), vocab)
    sampled = TokenSampler(SamplingParams(temperature=1.7, top_k=1, repetition_penalty=1.3, seed=3), vocab)
    ctx = list(rng.integers(0, vocab, 50))
    for _ in range(30):
        logits = _random_logits(rng, vocab, 0.5)
        g = greedy.sample(logits, ctx).token_id
        assert sampled.sample(logits, ctx).token_id == g
        ctx.append(g)


def test_top_p_keeps_exact_nucleus():
    probs = np.array([0.03, 0.25, 0.5, 0.07, 0.15])  # sorted: 2 (.5), 1 (.25), 4 (.15), 3 (.07), 0 (.03)
    logits = np.log(probs).astype(np.float32)
    for top_p, keep in [(0.45, {2}), (0.7, {1, 2}), (0.8, {1, 2, 4}), (0.92, {1, 2, 3, 4}), (0.99, {0, 1, 2, 3, 4})]:
        kept = set(np.flatnonzero(np.isfinite(top_p_filter(logits, top_p))).tolist())
        assert kept == keep, top_p
        # the sampler never leaves the nucleus
        counts = _draw_counts(SamplingParams(temperature=1.0, top_p=top_p, seed=7), logits, 400)
        assert set(np.flatnonzero(counts).tolist()) <= keep


def test_typical_p_handcrafted():
    # p = .4 .3 .2 .1, H = 1.2799; |-log p - H| = .364 .076 .330 1.023
    # typical order: 1, 2, 0, 3 with running mass .3 .5 .9 1.0
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1])).astype(np.float32)
    for mass, keep in [(0.2, {1}), (0.4, {1, 2}), (0.6, {0, 1, 2}), (0.95, {0, 1, 2, 3})]:
        kept = set(np.flatnonzero(np.isfinite(typical_p_filter(logits, mass))).tolist())
        assert kept == keep, mass
    # the most likely token is not typical: it is never sampled at mass 0.2
    counts = _draw_counts(SamplingParams(temperature=1.0, typical_p=0.2, seed=1), logits, 200)
    assert counts[1] == 200


# -- against transformers ----------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    return torch, lp


def _hf_apply(hf, processor, logits: np.ndarray, input_ids=None) -> np.ndarray:
    torch, _ = hf
    ids = torch.tensor([list(input_ids or [0])], dtype=torch.long)
    scores = torch.from_numpy(np.array(logits, np.float32)[None, :])
    return processor(ids, scores)[0].numpy()


def _assert_same_mask(ours: np.ndarray, theirs: np.ndarray, what: str, score: np.ndarray | None = None):
    """Same kept set and values. With ``score`` (the quantity the warper
    thresholds, computed in float64), a disagreement is tolerated only for a
    token whose score is within float32 rounding of the kept set's boundary:
    transformers computes in float32, we accumulate in float64."""
    ours_kept, theirs_kept = np.isfinite(ours), np.isfinite(theirs)
    diff = np.flatnonzero(ours_kept != theirs_kept)
    if diff.size and score is not None:
        boundary = score[theirs_kept].max()
        # float32 sums over a vocabulary-sized vector carry ~sqrt(n) * 6e-8 relative error, and how much
        # depends on the host's SIMD width (1.2e-5 seen on an AVX2 host): 1e-4 is still rounding.
        assert diff.size <= 2 and np.all(np.abs(score[diff] - boundary) <= 1e-4 * max(1.0, abs(boundary))), what
    else:
        assert diff.size == 0, (what, diff[:10])
    both = ours_kept & theirs_kept
    np.testing.assert_allclose(ours[both], theirs[both], rtol=1e-6, err_msg=what)


def _typical_score(logits: np.ndarray) -> np.ndarray:
    lsm = _log_softmax(logits)
    ent = -(np.exp(lsm) * lsm).sum()
    return np.abs(-lsm - ent)


def test_repetition_penalty_matches_transformers(hf):
    _, lp = hf
    rng = np.random.default_rng(2)
    vocab = 3000
    for penalty in (1.3, 0.7, 2.0):
        logits = _random_logits(rng, vocab)
        ctx = list(rng.integers(0, vocab, 400)) + [5, 5, 5, 17]  # duplicates included
        theirs = _hf_apply(hf, lp.RepetitionPenaltyLogitsProcessor(penalty), logits, ctx)
        ours = apply_repetition_penalty(logits, ctx, penalty)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)
        # and the sampler's incremental path applies the same penalty (checked via greedy)
        sampler = TokenSampler(SamplingParams(repetition_penalty=penalty), vocab)
        assert sampler.sample(logits, ctx).token_id == int(np.argmax(theirs))


def test_sampler_incremental_penalty_context(hf):
    """The sampler caches seen ids between steps; growing, shrinking and
    replaced contexts must all give the penalty of the context passed."""
    rng = np.random.default_rng(9)
    vocab = 500
    sampler = TokenSampler(SamplingParams(repetition_penalty=50.0), vocab)
    logits = np.linspace(5.0, 1.0, vocab).astype(np.float32)  # argmax 0, then 1, 2, ...
    ctx: list[int] = []
    for step in range(20):  # greedy with a huge penalty walks 0, 1, 2, ...
        tok = sampler.sample(logits, ctx).token_id
        assert tok == step
        ctx.append(tok)
    assert sampler.sample(logits, [3]).token_id == 0  # shrunk context: cache rebuilt
    assert sampler.sample(logits, np.array([0, 1, 2])).token_id == 3  # ndarray, last id differs
    assert sampler.sample(logits, np.array([0, 1, 2, 3, 4])).token_id == 5
    other = list(rng.permutation(vocab)[:100])
    expected = int(np.argmax(apply_repetition_penalty(logits, other, 50.0)))
    assert sampler.sample(logits, other).token_id == expected


def test_temperature_matches_transformers(hf):
    _, lp = hf
    rng = np.random.default_rng(3)
    logits = _random_logits(rng, 2000)
    for t in (0.3, 1.0, 1.7):
        theirs = _hf_apply(hf, lp.TemperatureLogitsWarper(t), logits)
        np.testing.assert_allclose(apply_temperature(logits, t), theirs, rtol=1e-6)


@pytest.mark.parametrize("vocab", [64, 4000, 100352])
def test_top_k_top_p_typical_match_transformers(hf, vocab):
    _, lp = hf
    rng = np.random.default_rng(vocab)
    for trial in range(3):
        logits = _random_logits(rng, vocab, scale=[0.5, 2.0, 6.0][trial])
        for k in (1, 5, 50, vocab - 1):
            theirs = _hf_apply(hf, lp.TopKLogitsWarper(k), logits)
            _assert_same_mask(top_k_filter(logits, k), theirs, f"top_k={k}")
        neg_logp = -_log_softmax(logits)  # top_p keeps the most likely: lowest -log p
        for p in (0.1, 0.5, 0.9, 0.97):
            theirs = _hf_apply(hf, lp.TopPLogitsWarper(p), logits)
            _assert_same_mask(top_p_filter(logits, p), theirs, f"top_p={p}", neg_logp)
        typ = _typical_score(logits)
        for m in (0.2, 0.5, 0.9):
            theirs = _hf_apply(hf, lp.TypicalLogitsWarper(m), logits)
            _assert_same_mask(typical_p_filter(logits, m), theirs, f"typical_p={m}", typ)


def test_top_k_keeps_ties_like_transformers(hf):
    _, lp = hf
    logits = np.array([1.0, 3.0, 2.0, 2.0, 2.0, 0.0], np.float32)
    theirs = _hf_apply(hf, lp.TopKLogitsWarper(2), logits)
    _assert_same_mask(top_k_filter(logits, 2), theirs, "ties")
    assert np.isfinite(theirs).sum() == 4


def test_sampler_stays_inside_transformers_chain(hf):
    """Every sampled token lies in the set kept by HF's chained processors
    (penalty -> temperature -> top_k -> top_p -> typical_p)."""
    _, lp = hf
    rng = np.random.default_rng(4)
    vocab = 30000
    params = SamplingParams(temperature=0.8, top_k=400, top_p=0.8, typical_p=0.9, repetition_penalty=1.2, seed=4)
    sampler = TokenSampler(params, vocab)
    ctx = list(rng.integers(0, vocab, 100))
    chain = [
        lp.RepetitionPenaltyLogitsProcessor(1.2),
        lp.TemperatureLogitsWarper(0.8),
        lp.TopKLogitsWarper(400),
        lp.TopPLogitsWarper(0.8),
        lp.TypicalLogitsWarper(0.9),
    ]
    for _ in range(40):
        logits = _random_logits(rng, vocab, 2.5)
        scores = logits
        for proc in chain:
            scores = _hf_apply(hf, proc, scores, ctx)
        kept = np.isfinite(scores)
        assert 1 < kept.sum() < 400
        tok = sampler.sample(logits, ctx).token_id
        assert kept[tok]
        ctx.append(tok)


def test_top_p_does_not_sort_whole_vocab(monkeypatch):
    """Peaked 100k-vocab distributions must not trigger a full-vocab sort."""
    vocab = 100352
    rng = np.random.default_rng(5)
    sizes: list[int] = []
    real_argsort = np.argsort

    def spy(a, *args, **kwargs):
        sizes.append(np.asarray(a).size)
        return real_argsort(a, *args, **kwargs)

    monkeypatch.setattr(np, "argsort", spy)
    sampler = TokenSampler(SamplingParams(temperature=0.7, top_p=0.9, typical_p=0.95, logprobs=True,
                                          top_n_tokens=5, seed=1), vocab)
    for _ in range(10):
        logits = _random_logits(rng, vocab, 4.0)
        logits[rng.integers(0, vocab, 20)] += 25.0  # an LLM-like head
        sampler.sample(logits)
    assert sizes and max(sizes) < 10_000, max(sizes)


# -- reproducibility -----------------------------------------------------------


def _fake_logits(step: int, vocab: int) -> np.ndarray:
    return _random_logits(np.random.default_rng(1000 + step), vocab, 1.5)


def _run(sampler: TokenSampler, steps: int, vocab: int) -> list[int]:
    ctx = [1, 2, 3]
    out = []
    for step in range(steps):
        tok = sampler.sample(_fake_logits(step, vocab), ctx).token_id
        out.append(tok)
        ctx.append(tok)
    return out


def test_same_seed_same_tokens_even_when_interleaved():
    vocab = 2048
    pa = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=1234)
    pb = SamplingParams(temperature=0.8, top_k=40, typical_p=0.9, seed=99)
    alone_a = _run(TokenSampler(pa, vocab), 40, vocab)
    alone_b = _run(TokenSampler(pb, vocab), 40, vocab)
    assert alone_a == _run(TokenSampler(pa, vocab), 40, vocab)
    assert len(set(alone_a)) > 5  # it really samples
    assert alone_a != _run(TokenSampler(SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1,
                                                       seed=1235), vocab), 40, vocab)

    # interleave: a batch step samples a, then b, with a third greedy request in between
    sa, sb, sg = TokenSampler(pa, vocab), TokenSampler(pb, vocab), TokenSampler(SamplingParams(), vocab)
    ca, cb = [1, 2, 3], [1, 2, 3]
    got_a, got_b = [], []
    for step in range(40):
        logits = _fake_logits(step, vocab)
        if step % 3 == 0:  # different batch compositions on different steps
            sg.sample(_fake_logits(step + 500, vocab))
        b_first = step % 2 == 1
        if b_first:
            got_b.append(sb.sample(logits, cb).token_id)
        got_a.append(sa.sample(logits, ca).token_id)
        if not b_first:
            got_b.append(sb.sample(logits, cb).token_id)
        ca.append(got_a[-1])
        cb.append(got_b[-1])
    assert got_a == alone_a
    assert got_b == alone_b


def test_rng_consumption_does_not_depend_on_logits():
    """One draw per step whatever the logits: a step where only one token
    survives truncation must not shift the random stream of later steps."""
    vocab = 256
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=42)
    a, b = TokenSampler(params, vocab), TokenSampler(params, vocab)
    peaked = np.zeros(vocab, np.float32)
    peaked[7] = 50.0  # nucleus of one token
    for step in range(30):
        logits = _fake_logits(step, vocab)
        ta = a.sample(peaked if step == 3 else logits).token_id
        tb = b.sample(logits).token_id
        if step == 3:
            assert ta == 7
        else:
            assert ta == tb, step


def test_unseeded_sampler_reports_a_reusable_seed():
    vocab = 512
    s1 = TokenSampler(SamplingParams(temperature=1.0), vocab)
    assert isinstance(s1.seed, int) and 0 <= s1.seed < 2**64
    first = _run(s1, 20, vocab)
    assert _run(TokenSampler(SamplingParams(temperature=1.0, seed=s1.seed), vocab), 20, vocab) == first
    assert TokenSampler(SamplingParams(seed=7), vocab).seed == 7


# -- logprobs / rank / top-n ---------------------------------------------------


def test_logprobs_rank_top_n_greedy():
    logits = np.array([1.0, 3.0, 2.0, 0.0, 2.0], np.float32)
    lsm = _log_softmax(logits)
    r = TokenSampler(SamplingParams(logprobs=True, top_n_tokens=4), 5).sample(logits)
    assert isinstance(r, SampledToken)
    assert r.token_id == 1 and r.rank == 1
    assert r.logprob == pytest.approx(lsm[1], abs=1e-6)
    assert [t for t, _ in r.top_tokens] == [1, 2, 4, 0]  # tie 2/4 -> lower id first
    for t, lp in r.top_tokens:
        assert lp == pytest.approx(lsm[t], abs=1e-6)


def test_logprobs_greedy_are_raw_even_with_penalty():
    logits = np.array([1.0, 3.0, 2.5, 0.0], np.float32)
    r = TokenSampler(SamplingParams(repetition_penalty=2.0, logprobs=True, top_n_tokens=2), 4).sample(logits, [1])
    assert r.token_id == 2
    assert r.rank == 2  # token 1 is more likely under the raw distribution
    assert r.logprob == pytest.approx(_log_softmax(logits)[2], abs=1e-6)
    assert [t for t, _ in r.top_tokens] == [1, 2]


def test_logprobs_sampling_use_processed_logits():
    logits = np.array([1.0, 3.0, 2.5, 0.0, -1.0], np.float32)
    # penalty turns 3.0 into 1.5; T=0.5; top_k=1 makes the draw deterministic
    params = SamplingParams(temperature=0.5, top_k=1, repetition_penalty=2.0, logprobs=True, top_n_tokens=3, seed=0)
    r = TokenSampler(params, 5).sample(logits, [1])
    processed = np.array([1.0, 1.5, 2.5, 0.0, -1.0]) / 0.5
    lsm = _log_softmax(processed)  # before top_k truncation
    assert r.token_id == 2 and r.rank == 1
    assert r.logprob == pytest.approx(lsm[2], abs=1e-5)
    assert r.top_tokens == [(2, pytest.approx(lsm[2], abs=1e-5)), (1, pytest.approx(lsm[1], abs=1e-5)),
                            (0, pytest.approx(lsm[0], abs=1e-5))]
    # a sampled non-top token gets its true rank
    flat = np.array([0.0, 0.1, 0.2, 0.3], np.float32)
    s = TokenSampler(SamplingParams(temperature=1.0, logprobs=True, seed=3), 4)
    for _ in range(50):
        r = s.sample(flat)
        assert r.rank == 4 - r.token_id
        assert r.logprob == pytest.approx(_log_softmax(flat)[r.token_id], abs=1e-6)


def test_no_logprobs_by_default():
    r = TokenSampler(SamplingParams(), 3).sample(np.array([0.0, 1.0, 2.0], np.float32))
    assert (r.token_id, r.logprob, r.rank, r.top_tokens) == (2, None, None, [])


# -- suppression (min_new_tokens) and bad input -------------------------------


def test_suppress_tokens():
    logits = np.array([5.0, 1.0, 4.0, 2.0], np.float32)
    out = suppress_tokens(logits, {0, 2, 99})  # out-of-vocab ids ignored
    assert out.tolist() == [-np.inf, 1.0, -np.inf, 2.0]
    assert logits[0] == 5.0  # not in place by default
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=1)):
        sampler = TokenSampler(params, 4)
        for _ in range(20):
            assert sampler.sample(logits, [], suppress_token_ids=frozenset({0, 2})).token_id in (1, 3)
    r = TokenSampler(SamplingParams(logprobs=True), 4).sample(logits, suppress_token_ids=[0])
    assert r.token_id == 2 and r.logprob == pytest.approx(_log_softmax([-np.inf, 1.0, 4.0, 2.0])[2], abs=1e-6)


def test_bad_logits_rejected():
    s = TokenSampler(SamplingParams(), 4)
    with pytest.raises(ValueError, match="^logits:"):
        s.sample(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="^logits:"):
        s.sample(np.array([0.0, np.nan, 1.0, 2.0], np.float32))
    with pytest.raises(ValueError, match="^logits:"):
        s.sample(np.zeros(4, np.float32), suppress_token_ids=[0, 1, 2, 3])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"typical_p": 1.01}, "typical_p"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_n_tokens": 6}, "top_n_tokens"),
        ({"top_n_tokens": -1}, "top_n_tokens"),
    ],
)
def test_sampling_params_validate_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**kwargs).validate()
    with pytest.raises(ValueError, match=f"^{field}: "):
        TokenSampler(SamplingParams(**kwargs), 10)


def test_sampling_params_valid_edges():
    for kw in ({}, {"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.0}, {"typical_p": 0.0},
               {"repetition_penalty": 0.0}, {"seed": 0}, {"seed": 2**64 - 1}, {"top_n_tokens": 5},
               {"top_k": 10**6}):
        assert SamplingParams(**kw).validate() is not None
    # a temperature below float32's range degenerates to greedy instead of NaN
    logits = np.array([0.5, 2.0, 1.9], np.float32)
    for t in (1e-30, 1e-50):
        assert TokenSampler(SamplingParams(temperature=t, seed=1), 3).sample(logits).token_id == 1
    # top_k larger than the vocabulary is simply "everything"
    assert TokenSampler(SamplingParams(temperature=1.0, top_k=10**6, seed=1), 3).sample(
        np.array([0.0, 9.0, 0.0], np.float32)).token_id in (0, 1, 2)


# --------------------------------------------------------------------------- #
# Stopping
# --------------------------------------------------------------------------- #


def test_stop_reason_values_match_proto():
    assert [(r.name, int(r)) for r in StopReason] == [
        ("NOT_FINISHED", 0), ("MAX_TOKENS", 1), ("EOS_TOKEN", 2), ("CANCELLED", 3),
        ("TIME_LIMIT", 4), ("STOP_SEQUENCE", 5), ("TOKEN_LIMIT", 6), ("ERROR", 7), ("CONSTRAINT_UNMET", 8),
    ]
    pb = pytest.importorskip("granite_deploy.protos.generation_pb2")
    # fmaas has no CONSTRAINT_UNMET: fmaas_stop_reason reports it as MAX_TOKENS there
    assert {r.name: int(r) for r in StopReason if r != StopReason.CONSTRAINT_UNMET} == dict(pb.StopReason.items())
    assert {int(fmaas_stop_reason(r)) for r in StopReason} <= set(dict(pb.StopReason.items()).values())
    assert fmaas_stop_reason(StopReason.CONSTRAINT_UNMET) == StopReason.MAX_TOKENS
    chat = pytest.importorskip("granite_deploy.protos.granite_chat_pb2")
    assert {r.name: int(r) for r in StopReason} == dict(chat.StopReason.items())


def _stream(matcher: StopSequenceMatcher, deltas) -> tuple[str, str | None, list[str]]:
    """Feed deltas; return (all emitted text, matched, emitted chunks)."""
    chunks = []
    for d in deltas:
        safe, matched = matcher.feed(d)
        chunks.append(safe)
        if matched is not None:
            return "".join(chunks), matched, chunks
    chunks.append(matcher.flush())
    return "".join(chunks), None, chunks


def _reference(text: str, stops, include: bool) -> tuple[str, str | None]:
    """Independent one-shot search: the match that completes first wins; on a
    tie (same end) the longest one."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include else text[: end - len(s)]), s
    return text, None


def test_stop_sequence_split_per_character_never_partially_emitted():
    text = "Hello world<|stop|> trailing text"
    m = StopSequenceMatcher(["<|stop|>"])
    emitted = ""
    for ch in text:
        safe, matched = m.feed(ch)
        emitted += safe
        assert "<" not in emitted  # no piece of the stop sequence ever leaks
        assert "Hello world".startswith(emitted)
        if matched:
            break
    assert (emitted, matched) == ("Hello world", "<|stop|>")
    assert m.feed("more") == ("", None) and m.flush() == ""


def test_include_stop_sequence_and_nothing_after():
    m = StopSequenceMatcher(["END"], include_stop_sequence=True)
    assert _stream(m, ["abc E", "N", "D and more", "x"])[:2] == ("abc END", "END")
    m = StopSequenceMatcher(["END"])
    assert _stream(m, ["abcENDxyz"])[:2] == ("abc", "END")


def test_held_text_released_when_not_a_stop_sequence():
    m = StopSequenceMatcher(["abc"])
    assert m.feed("xab") == ("x", None)
    assert m.held == "ab"
    assert m.feed("d") == ("abd", None)
    assert m.feed("a") == ("", None)
    assert m.flush() == "a"


def test_overlapping_prefixes():
    # "ab" completes before "abc" could: the shorter one wins
    assert _stream(StopSequenceMatcher(["abc", "ab"]), "xxabcyy")[:2] == ("xx", "ab")
    # both complete at the same place: the longer (earlier-starting) one wins
    assert _stream(StopSequenceMatcher(["bc", "abc"]), "xabcd")[:2] == ("x", "abc")
    assert _stream(StopSequenceMatcher(["bc", "abc"], True), "xabcd")[:2] == ("xabc", "abc")
    # a naive matcher that restarts after a mismatch misses these
    assert _stream(StopSequenceMatcher(["aab"]), "aaab!")[:2] == ("a", "aab")
    assert _stream(StopSequenceMatcher(["abab"]), "abaabab!")[:2] == ("aba", "abab")
    assert _stream(StopSequenceMatcher(["aab"]), ["a", "a", "a", "a", "b"])[:2] == ("aa", "aab")
    # earliest completion wins over earliest start
    assert _stream(StopSequenceMatcher(["xabcd", "bc"]), "xabcd")[:2] == ("xa", "bc")


def test_unicode_stop_sequences():
    text = "前文🙂终止后文"
    for deltas in (list(text), [text], ["前文🙂终", "止后", "文"]):
        assert _stream(StopSequenceMatcher(["终止"]), deltas)[:2] == ("前文🙂", "终止")
        assert _stream(StopSequenceMatcher(["🙂终"], True), deltas)[:2] == ("前文🙂终", "🙂终")
    assert _stream(StopSequenceMatcher(["终结"]), list(text))[:2] == (text, None)


def test_no_stop_sequences_passthrough():
    m = StopSequenceMatcher([])
    assert m.feed("abc") == ("abc", None) and m.held == "" and m.flush() == ""


def test_matcher_agrees_with_one_shot_search_on_random_streams():
    rnd = random.Random(20240611)
    alphabet = "aab c\u00e9"
    for _ in range(3000):
        stops = list({"".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 5))) for _ in range(rnd.randint(1, 4))})
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))
        deltas, i = [], 0
        while i < len(text):
            n = rnd.choice([0, 1, 1, 1, 2, 3, 7])
            deltas.append(text[i : i + n])
            i += n
        include = rnd.random() < 0.5
        m = StopSequenceMatcher(stops, include)
        expected_text, expected_match = _reference(text, stops, include)
        emitted = ""
        matched = None
        for d in deltas:
            safe, matched = m.feed(d)
            emitted += safe
            assert expected_text.startswith(emitted), (stops, deltas, emitted)
            assert len(m.held) < max(map(len, stops))
            if matched is not None:
                break
        if matched is None:
            emitted += m.flush()
        assert (emitted, matched) == (expected_text, expected_match), (stops, deltas, include)
        hit = find_stop_sequence(text, stops)
        assert (hit[1] if hit else None) == expected_match


def test_matcher_cost_is_bounded_by_stop_length():
    # a long stream of near-misses keeps only < len(stop) characters held
    m = StopSequenceMatcher(["a" * 200 + "b"])
    total = 0
    for _ in range(2000):
        safe, matched = m.feed("a" * 37 + "c")
        assert matched is None
        total += len(safe)
        assert len(m.held) <= 200
    assert total + len(m.flush()) == 2000 * 38


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"min_new_tokens": 30, "max_new_tokens": 20}, "min_new_tokens"),
        ({"stop_token_ids": frozenset({-1})}, "stop_token_ids"),
        ({"stop_sequences": ("",)}, "stop_sequences"),
        ({"stop_sequences": tuple("abcdefg")}, "stop_sequences"),
        ({"stop_sequences": ("x" * 241,)}, "stop_sequences"),
        ({"stop_sequences": "abc"}, "stop_sequences"),
        ({"include_stop_sequence": 1}, "include_stop_sequence"),
        ({"time_limit_s": 0}, "time_limit_s"),
        ({"time_limit_s": -1.0}, "time_limit_s"),
        ({"time_limit_s": float("inf")}, "time_limit_s"),
    ],
)
def test_stopping_params_validate_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        StoppingParams(**kwargs).validate()


def test_stopping_params_normalise_and_limits():
    p = StoppingParams(stop_token_ids=[1, 2, 2], stop_sequences=["a", "b"]).validate()
    assert p.stop_token_ids == frozenset({1, 2}) and p.stop_sequences == ("a", "b")
    StoppingParams(stop_sequences=tuple("abcdef"), max_new_tokens=5, min_new_tokens=5, time_limit_s=0.5).validate()
    with pytest.raises(ValueError, match="^stop_sequences: "):
        StoppingParams(stop_sequences=("abc",)).validate(max_stop_sequence_len=2)
    StoppingParams(stop_sequences=tuple("abcdefgh")).validate(max_stop_sequences=8)


def test_stopping_criteria_each_reason():
    # EOS, only once min_new_tokens tokens were generated before it
    sc = StoppingCriteria(StoppingParams(max_new_tokens=10, min_new_tokens=2, stop_token_ids=frozenset({0})), 100, 5, 0.0)
    assert sc.suppressed_token_ids(0) == {0} and sc.suppressed_token_ids(1) == {0}
    assert sc.suppressed_token_ids(2) == frozenset()
    assert sc.check(0, 1, now=0.0) == StopReason.NOT_FINISHED
    assert sc.check(0, 2, now=0.0) == StopReason.NOT_FINISHED
    assert sc.check(0, 3, now=0.0) == StopReason.EOS_TOKEN
    assert sc.check(7, 3, now=0.0) == StopReason.NOT_FINISHED
    # max tokens (EOS takes priority on the same token)
    assert sc.check(7, 10, now=0.0) == StopReason.MAX_TOKENS
    assert sc.check(0, 10, now=0.0) == StopReason.EOS_TOKEN
    # context window full
    sc = StoppingCriteria(StoppingParams(max_new_tokens=20), context_window=10, prompt_len=7, start_time=0.0)
    assert sc.max_generated == 3
    assert sc.check(5, 2, now=0.0) == StopReason.NOT_FINISHED
    assert sc.check(5, 3, now=0.0) == StopReason.TOKEN_LIMIT
    # time limit
    sc = StoppingCriteria(StoppingParams(time_limit_s=2.0), 100, 1, start_time=100.0)
    assert sc.check(5, 1, now=101.9) == StopReason.NOT_FINISHED
    assert not sc.time_exceeded(101.9) and sc.time_exceeded(102.0)
    assert sc.check(5, 1, now=102.0) == StopReason.TIME_LIMIT
    # no time limit: never TIME_LIMIT
    sc = StoppingCriteria(StoppingParams(), 100, 1, start_time=0.0)
    assert sc.check(5, 1, now=1e9) == StopReason.NOT_FINISHED


def test_min_new_tokens_end_to_end():
    """Sampler + criteria: EOS is the argmax at every step but cannot end the
    sequence before min_new_tokens."""
    eos = 3
    logits = np.array([0.0, 1.0, 0.5, 9.0], np.float32)
    crit = StoppingCriteria(StoppingParams(max_new_tokens=10, min_new_tokens=4, stop_token_ids=frozenset({eos})), 64, 2)
    sampler = TokenSampler(SamplingParams(), 4)
    tokens, reason = [], StopReason.NOT_FINISHED
    while reason == StopReason.NOT_FINISHED:
        tok = sampler.sample(logits, tokens, suppress_token_ids=crit.suppressed_token_ids(len(tokens))).token_id
        tokens.append(tok)
        reason = crit.check(tok, len(tokens))
    assert tokens == [1, 1, 1, 1, eos] and reason == StopReason.EOS_TOKEN


def test_stopping_criteria_rejects_bad_window():
    with pytest.raises(ValueError, match="^prompt_len: "):
        StoppingCriteria(StoppingParams(), context_window=10, prompt_len=10)
    with pytest.raises(ValueError, match="^context_window: "):
        StoppingCriteria(StoppingParams(), context_window=0, prompt_len=0)
