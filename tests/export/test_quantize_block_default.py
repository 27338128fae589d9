"""quantize's default block size per method (no model needed)."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from granite_deploy.export.quantize import DEFAULT_BLOCK_SIZE, default_block_size


def _graph(*ks):
    nodes, inits = [], []
    for i, k in enumerate(ks):
        inits.append(numpy_helper.from_array(np.zeros((k, 8), np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
    inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, k]) for i, k in enumerate(ks)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 8]) for i in range(len(ks))]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=inits))


def test_int8_takes_128_only_where_every_k_divides():
    assert default_block_size(_graph(2048, 4096), "int8") == 128
    assert default_block_size(_graph(2048, 96), "int8") == DEFAULT_BLOCK_SIZE  # the tiny test models' MLP
    assert default_block_size(_graph(64), "int8") == DEFAULT_BLOCK_SIZE


def test_int4_keeps_32():
    assert default_block_size(_graph(2048, 4096), "int4") == DEFAULT_BLOCK_SIZE == 32
