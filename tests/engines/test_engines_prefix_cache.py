"""Prefix caching (engines/prefix_cache.py through serve/scheduler.py): cache on == cache off, token for token."""

from __future__ import annotations

import numpy as np
import pytest

from granite_deploy.engines import Chunk, load_engine
from granite_deploy.engines.prefix_cache import PrefixCache
from granite_deploy.export.exporter import export
from granite_deploy.export.tiny import make_tiny_checkpoint
from granite_deploy.serve.generate import stream
from granite_deploy.serve.sampling import SamplingParams
from granite_deploy.serve.scheduler import Request, Scheduler
from granite_deploy.serve.stopping import StoppingParams
from granite_deploy.serve.tokenizer import GraniteTokenizer
from harness import run_concurrently

HYBRID = dict(num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "mamba"], position_embedding_type="nope",
              mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_expand=2, mamba_d_conv=4, mamba_chunk_size=64)
MB = 1 << 20


@pytest.fixture(scope="module")
def dense(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("pc-dense") / "art", validate=False)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("pc-hybrid") / "ckpt", seed=1, **HYBRID)
    return export(ckpt, tmp_path_factory.mktemp("pc-hybrid-art") / "art", validate=False)


@pytest.fixture(params=["dense", "hybrid"])
def artifact(request, dense, hybrid):
    return {"dense": dense, "hybrid": hybrid}[request.param]


def rand_prompt(seed: int, n: int) -> tuple[int, ...]:
    return tuple(int(t) for t in np.random.default_rng(seed).integers(5, 400, n))


class Runner:
    """One engine + scheduler, requests run one after another (or concurrently)."""

    def __init__(self, artifact, budget_mb: float | None, max_batch: int = 2, prefill_chunk: int = 256, interval=16):
        self.engine = load_engine(artifact, max_batch=max_batch, threads=1)
        self.tokenizer = GraniteTokenizer.from_dir(artifact)
        self.cache = None if budget_mb is None else PrefixCache(self.engine, int(budget_mb * MB), interval=interval)
        self.scheduler = Scheduler(self.engine, self.tokenizer, prefill_chunk=prefill_chunk,
                                   idle_prefill_chunk=prefill_chunk, prefix_cache=self.cache).start()
        self.steps = []
        real = self.engine.step

        def recording(chunks):
            self.steps.append([(c.seq_id, len(c.token_ids)) for c in chunks])
            return real(chunks)

        self.engine.step = recording

    def run(self, prompt, n=8, sampling=SamplingParams()):
        events = list(stream(self.scheduler, Request(tuple(prompt), sampling, StoppingParams(max_new_tokens=n))))
        tokens = [e.token.token_id for e in events if e.kind == "token"]
        return tokens, events[-1]

    def close(self):
        self.scheduler.shutdown()


@pytest.fixture
def pair(artifact):
    runners = []

    def make(budget_mb=64, **kw):
        off, on = Runner(artifact, None, **kw), Runner(artifact, budget_mb, **kw)
        runners.extend([off, on])
        return off, on

    yield make
    for r in runners:
        r.close()


def test_extended_repeated_and_unrelated_prompts(pair, artifact):
    off, on = pair()
    base = rand_prompt(1, 40)
    turns = [base, base + rand_prompt(2, 9), base + rand_prompt(2, 9), rand_prompt(3, 30), base[:37] + (7, 8, 9)]
    for i, prompt in enumerate(turns):
        want, final_off = off.run(prompt)
        got, final = on.run(prompt)
        assert got == want, f"turn {i}"
        assert final_off.cached_prompt_tokens == 0
        if i == 0 or i == 3:  # nothing shared
            assert final.cached_prompt_tokens == 0
        elif i == 1:  # extends turn 0: its prompt and the generated tokens that are in this prompt
            assert final.cached_prompt_tokens >= (32 if on.cache.recurrent else 40)
        elif i == 2:  # the same prompt again: all of it, no prefill
            assert final.cached_prompt_tokens == len(prompt)
        else:  # shares 37 tokens with turn 0; hybrids resume from the snapshot at 32
            assert final.cached_prompt_tokens == (32 if on.cache.recurrent else 37)
    assert on.cache.looked_up_tokens == sum(len(t) for t in turns)


def test_counters_move_by_the_expected_token_counts(pair):
    off, on = pair()
    a = rand_prompt(4, 48)
    on.run(a, n=4)
    assert (on.cache.lookups, on.cache.looked_up_tokens, on.cache.hits, on.cache.hit_tokens) == (1, 48, 0, 0)
    _, final = on.run(a + (11, 12, 13), n=4)
    assert on.cache.looked_up_tokens == 48 + 51 and on.cache.hits == 1
    assert on.cache.hit_tokens == final.cached_prompt_tokens >= 48
    on.run(rand_prompt(5, 20), n=4)  # unrelated: counted as looked up, no hit
    assert on.cache.looked_up_tokens == 48 + 51 + 20 and on.cache.hit_tokens == final.cached_prompt_tokens
    assert on.cache.bytes > 0 and on.cache.bytes <= on.cache.budget


def test_prefill_after_a_hit_runs_only_the_new_tokens(pair):
    off, on = pair()
    a = rand_prompt(6, 50)
    on.run(a, n=1)
    on.steps.clear()
    _, final = on.run(a + rand_prompt(7, 10), n=1)
    prefilled = sum(n for step in on.steps for _, n in step)
    assert prefilled == 60 - final.cached_prompt_tokens and final.cached_prompt_tokens >= 48


def test_seeded_sampling_identical(pair):
    off, on = pair()
    a = rand_prompt(8, 33)
    params = SamplingParams(temperature=0.9, top_k=50, seed=77)
    for prompt in (a, a + (9, 10, 11), a):
        assert on.run(prompt, 10, params)[0] == off.run(prompt, 10, params)[0]


def test_chunked_prefill_with_joins_and_leaves(pair):
    off, on = pair(max_batch=2, prefill_chunk=5)
    base = rand_prompt(9, 30)
    warm = [Request(base, stopping=StoppingParams(max_new_tokens=6))]
    requests = [Request(base + rand_prompt(10 + i, 3 + i), stopping=StoppingParams(max_new_tokens=9 - i)) for i in range(5)]
    for runner in (off, on):
        runner.results = [run_concurrently(runner.engine, runner.tokenizer, r, prefill_chunk=5,
                                           prefix_cache=runner.cache) for r in (warm, requests)]
    assert [r[0] for r in on.results[1]] == [r[0] for r in off.results[1]]
    assert all(r[2].cached_prompt_tokens >= 16 for r in on.results[1])


def test_concurrent_requests_sharing_a_prefix(pair):
    off, on = pair(max_batch=3, prefill_chunk=8)
    base = rand_prompt(11, 40)
    requests = [Request(base + rand_prompt(20 + i, 4), stopping=StoppingParams(max_new_tokens=6)) for i in range(5)]
    for runner in (off, on):
        runner.results = run_concurrently(runner.engine, runner.tokenizer, requests, prefill_chunk=8,
                                          prefix_cache=runner.cache)
    assert [r[0] for r in on.results] == [r[0] for r in off.results]
    assert [r[2].cached_prompt_tokens for r in off.results] == [0] * 5
    assert on.cache.hit_tokens > 0  # later requests reused the prompt of earlier (running or finished) ones


def test_eviction_under_a_tiny_budget_stays_exact(pair):
    off, on = pair()
    prompts = [rand_prompt(30 + i, 40) for i in range(4)]
    assert on.run(prompts[0], 6)[0] == off.run(prompts[0], 6)[0]
    on.cache.budget = int(on.cache.bytes * 2.5)  # room for about two finished requests
    cached = []
    for prompt in prompts[1:] + [prompts[0] + (5, 6), prompts[3] + (5, 6)]:
        tokens, final = on.run(prompt, 6)
        assert tokens == off.run(prompt, 6)[0]
        assert on.cache.bytes <= on.cache.budget
        cached.append(final.cached_prompt_tokens)
    assert on.cache.evictions >= 2
    assert cached[3] == 0 and cached[4] >= 32  # the oldest was evicted (LRU), the newest hit


def test_reused_slot_after_eviction(pair):
    """max_batch 1: every request reuses the one slot, and the cache holds one request at a time."""
    off, on = pair(max_batch=1)
    a, b = rand_prompt(40, 45), rand_prompt(41, 45)
    assert on.run(a, 5)[0] == off.run(a, 5)[0]
    on.cache.budget = int(on.cache.bytes * 1.5)
    cached = []
    for prompt in (b, b + (3, 4), a + (3, 4), b):
        tokens, final = on.run(prompt, 5)
        assert tokens == off.run(prompt, 5)[0]
        cached.append(final.cached_prompt_tokens)
    assert cached[0] == 0 and cached[1] >= 32 and cached[2] == 0 and cached[3] == 0  # a, then b, were evicted
    assert on.cache.evictions >= 2


def test_engine_restore_equals_prefill(artifact):
    """The engine's snapshot/restore: a sequence restored from another's cached state computes what
    prefilling it would (same logits), for KV and recurrent state."""
    engine = load_engine(artifact, max_batch=2, threads=1)
    prompt = rand_prompt(50, 24)
    engine.reserve(0)
    engine.step([Chunk(0, prompt[:16], 0)])
    kv1 = engine.save_kv(0, 0, 16)
    rec = engine.save_recurrent(0)
    engine.step([Chunk(0, prompt[16:], 16)])
    want = engine.step([Chunk(0, (9,), 24)])
    engine.reserve(1)
    engine.restore(1, 16, [kv1], rec)
    engine.step([Chunk(1, prompt[16:], 16)])
    np.testing.assert_allclose(engine.step([Chunk(1, (9,), 24)]), want, atol=1e-4)
    assert kv1.nbytes > 0 and (rec is None) == (not engine.recurrent)


def test_fmaas_and_chat_over_grpc_cache_on_equals_off(artifact):
    """Two servers, the default (prefix cache on) and --prefix-cache-mb 0: the same greedy text over fmaas
    Generate; the counters count the shared prompt as hits, an unrelated prompt none; the chat Final event
    reports the cached tokens."""
    import grpc

    from granite_deploy.protos import generation_pb2 as pb
    from granite_deploy.protos import generation_pb2_grpc as pb_grpc
    from granite_deploy.protos import granite_chat_pb2 as cpb
    from granite_deploy.protos import granite_chat_pb2_grpc as cpb_grpc
    from granite_deploy.serve.server import ServerConfig, ServerThread

    tokenizer = GraniteTokenizer.from_dir(artifact)
    first = "The capital of France is Paris. The capital of Japan is Tokyo. The capital of Italy is Rome, and"
    texts = [first, first + " the capital of Spain is", "def add(a, b): return a + b", first]
    results = {}
    for mb in (None, 0):
        with ServerThread(ServerConfig(str(artifact), host="127.0.0.1", port=0, max_batch=2,
                                       prefix_cache_mb=mb)) as st:
            metrics = st.server.metrics
            with grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=8))
                out = []
                for text in texts:
                    hits = metrics.value("prefix_cache_hit_tokens_total")
                    looked = metrics.value("prefix_cache_lookup_tokens_total")
                    r = stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=text)],
                                                                  params=params), timeout=60).responses[0]
                    out.append((r.text, metrics.value("prefix_cache_hit_tokens_total") - hits,
                                metrics.value("prefix_cache_lookup_tokens_total") - looked, r.input_token_count))
                chat = cpb_grpc.ChatServiceStub(channel)
                conv = cpb.Conversation(messages=[cpb.ChatMessage(role="user", content=first)])
                finals = [[e.final for e in chat.ChatStream(cpb.ChatRequest(conversation=conv), timeout=60)
                           if e.WhichOneof("event") == "final"][0] for _ in range(2)]
        results[mb] = out, finals
    (on, on_finals), (off, off_finals) = results[None], results[0]
    assert [o[0] for o in on] == [o[0] for o in off]
    assert all(o[1] == o[2] == 0 for o in off)  # cache off: no lookups, no hits
    n0 = len(tokenizer.encode(first))
    assert on[0][1] == 0 and on[0][2] == on[0][3] == n0  # the first prompt: looked up, nothing to hit
    assert on[1][1] >= n0 - 16 and on[1][1] >= on[1][3] // 2  # extends the first: most of it is a hit
    assert on[2][1] == 0 and on[2][2] == on[2][3]  # unrelated: no hit
    assert on[3][1] == n0  # the same prompt again: all of it
    assert on_finals[0].cached_prompt_tokens == 0 and on_finals[1].cached_prompt_tokens == on_finals[1].prompt_token_count
    assert off_finals[1].cached_prompt_tokens == 0
    assert on_finals[0].completion_token_count == off_finals[0].completion_token_count
