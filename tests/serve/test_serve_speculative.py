"""Prompt-lookup speculative decoding (serve/speculative.py) and the scheduler's token budget.

On the tiny random-weight dense model: random weights make gibberish, so prompts repeat a
random phrase (the drafter then finds matches, and such models fall into loops that it drafts
from too), and an oracle drafter is patched in where a test needs drafts that diverge at a
chosen position. Greedy output (tokens, text deltas, stop reasons, logprobs) must be the same
with speculation on and off; the sampling acceptance rule must reproduce the target
distribution (chi-square), where the classic wrong rule does not.
"""

from __future__ import annotations

import http.client
import json
import math
import threading

import numpy as np
import pytest

from granite_deploy.engines import load_engine
from granite_deploy.engines.base import EngineError
from granite_deploy.errors import InvalidField
from granite_deploy.serve import scheduler as scheduler_module
from granite_deploy.serve.generate import stream
from granite_deploy.serve.sampling import SamplingParams, TokenSampler
from granite_deploy.serve.scheduler import Request, Scheduler
from granite_deploy.serve.speculative import SpeculativeConfig, accept_draft, draft_length, propose
from granite_deploy.serve.stopping import StoppingParams, StopReason
from granite_deploy.serve.tokenizer import GraniteTokenizer
from sampling_filters import apply_repetition_penalty, apply_temperature, top_k_filter, top_p_filter

K = 4
SPEC = SpeculativeConfig(num_tokens=K)


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    from granite_deploy.export.exporter import export

    return export(str(tiny_checkpoint), tmp_path_factory.mktemp("speculative") / "tiny", validate=False)


@pytest.fixture(scope="module")
def tokenizer(artifact):
    return GraniteTokenizer.from_dir(artifact)


@pytest.fixture(scope="module")
def vocab(artifact):
    return load_engine(artifact, max_batch=1, threads=1).info.vocab_size


def repetitive_prompts(n: int, vocab: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        phrase = rng.integers(5, vocab, int(rng.integers(3, 7))).tolist()
        out.append(tuple(rng.integers(5, vocab, int(rng.integers(0, 4))).tolist() + phrase * int(rng.integers(2, 4))
                         + rng.integers(5, vocab, int(rng.integers(1, 3))).tolist()))
    return out


def _event(e):
    t = e.token
    return (e.kind, e.text, None if t is None else t.token_id, e.generated_count, e.stop_reason, e.stop_sequence,
            e.error, None if t is None or t.logprob is None else t.logprob,
            None if t is None else t.rank,
            None if t is None else tuple(t.top_tokens),
            None if e.prompt_tokens is None else tuple(
                (p.token_id, None if p.logprob is None or math.isnan(p.logprob) else p.logprob)
                for p in e.prompt_tokens))


def same(a, b, atol: float = 1e-3) -> bool:
    """Events equal, logprobs within atol: the engine batches rows differently with and without
    speculation (and run to run), which moves logits by float rounding, never tokens or text."""
    if isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)):
        return math.isclose(float(a), float(b), abs_tol=atol)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, atol) for x, y in zip(a, b))
    return a == b


def run(artifact, tokenizer, requests, speculative=None, max_batch=4, token_budget=256, engine=None, **kw):
    """Every request through one scheduler, concurrently; per request its events (comparable tuples)."""
    engine = engine or load_engine(artifact, max_batch=max_batch, threads=1)
    sched = Scheduler(engine, tokenizer, token_budget=token_budget, speculative=speculative, **kw).start()
    results = [None] * len(requests)

    def go(i):
        results[i] = [_event(e) for e in stream(sched, requests[i])]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    sched.shutdown()
    assert all(r is not None for r in results)
    return results, sched


def tokens_of(events) -> list[int]:
    return [e[2] for e in events if e[0] == "token"]


def oracle(refs: dict, diverge_at: int, vocab: int):
    """A drafter that proposes the true greedy continuation for `diverge_at` tokens, then a wrong one."""
    def proposer(context, k, ngram_max=3, ngram_min=1):
        context = tuple(context)
        for prompt, ref in refs.items():
            if context[:len(prompt)] == prompt and len(context) - len(prompt) <= len(ref):
                pos = len(context) - len(prompt)
                assert list(context[len(prompt):]) == ref[:pos], "generation left the reference"
                true = ref[pos:pos + k]
                draft = true[:diverge_at]
                if len(draft) < k and len(true) > diverge_at:
                    draft.append((true[diverge_at] + 1) % vocab)
                return draft[:k]
        return []
    return proposer


# ============================================================================ the drafter

def test_propose_matches_the_longest_ngram_most_recent_first():
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert propose(ctx, 3, 3, 1) == [7, 8, 5]  # "2 3" most recently followed by 7 (3-gram "5 2 3" unseen)
    assert propose([4, 1, 2, 3, 8, 5, 1, 2, 3, 6, 9, 1, 2, 3], 2, 3, 1) == [6, 9]  # the most recent "1 2 3"
    assert propose([1, 2, 3, 4, 1, 2, 3, 4, 5, 9, 3, 4], 5, 1, 1) == [5, 9, 3, 4]  # 1-gram "4": followers to the end
    assert propose([7, 7, 7], 3, 2, 1) == [7]  # overlap: "7 7" at 0 is followed by the last 7
    assert propose([1, 2, 3], 4, 3, 1) == []  # nothing repeats
    assert propose([5, 1, 2, 5, 3, 2], 4, 3, 2) == []  # only a 1-gram ("2") would match, min is 2
    assert propose([5, 1, 2, 5, 3, 2], 4, 3, 1) == [5, 3, 2]
    assert propose([1, 1], 0) == [] and propose([], 3) == [] and propose([3], 3) == []
    assert draft_length(4, 10) == 4 and draft_length(4, 3) == 2 and draft_length(4, 1) == 0


def test_config_validation():
    with pytest.raises(ValueError, match="--speculative-tokens"):
        SpeculativeConfig(num_tokens=0).validate()
    with pytest.raises(ValueError, match="--speculative-ngram"):
        SpeculativeConfig(ngram_max=1, ngram_min=2).validate()
    with pytest.raises(ValueError, match="--speculative: unknown method"):
        SpeculativeConfig(method="eagle").validate()


# ============================================================================ the acceptance rule

def _chi2_p(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Pearson's chi-square statistic and its p-value (Wilson-Hilferty; cells with p = 0 must be empty)."""
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token of probability 0"
    n, expected = counts.sum(), probs[support] * counts.sum()
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return stat, 0.5 * math.erfc(z / math.sqrt(2))


def _wrong_rule(weights, draft, rng):
    """The classic mistake: accept with min(1, p(x)), else sample from p unmodified."""
    p = weights / weights.sum()
    if rng.random() < min(1.0, p[draft]):
        return draft
    return int(rng.choice(len(p), p=p))


@pytest.mark.parametrize("draft", [2, 0, 5], ids=["p=0.2", "p=0.4", "p=0"])
def test_acceptance_rule_reproduces_the_target_distribution(draft):
    p = np.array([0.4, 0.1, 0.2, 0.15, 0.15, 0.0])
    n = 20000
    for rule, seed in ((accept_draft, 1), (_wrong_rule, 2)):
        rng = np.random.default_rng(seed)
        j = draft if p[draft] > 0 else -1
        idx = [rule(p * 3.0, j if rule is accept_draft else draft, rng) for _ in range(n)]  # unnormalised weights
        stat, pvalue = _chi2_p(np.bincount(idx, minlength=p.size), p)
        if rule is accept_draft:
            assert pvalue > 1e-3, (stat, pvalue)
        elif p[draft] > 0:
            assert pvalue < 1e-30 and stat > 300, (stat, pvalue)  # the wrong rule over-weights the draft


def test_sampler_verifies_drafts_against_the_final_processed_distribution():
    """TokenSampler.sample(draft=) with repetition penalty, temperature, top-k, top-p: the draws
    follow that distribution (computed with the reference filters) whatever the draft."""
    vocab = 12
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, vocab).astype(np.float32)
    context = [1, 3, 3, 7]
    params = SamplingParams(temperature=0.8, top_k=8, top_p=0.9, repetition_penalty=1.3, seed=11)
    z = apply_temperature(apply_repetition_penalty(logits, context, 1.3), 0.8)
    z = top_p_filter(top_k_filter(z, 8), 0.9)
    target = np.exp(z - z.max())
    target /= target.sum()
    assert (target == 0).sum() >= 4  # the filters removed something: a draft may lie outside
    outside = int(np.flatnonzero(target == 0)[0])
    for draft in (int(np.argmax(target)), int(np.argsort(target)[-3]), outside):
        sampler = TokenSampler(params, vocab)
        counts = np.bincount([sampler.sample(logits, context, draft=draft).token_id for _ in range(12000)],
                             minlength=vocab)
        stat, pvalue = _chi2_p(counts, target)
        assert pvalue > 1e-3, (draft, stat, pvalue)


# ============================================================================ greedy identity in the scheduler

def test_greedy_output_is_identical_with_speculation(artifact, tokenizer, vocab):
    prompts = repetitive_prompts(24, vocab)
    requests = [Request(p, stopping=StoppingParams(max_new_tokens=int(12 + i % 3 * 9)), request_id=f"r{i}")
                for i, p in enumerate(prompts)]
    off, _ = run(artifact, tokenizer, requests)
    on, sched = run(artifact, tokenizer, requests, speculative=SPEC)
    assert same(on, off)
    assert sched.draft_tokens_proposed > 50 and sched.draft_tokens_accepted > 10  # drafts were really used
    assert sched.draft_tokens_accepted < sched.draft_tokens_proposed  # and some were rolled back


def test_sampling_requests_speculate(artifact, tokenizer, vocab):
    """Seeded sampling (temperature, top-k, top-p, repetition penalty, min_new_tokens) with speculation:
    drafts are verified by the distribution-preserving rule, every request completes normally, and a
    seed gives the same tokens run to run (the drafter and the rule are deterministic)."""
    prompts = repetitive_prompts(8, vocab, seed=13)
    requests = [Request(p, SamplingParams(temperature=0.3, top_k=20, top_p=0.95, repetition_penalty=1.05,
                                          seed=100 + i, logprobs=True),
                        StoppingParams(max_new_tokens=20, min_new_tokens=5)) for i, p in enumerate(prompts)]
    first, sched = run(artifact, tokenizer, requests, speculative=SPEC)
    again, _ = run(artifact, tokenizer, requests, speculative=SPEC)
    assert same(first, again)
    assert all(e[-1][4] in (StopReason.MAX_TOKENS, StopReason.EOS_TOKEN) and e[-1][3] >= 5 for e in first)
    assert sched.draft_tokens_accepted > 0


@pytest.fixture(scope="module")
def references(artifact, tokenizer, vocab):
    """Greedy outputs (no speculation, no stop) of 6 prompts, 24 tokens each."""
    prompts = repetitive_prompts(6, vocab, seed=5)
    out, _ = run(artifact, tokenizer, [Request(p, stopping=StoppingParams(max_new_tokens=24)) for p in prompts])
    return {p: tokens_of(events) for p, events in zip(prompts, out)}


@pytest.mark.parametrize("diverge_at", range(K + 1))
def test_rollback_at_every_draft_position(artifact, tokenizer, vocab, references, monkeypatch, diverge_at):
    """Drafts right for `diverge_at` tokens then wrong: output identical, the cache rolled back
    correctly (later tokens depend on it); diverge_at = K: every draft accepted, bonus token."""
    monkeypatch.setattr(scheduler_module, "propose", oracle(references, diverge_at, vocab))
    requests = [Request(p, SamplingParams(logprobs=True, top_n_tokens=2), StoppingParams(max_new_tokens=24))
                for p in references]
    on, sched = run(artifact, tokenizer, requests, speculative=SPEC, max_batch=3)
    assert [tokens_of(e) for e in on] == list(references.values())
    off, _ = run(artifact, tokenizer, requests, max_batch=3)
    assert same(on, off)  # texts, logprobs, ranks, top tokens too
    assert sched.draft_tokens_proposed > 0
    if diverge_at == 0:
        assert sched.draft_tokens_accepted == 0
    elif diverge_at == K:
        assert sched.draft_tokens_accepted == sched.draft_tokens_proposed
        # the first token comes from the prefill, then K + 1 per step while the oracle drafts K
        assert sched.draft_steps <= len(references) * math.ceil(23 / (K + 1))
    else:
        assert 0 < sched.draft_tokens_accepted < sched.draft_tokens_proposed


def test_stops_inside_an_accepted_draft(artifact, tokenizer, vocab, references, monkeypatch):
    """EOS, a stop sequence and max_new_tokens falling inside a fully right draft end the request at
    the same token with the same text and events as without speculation."""
    monkeypatch.setattr(scheduler_module, "propose", oracle(references, K, vocab))
    requests = []
    for i, (prompt, ref) in enumerate(references.items()):
        at = 3 + i * 2  # the stop lands at different positions inside the K + 1 emitted per step
        if i % 3 == 0:  # a "stop token" (EOS) that first appears there
            stop_id = next((t for t in ref[at:] if t not in ref[:at]), None)
            stopping = StoppingParams(max_new_tokens=24, stop_token_ids=frozenset({stop_id} if stop_id else ()))
        elif i % 3 == 1:  # a stop sequence: the text of two tokens from there
            text = tokenizer.decode(ref[at:at + 2], skip_special_tokens=True)
            stopping = StoppingParams(max_new_tokens=24, stop_sequences=(text,) if text.strip() else ())
        else:
            stopping = StoppingParams(max_new_tokens=at)
        requests.append(Request(prompt, SamplingParams(logprobs=True), stopping))
    off, _ = run(artifact, tokenizer, requests, max_batch=3)
    on, sched = run(artifact, tokenizer, requests, speculative=SPEC, max_batch=3)
    assert same(on, off)
    reasons = {e[-1][4] for e in off}
    assert {StopReason.EOS_TOKEN, StopReason.STOP_SEQUENCE, StopReason.MAX_TOKENS} <= reasons
    assert sched.draft_tokens_accepted > 0


def test_prompt_logprobs_and_prefix_cache_with_speculation(artifact, tokenizer, vocab, references):
    """TGIS prompt logprobs (all-logits prefill) and the prefix cache, whose entries hold KV written by
    speculative steps: a second round of prompts extending the first rounds' outputs reuses them."""
    from granite_deploy.engines.prefix_cache import make_prefix_cache

    first = [Request(p, SamplingParams(logprobs=True), StoppingParams(max_new_tokens=20), prompt_logprobs=i == 0)
             for i, p in enumerate(references)]
    second = [Request(p + tuple(ref[:14]) + (7,), stopping=StoppingParams(max_new_tokens=12))
              for p, ref in references.items()]
    results = {}
    for label, spec in (("off", None), ("on", SPEC)):
        engine = load_engine(artifact, max_batch=3, threads=1)
        cache = make_prefix_cache(engine, 64)
        results[label] = [run(artifact, tokenizer, reqs, spec, engine=engine, prefix_cache=cache)[0]
                          for reqs in (first, second)]
        assert cache.hits > 0
    assert same(results["on"], results["off"])


def test_token_budget_plan(artifact, tokenizer, vocab):
    """Decodes (and drafts) first, then prompt chunks oldest first, within the budget; prompts keep
    a reserve of budget // 4 even when decodes fill the budget."""
    engine = load_engine(artifact, max_batch=4, threads=1)
    sizes = []
    real = engine.step

    def recording(chunks):
        sizes.append([(len(c.token_ids), c.start) for c in chunks])
        return real(chunks)

    engine.step = recording
    prompts = repetitive_prompts(4, vocab, seed=9)
    long_prompt = tuple(np.random.default_rng(1).integers(5, vocab, 60).tolist())
    requests = [Request(p, stopping=StoppingParams(max_new_tokens=30)) for p in prompts[:3]]
    requests.append(Request(long_prompt, stopping=StoppingParams(max_new_tokens=3)))
    run(artifact, tokenizer, requests, speculative=SPEC, token_budget=8, idle_token_budget=8, engine=engine)
    totals = [sum(n for n, _ in step) for step in sizes]
    assert max(totals) <= 8  # at most 4 decodes: decodes + reserve (2) never exceed the budget here
    assert max(n for step in sizes for n, _ in step) > 1  # drafts or prompt chunks did fill steps
    long_chunks = [n for step in sizes for n, start in step if start < 60 and n > 1]
    assert sum(long_chunks) >= 60 - 8 and max(long_chunks) <= 8  # the long prompt went in budget-sized pieces
    for idle, expected in ((16, [16, 16, 16, 12]), (None, [60])):  # nobody decodes: the idle budget
        sizes.clear()
        alone = Scheduler(engine, tokenizer, token_budget=16, idle_token_budget=idle).start()
        events = list(stream(alone, Request(long_prompt, stopping=StoppingParams(max_new_tokens=1))))
        alone.shutdown()
        assert events[-1].stop_reason == StopReason.MAX_TOKENS
        assert [step[0][0] for step in sizes] == expected  # None: IDLE_TOKEN_BUDGET (256) covers it
    assert Scheduler(engine, tokenizer, prefill_chunk=5).token_budget == 5  # the old name is an alias


# ============================================================================ what is refused / not speculated

class _Recurrent:
    """An engine that says it has recurrent (Mamba) state."""

    recurrent = True

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_refusals_and_opt_outs(artifact, tokenizer, vocab):
    engine = load_engine(artifact, max_batch=2, threads=1)
    with pytest.raises(ValueError, match="--speculative: this model has recurrent"):
        Scheduler(_Recurrent(engine), tokenizer, speculative=SPEC)
    plain = Scheduler(engine, tokenizer)
    with pytest.raises(InvalidField, match="speculative_tokens: speculative decoding is off"):
        plain.submit(Request((5, 6, 7), speculative_tokens=2), lambda e: None)
    plain.submit(Request((5, 6, 7), speculative_tokens=0), lambda e: None)  # 0 is always fine
    plain.shutdown()
    prompts = repetitive_prompts(4, vocab, seed=3)
    # speculative_tokens=0 turns it off per request
    _, sched = run(artifact, tokenizer, [Request(p, speculative_tokens=0) for p in prompts], speculative=SPEC)
    assert sched.draft_tokens_proposed == 0
    # capped at the server's k
    _, sched = run(artifact, tokenizer, [Request(p, stopping=StoppingParams(max_new_tokens=24),
                                                 speculative_tokens=99) for p in prompts],
                   speculative=SpeculativeConfig(num_tokens=2))
    assert 0 < sched.draft_tokens_proposed <= 2 * sched.draft_steps


def test_failed_rollback_fails_only_that_request(artifact, tokenizer, vocab, references, monkeypatch):
    """An engine whose truncate raises: the speculating request ends with ERROR naming the rollback;
    a request that does not speculate (speculative_tokens=0) finishes normally."""
    monkeypatch.setattr(scheduler_module, "propose", oracle(references, 0, vocab))  # always rejected
    engine = load_engine(artifact, max_batch=2, threads=1)

    def broken(seq_id, length):
        raise EngineError("no rollback today")

    engine.truncate = broken
    prompts = list(references)
    requests = [Request(prompts[0], stopping=StoppingParams(max_new_tokens=10)),
                Request(prompts[1], stopping=StoppingParams(max_new_tokens=10), speculative_tokens=0)]
    out, sched = run(artifact, tokenizer, requests, speculative=SPEC, engine=engine)
    assert out[0][-1][4] == StopReason.ERROR and "speculative rollback failed" in out[0][-1][6]
    assert out[1][-1][4] == StopReason.MAX_TOKENS and tokens_of(out[1]) == references[prompts[1]][:10]
    assert not sched.unusable


def test_cancel_while_speculating(artifact, tokenizer, vocab, references, monkeypatch):
    monkeypatch.setattr(scheduler_module, "propose", oracle(references, 2, vocab))
    sched = Scheduler(load_engine(artifact, max_batch=1, threads=1), tokenizer, speculative=SPEC).start()
    events = []
    done = threading.Event()

    def sink(e):
        events.append(e)
        if e.kind == "token" and e.generated_count >= 3:
            ticket.cancel()
        if e.kind == "final":
            done.set()

    ticket = sched.submit(Request(next(iter(references)), stopping=StoppingParams(max_new_tokens=24)), sink)
    assert done.wait(60)
    sched.shutdown()
    assert events[-1].stop_reason == StopReason.CANCELLED and events[-1].generated_count < 24


# ============================================================================ end to end (OpenAI HTTP)

def _post(port, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"content-type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read().decode())
    conn.close()
    return resp.status, data


def test_openai_field_and_metrics(artifact, vocab):
    from granite_deploy.serve.server import ServerConfig, ServerThread

    prompt = list(repetitive_prompts(1, vocab, seed=21)[0])
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0}
    config = ServerConfig(str(artifact), host="127.0.0.1", port=0, http_port=0, threads=1, max_batch=2,
                          speculative="ngram", speculative_tokens=3, warmup=False)
    with ServerThread(config) as st:
        port = st.server.http_port
        status, on = _post(port, "/v1/completions", {**body, "speculative_tokens": 3})
        assert status == 200, on
        status, off = _post(port, "/v1/completions", {**body, "speculative_tokens": 0})
        assert status == 200 and on["choices"][0]["text"] == off["choices"][0]["text"]
        status, err = _post(port, "/v1/completions", {**body, "speculative_tokens": -1})
        assert status == 400 and err["error"]["param"] == "speculative_tokens"
        metrics = st.server.metrics
        assert metrics.value("speculative_verification_steps_total") == st.server.scheduler.draft_steps
        assert metrics.value("speculative_draft_tokens_proposed_total") > 0
    with ServerThread(ServerConfig(str(artifact), host="127.0.0.1", port=0, http_port=0, threads=1, max_batch=1,
                                   warmup=False)) as st:
        status, err = _post(st.server.http_port, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                             "speculative_tokens": 2})
        assert status == 400 and err["error"]["param"] == "speculative_tokens"
        assert "speculative decoding is off" in err["error"]["message"]
