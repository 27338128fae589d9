"""CPU-flavour graph fusions (export/cpu_fusions.py): what they fuse, and that logits do not move."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
from onnx import TensorProto, helper

from granite_deploy.engines import Chunk
from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
from granite_deploy.export.cpu_fusions import fuse_skip_rmsnorm


def greedy(engine, prompt, steps):
    engine.reserve(0)
    logits = [engine.step([Chunk(0, tuple(prompt), 0)])[0]]
    tokens = [int(np.argmax(logits[-1]))]
    for i in range(steps - 1):
        logits.append(engine.step([Chunk(0, (tokens[-1],), len(prompt) + i)])[0])
        tokens.append(int(np.argmax(logits[-1])))
    engine.release(0)
    return tokens, np.stack(logits)


def test_skip_rmsnorm_fusion_keeps_greedy_tokens_and_logits(tiny_fp32_artifact, tmp_path):
    fused_dir = tmp_path / "fused"
    shutil.copytree(tiny_fp32_artifact, fused_dir)
    model = onnx.load(str(fused_dir / "model.cpu.onnx"), load_external_data=False)
    layers = sum(1 for n in model.graph.node if n.op_type == "RMSNormalization") // 2
    # every layer boundary but the last (a Slice sits between the last Add and the final norm)
    assert fuse_skip_rmsnorm(model) == 2 * layers - 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers - 1
    assert ops.count("RMSNormalization") == 2 * layers + 1 - (2 * layers - 1)
    onnx.save_model(model, str(fused_dir / "model.cpu.onnx"))

    prompt = [5, 17, 33, 2, 41, 9, 12]
    plain_tokens, plain_logits = greedy(OnnxRuntimeEngine(tiny_fp32_artifact, max_batch=2, threads=1), prompt, 12)
    fused_tokens, fused_logits = greedy(OnnxRuntimeEngine(fused_dir, max_batch=2, threads=1), prompt, 12)
    assert fused_tokens == plain_tokens
    assert np.abs(fused_logits - plain_logits).max() < 1e-4


def test_a_broadcast_add_is_not_fused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Add", ["r", "bias"], ["s"]),  # a constant operand: not a residual add
         helper.make_node("RMSNormalization", ["s", "gamma"], ["y"], axis=-1, epsilon=1e-5)],
        "g", [x], [y],
        initializer=[helper.make_tensor("bias", TensorProto.FLOAT, [8], [0.5] * 8),
                     helper.make_tensor("gamma", TensorProto.FLOAT, [8], [1.0] * 8)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    assert fuse_skip_rmsnorm(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Relu", "Add", "RMSNormalization"]
