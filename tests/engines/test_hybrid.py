"""Granite 4.0 H (Mamba2 + attention, NoPE) through export, engine and scheduler."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from granite_deploy.engines import Chunk, load_engine
from granite_deploy.export.exporter import export
from granite_deploy.export.tiny import make_tiny_checkpoint
from granite_deploy.serve.scheduler import Request
from granite_deploy.serve.stopping import StoppingParams
from granite_deploy.serve.tokenizer import GraniteTokenizer
from harness import run_concurrently

from conftest import HYBRID  # noqa: F401 (the tiny hybrid layout; the checkpoint and artifacts are session fixtures)
PROMPTS = ["Hello world", "The capital of France is Paris. The capital of Japan is", "def add(a, b):", "🙂 東京", "x"]


@pytest.fixture(scope="module")
def hf(hybrid_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hybrid_checkpoint, dtype=torch.float32).eval()


def test_export_records_states_and_parity(hybrid_artifact):
    m = json.loads((hybrid_artifact / "manifest.json").read_text())
    v = m["validation"]
    assert v["passed"] and v["greedy_agreement"] == 1.0 and v["max_abs_logit_diff"] <= 1e-3
    state = {(s["layer"], s["kind"]): s for s in m["graphs"]["decoder"]["state"]}
    assert set(state) == {(0, "conv"), (0, "ssm"), (1, "kv"), (2, "conv"), (2, "ssm"), (3, "conv"), (3, "ssm")}
    assert state[(0, "conv")]["shape"] == [128 + 2 * 16, 4]  # expand*H + 2*groups*d_state, d_conv
    assert state[(0, "ssm")]["shape"] == [4, 32, 16]  # heads, d_head, d_state
    assert state[(0, "ssm")]["in_place"] is False and state[(1, "kv")]["in_place"] is True
    graph = onnx.load(str(hybrid_artifact / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert "RotaryEmbedding" not in ops  # NoPE
    assert {"CumSum", "Conv", "Attention", "TensorScatter"} <= ops
    assert {o.domain for o in graph.opset_import} == {""}


def test_prefill_in_chunks_equals_prefill_at_once(hybrid_artifact):
    engine = load_engine(hybrid_artifact, max_batch=2, threads=1)
    prompt = tuple(range(5, 45))
    engine.reserve(0)
    at_once = engine.step([Chunk(0, prompt, 0)])
    engine.reserve(1)
    engine.step([Chunk(1, prompt[:7], 0)])
    engine.step([Chunk(1, prompt[7:30], 7)])
    engine.step([Chunk(1, prompt[30:39], 30)])
    chunked = engine.step([Chunk(1, prompt[39:], 39)])
    np.testing.assert_allclose(chunked, at_once, atol=1e-4)
    # and the next decode step agrees too
    a, b = engine.step([Chunk(0, (7,), 40), Chunk(1, (7,), 40)])
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_reused_slot_starts_from_zero_state(hybrid_artifact):
    engine = load_engine(hybrid_artifact, max_batch=1, threads=1)
    engine.reserve(0)
    fresh = engine.step([Chunk(0, (3, 4, 5), 0)])
    engine.step([Chunk(0, (6,), 3)])
    engine.release(0)
    engine.reserve(1)
    again = engine.step([Chunk(1, (3, 4, 5), 0)])
    np.testing.assert_array_equal(fresh, again)


def test_greedy_equals_transformers_joining_and_leaving(hybrid_artifact, hf):
    tokenizer = GraniteTokenizer.from_dir(hybrid_artifact)
    engine = load_engine(hybrid_artifact, max_batch=2, threads=1)
    requests = [Request(tuple(tokenizer.encode(p)), stopping=StoppingParams(max_new_tokens=12 - i))
                for i, p in enumerate(PROMPTS)]
    results = [tokens for tokens, _, _ in run_concurrently(engine, tokenizer, requests, prefill_chunk=4)]
    for req, got in zip(requests, results):
        ids = list(req.prompt_ids)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=req.stopping.max_new_tokens, do_sample=False,
                              attention_mask=torch.ones(1, len(ids)))
        expected = out[0, len(ids):].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
        assert got == expected


def test_fp16_hybrid_export_and_tensorrt_op_check(hybrid_fp16_artifact):
    """Half precision keeps the scan (cumsum, exp of segment sums) and the Mamba states in float32."""
    from granite_deploy.export.opcheck import check_graph_file

    art = hybrid_fp16_artifact
    m = json.loads((art / "manifest.json").read_text())
    assert m["validation"]["passed"] and m["validation"]["greedy_agreement"] >= 0.95
    assert {s["dtype"] for s in m["graphs"]["decoder"]["state"] if s["kind"] in ("conv", "ssm")} == {"float32"}
    assert {s["dtype"] for s in m["graphs"]["decoder"]["state"] if s["kind"] == "kv"} == {"float16"}
    report = check_graph_file(art / "model.onnx")
    assert report.ok, report


def test_grpc_streams_from_a_hybrid_artifact(hybrid_artifact, hf):
    """fmaas GenerateStream from a hybrid artifact: transformers' greedy tokens, stream == unary."""
    import grpc

    from granite_deploy.protos import generation_pb2 as pb
    from granite_deploy.protos import generation_pb2_grpc as pb_grpc
    from granite_deploy.serve.server import ServerConfig, ServerThread

    tokenizer = GraniteTokenizer.from_dir(hybrid_artifact)
    prompt = PROMPTS[1]
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, attention_mask=torch.ones(1, len(ids)))
    expected = out[0, len(ids):].tolist()
    if tokenizer.eos_token_id in expected:
        expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
    with ServerThread(ServerConfig(str(hybrid_artifact), host="127.0.0.1", port=0, max_batch=2)) as st:
        with grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=10))
            params.response.generated_tokens = True
            req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=prompt), params=params)
            messages = list(stub.GenerateStream(req, timeout=60))
            unary = stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=prompt)],
                                                              params=params), timeout=60).responses[0]
    streamed = "".join(m.text for m in messages)
    assert messages[0].input_token_count == len(ids)
    assert streamed == unary.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert messages[-1].generated_token_count == len(expected)
