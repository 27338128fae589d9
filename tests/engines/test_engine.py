"""The ONNX Runtime engine and the scheduler against transformers' own generate()."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from granite_deploy.engines import Chunk, EngineError, load_engine
from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
from granite_deploy.export.exporter import export
from granite_deploy.serve.generate import stream
from granite_deploy.serve.sampling import SamplingParams
from granite_deploy.serve.scheduler import Request, Scheduler
from granite_deploy.serve.stopping import StoppingParams, StopReason
from granite_deploy.serve.tokenizer import GraniteTokenizer
from harness import run_concurrently

PROMPTS = [
    "Hello world",
    "The capital of France is Paris. The capital of Japan is",
    "def add(a, b):",
    "🙂 東京 are",
    "x",
]


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("engine") / "art", validate=False)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(artifact):
    return GraniteTokenizer.from_dir(artifact)


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, attention_mask=torch.ones(1, len(ids)))
    return out[0, len(ids):].tolist()


def run_all(artifact, tokenizer, requests, max_batch, prefill_chunk=256, graph=None):
    if graph is None:
        engine = load_engine(artifact, max_batch=max_batch, threads=1)
    else:
        engine = OnnxRuntimeEngine(artifact, max_batch=max_batch, threads=1, graph=graph)
    return run_concurrently(engine, tokenizer, requests, prefill_chunk)


GRAPHS = ["decoder_ragged", "decoder_cpu", "decoder"]  # ragged (the default on CPU), the CPU flavour, the portable graph


@pytest.mark.parametrize("graph", GRAPHS)
def test_greedy_equals_transformers_with_joining_and_leaving(artifact, tokenizer, hf, graph):
    """5 requests, 2 slots, 3-token prefill chunks: sequences join as others leave, prompts are chunked."""
    n = 12
    requests = [Request(tuple(tokenizer.encode(p)), stopping=StoppingParams(max_new_tokens=n - i))
                for i, p in enumerate(PROMPTS)]
    results = run_all(artifact, tokenizer, requests, max_batch=2, prefill_chunk=3, graph=graph)
    for req, (tokens, text, final) in zip(requests, results):
        expected = hf_greedy(hf, list(req.prompt_ids), req.stopping.max_new_tokens)
        eos = tokenizer.eos_token_id
        if eos in expected:
            expected = expected[: expected.index(eos) + 1]
        assert tokens == expected
        assert final.stop_reason in (StopReason.MAX_TOKENS, StopReason.EOS_TOKEN)
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("graph", GRAPHS)
def test_cache_growth_past_a_capacity_block(artifact, tokenizer, hf, graph):
    """A prompt of 250 tokens decoding past position 256 (the engine's capacity block)."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 400, 250).tolist()
    (tokens, _, _), = run_all(artifact, tokenizer, [Request(tuple(prompt), stopping=StoppingParams(max_new_tokens=12))],
                              1, graph=graph)
    assert tokens == hf_greedy(hf, prompt, 12)[: len(tokens)] and len(tokens) >= 1


def test_reused_slot_starts_empty(artifact):
    engine = load_engine(artifact, max_batch=2, threads=1)
    long = tuple(range(3, 40))
    short = (5, 6, 7)
    engine.reserve(0)
    fresh = engine.step([Chunk(0, short, 0)])
    engine.release(0)
    engine.reserve(1)
    engine.step([Chunk(1, long, 0)])
    engine.release(1)
    engine.reserve(2)  # same row as before, previously holding 37 tokens
    again = engine.step([Chunk(2, short, 0)])
    np.testing.assert_array_equal(fresh, again)
    with pytest.raises(EngineError):
        engine.step([Chunk(2, (1,), 0)])  # wrong start position
    with pytest.raises(EngineError):
        engine.step([Chunk(9, (1,), 0)])  # no slot


def test_seeded_sampling_same_alone_and_batched(artifact, tokenizer):
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    req = Request(tuple(tokenizer.encode(PROMPTS[1])), params, StoppingParams(max_new_tokens=16))
    others = [Request(tuple(tokenizer.encode(p)), SamplingParams(temperature=1.0, seed=i), StoppingParams(max_new_tokens=10))
              for i, p in enumerate(PROMPTS)]
    (alone, _, final_alone), = run_all(artifact, tokenizer, [req], 1)
    batched = run_all(artifact, tokenizer, others[:2] + [req] + others[2:], 4)
    assert batched[2][0] == alone
    assert final_alone.seed == 1234 and batched[2][2].seed == 1234
    greedy, = run_all(artifact, tokenizer, [Request(req.prompt_ids, stopping=req.stopping)], 1)
    assert greedy[0] != alone  # sampling really sampled


def test_stop_sequence_split_across_tokens(artifact, tokenizer):
    prompt = tuple(tokenizer.encode(PROMPTS[1]))
    (tokens, text, _), = run_all(artifact, tokenizer, [Request(prompt, stopping=StoppingParams(max_new_tokens=16))], 1)
    # choose a stop string that spans a token boundary in the middle of the output
    pieces = [tokenizer.decode(tokens[: i + 1]) for i in range(len(tokens))]
    k = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) > len(pieces[i - 2]) and len(pieces[i]) > len(pieces[i - 1]))
    stop = pieces[k][len(pieces[k - 1]) - 1 : len(pieces[k - 1]) + 1]
    assert len(stop) == 2
    stopping = StoppingParams(max_new_tokens=16, stop_sequences=(stop,))
    (_, stopped_text, final), = run_all(artifact, tokenizer, [Request(prompt, stopping=stopping)], 1)
    assert final.stop_reason == StopReason.STOP_SEQUENCE and final.stop_sequence == stop
    assert stopped_text == text[: text.index(stop)]
    stopping = StoppingParams(max_new_tokens=16, stop_sequences=(stop,), include_stop_sequence=True)
    (_, with_stop, _), = run_all(artifact, tokenizer, [Request(prompt, stopping=stopping)], 1)
    assert with_stop == text[: text.index(stop) + 2]


def test_token_limit_at_context_window(artifact, tokenizer):
    engine = load_engine(artifact, max_batch=1, max_seq_len=20, threads=1)
    scheduler = Scheduler(engine, tokenizer).start()
    events = list(stream(scheduler, Request(tuple(range(10, 25)), stopping=StoppingParams(max_new_tokens=50))))
    scheduler.shutdown()
    final = events[-1]
    assert final.stop_reason == StopReason.TOKEN_LIMIT and final.generated_count == 5


@pytest.mark.parametrize("request_kwargs, field", [
    ({"prompt_ids": ()}, "prompt"),
    ({"prompt_ids": tuple(range(30))}, "prompt: 30 tokens does not fit the context window of 20"),
    ({"sampling": SamplingParams(top_p=1.5)}, "top_p"),
    ({"sampling": SamplingParams(temperature=-1)}, "temperature"),
    ({"stopping": StoppingParams(max_new_tokens=2, min_new_tokens=5)}, "min_new_tokens"),
])
def test_bad_requests_name_the_field(artifact, tokenizer, request_kwargs, field):
    engine = load_engine(artifact, max_batch=1, max_seq_len=20, threads=1)
    scheduler = Scheduler(engine, tokenizer)
    kwargs = {"prompt_ids": (1, 2, 3), **request_kwargs}
    with pytest.raises(ValueError, match=field):
        scheduler.submit(Request(**kwargs), lambda e: None)


def test_generate_cli_streams_transformers_greedy(artifact, tokenizer, hf):
    r = subprocess.run([sys.executable, "-m", "granite_deploy.cli", "generate", str(artifact), "--prompt", PROMPTS[2],
                        "--max-new-tokens", "10"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    expected = hf_greedy(hf, tokenizer.encode(PROMPTS[2]), 10)
    eos = tokenizer.eos_token_id
    if eos in expected:
        expected = expected[: expected.index(eos) + 1]
    assert r.stdout == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    assert f"generated tokens: {len(expected)}" in r.stderr and "tokens/s" in r.stderr


def test_render_cli_matches_apply_chat_template(artifact, tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Boston? 🙂"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    (tmp_path / "chat.json").write_text(json.dumps(messages))
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    r = subprocess.run([sys.executable, "-m", "granite_deploy.cli", "render", str(artifact), "--chat",
                        str(tmp_path / "chat.json"), "--tools", str(tmp_path / "tools.json")], capture_output=True)
    assert r.returncode == 0, r.stderr
    expected = AutoTokenizer.from_pretrained(tiny_checkpoint).apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert r.stdout.decode("utf-8") == expected


def test_capacity_shrinks_after_a_long_sequence_leaves(artifact):
    """Attention reads the whole capacity, so capacity left behind by a long sequence is given back."""
    engine = load_engine(artifact, max_batch=2, threads=1)
    alone = load_engine(artifact, max_batch=1, threads=1)
    engine.reserve(0)
    engine.step([Chunk(0, tuple(range(1, 301)), 0)])
    assert engine.capacity == 512
    engine.reserve(1)
    alone.reserve(1)
    short = (5, 6, 7, 8, 9)
    np.testing.assert_allclose(engine.step([Chunk(1, short, 0)]), alone.step([Chunk(1, short, 0)]), atol=1e-5)
    engine.release(0)  # the short sequence moves to row 0 and capacity halves
    assert engine.capacity == 256
    for i in range(3):
        np.testing.assert_allclose(engine.step([Chunk(1, (10 + i,), 5 + i)]), alone.step([Chunk(1, (10 + i,), 5 + i)]),
                                   atol=1e-5)


def test_prefill_chunk_applies_only_while_others_decode(artifact, tokenizer):
    """A prompt alone prefills in big pieces; while another stream decodes it goes in small chunks."""
    engine = load_engine(artifact, max_batch=2, threads=1)
    sizes = []
    real_step = engine.step

    def recording_step(chunks):
        sizes.append(sorted(len(c.token_ids) for c in chunks))
        return real_step(chunks)

    engine.step = recording_step
    scheduler = Scheduler(engine, tokenizer, prefill_chunk=8, idle_prefill_chunk=64).start()
    first = list(stream(scheduler, Request(tuple(range(10, 50)), stopping=StoppingParams(max_new_tokens=2))))
    assert sizes[0] == [40]  # nobody decoding: the whole 40-token prompt in one step
    assert first[-1].generated_count == 2
    sizes.clear()
    done = threading.Event()
    long_running = Request(tuple(range(10, 14)), stopping=StoppingParams(max_new_tokens=40))
    t = threading.Thread(target=lambda: (list(stream(scheduler, long_running)), done.set()))
    t.start()
    while not sizes:  # the long stream has started
        threading.Event().wait(0.001)
    list(stream(scheduler, Request(tuple(range(60, 100)), stopping=StoppingParams(max_new_tokens=2))))
    t.join(60)
    scheduler.shutdown()
    prefills = [max(s) for s in sizes if len(s) == 2]  # steps shared with the decoding stream
    assert prefills and max(prefills) <= 8


def test_cpu_engine_runs_the_cpu_flavour_and_both_graphs_agree(artifact):
    """load_engine on CPU picks decoder_ragged; its logits and decoder_cpu's equal the portable graph's
    through prefill, batched decode, a sequence leaving (row compaction) and capacity growth past 256."""
    assert load_engine(artifact, max_batch=1, threads=1).graph_name == "decoder_ragged"
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, 400, n).tolist() for n in (7, 260, 3)]
    logits = {}
    for graph in GRAPHS:
        engine = OnnxRuntimeEngine(artifact, max_batch=3, threads=1, graph=graph)
        lengths, out = {}, []
        for s, p in enumerate(prompts):
            engine.reserve(s)
            out.append(engine.step([Chunk(s, tuple(p), 0)]))
            lengths[s] = len(p)
        for t in range(8):
            if t == 4:
                engine.release(0)
                del lengths[0]
            out.append(engine.step([Chunk(s, (11 + t,), n) for s, n in lengths.items()]))
            lengths = {s: n + 1 for s, n in lengths.items()}
        assert engine.capacity == 512
        logits[graph] = out
    portable = logits["decoder"]
    diff = max(float(np.abs(a - b).max()) for out in logits.values() for a, b in zip(out, portable))
    assert diff < 1e-4


def test_unknown_graph_is_named(artifact):
    with pytest.raises(EngineError, match="no graph 'decoder_gpu'"):
        OnnxRuntimeEngine(artifact, graph="decoder_gpu")


@pytest.mark.parametrize("graph", GRAPHS)
def test_cpu_path_binds_the_state_buffers_in_place(artifact, graph):
    """The CPU provider keeps KV in numpy buffers that the graph writes through IO binding:
    after steps the same buffers (same address) hold the new positions of the right rows only."""
    engine = OnnxRuntimeEngine(artifact, max_batch=3, threads=1, graph=graph)
    name = next(st["input"] for st in engine.states if st["kind"] == "kv")
    axis = engine._axis[name]
    before = {k: v.ctypes.data for k, v in engine._buffers.items()}
    engine.reserve(0)
    engine.reserve(1)
    engine.step([Chunk(1, (5, 6, 7, 8), 0)])
    engine.step([Chunk(0, (9, 10), 0), Chunk(1, (11,), 4)])
    assert {k: v.ctypes.data for k, v in engine._buffers.items()} == before
    buf = engine._buffers[name]
    filled = np.moveaxis(buf, axis + 1, 1)  # [rows, positions, ...]
    assert np.abs(filled[1, :5]).min(axis=tuple(range(1, filled.ndim - 1))).all()
    assert np.abs(filled[0, :2]).sum() > 0 and not filled[2].any()
    # decode wrote only row 1's position 4 (row 0's dummy write at position 0 is overwritten by its prefill)
    assert not filled[1, 5:].any() and not filled[0, 3:].any()
