"""TGIS numerics through the real scheduler and ONNX Runtime engine on a tiny model:
prompt-token logprobs / ranks / top-n equal transformers' log-softmax of the prompt positions,
and the length penalty moves the EOS logit exactly as TGIS's formula says."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
from granite_deploy.errors import InvalidField
from granite_deploy.export.exporter import export
from granite_deploy.serve.sampling import SamplingParams
from granite_deploy.serve.scheduler import Request, Scheduler
from granite_deploy.serve.stopping import StoppingParams, StopReason
from granite_deploy.serve.tgis import apply_length_penalty, length_penalty_boost
from granite_deploy.serve.tokenizer import GraniteTokenizer
from harness import run_concurrently


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("tgis-scores") / "art", validate=False)


@pytest.fixture(scope="module")
def tokenizer(artifact):
    return GraniteTokenizer.from_dir(artifact)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def _hf_prompt_logprobs(hf, ids):
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()  # [positions, vocab]


class _Recording:
    """The real engine; remembers the raw next-token logits it returned for each sequence."""

    def __init__(self, inner):
        self.inner, self.info = inner, inner.info
        self.rows: dict[int, list[np.ndarray]] = {}

    def reserve(self, seq_id):
        self.inner.reserve(seq_id)

    def release(self, seq_id):
        self.inner.release(seq_id)

    def step(self, chunks):
        out = self.inner.step(chunks)
        for c, row in zip(chunks, out):
            self.rows.setdefault(c.seq_id, []).append(row.copy())
        return out


def _first_token_event(scheduler, request):
    from granite_deploy.serve.generate import stream

    events = list(stream(scheduler, request))
    return [e for e in events if e.kind == "token"], events[-1]


@pytest.mark.parametrize("prefill_chunk", [256, 3], ids=["one-chunk", "chunks-of-3"])
def test_prompt_logprobs_equal_transformers(artifact, tokenizer, hf, prefill_chunk):
    prompts = ["The capital of France is Paris. The capital of Japan is", "Hello world", "x"]
    requests = [Request(tuple(tokenizer.encode(p)), SamplingParams(logprobs=True, top_n_tokens=3),
                        StoppingParams(max_new_tokens=2, min_new_tokens=2), prompt_logprobs=True)
                for p in prompts]
    engine = OnnxRuntimeEngine(artifact, max_batch=3, threads=1)
    # run_concurrently returns token ids; the prompt scores ride on each request's first token event
    scheduler = Scheduler(engine, tokenizer, prefill_chunk=prefill_chunk).start()
    try:
        results = [_first_token_event(scheduler, r) for r in requests]
    finally:
        scheduler.shutdown()
    for req, (tokens, final) in zip(requests, results):
        ids = list(req.prompt_ids)
        infos = tokens[0].prompt_tokens
        assert [t.prompt_tokens for t in tokens[1:]] == [None] * (len(tokens) - 1)
        assert [i.token_id for i in infos] == ids
        assert math.isnan(infos[0].logprob) and infos[0].rank == 0 and infos[0].top_tokens == []
        ref = _hf_prompt_logprobs(hf, ids)
        for j in range(1, len(ids)):
            row = ref[j - 1]
            assert infos[j].logprob == pytest.approx(row[ids[j]], abs=1e-4), j
            assert infos[j].rank == int((row > row[ids[j]]).sum()) + 1, j
            top = np.argsort(-row, kind="stable")[:3]
            assert [t for t, _ in infos[j].top_tokens] == top.tolist(), j
            assert [lp for _, lp in infos[j].top_tokens] == pytest.approx(row[top].tolist(), abs=1e-4)
        assert final.stop_reason == StopReason.MAX_TOKENS


def test_prompt_logprobs_are_off_unless_asked(artifact, tokenizer):
    engine = OnnxRuntimeEngine(artifact, max_batch=1, threads=1)
    req = Request(tuple(tokenizer.encode("Hello world")), SamplingParams(logprobs=True),
                  StoppingParams(max_new_tokens=2, min_new_tokens=2))
    scheduler = Scheduler(engine, tokenizer).start()
    try:
        tokens, _ = _first_token_event(scheduler, req)
    finally:
        scheduler.shutdown()
    assert all(t.prompt_tokens is None for t in tokens)


def test_length_penalty_formula_values():
    # eos + |eos| * (decay ** (generated - start) - 1), only once generated > start
    assert length_penalty_boost(2.0, 5, 3, 1.5) == pytest.approx(2.0 + 2.0 * (1.5**2 - 1))
    assert length_penalty_boost(-2.0, 5, 3, 1.5) == pytest.approx(-2.0 + 2.0 * (1.5**2 - 1))
    assert length_penalty_boost(2.0, 3, 3, 1.5) == 2.0 and length_penalty_boost(2.0, 9, 3, 1.0) == 2.0
    assert length_penalty_boost(1.0, 10_000, 0, 10.0) == float(np.finfo(np.float32).max)  # capped, never inf
    logits = np.array([0.5, -3.0, 1.0], np.float32)
    out = apply_length_penalty(logits, 4, 1, 2.0, eos_token_id=1)
    assert out.tolist() == [0.5, -3.0 + 3.0 * (2.0**3 - 1), 1.0] and logits[1] == -3.0


def _log_softmax(x):
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


@pytest.mark.parametrize("start_index,decay", [(2, 1.8), (0, 10.0), (5, 1.3)])
def test_length_penalty_moves_eos_as_tgis_formula(artifact, tokenizer, start_index, decay):
    eos = tokenizer.eos_token_id
    engine = _Recording(OnnxRuntimeEngine(artifact, max_batch=1, threads=1))
    n = 24
    req = Request(tuple(tokenizer.encode("The capital of France is")), SamplingParams(logprobs=True, top_n_tokens=5),
                  StoppingParams(max_new_tokens=n), length_penalty=(start_index, decay))
    ((tokens, _, final),) = run_concurrently(engine, tokenizer, [req])
    (raw,) = engine.rows.values()
    raw = raw[-len(tokens):]  # the decode-step logits (the prompt's own row is the first)
    for g, (token, row) in enumerate(zip(tokens, raw)):
        expected = row.astype(np.float64).copy()
        if g > start_index:
            expected[eos] = row[eos] + abs(row[eos]) * (decay ** (g - start_index) - 1)
        assert token == int(np.argmax(expected)), g
    # the run ends where the boosted EOS first wins, and the penalty is what made it win
    assert tokens[-1] == eos and final.stop_reason == StopReason.EOS_TOKEN
    assert all(int(np.argmax(r)) != eos for r in raw)


def test_length_penalty_reported_logprob_includes_the_boost(artifact, tokenizer):
    eos = tokenizer.eos_token_id
    engine = _Recording(OnnxRuntimeEngine(artifact, max_batch=1, threads=1))
    req = Request(tuple(tokenizer.encode("Hello")), SamplingParams(logprobs=True, top_n_tokens=5),
                  StoppingParams(max_new_tokens=6, min_new_tokens=2), length_penalty=(0, 1.2))
    scheduler = Scheduler(engine, tokenizer).start()
    try:
        events, _ = _first_token_event(scheduler, req)
    finally:
        scheduler.shutdown()
    (raw,) = engine.rows.values()
    for g, (ev, row) in enumerate(zip(events, raw)):
        expected = row.astype(np.float64).copy()
        if g < 2:  # min_new_tokens suppresses EOS (TGIS: and the length penalty waits)
            expected[eos] = -np.inf
        else:
            expected[eos] += abs(row[eos]) * (1.2 ** g - 1)
        lp = _log_softmax(expected)
        assert ev.token.logprob == pytest.approx(lp[ev.token.token_id], abs=1e-4), g


def test_bad_length_penalty_and_unsupported_prompt_scores(artifact, tokenizer):
    engine = OnnxRuntimeEngine(artifact, max_batch=1, threads=1)
    scheduler = Scheduler(engine, tokenizer)
    for lp in ((0, 0.5), (0, 10.5), (-1, 2.0)):
        with pytest.raises(InvalidField, match="length_penalty"):
            scheduler.submit(Request((1, 2), length_penalty=lp), lambda e: None)
    recording = _Recording(engine)  # exposes no Chunk.all_logits support
    with pytest.raises(InvalidField, match="prompt_logprobs"):
        Scheduler(recording, tokenizer).submit(Request((1, 2), prompt_logprobs=True), lambda e: None)
