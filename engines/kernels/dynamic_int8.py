"""Finding export/quantize.py's per-row dynamic int8 GEMMs (`quantize --int8`) in a graph, for MatMulQ8Dynamic.

Each is ten nodes around one MatMulInteger (quantize.py `_matmuls_to_dynamic` writes them):

    s  = Mul(Max(ReduceMax(Abs(x), axes=[-1], keepdims=1), eps), inv127)
    xq = QuantizeLinear(x, s, ConstantOfShape(Shape(s), 128), axis=-1, block_size=K)
    y  = Mul(DequantizeLinear(MatMulInteger(xq, W_int8 [K, N], 128), s, axis=-1), w_scale [N])

Matched by structure and constants, not by node names; any intermediate used outside the ten, or
a constant that differs (zero points other than 128; weights outside +-64, which the AVX2 path's
int16 pair sums need, checked when they are read to be tiled), leaves the GEMM to ONNX Runtime.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

WEIGHT_LIMIT = 64  # 2 * 255 * 64 fits vpmaddubsw's int16; quantize.py writes |w| <= 63


@dataclass
class DynamicGemm:
    nodes: list  # the ten nodes it replaces, the output Mul last
    x: str
    weight: str  # int8 [K, N] initializer
    weight_scale: str  # fp32 [N] initializer
    output: str
    k: int
    n: int
    eps: float
    inv127: float


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def find(graph, tensors: dict, constant) -> list[DynamicGemm]:
    """The main graph's dynamic int8 GEMMs. tensors: the initializers by name (the weights are checked
    by type and shape only: their values are read once, to tile them, and checked there); constant(name):
    a small initializer's array, or None."""
    from onnx import TensorProto

    producer = {o: n for n in graph.node for o in n.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in graph.output}

    def made_by(name, op_type, inputs=None):
        node = producer.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            return None
        return node if inputs is None or len(node.input) == inputs else None

    def scalar(name, dtype):
        value = constant(name)
        return value.reshape(()).item() if value is not None and value.dtype == dtype and value.size == 1 else None

    found = []
    for gemm in graph.node:
        if gemm.op_type != "MatMulInteger" or len(gemm.input) != 3:
            continue
        w = tensors.get(gemm.input[1])
        if w is None or w.data_type != TensorProto.INT8 or len(w.dims) != 2 or scalar(gemm.input[2], np.uint8) != 128:
            continue
        k, n = w.dims
        xq = made_by(gemm.input[0], "QuantizeLinear", 3)
        if xq is None or _attrs(xq).get("axis") != -1 or _attrs(xq).get("block_size") != k:
            continue
        x, s, x_zero = xq.input
        scale = made_by(s, "Mul", 2)
        if scale is None:
            continue
        inv127 = [scalar(i, np.float32) for i in scale.input]
        j = 1 if inv127[1] is not None else 0
        floor = made_by(scale.input[1 - j], "Max", 2)
        if inv127[j] is None or floor is None:
            continue
        eps = [scalar(i, np.float32) for i in floor.input]
        e = 1 if eps[1] is not None else 0
        absmax = made_by(floor.input[1 - e], "ReduceMax")
        if eps[e] is None or absmax is None or _attrs(absmax).get("keepdims", 1) != 1:
            continue
        axes = constant(absmax.input[1]) if len(absmax.input) > 1 else None
        absx = made_by(absmax.input[0], "Abs", 1)
        if axes is None or axes.tolist() != [-1] or absx is None or absx.input[0] != x:
            continue
        zeros = made_by(x_zero, "ConstantOfShape", 1)
        shape = made_by(zeros.input[0], "Shape", 1) if zeros is not None else None
        fill = _attrs(zeros).get("value") if zeros is not None else None
        if shape is None or shape.input[0] != s or fill is None or fill.data_type != 2 or \
                np.frombuffer(fill.raw_data, np.uint8).tolist() != [128]:
            continue
        users = consumers[gemm.output[0]]
        dq = users[0] if len(users) == 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or list(dq.input) != [gemm.output[0], s] or \
                _attrs(dq).get("axis", 1) != -1:
            continue
        users = consumers[dq.output[0]]
        out = users[0] if len(users) == 1 and users[0].op_type == "Mul" else None
        if out is None:
            continue
        ws_name = out.input[1] if out.input[0] == dq.output[0] else out.input[0]
        ws = tensors.get(ws_name)
        if ws is None or ws.data_type != TensorProto.FLOAT or int(np.prod(ws.dims)) != n or dq.output[0] not in out.input:
            continue
        nodes = [absx, absmax, floor, scale, shape, zeros, xq, gemm, dq, out]
        inside = {id(node) for node in nodes}
        inner = [o for node in nodes[:-1] for o in node.output]
        if any(o in outputs or any(id(c) not in inside for c in consumers[o]) for o in inner):
            continue
        found.append(DynamicGemm(nodes, x, gemm.input[1], ws_name, out.output[0], int(k), int(n),
                                 float(eps[e]), float(inv127[j])))
    return found
