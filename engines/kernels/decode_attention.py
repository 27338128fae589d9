"""Pointing the graph's decode attention at DecodeAttention (decode_attention.h).

Each eligible com.microsoft.GroupQueryAttention (fp32 cache, no rotary, softcap, local window or smooth
softmax; the seven inputs query, key, value, past key and value, seqlens_k, total_sequence_length) becomes

    If(Shape(query)[1] == 1, then: DecodeAttention(same inputs), else: the GroupQueryAttention)

so one-token rows (decode) stream the cache once and prompt chunks keep ONNX Runtime's kernel. The
nodes may sit in subgraphs (the ragged graph's attention is inside its groups' Ifs); the two constants
live in the main graph, where every subgraph sees them.
"""

from __future__ import annotations

OP = "DecodeAttention"
ONE = "granite_kernels/one"  # int64 scalar 1: the sequence axis of the query, and one token
_UNSUPPORTED = {"do_rotary": 0, "softcap": 0.0, "local_window_size": -1, "smooth_softmax": 0}


def _float_inputs(model) -> set[str]:
    from onnx import TensorProto

    return {i.name for i in model.graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}


def eligible(node, float_inputs: set[str]) -> bool:
    from onnx import helper

    if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
        return False
    if len(node.input) != 7 or not all(node.input) or len(node.output) != 3:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if set(attrs) - {"num_heads", "kv_num_heads", "scale", "rotary_interleaved", *_UNSUPPORTED}:
        return False
    if any(attrs.get(name, default) != default for name, default in _UNSUPPORTED.items()):
        return False
    return node.input[3] in float_inputs and node.input[4] in float_inputs  # the cache: fp32 graph inputs


def rewrite(model, domain: str) -> int:
    """Wrap every eligible GroupQueryAttention of model (in place, subgraphs too); returns how many."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    float_inputs = _float_inputs(model)
    count = 0

    def visit(graph) -> None:
        nonlocal count
        nodes = []
        for node in graph.node:
            for a in node.attribute:
                if a.type == a.GRAPH:
                    visit(a.g)
                for g in a.graphs:
                    visit(g)
            if not eligible(node, float_inputs):
                nodes.append(node)
                continue
            count += 1
            p = f"{node.name or node.output[0]}/decode"
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            ours = helper.make_node(OP, list(node.input), [f"{p}/y{i}" for i in range(3)], name=f"{p}/{OP}",
                                    domain=domain, num_heads=attrs["num_heads"], kv_num_heads=attrs["kv_num_heads"],
                                    scale=float(attrs.get("scale", 0.0)))
            theirs = helper.make_node(node.op_type, list(node.input), [f"{p}/ort_y{i}" for i in range(3)],
                                      name=f"{p}/GroupQueryAttention", domain=node.domain)
            theirs.attribute.extend(node.attribute)

            def branch(name, inner):
                return helper.make_graph([inner], name, [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                             for o in inner.output])

            nodes += [
                helper.make_node("Shape", [node.input[0]], [f"{p}/shape"], name=f"{p}/shape"),
                helper.make_node("Gather", [f"{p}/shape", ONE], [f"{p}/tokens"], name=f"{p}/tokens", axis=0),
                helper.make_node("Equal", [f"{p}/tokens", ONE], [f"{p}/one_token"], name=f"{p}/one_token"),
                helper.make_node("If", [f"{p}/one_token"], list(node.output), name=f"{p}/if",
                                 then_branch=branch(f"{p}/then", ours), else_branch=branch(f"{p}/else", theirs)),
            ]
        del graph.node[:]
        graph.node.extend(nodes)

    visit(model.graph)
    if count and ONE not in {t.name for t in model.graph.initializer}:
        model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), ONE))
    return count
