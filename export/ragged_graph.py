"""The ragged-step flavour of the CPU graph: every chunk of a scheduler step in one call.

`decoder_ragged` (docs/ragged-step.md is the contract) is derived from
`decoder_cpu` (export/cpu_graph.py) by rewriting nodes only: it is loaded
without its external data and written as a second graph file pointing at the
same data file, so fp32 and weight-only int8/int4 (MatMulNBits) graphs get it
unchanged, for a few hundred KB on disk.

A step of T tokens runs twice laid out:

- flat, [1, T]: the embedding, every norm, every weight MatMul (or
  MatMulNBits), RoPE (from `position_ids` [1, T]), the Mamba in/out
  projections, gating and the head; each weight is read once per step.
- padded, per group g (two groups, each a contiguous range of cache rows,
  [rows_g, width_g] slots): attention and the Mamba2 conv + SSD scan, the
  parts that mix tokens of one sequence. `group{g}.token_index` gathers the
  flat tokens into slots, `unpad_index` gathers the slots back.

Attention per group is ONNX Runtime's GroupQueryAttention (com.microsoft) over
a [rows, kv_heads, capacity, head_dim] cache (the portable layout, not
decoder_cpu's head-dim-major one): it writes the step's K and V in place (past
and present bound to one buffer) at `group{g}.position_ids[:, 0]` onward and
attends each row up to its chunk's end only, where decoder_cpu's MatMul form
reads the whole capacity (1B int4 on a 2-core EPYC, interleaved A/B, 3 rounds:
prefill 1024 43.4 -> 48.6 tok/s, decode b8 33.4 -> 36.9, b1 17.1 -> 17.5, peak RSS
2.14 -> 1.79 GiB: no [rows, heads, width, capacity] score tensors).
GroupQueryAttention refuses several rows of several tokens with a cache, so such a group (concurrent prompt chunks, batched
speculative verification) takes a fallback inside the same If: TensorScatter
writes (axis 2) and MatMul/Softmax under the mask `key position <=
group{g}.position_ids`. RoPE runs on the flat layout (RotaryEmbedding's 3D
form). Mamba per group:
padding slots (j >= `group{g}.lengths[r]`) get dt = 0, so the SSM state does
not move through them, and the conv state written back is the K inputs ending
at the row's real chunk end (GatherElements on the [old window | chunk]
concatenation), so an idle row (length 0) keeps conv and ssm state exactly.
The Mamba causal masks come from the group's width. Each group's conv + scan
(about 45 nodes), like its attention, sits in an If on rows_g > 0 (for attention
also because GroupQueryAttention fails on zero rows), so an empty group costs one node
per Mamba layer (ONNX Runtime writes an If's outputs straight into the bound
output buffers: no copy of the ssm state); the conv state write stays outside.

The head gathers the hidden states at `logits_index` before the final norm;
`num_logits_to_keep` is gone. Group 0's state tensors keep decoder_cpu's
names, group 1's are `group1.past_key_values.{i}.*` / `group1.present.{i}.*`
(granite_deploy.manifest.ragged_state_name).

Empty groups: rows_g = 0 (state inputs [0, ...], token_index [0, width_g],
lengths [0]) runs in ONNX Runtime 1.32's CPU provider and leaves the other
group's results unchanged (tests/export/test_ragged_graph.py checks it), so
engines bind an unused group as zero rows. width_g must stay >= 1 even then:
a [0, 0] token_index fails (the write-index Gather reads column 0).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ..errors import GraniteDeployError
from ..manifest import (
    DECODER_CPU,
    DECODER_RAGGED,
    RAGGED_GROUPS,
    GraphRecord,
    ragged_state_name,
    tensor_records,
)
from .cpu_graph import float_check_session, float_compute_copy
from .io_spec import (
    INPUT_IDS,
    LOGITS,
    LOGITS_INDEX,
    NUM_LOGITS_TO_KEEP,
    POSITION_IDS,
    RAGGED_CACHE_LAYOUT,
    UNPAD_INDEX,
    ragged_graph_io,
    ragged_group_input,
    state_names,
    state_records,
)

RAGGED_GRAPH_FILE = "model.ragged.onnx"
# The check at export compares fp32 logits of one ragged call with the same chunks run one by one.
PARITY_MAX_ABS_DIFF = 1e-3


class RaggedGraphError(GraniteDeployError, ValueError):
    pass


class _Builder:
    """New nodes and small constants of the rewrite (names under `ragged/`)."""

    def __init__(self):
        self.nodes = []
        self.inits = {}

    def const(self, name, value, dtype=np.int64):
        from onnx import numpy_helper

        full = f"ragged/c/{name}"
        if full not in self.inits:
            self.inits[full] = numpy_helper.from_array(np.asarray(value, dtype), full)
        return full

    def op(self, op_type, inputs, out, n_out=1, **attrs):
        from onnx import helper

        outs = [out] if n_out == 1 else [f"{out}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=out, **attrs))
        return out if n_out == 1 else outs


def derive_ragged_graph(cpu_graph_path: Path, arch, out_name: str = RAGGED_GRAPH_FILE) -> Path:
    """Write the ragged flavour of the decoder_cpu graph at cpu_graph_path next to it; returns its path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    src = Path(cpu_graph_path)
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    nodes = list(graph.node)
    producers = {o: n for n in nodes for o in n.output}
    by_name = {n.name: n for n in nodes}
    consumers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    a = arch
    kinds = list(a.layer_types or ("attention",) * a.num_layers)
    nH, kvH, D = a.num_heads, a.num_kv_heads, a.head_dim
    G = nH // kvH
    b = _Builder()
    c = b.const
    removed: set[int] = set()  # id() of nodes replaced by the rewrite (the rest become dead and are pruned)

    def produced_by(name, op_type, what):
        n = producers.get(name)
        if n is None or n.op_type != op_type:
            raise RaggedGraphError(f"{src}: {what}: expected {name!r} to come from a {op_type} node, got "
                                   f"{n.op_type if n is not None else 'a graph input or initializer'}; re-derive "
                                   "decoder_cpu with this version")
        return n

    def only_consumer(name, op_type, what):
        users = consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type:
            raise RaggedGraphError(f"{src}: {what}: expected {name!r} to be read by one {op_type} node, got "
                                   f"{[u.op_type for u in users]}")
        return users[0]

    def gname(name, g):
        return ragged_state_name(name, g)

    # --- per-group index tensors, shared by every layer ------------------------------------------------
    tok = [ragged_group_input(g, "token_index") for g in range(RAGGED_GROUPS)]
    gpos = [ragged_group_input(g, "position_ids") for g in range(RAGGED_GROUPS)]
    glen = [ragged_group_input(g, "lengths") for g in range(RAGGED_GROUPS)]
    # unpad gather index as [1, T], so the gather back lands at [1, T, features] directly
    unpad_2d = b.op("Unsqueeze", [UNPAD_INDEX, c("axes_0", [0])], "ragged/unpad_2d")
    shared: list[dict] = []
    attention_layers = [i for i, k in enumerate(kinds) if k == "attention"]
    mamba_layers = [i for i, k in enumerate(kinds) if k == "mamba"]
    for g in range(RAGGED_GROUPS):
        p = f"ragged/group{g}"
        s = {}
        rw = b.op("Shape", [tok[g]], f"{p}/rw")  # [R, W]
        s["R"] = b.op("Gather", [rw, c("idx0_1d", [0])], f"{p}/R", axis=0)  # [1]
        s["W"] = b.op("Gather", [rw, c("idx1_1d", [1])], f"{p}/W", axis=0)  # [1]
        s["W0"] = b.op("Squeeze", [s["W"], c("axes_0", [0])], f"{p}/W0")  # scalar
        s["RW"] = b.op("Mul", [s["R"], s["W"]], f"{p}/RW")
        s["nonempty"] = b.op("Squeeze", [b.op("Greater", [s["R"], c("zero_1d", [0])], f"{p}/nonempty_1d"),
                                         c("axes_0", [0])], f"{p}/nonempty")  # scalar bool: rows_g > 0
        if attention_layers:
            first_k = gname(state_names(attention_layers[0], "key")[0], g)
            cap = b.op("Shape", [first_k], f"{p}/capacity", start=2, end=3)  # [1]
            cap0 = b.op("Squeeze", [cap, c("axes_0", [0])], f"{p}/capacity0")
            # GroupQueryAttention: row r's chunk ends at position seqlens_k[r] = group position_ids[r, W-1]
            # (padding included: its writes land past the row's length, as the fallback's do); a total
            # length of `capacity` keeps it out of first-prompt mode, so past = seqlens_k + 1 - W per row.
            last = b.op("Sub", [s["W0"], c("one", 1)], f"{p}/last_slot")
            s["seqlens_k"] = b.op("Cast", [b.op("Gather", [gpos[g], last], f"{p}/chunk_end", axis=1)],
                                  f"{p}/seqlens_k", to=TensorProto.INT32)  # [R]
            s["total"] = b.op("Cast", [cap0], f"{p}/total_len", to=TensorProto.INT32)
            # GroupQueryAttention takes W > 1 with a cache only for one row: other groups take the fallback
            one_row = b.op("Equal", [s["R"], c("one_1d", [1])], f"{p}/one_row")
            one_slot = b.op("Equal", [s["W"], c("one_1d", [1])], f"{p}/one_slot")
            s["gqa"] = b.op("Squeeze", [b.op("Or", [one_row, one_slot], f"{p}/gqa_1d"), c("axes_0", [0])],
                            f"{p}/gqa")
            # the fallback: MatMul attention over the whole capacity under a mask
            kv_pos = b.op("Range", [c("zero", 0), cap0, c("one", 1)], f"{p}/kv_pos")  # [cap]
            q_pos = b.op("Unsqueeze", [gpos[g], c("axes_1_2_4", [1, 2, 4])], f"{p}/q_pos")  # [R, 1, 1, W, 1]
            s["mask"] = b.op("LessOrEqual", [kv_pos, q_pos], f"{p}/mask5")  # [R, 1, 1, W, cap]
            s["write"] = b.op("Gather", [gpos[g], c("zero", 0)], f"{p}/write_index", axis=1)  # [R]
            s["s5_shape"] = b.op("Concat", [s["R"], c("kvH_G", [kvH, G]), s["W"], cap], f"{p}/s5_shape", axis=0)
            s["p4_shape"] = b.op("Concat", [s["R"], c("kvH_any", [kvH, -1]), cap], f"{p}/p4_shape", axis=0)
            s["flat_shape"] = b.op("Concat", [s["RW"], c("nHD", [nH * D])], f"{p}/flat_shape", axis=0)
        if mamba_layers:
            m = a.mamba
            pos_w = b.op("Range", [c("zero", 0), s["W0"], c("one", 1)], f"{p}/slot")  # [W]
            rows = b.op("Unsqueeze", [pos_w, c("axes_neg1", [-1])], f"{p}/slot_col")
            s["causal_incl"] = b.op("LessOrEqual", [pos_w, rows], f"{p}/causal_incl")  # [W(i), W(j)]: j <= i
            s["causal_strict"] = b.op("Less", [pos_w, rows], f"{p}/causal_strict")
            len_col = b.op("Unsqueeze", [glen[g], c("axes_neg1", [-1])], f"{p}/len_col")  # [R, 1]
            s["valid"] = b.op("Unsqueeze", [b.op("Less", [pos_w, len_col], f"{p}/valid2"), c("axes_neg1", [-1])],
                              f"{p}/valid")  # [R, W, 1]: a real token (not padding)
            K, C = m["d_conv"], m["conv_dim"]
            win = b.op("Add", [b.op("Unsqueeze", [glen[g], c("axes_1_2", [1, 2])], f"{p}/len3"),
                               c("k_range", np.arange(K).reshape(1, 1, K))], f"{p}/conv_window_index3")
            s["conv_index"] = b.op("Expand", [win, b.op("Concat", [s["R"], c("C_K", [C, K])], f"{p}/conv_index_shape",
                                                        axis=0)], f"{p}/conv_index")  # [R, C, K]
            s["y_shape"] = b.op("Concat", [s["RW"], c("mamba_I", [m["intermediate"]])], f"{p}/mamba_y_shape", axis=0)
        shared.append(s)

    # --- attention layers ------------------------------------------------------------------------------
    inits = {t.name: t for t in graph.initializer}

    def heads_flat(name, what):
        """decoder_cpu's per-head tensor [1, heads, T, D] (after RoPE if the layer has it) -> the flat
        [1, T, heads*D] projection output it came from, and its RotaryEmbedding node (or None)."""
        rope = producers.get(name)
        if rope is not None and rope.op_type == "RotaryEmbedding":
            name = rope.input[0]
        else:
            rope = None
        split = produced_by(name, "Transpose", f"{what} heads")
        return produced_by(split.input[0], "Reshape", f"{what} head split").input[0], rope

    for i in attention_layers:
        (past_k, present_k), (past_v, present_v) = state_names(i, "key"), state_names(i, "value")
        tag = f"ragged/l{i}"
        flat = {}
        for part, present in (("key", present_k), ("value", present_v)):
            w = produced_by(present, "TensorScatter", f"layer {i} {part} write")
            t = produced_by(w.input[1], "Transpose", f"layer {i} {part} update")
            flat[part] = heads_flat(t.input[0], f"layer {i} {part}")
            removed.update((id(w), id(t)))
        k5 = only_consumer(present_k, "Unsqueeze", f"layer {i} keys")
        p = k5.name[: -len("/k5")]
        q_scaled = produced_by(f"{p}/q_scaled", "Mul", f"layer {i} query scale")
        flat["query"] = heads_flat(q_scaled.input[0], f"layer {i} query")
        if q_scaled.input[1] not in inits:
            raise RaggedGraphError(f"{src}: layer {i}: the query scale {q_scaled.input[1]!r} is not a constant")
        scale = float(numpy_helper.to_array(inits[q_scaled.input[1]]))
        y_node = by_name.get(f"{p}/y")
        if y_node is None or y_node.op_type != "Reshape":
            raise RaggedGraphError(f"{src}: layer {i}: no Reshape node {p}/y (decoder_cpu's attention output)")
        y_t = only_consumer(y_node.output[0], "Transpose", f"layer {i} attention output")
        merged = only_consumer(y_t.output[0], "Reshape", f"layer {i} head merge")
        removed.update((id(y_t), id(merged)))
        # flat [T, heads*D] q, k, v, RoPE applied on the flat layout (RotaryEmbedding's 3D form)
        x2 = {}
        for part, heads in (("query", nH), ("key", kvH), ("value", kvH)):
            x, rope = flat[part]
            if rope is not None:
                attrs = {at.name: helper.get_attribute_value(at) for at in rope.attribute}
                x = b.op("RotaryEmbedding", [x, *rope.input[1:]], f"{tag}/{part}_rope", **{**attrs, "num_heads": heads})
            x2[part] = b.op("Squeeze", [x, c("axes_0", [0])], f"{tag}/{part}2")
        outs = []
        for g in range(RAGGED_GROUPS):
            s, pg = shared[g], f"{tag}/g{g}"
            names = [f"{pg}/out_slots", gname(present_k, g), gname(present_v, g)]
            pk_in, pv_in = gname(past_k, g), gname(past_v, g)
            # GroupQueryAttention: writes this step's K/V into the cache in place (it sees past and
            # present as one buffer) and attends each row up to its own length only.
            start = len(b.nodes)
            slots = {part: b.op("Gather", [x2[part], tok[g]], f"{pg}/gqa_{part}_slots", axis=0)  # [R, W, F]
                     for part in ("query", "key", "value")}
            y, pk, pv = b.op("GroupQueryAttention", [slots["query"], slots["key"], slots["value"], pk_in, pv_in,
                                                     s["seqlens_k"], s["total"]], f"{pg}/gqa", n_out=3,
                             domain="com.microsoft", num_heads=nH, kv_num_heads=kvH, scale=scale)
            y = b.op("Reshape", [y, s["flat_shape"]], f"{pg}/gqa_out")  # [R*W, nH*D]
            gqa_nodes = b.nodes[start:]
            del b.nodes[start:]
            # Fallback (several rows of several slots): TensorScatter writes, MatMul attention under a mask
            q5 = b.op("Reshape", [b.op("Gather", [x2["query"], tok[g]], f"{pg}/q_slots", axis=0),
                                  c("q5_shape", [0, 0, kvH, G, D])], f"{pg}/q5")  # [R, W, kvH, G, D]
            q4 = b.op("Reshape", [b.op("Transpose", [q5], f"{pg}/q_t", perm=[0, 2, 3, 1, 4]),
                                  c("q4_shape", [0, kvH, -1, D])], f"{pg}/q4")  # [R, kvH, G*W, D]
            cache = {}
            for part, past, present in (("key", pk_in, pk), ("value", pv_in, pv)):
                upd = b.op("Reshape", [b.op("Gather", [x2[part], tok[g]], f"{pg}/{part}_slots", axis=0),
                                       c("kv4_shape", [0, 0, kvH, D])], f"{pg}/{part}4")
                upd = b.op("Transpose", [upd], f"{pg}/{part}_update", perm=[0, 2, 1, 3])  # [R, kvH, W, D]
                cache[part] = b.op("TensorScatter", [past, upd, s["write"]], f"{pg}/{part}_written", axis=2)
            scores = b.op("FusedMatMul", [q4, cache["key"]], f"{pg}/scores", domain="com.microsoft", transB=1,
                          alpha=scale)  # [R, kvH, G*W, cap]
            scores = b.op("Reshape", [scores, s["s5_shape"]], f"{pg}/scores5")  # [R, kvH, G, W, cap]
            scores = b.op("Where", [s["mask"], scores, c("minus_inf", -np.inf, np.float32)], f"{pg}/scores_masked")
            probs = b.op("Reshape", [b.op("Softmax", [scores], f"{pg}/probs", axis=-1), s["p4_shape"]],
                         f"{pg}/probs4")  # [R, kvH, G*W, cap]
            out = b.op("MatMul", [probs, cache["value"]], f"{pg}/out4")  # [R, kvH, G*W, D]
            out = b.op("Reshape", [out, c("o5_shape", [0, kvH, G, -1, D])], f"{pg}/out5")
            out = b.op("Transpose", [out], f"{pg}/out5_t", perm=[0, 3, 1, 2, 4])  # [R, W, kvH, G, D]
            out = b.op("Reshape", [out, s["flat_shape"]], f"{pg}/fallback_out")
            fallback_nodes = b.nodes[start:]
            del b.nodes[start:]
            inner = [f"{pg}/attention_out", f"{pg}/attention_key", f"{pg}/attention_value"]
            b.nodes.append(_if(s["gqa"], f"{pg}/if_gqa", inner, gqa_nodes, [y, pk, pv],
                               fallback_nodes, [out, cache["key"], cache["value"]]))
            # an empty group (rows_g = 0) keeps its state: GroupQueryAttention cannot take zero rows
            outs.append(_gate(b, len(b.nodes) - 1, s["nonempty"], pg, inner,
                              [np.zeros((0, nH * D), np.float32), pk_in, pv_in], names))
        slots = b.op("Concat", outs, f"{tag}/out_slots", axis=0)
        b.nodes.append(helper.make_node("Gather", [slots, unpad_2d], [merged.output[0]], name=f"{tag}/unpad", axis=0))

    # --- Mamba layers ----------------------------------------------------------------------------------
    for i in mamba_layers:
        m = a.mamba
        I, N, nh, hd, K, C = m["intermediate"], m["d_state"], m["heads"], m["head_dim"], m["d_conv"], m["conv_dim"]
        conv_in, conv_out = state_names(i, "conv")
        ssm_in, ssm_out = state_names(i, "ssm")
        cat = only_consumer(conv_in, "Concat", f"layer {i} conv window")
        mt = cat.output[0][: -len("/conv_window")]
        xbc = produced_by(cat.input[1], "Transpose", f"layer {i} conv input").input[0]  # [1, T, C]
        conv = next((n for n in consumers.get(cat.output[0], []) if n.op_type == "Conv"), None)
        if conv is None:
            raise RaggedGraphError(f"{src}: layer {i}: no Conv reads {cat.output[0]}")
        conv_attrs = {at.name: helper.get_attribute_value(at) for at in conv.attribute}
        dt = produced_by(f"{mt}/dt_t", "Transpose", f"layer {i} dt").input[0]  # [1, T, nh]
        A = produced_by(f"{mt}/a", "Mul", f"layer {i} a = dt A").input[1]
        Dskip = produced_by(f"{mt}/y_skip", "Mul", f"layer {i} skip").input[1]
        y3 = produced_by(f"{mt}/y3", "Reshape", f"layer {i} mixer output")
        removed.update((id(y3), id(producers[conv_out]), id(producers[ssm_out])))
        tag = f"ragged/l{i}"
        xbc2 = b.op("Squeeze", [xbc, c("axes_0", [0])], f"{tag}/xbc2")  # [T, C]
        dt2 = b.op("Squeeze", [dt, c("axes_0", [0])], f"{tag}/dt2")  # [T, nh]
        outs = []
        for g in range(RAGGED_GROUPS):
            s, pg = shared[g], f"{tag}/g{g}"
            cin, sin = gname(conv_in, g), gname(ssm_in, g)
            xt = b.op("Transpose", [b.op("Gather", [xbc2, tok[g]], f"{pg}/xbc_slots", axis=0)], f"{pg}/xbc_t",
                      perm=[0, 2, 1])  # [R, C, W]
            window = b.op("Concat", [cin, xt], f"{pg}/conv_window", axis=2)  # [R, C, K + W]
            b.nodes.append(helper.make_node("GatherElements", [window, s["conv_index"]], [gname(conv_out, g)],
                                            name=f"{pg}/conv_state", axis=2))
            body_start = len(b.nodes)  # the rest runs inside If(rows_g > 0): an empty group costs one node
            cv = b.op("Conv", [window, *conv.input[1:]], f"{pg}/conv", **conv_attrs)
            cv = b.op("Slice", [cv, c("one_1d", [1]), c("int_max", [2**62]), c("axis2", [2])], f"{pg}/conv_new")
            act = b.op("Mul", [cv, b.op("Sigmoid", [cv], f"{pg}/conv_sig")], f"{pg}/conv_silu")
            act = b.op("Transpose", [act], f"{pg}/conv_act", perm=[0, 2, 1])  # [R, W, C]
            x, bm, cm = b.op("Split", [act, c("xbc_split", [I, N, N])], f"{pg}/xbc", n_out=3, axis=-1)
            dtg = b.op("Where", [s["valid"], b.op("Gather", [dt2, tok[g]], f"{pg}/dt_slots", axis=0),
                                 c("zero_f", 0.0, np.float32)], f"{pg}/dt")  # [R, W, nh]; 0 on padding
            dt_t = b.op("Transpose", [dtg], f"{pg}/dt_t", perm=[0, 2, 1])  # [R, nh, W]
            av = b.op("Mul", [dt_t, A], f"{pg}/a")
            cum = b.op("CumSum", [av, c("axis_neg1", -1)], f"{pg}/a_cum")
            a_rows = b.op("Expand", [b.op("Unsqueeze", [av, c("axes_neg1", [-1])], f"{pg}/a_col"),
                                     b.op("Concat", [b.op("Shape", [av], f"{pg}/a_shape"), s["W"]],
                                          f"{pg}/segsum_shape", axis=0)], f"{pg}/a_rows")  # [R, nh, W(k), W(j)]
            segsum = b.op("CumSum", [b.op("Where", [s["causal_strict"], a_rows, c("zero_f", 0.0, np.float32)],
                                          f"{pg}/a_masked"), c("axis_neg2", -2)], f"{pg}/segsum")
            decay = b.op("Where", [s["causal_incl"], b.op("Exp", [segsum], f"{pg}/segsum_exp"),
                                   c("zero_f", 0.0, np.float32)], f"{pg}/decay")
            xh = b.op("Transpose", [b.op("Reshape", [x, c("shape_heads", [0, 0, nh, hd])], f"{pg}/x4")], f"{pg}/xh",
                      perm=[0, 2, 1, 3])  # [R, nh, W, hd]
            xdt = b.op("Mul", [xh, b.op("Unsqueeze", [dt_t, c("axes_neg1", [-1])], f"{pg}/dt4")], f"{pg}/xdt")
            cb = b.op("MatMul", [cm, b.op("Transpose", [bm], f"{pg}/b_t", perm=[0, 2, 1])], f"{pg}/cb")
            sc = b.op("Mul", [b.op("Unsqueeze", [cb, c("axes_1", [1])], f"{pg}/cb4"), decay], f"{pg}/scores")
            y = b.op("MatMul", [sc, xdt], f"{pg}/y_chunk")
            c4 = b.op("Unsqueeze", [cm, c("axes_1", [1])], f"{pg}/c4")
            fs = b.op("MatMul", [c4, b.op("Transpose", [sin], f"{pg}/state_t", perm=[0, 1, 3, 2])], f"{pg}/y_state_raw")
            fs = b.op("Mul", [fs, b.op("Unsqueeze", [b.op("Exp", [cum], f"{pg}/cum_exp"), c("axes_neg1", [-1])],
                                       f"{pg}/cum_exp4")], f"{pg}/y_state")
            skip = b.op("Mul", [xh, Dskip], f"{pg}/y_skip")
            y = b.op("Add", [b.op("Add", [y, fs], f"{pg}/y_sum"), skip], f"{pg}/y")  # [R, nh, W, hd]
            to_end = b.op("Exp", [b.op("Gather", [segsum, c("last", -1)], f"{pg}/segsum_last", axis=2)],
                          f"{pg}/to_end")
            weighted = b.op("Mul", [xdt, b.op("Unsqueeze", [to_end, c("axes_neg1", [-1])], f"{pg}/to_end4")],
                            f"{pg}/x_weighted")
            contrib = b.op("MatMul", [b.op("Transpose", [weighted], f"{pg}/xw_t", perm=[0, 1, 3, 2]),
                                      b.op("Unsqueeze", [bm, c("axes_1", [1])], f"{pg}/b4")], f"{pg}/contrib")
            total = b.op("Exp", [b.op("Gather", [cum, c("last_1d", [-1])], f"{pg}/cum_last", axis=2)],
                         f"{pg}/cum_last_exp")
            kept = b.op("Mul", [sin, b.op("Unsqueeze", [total, c("axes_neg1", [-1])], f"{pg}/total4")],
                        f"{pg}/state_kept")
            b.nodes.append(helper.make_node("Add", [kept, contrib], [f"{pg}/state_new"], name=f"{pg}/state_new"))
            y = b.op("Transpose", [y], f"{pg}/y_bl", perm=[0, 2, 1, 3])  # [R, W, nh, hd]
            y = b.op("Reshape", [y, s["y_shape"]], f"{pg}/y_slots_then")  # [R*W, I]
            outs.append(_gate(b, body_start, s["nonempty"], pg, [y, f"{pg}/state_new"],
                              [np.zeros((0, I), np.float32), sin], [f"{pg}/y_slots", gname(ssm_out, g)]))
        slots = b.op("Concat", outs, f"{tag}/y_slots", axis=0)
        b.nodes.append(helper.make_node("Gather", [slots, unpad_2d], [y3.output[0]], name=f"{tag}/unpad", axis=0))

    # --- head: hidden states at logits_index ----------------------------------------------------------
    final_norm = next((n for n in nodes if n.op_type == "RMSNormalization" and len(n.input) > 1
                       and n.input[1] == "model.norm.weight"), None)
    if final_norm is None:
        raise RaggedGraphError(f"{src}: no final RMSNormalization (model.norm.weight)")
    kept = produced_by(final_norm.input[0], "Slice", "the head's num_logits_to_keep slice")
    removed.add(id(kept))
    b.nodes.append(helper.make_node("Gather", [kept.input[0], LOGITS_INDEX], [kept.output[0]],
                                    name="ragged/logits_gather", axis=1))

    # --- assemble: the new nodes where the graph needs them, dead nodes pruned, I/O as the contract -----
    kept_nodes = [n for n in nodes if id(n) not in removed]
    if attention_layers and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    inputs, outputs = ragged_graph_io(arch)
    outputs_needed = {o.name for o in outputs}
    all_nodes = _toposort(kept_nodes + b.nodes, {i.name for i in inputs} | {t.name for t in graph.initializer}
                          | set(b.inits))
    live = _prune(all_nodes, outputs_needed)
    del graph.node[:]
    graph.node.extend(live)
    used = {x for n in live for x in _reads(n)}
    old_inits = [t for t in graph.initializer if t.name in used and t.name != NUM_LOGITS_TO_KEEP]
    del graph.initializer[:]
    graph.initializer.extend(old_inits)
    graph.initializer.extend(t for name, t in b.inits.items() if name in used)
    elem = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}

    def value_info(spec):
        return helper.make_tensor_value_info(spec.name, elem[spec.dtype], list(spec.shape))

    del graph.input[:]
    graph.input.extend(value_info(s) for s in inputs)
    del graph.output[:]
    graph.output.extend(value_info(s) for s in outputs)
    del graph.value_info[:]
    graph.name = graph.name.removesuffix("_cpu") + "_ragged"
    defined = {x for n in live for x in n.output} | {t.name for t in graph.initializer} | {s.name for s in inputs}
    missing = {x for n in live for x in _reads(n) if x} - defined
    if missing:
        raise RaggedGraphError(f"{src}: internal error: the rewrite reads undefined tensors {sorted(missing)[:5]}")
    out_path = src.parent / out_name
    onnx.save_model(model, str(out_path))
    return out_path


def _gate(b: _Builder, start: int, cond: str, tag: str, outs: list[str], empty: list, names=None) -> str:
    """Move b.nodes[start:] into If(cond)'s then-branch, producing `outs`; the else-branch gives `empty`
    (a zero-size array, or the name of a tensor to pass through). Returns the If's first output."""
    from onnx import helper, numpy_helper

    body = b.nodes[start:]
    del b.nodes[start:]
    names = names or [f"{o}/gated" for o in outs]
    else_nodes, else_outs = [], []
    for k, e in enumerate(empty):
        out = f"{tag}/else_{k}"
        if isinstance(e, str):
            else_nodes.append(helper.make_node("Identity", [e], [out], name=out))
        else:
            else_nodes.append(helper.make_node("Constant", [], [out], name=out,
                                               value=numpy_helper.from_array(e, out)))
        else_outs.append(out)

    b.nodes.append(_if(cond, f"{tag}/if_rows", names, body, outs, else_nodes, else_outs))
    return names[0]


def _if(cond: str, name: str, outs: list[str], then_nodes: list, then_outs: list[str], else_nodes: list,
        else_outs: list[str]):
    """If(cond) whose branches are the given nodes, producing then_outs / else_outs as `outs`."""
    from onnx import TensorProto, helper

    def sub(nodes, outputs, what):
        return helper.make_graph(nodes, f"{name}/{what}", [],
                                 [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])

    return helper.make_node("If", [cond], outs, name=name, then_branch=sub(then_nodes, then_outs, "then"),
                            else_branch=sub(else_nodes, else_outs, "else"))


def _reads(node) -> list[str]:
    """Every tensor a node reads: its inputs and, for If/Loop/Scan, what its subgraphs take from outside."""
    names = list(node.input)
    for at in node.attribute:
        graphs = [at.g] if at.HasField("g") else list(at.graphs)
        for sub in graphs:
            made = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for n in sub.node:
                names.extend(x for x in _reads(n) if x not in made)
                made.update(n.output)
    return names


def _toposort(nodes, available: set) -> list:
    """Nodes in an order where each one's inputs exist before it (the rewrite appends its nodes at the end)."""
    producers = {o: n for n in nodes for o in n.output}
    done, order, avail = set(), [], set(available) | {""}

    def visit(n):
        stack = [(n, False)]
        while stack:
            node, expanded = stack.pop()
            if id(node) in done:
                continue
            if expanded:
                done.add(id(node))
                order.append(node)
                avail.update(node.output)
                continue
            stack.append((node, True))
            for x in _reads(node):
                if x not in avail and x in producers and id(producers[x]) not in done:
                    stack.append((producers[x], False))

    for n in nodes:
        visit(n)
    return order


def _prune(nodes, outputs: set) -> list:
    """The nodes some graph output depends on, in their order."""
    producers = {o: n for n in nodes for o in n.output}
    live, stack = set(), [producers[o] for o in outputs if o in producers]
    while stack:
        n = stack.pop()
        if id(n) in live:
            continue
        live.add(id(n))
        stack.extend(producers[x] for x in _reads(n) if x in producers)
    return [n for n in nodes if id(n) in live]


def ragged_graph_record(cpu_record: GraphRecord, path: Path, arch, validation: dict | None = None) -> GraphRecord:
    """The manifest entry of decoder_ragged: decoder_cpu's record with its own file, I/O and step layout."""
    inputs, outputs = ragged_graph_io(arch)
    return dataclasses.replace(
        cpu_record,
        name=DECODER_RAGGED,
        file=Path(path).name,
        derived_from=cpu_record.name,
        engines=("onnxruntime",),
        extra=MappingProxyType({**cpu_record.extra, "for": "ONNX Runtime CPU: every chunk of a scheduler step in "
                                "one call (docs/ragged-step.md)"}),
        inputs=tensor_records(inputs),
        outputs=tensor_records(outputs),
        kv_cache=MappingProxyType({**RAGGED_CACHE_LAYOUT, "step": "ragged", "groups": RAGGED_GROUPS,
                                   "write_position": "group{g}.position_ids[:, 0]",
                                   "group_state_names": "state names as listed for group 0; "
                                                        "group{g}.<name> for group g >= 1"}),
        state=state_records(arch, "float32"),
        validation=MappingProxyType(dict(validation)) if validation is not None else None,
    )


# --- feeding the graph (tests and the export check; engines build the same arrays in engines/slots.py) -----

def ragged_feeds(groups, logits: str = "all") -> dict:
    """The index inputs (and input_ids/position_ids) of one ragged call.

    groups: per group, its rows in order, each (start, tokens): `start` tokens cached before the step,
    `tokens` this step's chunk (empty: an idle row). logits: "all" (every token, in order) or "last"
    (each non-empty row's last token).
    """
    ids, pos, last = [], [], []
    feeds = {}
    slot_of = []
    offset = 0
    for g, rows in enumerate(groups):
        width = max([len(t) for _, t in rows] + [1])
        token_index = np.zeros((len(rows), width), np.int64)
        gpos = np.zeros((len(rows), width), np.int64)
        lengths = np.zeros(len(rows), np.int64)
        for r, (start, tokens) in enumerate(rows):
            first = len(ids)
            for j, t in enumerate(tokens):
                slot_of.append(offset + r * width + j)
                ids.append(int(t))
                pos.append(start + j)
            if tokens:
                last.append(len(ids) - 1)
                token_index[r] = [first + min(j, len(tokens) - 1) for j in range(width)]
            lengths[r] = len(tokens)
            gpos[r] = start + np.arange(width)
        offset += len(rows) * width
        feeds[ragged_group_input(g, "token_index")] = token_index
        feeds[ragged_group_input(g, "position_ids")] = gpos
        feeds[ragged_group_input(g, "lengths")] = lengths
    feeds[INPUT_IDS] = np.array([ids], np.int64)
    feeds[POSITION_IDS] = np.array([pos], np.int64)
    feeds[UNPAD_INDEX] = np.array(slot_of, np.int64)
    feeds[LOGITS_INDEX] = np.arange(len(ids), dtype=np.int64) if logits == "all" else np.array(last, np.int64)
    return feeds


# The export check's step: rows of group 0 decode (1 token) around an idle row; group 1 a prefill chunk
# from position 0 and a 3-token (speculative-verification sized) chunk after a cached prefix.
CHECK_PREFIXES = ((6, 1), (4, 0), (9, 1), (0, 7), (5, 3))  # (cached tokens, chunk tokens) per row
CHECK_GROUPS = ((0, 3), (3, 5))  # row ranges of group 0 and group 1


def run_chunks_cpu(session, arch, state: dict, rows_chunks, all_logits=True):
    """Run chunks one by one through a decoder_cpu session (batch 1 each), updating `state`
    ({input name: [rows, ...] array}) in place; returns each chunk's logits [len, vocab] (None: idle)."""
    records = state_records(arch, "float32", head_dim_major=True)
    out_names = [o.name for o in session.get_outputs()]
    result = []
    for r, (start, tokens) in enumerate(rows_chunks):
        if not tokens:
            result.append(None)
            continue
        feeds = {INPUT_IDS: np.array([tokens], np.int64),
                 POSITION_IDS: np.arange(start, start + len(tokens), dtype=np.int64)[None],
                 NUM_LOGITS_TO_KEEP: np.array(0 if all_logits else 1, np.int64),
                 **{st.input: state[st.input][r:r + 1] for st in records}}
        out = dict(zip(out_names, session.run(None, feeds)))
        for st in records:
            state[st.input][r:r + 1] = out[st.output]
        result.append(np.asarray(out[LOGITS][0], np.float32))
    return result


def run_ragged(session, arch, state: dict, groups_ranges, rows_chunks):
    """One ragged call over rows_chunks with group g bound to rows groups_ranges[g] of `state`
    (decoder_cpu's layout, as run_chunks_cpu keeps it; updated in place); returns the logits of
    every token, split per row (None: idle)."""
    records = state_records(arch, "float32", head_dim_major=True)
    groups = [[rows_chunks[r] for r in range(lo, hi)] for lo, hi in groups_ranges]
    feeds = ragged_feeds(groups)

    def layout(x, st):  # head-dim-major <-> decoder_ragged's [rows, kv_heads, capacity, head_dim]
        return np.ascontiguousarray(np.swapaxes(x, -1, -2) if st.kind == "kv" else x)

    for g, (lo, hi) in enumerate(groups_ranges):
        for st in records:
            feeds[ragged_state_name(st.input, g)] = layout(state[st.input][lo:hi], st)
    out_names = [o.name for o in session.get_outputs()]
    out = dict(zip(out_names, session.run(None, feeds)))
    for g, (lo, hi) in enumerate(groups_ranges):
        for st in records:
            state[st.input][lo:hi] = layout(out[ragged_state_name(st.output, g)], st)
    logits = np.asarray(out[LOGITS][0], np.float32)
    result, t = [], 0
    for lo, hi in groups_ranges:
        for r in range(lo, hi):
            n = len(rows_chunks[r][1])
            result.append(logits[t:t + n] if n else None)
            t += n
    return result


def check_against_cpu(cpu: Path, ragged: Path, arch, seed: int = 0) -> dict:
    """One ragged call (decodes, an idle row, a prefill chunk, a 3-token chunk, both groups) against the same
    chunks run one by one through decoder_cpu, from the same cached prefixes; the manifest record.

    MatMulNBits graphs run at accuracy_level 0 (float compute) for the check, as
    cpu_graph.check_against_portable does, so that the two differ only in float rounding.
    """
    rng = np.random.default_rng(seed)
    rows = len(CHECK_PREFIXES)
    capacity = max(p + n for p, n in CHECK_PREFIXES) + 8
    records = state_records(arch, "float32", head_dim_major=True)
    with float_compute_copy(cpu) as (cpu_run, float_compute), float_compute_copy(ragged) as (ragged_run, _):
        cpu_session = float_check_session(cpu_run)
        state = {st.input: np.zeros((rows, *st.row_shape(capacity)), np.float32) for st in records}
        prefixes = [(0, rng.integers(0, arch.vocab_size, p).tolist()) for p, _ in CHECK_PREFIXES]
        run_chunks_cpu(cpu_session, arch, state, prefixes, all_logits=False)
        chunks = [(p, rng.integers(0, arch.vocab_size, n).tolist()) for p, n in CHECK_PREFIXES]
        ref_state = {k: v.copy() for k, v in state.items()}
        reference = run_chunks_cpu(cpu_session, arch, ref_state, chunks)
        del cpu_session
        ragged_session = float_check_session(ragged_run)
        got = run_ragged(ragged_session, arch, state, CHECK_GROUPS, chunks)
        del ragged_session
    diffs = [float(np.abs(a - b).max()) for a, b in zip(reference, got) if a is not None]
    agree = float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(reference, got)
                                          if a is not None])))
    state_diff = 0.0
    for st in records:
        for r, (p, n) in enumerate(CHECK_PREFIXES):
            a, b = ref_state[st.input][r], state[st.input][r]
            if st.kind == "kv":
                a, b = a[..., :p + n], b[..., :p + n]
            # relative to the tensor's scale: random-weight Mamba states reach ~1e3 (float32 ulp ~1e-4 there)
            state_diff = max(state_diff, float(np.abs(a - b).max()) / max(1.0, float(np.abs(a).max())))
    max_diff = max(diffs)
    record = {
        "reference": f"{DECODER_CPU} (the graph it was derived from), the same chunks one by one, random tokens",
        "rows": [{"cached": p, "chunk": n} for p, n in CHECK_PREFIXES],
        "groups": [list(r) for r in CHECK_GROUPS],
        "max_abs_logit_diff": max_diff,
        "max_state_diff_relative": state_diff,
        "argmax_agreement": agree,
        "tolerance": {"max_abs_diff": PARITY_MAX_ABS_DIFF},
        "passed": bool(max_diff <= PARITY_MAX_ABS_DIFF and state_diff <= PARITY_MAX_ABS_DIFF),
    }
    if float_compute:
        record["note"] = ("both graphs ran with float compute (MatMulNBits accuracy_level 0, int8-dynamic GEMMs as "
                          "float MatMuls over the same int8 weights) for this check")
    return record


def derive_checked(cpu_path: Path, arch) -> tuple[Path, dict]:
    """Derive decoder_ragged next to decoder_cpu and check it against it; (path, validation record).
    Raises RaggedGraphError (nothing kept) when the check fails."""
    import onnx

    path = derive_ragged_graph(cpu_path, arch)
    try:
        onnx.checker.check_model(str(path), full_check=False)
        record = check_against_cpu(cpu_path, path, arch)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if not record["passed"]:
        path.unlink(missing_ok=True)
        raise RaggedGraphError(f"internal error: {path.name} differs from {Path(cpu_path).name} by "
                               f"{record['max_abs_logit_diff']:.3g} in logits (state "
                               f"{record['max_state_diff_relative']:.3g} relative) on the same chunks")
    return path, record


def add_ragged_flavour(artifact: str | Path) -> Path:
    """Derive decoder_ragged for an existing artifact that has decoder_cpu (re-deriving it if present), check
    it, and rewrite the manifest with its record and file hash. Returns the graph's path."""
    from ..artifact import file_records, load_manifest, write_manifest

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    if DECODER_CPU not in manifest.graphs:
        raise RaggedGraphError(f"{artifact}: no {DECODER_CPU} graph to derive {DECODER_RAGGED} from (fp16/bf16 "
                               "artifacts have none; re-export fp32 or quantize it)")
    cpu = manifest.graph(DECODER_CPU)
    path, record = derive_checked(artifact / cpu.file, manifest.architecture)
    graph = ragged_graph_record(cpu, path, manifest.architecture, record)
    manifest = manifest.with_graph(graph).replace(files={**manifest.files, **file_records(artifact, [path.name])})
    write_manifest(artifact, manifest)
    return path


if __name__ == "__main__":  # python -m granite_deploy.export.ragged_graph ARTIFACT...
    import sys

    for arg in sys.argv[1:]:
        out = add_ragged_flavour(arg)
        print(f"{out}: derived, checked against {DECODER_CPU}, manifest updated")
