"""Graph fusions for the ONNX Runtime CPU flavour only (`decoder_cpu`; com.microsoft ops allowed).

The portable graph stays standard ONNX (TensorRT reads it); these passes are meant to run
where the CPU flavour is derived from it (export/cpu_graph.py), on the graph without its
external data (no weight is
touched, so the flavour keeps sharing the portable graph's data file).

* `fuse_skip_rmsnorm`: `Add(residual, branch)` followed by `RMSNormalization` of the sum
  becomes one `SkipSimplifiedLayerNormalization` whose fourth output is the sum, so the
  residual stream is read once per layer boundary instead of twice and two kernel
  launches become one (ONNX Runtime's own transformer optimizer makes the same fusion,
  but not from the opset-23 `RMSNormalization` op the exporter writes).
"""

from __future__ import annotations

MS_DOMAIN = "com.microsoft"


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fuse_skip_rmsnorm(model) -> int:
    """Rewrite Add -> RMSNormalization pairs in place; returns how many were fused.

    A pair qualifies when the Add has two float inputs of the same shape as its output
    (no broadcasting: the fused kernel adds element-wise), the norm reads the Add's
    output as its input over the last axis with a constant scale and no stash_type
    other than float. The Add's output keeps its name (as output 3), so every other
    reader of the residual stream is unchanged."""
    from onnx import helper

    graph = model.graph
    nodes = list(graph.node)
    producers = {o: n for n in nodes for o in n.output}
    initializers = {t.name for t in graph.initializer}
    shapes = {}
    for v in (*graph.input, *graph.value_info, *graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = tuple(d.dim_value or d.dim_param or None for d in dims) if dims else None

    replace, drop = {}, set()
    for norm in nodes:
        if norm.op_type != "RMSNormalization" or norm.domain not in ("", "ai.onnx") or len(norm.input) < 2:
            continue
        add = producers.get(norm.input[0])
        if add is None or add.op_type != "Add" or id(add) in drop or len(add.input) != 2:
            continue
        a = _attrs(norm)
        if a.get("axis", -1) != -1 or a.get("stash_type", 1) != 1 or norm.input[1] not in initializers:
            continue
        # Both operands must come from nodes (activations), not broadcast constants.
        if any(x in initializers or x not in producers for x in add.input):
            continue
        x_shape, y_shape = shapes.get(add.input[0]), shapes.get(add.input[1])
        if x_shape is not None and y_shape is not None and x_shape != y_shape:
            continue
        fused = helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0]],
            name=f"{norm.name}/skip_fused",
            domain=MS_DOMAIN,
            epsilon=float(a.get("epsilon", 1e-5)),
        )
        replace[id(add)] = fused  # at the Add's place: every reader of the sum comes after it
        drop.add(id(norm))

    if not replace:
        return 0
    new_nodes = []
    for n in nodes:
        if id(n) in drop:
            continue
        new_nodes.append(replace.get(id(n), n))
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(replace)


def apply_cpu_fusions(model, skip_rmsnorm: bool = False) -> dict:
    """The CPU-flavour passes, in order; returns {pass name: what it changed} for the record.

    Not hooked into export/cpu_graph.py yet: an interleaved A/B of skip_rmsnorm on a
    full-width 4-layer slice showed no step-time change outside this shared host's noise
    (README, performance section), so there is no measured reason to change the flavour."""
    record = {}
    if skip_rmsnorm:
        record["skip_rmsnorm"] = fuse_skip_rmsnorm(model)
    return record
