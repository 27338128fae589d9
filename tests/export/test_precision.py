"""FP16 and BF16 export: parity with the fp32 PyTorch model within the stated tolerances, the
mixed-precision layout of the graph, the manifest records and the activation report."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from granite_deploy.export.exporter import ExportError, export
from granite_deploy.export.validate import (
    FP16_MAX,
    MIN_HALF_DECODE_STEPS,
    TOLERANCES,
    activation_report,
    prompt_token_ids,
    validate,
)

CLI = [sys.executable, "-m", "granite_deploy.cli"]


@pytest.fixture
def fp16_artifact(tiny_fp16_artifact):
    return tiny_fp16_artifact  # tests/conftest.py: exported once per session


@pytest.fixture
def bf16_artifact(tiny_bf16_artifact):
    return tiny_bf16_artifact


@pytest.fixture(scope="module")
def torch_model(tiny_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def manifest(artifact):
    return json.loads((artifact / "manifest.json").read_text())


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_export_parity_within_tolerance(dtype, fp16_artifact, bf16_artifact):
    art = {"fp16": fp16_artifact, "bf16": bf16_artifact}[dtype]
    v = manifest(art)["validation"]
    tol = TOLERANCES[dtype]
    assert v["passed"] is True
    assert v["tolerance"] == tol and v["graph_precision"] == dtype
    assert v["decode_steps"] >= MIN_HALF_DECODE_STEPS == 32
    assert 0 < v["max_abs_logit_diff"] <= tol["max_abs_diff"]  # > 0: the graph really is half precision
    assert v["greedy_agreement"] >= tol["min_greedy_agreement"]
    assert v["reference"].startswith("transformers PyTorch, fp32")


def test_fp16_validated_on_onnxruntime_and_says_what_it_upcasts(fp16_artifact):
    v = manifest(fp16_artifact)["validation"]
    assert v["runtime"].startswith("onnxruntime") and "CPUExecutionProvider" in v["runtime"]
    # ORT 1.32 has no fp16 CPU MatMul/Gemm kernel: it runs them in float32 and the record says so.
    assert {"MatMul", "Gemm"} <= set(v["runtime_float32_ops"])
    assert "Attention" not in v["runtime_float32_ops"]  # the fp16 Attention kernel exists


def test_bf16_validated_on_reference_evaluator_and_says_why(bf16_artifact):
    v = manifest(bf16_artifact)["validation"]
    assert "reference evaluator" in v["runtime"]
    assert "ONNX Runtime's CPU provider cannot run this graph" in v["runtime_note"]
    assert "MatMul" in v["runtime_note"]


def test_fp16_graph_also_within_tolerance_in_true_fp16(fp16_artifact, torch_model, tiny_checkpoint):
    """ONNX Runtime upcasts the fp16 MatMuls; the reference evaluator computes every op in fp16."""
    from granite_deploy.export.checkpoint import arch_from_config, read_config

    arch = arch_from_config(read_config(tiny_checkpoint))
    prompts = prompt_token_ids(tiny_checkpoint, arch.vocab_size)
    record = validate(torch_model, fp16_artifact / "model.onnx", arch, prompts, 32, "fp16", runtime="reference")
    assert "reference evaluator" in record["runtime"]
    assert record["passed"], record


@pytest.mark.parametrize("dtype, onnx_type, np_name", [("fp16", onnx.TensorProto.FLOAT16, "float16"),
                                                       ("bf16", onnx.TensorProto.BFLOAT16, "bfloat16")])
def test_manifest_and_graph_cache_dtype(dtype, onnx_type, np_name, fp16_artifact, bf16_artifact):
    art = {"fp16": fp16_artifact, "bf16": bf16_artifact}[dtype]
    m = manifest(art)
    g = m["graphs"]["decoder"]
    assert m["export_options"]["dtype"] == dtype and g["precision"] == dtype
    caches = [s for s in g["inputs"] + g["outputs"] if s["name"].startswith(("past_key_values.", "present."))]
    assert caches and all(s["dtype"] == np_name for s in caches)
    assert next(s for s in g["outputs"] if s["name"] == "logits")["dtype"] == "float32"
    assert g["mixed_precision"] == {"weights_and_matmuls": np_name, "kv_cache": np_name, "attention": np_name,
                                    "rms_norm": "float32", "residual_stream": "float32", "logits": "float32"}
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert types["past_key_values.0.key"] == onnx_type and types["present.0.value"] == onnx_type
    assert types["logits"] == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_graph_layout_norms_and_residual_in_fp32(dtype, fp16_artifact, bf16_artifact):
    art = {"fp16": fp16_artifact, "bf16": bf16_artifact}[dtype]
    half = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[dtype]
    model = onnx.shape_inference.infer_shapes(onnx.load(str(art / "model.onnx"), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    nodes = model.graph.node
    # Weights of every MatMul/Gemm are half; so are their activations.
    for n in nodes:
        if n.op_type in ("MatMul", "Gemm"):
            assert types[n.input[0]] == half and types[n.input[1]] == half, n.name
        if n.op_type in ("Attention", "RotaryEmbedding", "TensorScatter"):
            assert types[n.input[0]] == half, n.name
        if n.op_type == "RMSNormalization":  # input, scale and output all float32
            assert types[n.input[0]] == types[n.input[1]] == types[n.output[0]] == onnx.TensorProto.FLOAT
        if n.op_type == "Add":  # the residual Adds accumulate in float32
            assert types[n.input[0]] == types[n.input[1]] == onnx.TensorProto.FLOAT, n.name
    assert sum(n.op_type == "Add" for n in nodes) == 2 * manifest(art)["architecture"]["num_layers"]


def test_activation_report_in_manifest(fp16_artifact, bf16_artifact, tiny_checkpoint):
    n_layers = json.loads((tiny_checkpoint / "config.json").read_text())["num_hidden_layers"]
    for art in (fp16_artifact, bf16_artifact):
        r = manifest(art)["activation_report"]
        assert r["fp16_max"] == FP16_MAX and r["threshold"] == 0.5 * FP16_MAX
        assert r["prompts"] >= 3 and r["tokens"] > 20
        assert [row["layer"] for row in r["layers"]] == list(range(n_layers))
        for row in r["layers"]:
            assert row["residual_max"] > 0 and row["mlp_intermediate_max"] > 0 and row["branch_output_max"] > 0
            assert row["overflow_risk"] is False  # the tiny model peaks around 80
        assert r["layers_at_risk"] == []


def test_activation_report_flags_overflow_risk(torch_model, tiny_checkpoint):
    import copy

    import torch

    model = copy.deepcopy(torch_model)
    with torch.no_grad():  # blow up layer 1's MLP: its intermediate (and the residual after it) exceed 32752
        model.model.layers[1].shared_mlp.input_linear.weight.mul_(2000.0)
    prompts = prompt_token_ids(tiny_checkpoint, model.config.vocab_size)
    r = activation_report(model, prompts)
    assert 1 in r["layers_at_risk"] and 0 not in r["layers_at_risk"]
    row = r["layers"][1]
    assert row["overflow_risk"] and "mlp_intermediate" in row["over_threshold"]
    assert row["mlp_intermediate_max"] > r["threshold"]


def test_fp16_artifact_runs_in_onnxruntime_engine(fp16_artifact, torch_model):
    """The ORT engine reads the cache dtype from the manifest: its greedy tokens match fp32 PyTorch."""
    import torch

    from granite_deploy.engines.base import Chunk
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine, state_specs

    from granite_deploy.artifact import load_manifest

    specs = state_specs(load_manifest(fp16_artifact).graph("decoder"))
    assert specs and all(st["dtype"] == np.float16 for st in specs)
    eng = OnnxRuntimeEngine(fp16_artifact, max_batch=2, threads=2)
    assert eng.info.precision == "fp16"
    prompt = [5, 17, 42, 99, 7]
    eng.reserve(0)
    logits = eng.step([Chunk(0, tuple(prompt), 0)])
    tokens = list(prompt)
    for _ in range(12):
        tokens.append(int(logits[0].argmax()))
        logits = eng.step([Chunk(0, (tokens[-1],), len(tokens) - 1)])
    with torch.no_grad():
        ref = list(prompt)
        for _ in range(12):
            ref.append(int(torch_model(torch.tensor([ref])).logits[0, -1].argmax()))
    agree = sum(a == b for a, b in zip(tokens[len(prompt):], ref[len(prompt):]))
    assert agree >= 11  # teacher-free greedy: one near-tie flip would derail the rest, so expect (near) all


def test_half_needs_32_decode_steps(tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="at least 32 decode steps"):
        export(tiny_checkpoint, tmp_path / "o", dtype="fp16", decode_steps=16)
    assert not (tmp_path / "o").exists()


def test_bf16_refused_when_no_runtime_can_validate(tiny_checkpoint, tmp_path, monkeypatch):
    import granite_deploy.export.validate as v

    monkeypatch.setattr(v, "REFERENCE_EVALUATOR_MAX_PARAMS", 1000)  # pretend the model is too big
    with pytest.raises(ExportError, match="not possible on this machine.*reference evaluator"):
        export(tiny_checkpoint, tmp_path / "o", dtype="bf16")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_fp16(tiny_checkpoint, tmp_path):
    r = subprocess.run(CLI + ["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "a"),
                              "--dtype", "fp16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "greedy agreement" in r.stdout and "32 decode steps" in r.stdout
    assert manifest(tmp_path / "a")["export_options"]["decode_steps"] == 32
    help_text = subprocess.run(CLI + ["export", "--help"], capture_output=True, text=True).stdout
    assert "fp16 or bf16" in help_text
