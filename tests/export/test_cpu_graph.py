"""The ONNX Runtime CPU flavour of the decoder (export/cpu_graph.py): layout, parity, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from granite_deploy.export.cpu_graph import CpuGraphError, check_against_portable, derive_cpu_graph
from granite_deploy.export.exporter import export
from granite_deploy.export.checkpoint import GraniteArch


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def cache_shapes(onnx_path):
    model = onnx.load(str(onnx_path), load_external_data=False)
    return {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output) if v.name.endswith((".key", ".value"))}


@pytest.fixture
def fp32_artifact(tiny_fp32_artifact):
    return tiny_fp32_artifact  # tests/conftest.py: exported once per session


def test_export_writes_a_validated_cpu_flavour_sharing_the_weights(fp32_artifact):
    m = manifest(fp32_artifact)
    portable, cpu = m["graphs"]["decoder"], m["graphs"]["decoder_cpu"]
    assert cpu["file"] == "model.cpu.onnx" and cpu["external_data"] == portable["external_data"] == ["model.onnx.data"]
    assert cpu["derived_from"] == "decoder" and cpu["engines"] == ["onnxruntime"]
    # One weights file on disk; the second graph is small.
    assert m["files"]["model.cpu.onnx"]["bytes"] < 200_000 < m["files"]["model.onnx.data"]["bytes"]
    v = cpu["validation"]
    assert v["passed"] and v["greedy_agreement"] == 1.0 and v["max_abs_logit_diff"] < 1e-3
    # The layout the manifest declares is the layout in the graph file.
    assert cpu["kv_cache"]["tensor_layout"] == ["batch", "kv_heads", "head_dim", "cache_capacity"]
    shapes = cache_shapes(fp32_artifact / "model.cpu.onnx")
    a = m["architecture"]
    assert shapes["past_key_values.0.key"] == ["batch", a["num_kv_heads"], a["head_dim"], "cache_capacity"]
    assert shapes["present.0.value"] == ["batch", a["num_kv_heads"], a["head_dim"], "cache_capacity"]
    assert {s["shape"][1] for s in cpu["state"]} == {a["head_dim"]}
    # The portable graph keeps the standard layout and the Attention op; the flavour has none.
    assert cache_shapes(fp32_artifact / "model.onnx")["past_key_values.0.key"][2] == "cache_capacity"
    ops = {n.op_type for n in onnx.load(str(fp32_artifact / "model.cpu.onnx"), load_external_data=False).graph.node}
    assert "Attention" not in ops and {"MatMul", "Softmax", "TensorScatter"} <= ops


def test_parity_check_catches_a_wrong_graph(fp32_artifact, tmp_path):
    """check_against_portable is what quantize relies on: it must fail for a graph that computes
    something else (here: the attention scale doubled)."""
    import shutil

    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(fp32_artifact / name, tmp_path / name)
    arch = GraniteArch.from_dict(manifest(fp32_artifact)["architecture"])
    good = derive_cpu_graph(tmp_path / "model.onnx", arch.num_heads)
    assert check_against_portable(tmp_path / "model.onnx", good, arch)["passed"]
    model = onnx.load(str(good), load_external_data=False)
    for init in model.graph.initializer:
        if init.name.endswith("/scale"):
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 2, init.name))
    onnx.save_model(model, str(tmp_path / "bad.onnx"))
    record = check_against_portable(tmp_path / "model.onnx", tmp_path / "bad.onnx", arch)
    assert not record["passed"] and record["max_abs_logit_diff"] > 1e-3


def test_half_graphs_get_no_cpu_flavour(tiny_checkpoint, tmp_path):
    art = export(tiny_checkpoint, tmp_path / "fp16", dtype="fp16", validate=False)
    assert "decoder_cpu" not in manifest(art)["graphs"]
    with pytest.raises(CpuGraphError, match="past_key_values.0.key is FLOAT16"):
        derive_cpu_graph(art / "model.onnx", manifest(art)["architecture"]["num_heads"])


def test_a_graph_without_the_capacity_shape_node_is_refused(fp32_artifact, tmp_path):
    """Graphs from before the flavour existed read the capacity with Gather(Shape(cache), 2)."""
    model = onnx.load(str(fp32_artifact / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "Shape" and node.input[0].startswith("past_key_values."):
            del node.attribute[:]
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    with pytest.raises(CpuGraphError, match="re-export"):
        derive_cpu_graph(tmp_path / "model.onnx", manifest(fp32_artifact)["architecture"]["num_heads"])


def test_quantized_artifacts_carry_their_own_cpu_flavour(fp32_artifact, tmp_path):
    """The flavour of an int4 artifact is derived from the quantized graph (not copied from the
    fp32 source) and checked against it; the engine runs it."""
    from granite_deploy.engines import Chunk, load_engine
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
    from granite_deploy.export.quantize import quantize

    out = quantize(fp32_artifact, tmp_path / "int4", "int4", skip_gate=True, decode_steps=4, ppl_max_tokens=32)
    m = manifest(out)
    cpu = m["graphs"]["decoder_cpu"]
    assert cpu["external_data"] == m["graphs"]["decoder"]["external_data"]
    assert cpu["validation"]["passed"] and cpu["validation"]["max_abs_logit_diff"] < 1e-3
    ops = {n.op_type for n in onnx.load(str(out / cpu["file"]), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "Attention" not in ops
    prompt = tuple(range(20, 40))
    results = []
    for engine in (load_engine(out, max_batch=1, threads=1), OnnxRuntimeEngine(out, max_batch=1, threads=1,
                                                                               graph="decoder")):
        engine.reserve(0)
        results.append(engine.step([Chunk(0, prompt, 0)]))
    # Not to float rounding: MatMulNBits at accuracy level 4 rounds activations to int8 per block, which
    # turns the graphs' float-rounding differences into ~0.1 in logits on CPUs without VNNI (AVX2 hosts:
    # 0.08 here; 1e-3 held on an AVX-512 VNNI host). The validation record above is the float-compute check.
    assert np.abs(results[0] - results[1]).max() < 0.25
    assert results[0].argmax() == results[1].argmax()
