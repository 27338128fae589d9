"""The ONNX Runtime CPU flavour of a decoder graph: attention as two matrix-vector products.

The portable graph (export/graph.py) runs attention with the standard
`Attention` op over a [batch, kv_heads, capacity, head_dim] cache, the layout
TensorRT and fused GPU kernels expect. ONNX Runtime's CPU kernel for that op
reads the cache at a third to a quarter of memory bandwidth at decode (one
granite-4.0-1b layer, batch 8 x 8192 keys: 39 ms where reading K, V and the
weights once takes 9.4 ms; bench/bench_attention.py): it runs one small GEMM
per query head and packs K for each.

This flavour stores K and V head-dim-major, [batch, kv_heads, head_dim,
capacity], and writes the attention as

    scores[b, h, g, s, :] = q[b, h, g, s, :] @ K[b, h]        (M=1 GEMV per query head at decode)
    out[b, h, :, (g, s)]  = V[b, h] @ softmax(scores)^T       (K read once for the whole group)

so both products stream the cache once per KV head (19.6 ms in the same
measurement). Everything else, weights included, is the portable graph
node for node: the rewrite loads it without its external data and writes a
second graph file that points at the same data file, so the flavour costs a
few hundred KB on disk.

Only float32-activation graphs get this flavour (fp32 and weight-only int8/int4):
half-precision graphs are for GPUs.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ..manifest import DECODER_CPU, GraphRecord, tensor_records
from .io_spec import CACHE_CAPACITY, CPU_CACHE_LAYOUT, PAST_PREFIX, graph_io, is_kv_name, state_records

CPU_GRAPH_FILE = "model.cpu.onnx"


class CpuGraphError(ValueError):
    pass


def derive_cpu_graph(src: Path, num_heads: int, out_name: str = CPU_GRAPH_FILE) -> Path:
    """Write the CPU flavour of the decoder graph at src next to it; returns its path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    kv_inputs = {i.name for i in graph.input if is_kv_name(i.name) and i.name.startswith(PAST_PREFIX)}
    if not kv_inputs:
        raise CpuGraphError(f"{src}: no {PAST_PREFIX}*.key/value inputs")

    def is_kv(name):
        return name in kv_inputs or is_kv_name(name)

    src_shapes = {}
    for value in (*graph.input, *graph.output):
        if not is_kv(value.name):
            continue
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type != TensorProto.FLOAT:
            raise CpuGraphError(f"{src}: {value.name} is {TensorProto.DataType.Name(tensor_type.elem_type)}; the "
                                "CPU flavour is made for float32-activation graphs only")
        shape = [d.dim_value or d.dim_param for d in tensor_type.shape.dim]
        if len(shape) != 4 or shape[2] != CACHE_CAPACITY:
            raise CpuGraphError(f"{src}: {value.name} has shape {shape}, expected "
                                f"[batch, kv_heads, {CACHE_CAPACITY}, head_dim]")
        src_shapes[value.name] = shape
        batch, kv_heads, capacity, head_dim = shape
        value.type.CopyFrom(helper.make_tensor_type_proto(TensorProto.FLOAT, [batch, kv_heads, head_dim, capacity]))

    nodes = list(graph.node)
    producers = {o: n for n in nodes for o in n.output}
    # The layout changes under every reader of the cache: only the rewritten nodes may read it.
    for n in nodes:
        for name in n.input:
            if name in kv_inputs and n.op_type not in ("TensorScatter", "Shape"):
                raise CpuGraphError(f"{src}: {n.op_type} node {n.name} reads {name}; the rewrite knows only "
                                    "TensorScatter and Shape readers of the cache")
    attention = [n for n in nodes if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    if not attention:
        raise CpuGraphError(f"{src}: no Attention nodes to rewrite")

    new_inits = []

    def const(name, value, dtype=np.int64):
        new_inits.append(numpy_helper.from_array(np.asarray(value, dtype), f"cpu_flavour/{name}"))
        return new_inits[-1].name

    # The capacity moves from axis 2 to axis 3: patch the graph's one Shape(start=2, end=3) of a cache input.
    capacity_1d = None
    for n in nodes:
        if n.op_type == "Shape" and n.input[0] in kv_inputs:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if attrs.get("start") != 2 or attrs.get("end") != 3:
                raise CpuGraphError(f"{src}: node {n.name} reads the cache shape other than as Shape(start=2, end=3); "
                                    "re-export the artifact with this version")
            del n.attribute[:]
            n.attribute.extend([helper.make_attribute("start", 3), helper.make_attribute("end", 4)])
            capacity_1d = n.output[0]
    if capacity_1d is None:
        raise CpuGraphError(f"{src}: no Shape node reads the cache capacity; re-export the artifact with this version")

    replacement: dict[int, list] = {}  # id(node) -> nodes that replace it
    mask5 = None
    for att in attention:
        q, present_k, present_v, mask = list(att.input)[:4]
        scale = next((helper.get_attribute_value(a) for a in att.attribute if a.name == "scale"), None)
        for name in (present_k, present_v):
            writer = producers.get(name)
            if writer is None or writer.op_type != "TensorScatter":
                raise CpuGraphError(f"{src}: {att.name} reads {name}, which no TensorScatter writes")
        past_k = producers[present_k].input[0]
        _, kv_heads, _, head_dim = src_shapes[past_k]
        if num_heads % kv_heads:
            raise CpuGraphError(f"{src}: num_heads {num_heads} is not a multiple of kv_heads {kv_heads}")
        group = num_heads // kv_heads
        if scale is None:
            scale = 1.0 / np.sqrt(head_dim)
        p = att.name
        # Cache writes: the new K/V [B, kvH, S, D] go in transposed, along the last axis.
        for name in (present_k, present_v):
            w = producers[name]
            t = f"{w.name}/transposed_update"
            replacement[id(w)] = [
                helper.make_node("Transpose", [w.input[1]], [t], name=t, perm=[0, 1, 3, 2]),
                helper.make_node("TensorScatter", [w.input[0], t, w.input[2]], list(w.output), name=w.name, axis=-1),
            ]
        out = []
        if mask5 is None:  # one shared [B, 1, 1, S, cap] mask and P reshape target for all layers
            mask5 = "cpu_flavour/mask5"
            p4_shape = "cpu_flavour/p4_shape"
            out += [helper.make_node("Unsqueeze", [mask, const("axes_2", [2])], [mask5], name=mask5),
                    helper.make_node("Concat", [const("p4_head", [0, 0, -1]), capacity_1d], [p4_shape],
                                     name=p4_shape, axis=0)]
        out += [
            helper.make_node("Mul", [q, const(f"{p}/scale", scale, np.float32)], [f"{p}/q_scaled"], name=f"{p}/q_scaled"),
            helper.make_node("Reshape", [f"{p}/q_scaled", const("q5_shape", [0, kv_heads, group, -1, head_dim])],
                             [f"{p}/q5"], name=f"{p}/q5"),  # [B, kvH, G, S, D]
            helper.make_node("Unsqueeze", [present_k, const("axes_2", [2])], [f"{p}/k5"], name=f"{p}/k5"),
            helper.make_node("MatMul", [f"{p}/q5", f"{p}/k5"], [f"{p}/scores"], name=f"{p}/scores"),
            helper.make_node("Where", [mask5, f"{p}/scores", const("minus_inf", -np.inf, np.float32)],
                             [f"{p}/scores_masked"], name=f"{p}/scores_masked"),
            helper.make_node("Softmax", [f"{p}/scores_masked"], [f"{p}/probs"], name=f"{p}/probs", axis=-1),
            helper.make_node("Reshape", [f"{p}/probs", p4_shape], [f"{p}/probs4"], name=f"{p}/probs4"),  # [B,kvH,G*S,cap]
            helper.make_node("Transpose", [f"{p}/probs4"], [f"{p}/probs_t"], name=f"{p}/probs_t", perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [present_v, f"{p}/probs_t"], [f"{p}/out_t"], name=f"{p}/out_t"),  # [B,kvH,D,G*S]
            helper.make_node("Reshape", [f"{p}/out_t", const("o5_shape", [0, 0, 0, group, -1])], [f"{p}/out5"],
                             name=f"{p}/out5"),
            helper.make_node("Transpose", [f"{p}/out5"], [f"{p}/out5_t"], name=f"{p}/out5_t", perm=[0, 1, 3, 4, 2]),
            helper.make_node("Reshape", [f"{p}/out5_t", const("y_shape", [0, num_heads, -1, head_dim])],
                             list(att.output)[:1], name=f"{p}/y"),
        ]
        replacement[id(att)] = out

    new_nodes = []
    for n in nodes:
        new_nodes.extend(replacement.get(id(n), [n]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    seen = {i.name for i in graph.initializer}
    graph.initializer.extend(t for t in {t.name: t for t in new_inits}.values() if t.name not in seen)
    graph.name = graph.name + "_cpu"
    out_path = src.parent / out_name
    onnx.save_model(model, str(out_path))
    return out_path


def cpu_graph_record(portable: GraphRecord, cpu_path: Path, arch, validation: dict | None = None) -> GraphRecord:
    """The manifest entry of the CPU flavour: the portable graph's record with its own file and KV layout."""
    inputs, outputs = graph_io(arch, cache_dtype="float32", head_dim_major=True)
    return dataclasses.replace(
        portable,
        name=DECODER_CPU,
        file=cpu_path.name,
        derived_from=portable.name,
        engines=("onnxruntime",),
        extra=MappingProxyType({**portable.extra, "for": "ONNX Runtime CPUExecutionProvider (attention as "
                                "MatMul/Softmax over a head-dim-major cache)"}),
        inputs=tensor_records(inputs),
        outputs=tensor_records(outputs),
        kv_cache=MappingProxyType(dict(CPU_CACHE_LAYOUT)),
        state=state_records(arch, "float32", head_dim_major=True),
        validation=MappingProxyType(dict(validation)) if validation is not None else portable.validation,
    )


# fp32 graphs that differ only in how attention is computed agree to float rounding.
PARITY_MAX_ABS_DIFF = 1e-3


# Node-name suffix of export/quantize.py's int8-dynamic GEMM chains, which to_float_compute finds by name.
DYNAMIC_GEMM = "/dyn8"


def to_float_compute(model) -> bool:
    """Make a quantized graph compute in float where it rounds its activations, in place; True if it did.

    MatMulNBits goes to accuracy_level 0; each int8-dynamic GEMM (export/quantize.py
    `_matmuls_to_dynamic`: x -> per-row uint8 -> MatMulInteger -> row scale -> * weight scale) becomes
    MatMul(x, float(Wq)) * weight scale. The weights stay the quantized ones: two graphs derived from
    each other then differ only by float rounding, which per-row activation rounding would amplify."""
    from onnx import TensorProto, helper

    changed = False
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level" and a.i != 0:
                    a.i, changed = 0, True
    nodes = {n.name: n for n in model.graph.node}
    rewritten = []
    for n in model.graph.node:
        if not (n.op_type == "MatMulInteger" and n.name.endswith(f"{DYNAMIC_GEMM}/gemm")):
            rewritten.append(n)
            continue
        p = n.name[: -len("/gemm")]
        x, wq = nodes[f"{p}/abs"].input[0], n.input[1]
        rewritten += [helper.make_node("Cast", [wq], [f"{p}/w_float"], name=f"{p}/w_float", to=TensorProto.FLOAT),
                      helper.make_node("MatMul", [x, f"{p}/w_float"], [f"{p}/acc"], name=f"{p}/float_gemm")]
        # The row scale (DequantizeLinear of the int32 accumulators) goes: x was never rounded.
        nodes[f"{p}/row_scaled"].CopyFrom(helper.make_node("Identity", [f"{p}/acc"], [f"{p}/row_scaled"],
                                                           name=f"{p}/row_scaled"))
        changed = True
    model.graph.ClearField("node")
    model.graph.node.extend(rewritten)
    return changed


def float_check_session(path: Path):
    """An ONNX Runtime CPU session for the float-compute checks: Q/DQ weights stay float too (ONNX
    Runtime otherwise fuses them into MatMulNBits at accuracy level 4, which rounds activations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextmanager
def float_compute_copy(path: Path):
    """The graph at path, or a temporary copy next to it computing in float (cpu_graph.to_float_compute)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if not to_float_compute(model):
        yield path, False
        return
    run_path = path.parent / f".check-{path.name}"
    onnx.save_model(model, str(run_path))
    try:
        yield run_path, True
    finally:
        run_path.unlink(missing_ok=True)


def check_against_portable(portable: Path, cpu: Path, arch, prompt_lens=(5, 19), decode_steps: int = 8,
                           seed: int = 0) -> dict:
    """Run both graphs on the same random tokens (prefill + decode through the cache); the manifest record.

    Used where no PyTorch reference is at hand (quantized artifacts): the CPU flavour must compute
    what the graph it was derived from computes. MatMulNBits with accuracy_level 4 rounds its
    activations to int8 per block, which turns the graphs' float-rounding differences in attention
    into differences of ~0.1 in logits; so this check runs copies of both graphs with
    accuracy_level 0 (float compute), where they must agree to float rounding. The same holds for
    Q/DQ graphs, which ONNX Runtime fuses into MatMulNBits at accuracy level 4 by default
    (float_check_session; on a trained model the two graphs differed by 0.063 in logits without it).
    """
    from .validate import run_graph_teacher_forced

    rng = np.random.default_rng(seed)
    sequences = [rng.integers(0, arch.vocab_size, n + decode_steps + 1).tolist() for n in prompt_lens]
    logits, float_compute = [], False
    for path, head_dim_major in ((portable, False), (cpu, True)):
        with float_compute_copy(path) as (run_path, changed):  # a copy next to it: external data resolves
            float_compute |= changed
            session = float_check_session(run_path)
            logits.append(run_graph_teacher_forced(session, arch, sequences, list(prompt_lens),
                                                   head_dim_major=head_dim_major))
            del session
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(*logits))
    agree = float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(*logits)])))
    record = {
        "reference": "the decoder graph it was derived from (ONNX Runtime CPU), random tokens",
        "prompt_lengths": list(prompt_lens),
        "decode_steps": decode_steps,
        "max_abs_logit_diff": max_diff,
        "argmax_agreement": agree,
        "tolerance": {"max_abs_diff": PARITY_MAX_ABS_DIFF},
        "passed": bool(max_diff <= PARITY_MAX_ABS_DIFF),
    }
    if float_compute:
        record["note"] = ("both graphs ran with float compute (MatMulNBits accuracy_level 0, int8-dynamic GEMMs "
                          "as float MatMuls over the same int8 weights) for this check, so that they differ "
                          "only in attention")
    return record
