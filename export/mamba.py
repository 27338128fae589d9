"""A Granite 4.0 H Mamba2 mixer as standard ONNX ops, one graph for prefill chunks and decode.

The state-space part is Mamba2's SSD algorithm for a single chunk, started
from the layer's cached state: for a step of L tokens (a prompt chunk, or
L = 1 when decoding) with a_t = dt_t * A per head,

    y_i    = sum_{j<=i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j     (within the chunk)
           + exp(a_1 + ... + a_i) C_i . state_0                           (from the cache)
           + D x_i
    state' = exp(a_1 + ... + a_L) state_0 + sum_j exp(a_{j+1} + ... + a_L) dt_j x_j B_j^T

For L = 1 this is exactly the recurrent update, so one graph serves both
steps; the cost is quadratic in L, which the engine bounds by prefilling in
chunks (256 tokens, Granite's `mamba_chunk_size`). The segment sums are
formed as cumulative sums of masked values (as transformers does) and every
exponential and cumulative sum stays in float32: these are the parts of
Mamba2 that lose accuracy in fp16.

The causal depthwise convolution keeps its last `d_conv` inputs as the
`conv` state, exactly transformers' layout (batch, conv_dim, d_conv).
"""

from __future__ import annotations

import numpy as np


def _same(t, hint):
    return t


def build_mamba_mixer(g, h: str, prefix: str, tag: str, m: dict, w, w_proj=None, to_half=_same, to_f32=_same,
                      conv_in: str = "", ssm_in: str = "", conv_out: str = "", ssm_out: str = "",
                      causal_incl: str = "", causal_strict: str = "") -> str:
    """Append one Mamba2 mixer to GraphBuilder g. h: normed hidden [B, L, H] in the export
    precision; returns the mixer output [B, L, H] in float32.

    w(name) gives a float32 numpy weight; w_proj(name) the in/out projection
    weights in the export precision (to_half/to_f32 cast around them).
    causal_incl / causal_strict are the shared [L, L] masks j <= i and j < i.
    """
    w_proj = w_proj or w
    from onnx import helper

    I, N, nh, hd, K, C = m["intermediate"], m["d_state"], m["heads"], m["head_dim"], m["d_conv"], m["conv_dim"]
    f32 = np.float32
    i64 = np.int64
    # 1. input projection: [z | xBC | dt]
    proj = g.op("MatMul", [h, g.weight(f"{prefix}.in_proj.weight_t", w_proj(f"{prefix}.in_proj.weight").T)],
                f"{tag}/in_proj")
    proj = to_f32(proj, f"{tag}/in_proj_f32")
    z, xbc, dt = g.op("Split", [proj, g.const("mamba_split", [I, C, nh], i64)], f"{tag}/split", outputs=3, axis=-1)

    # 2. causal depthwise conv over [cached last K inputs | new inputs]
    xbc_t = g.op("Transpose", [xbc], f"{tag}/xbc_t", perm=[0, 2, 1])  # [B, C, L]
    cat = g.op("Concat", [conv_in, xbc_t], f"{tag}/conv_window", axis=2)  # [B, C, K + L]
    conv_w = w(f"{prefix}.conv1d.weight").reshape(C, 1, K)
    conv_inputs = [cat, g.weight(f"{prefix}.conv1d.weight", conv_w)]
    if m["conv_bias"]:
        conv_inputs.append(g.weight(f"{prefix}.conv1d.bias", w(f"{prefix}.conv1d.bias")))
    conv = g.op("Conv", conv_inputs, f"{tag}/conv", group=C, kernel_shape=[K])  # [B, C, L + 1]
    conv = g.op("Slice", [conv, g.const("one_1d", [1], i64), g.const("int_max", [2**62], i64),
                          g.const("axis2", [2], i64)], f"{tag}/conv_new")  # drop the output of the old window
    g.nodes.append(helper.make_node("Slice", [cat, g.const("minus_k", [-K], i64), g.const("int_max", [2**62], i64),
                                              g.const("axis2", [2], i64)], [conv_out], name=f"{tag}/conv_state"))
    act = g.op("Mul", [conv, g.op("Sigmoid", [conv], f"{tag}/conv_sig")], f"{tag}/conv_silu")
    act = g.op("Transpose", [act], f"{tag}/conv_act", perm=[0, 2, 1])  # [B, L, C]
    x, bm, cm = g.op("Split", [act, g.const("xbc_split", [I, N, N], i64)], f"{tag}/xbc", outputs=3, axis=-1)

    # 3. discretisation: dt = softplus(dt + dt_bias) (clamped when the config limits it), a = dt * A
    dt = g.op("Softplus", [g.op("Add", [dt, g.weight(f"{prefix}.dt_bias", w(f"{prefix}.dt_bias"))], f"{tag}/dt_b")],
              f"{tag}/dt")
    lo, hi = m["time_step_limit"]
    if lo > 0.0 or hi != float("inf"):
        dt = g.op("Clip", [dt, g.const("dt_min", lo, f32), g.const("dt_max", min(hi, 3.0e38), f32)], f"{tag}/dt_clip")
    A = -np.exp(w(f"{prefix}.A_log").astype(f32))
    dt_t = g.op("Transpose", [dt], f"{tag}/dt_t", perm=[0, 2, 1])  # [B, nh, L]
    a = g.op("Mul", [dt_t, g.const(f"{tag}/A", A.reshape(1, nh, 1), f32)], f"{tag}/a")  # [B, nh, L]
    cum = g.op("CumSum", [a, g.const("axis_neg1", -1, i64)], f"{tag}/a_cum")  # [B, nh, L]

    # segsum[i, j] = a_{j+1} + ... + a_i for j <= i, from a cumulative sum of masked values
    a_rows = g.op("Expand", [g.op("Unsqueeze", [a, g.const("axes_neg1", [-1], i64)], f"{tag}/a_col"),
                             g.op("Concat", [g.op("Shape", [a], f"{tag}/a_shape"),
                                             g.op("Shape", [a], f"{tag}/a_len", start=-1)], f"{tag}/segsum_shape", axis=0)],
                  f"{tag}/a_rows")  # [B, nh, L(k), L(j)] = a_k
    zero = g.const("zero_f", 0.0, f32)
    segsum = g.op("CumSum", [g.op("Where", [causal_strict, a_rows, zero], f"{tag}/a_masked"),
                             g.const("axis_neg2", -2, i64)], f"{tag}/segsum")
    decay = g.op("Where", [causal_incl, g.op("Exp", [segsum], f"{tag}/segsum_exp"), zero], f"{tag}/decay")  # [B, nh, L, L]

    # 4. outputs within the chunk, from the cached state, and the skip term
    xh = g.op("Transpose", [g.op("Reshape", [x, g.const("shape_heads", [0, 0, nh, hd], i64)], f"{tag}/x4")],
              f"{tag}/xh", perm=[0, 2, 1, 3])  # [B, nh, L, hd]
    xdt = g.op("Mul", [xh, g.op("Unsqueeze", [dt_t, g.const("axes_neg1", [-1], i64)], f"{tag}/dt4")], f"{tag}/xdt")
    cb = g.op("MatMul", [cm, g.op("Transpose", [bm], f"{tag}/b_t", perm=[0, 2, 1])], f"{tag}/cb")  # [B, L, L]
    scores = g.op("Mul", [g.op("Unsqueeze", [cb, g.const("axes_1", [1], i64)], f"{tag}/cb4"), decay], f"{tag}/scores")
    y = g.op("MatMul", [scores, xdt], f"{tag}/y_chunk")  # [B, nh, L, hd]
    c4 = g.op("Unsqueeze", [cm, g.const("axes_1", [1], i64)], f"{tag}/c4")  # [B, 1, L, N]
    from_state = g.op("MatMul", [c4, g.op("Transpose", [ssm_in], f"{tag}/state_t", perm=[0, 1, 3, 2])],
                      f"{tag}/y_state_raw")  # [B, nh, L, hd]
    from_state = g.op("Mul", [from_state, g.op("Unsqueeze", [g.op("Exp", [cum], f"{tag}/cum_exp"),
                                                             g.const("axes_neg1", [-1], i64)], f"{tag}/cum_exp4")],
                      f"{tag}/y_state")
    skip = g.op("Mul", [xh, g.const(f"{tag}/D", w(f"{prefix}.D").astype(f32).reshape(1, nh, 1, 1), f32)], f"{tag}/y_skip")
    y = g.op("Add", [g.op("Add", [y, from_state], f"{tag}/y_sum"), skip], f"{tag}/y")

    # 5. the new state: decayed old state plus every token's contribution decayed to the chunk end
    last = g.const("last_idx", -1, i64)
    to_end = g.op("Exp", [g.op("Gather", [segsum, last], f"{tag}/segsum_last", axis=2)], f"{tag}/to_end")  # [B, nh, L]
    weighted = g.op("Mul", [xdt, g.op("Unsqueeze", [to_end, g.const("axes_neg1", [-1], i64)], f"{tag}/to_end4")],
                    f"{tag}/x_weighted")  # [B, nh, L, hd]
    contrib = g.op("MatMul", [g.op("Transpose", [weighted], f"{tag}/xw_t", perm=[0, 1, 3, 2]),
                              g.op("Unsqueeze", [bm, g.const("axes_1", [1], i64)], f"{tag}/b4")], f"{tag}/contrib")
    total = g.op("Exp", [g.op("Gather", [cum, g.const("last_idx_1d", [-1], i64)], f"{tag}/cum_last", axis=2)],
                 f"{tag}/cum_last_exp")  # [B, nh, 1]
    kept = g.op("Mul", [ssm_in, g.op("Unsqueeze", [total, g.const("axes_neg1", [-1], i64)], f"{tag}/total4")],
                f"{tag}/state_kept")
    g.nodes.append(helper.make_node("Add", [kept, contrib], [ssm_out], name=f"{tag}/state_new"))

    # 6. gated RMS norm (norm(y * silu(z))) and the output projection
    y = g.op("Reshape", [g.op("Transpose", [y], f"{tag}/y_bl", perm=[0, 2, 1, 3]),
                         g.const("shape_merge_i", [0, 0, I], i64)], f"{tag}/y3")
    gated = g.op("Mul", [y, g.op("Mul", [z, g.op("Sigmoid", [z], f"{tag}/z_sig")], f"{tag}/z_silu")], f"{tag}/gated")
    normed = g.op("RMSNormalization", [gated, g.weight(f"{prefix}.norm.weight", w(f"{prefix}.norm.weight"))],
                  f"{tag}/norm", axis=-1, epsilon=m["eps"])
    out = g.op("MatMul", [to_half(normed, f"{tag}/norm_half"),
                          g.weight(f"{prefix}.out_proj.weight_t", w_proj(f"{prefix}.out_proj.weight").T)], f"{tag}/out_proj")
    return to_f32(out, f"{tag}/out_proj_f32")


def causal_masks(g, ref: str) -> tuple[str, str]:
    """[L, L] masks j <= i and j < i for the sequence length of ref ([B, L, ...])."""
    i64 = np.int64
    length = g.op("Gather", [g.op("Shape", [ref], "mamba_ref_shape"), g.const("one_idx_m", 1, i64)], "mamba_len", axis=0)
    pos = g.op("Range", [g.const("zero_m", 0, i64), length, g.const("one_m", 1, i64)], "mamba_pos")
    rows = g.op("Unsqueeze", [pos, g.const("axes_neg1", [-1], i64)], "mamba_rows")  # i
    incl = g.op("LessOrEqual", [pos, rows], "mamba_causal_incl")  # [L(i), L(j)]: j <= i
    strict = g.op("Less", [pos, rows], "mamba_causal_strict")  # j < i  (for the masked cumsum over k: k > j)
    return incl, strict
