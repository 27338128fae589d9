"""Build the Granite decoder as an ONNX graph of standard ops, straight from the weights.

Why build rather than trace: the graph we want (an in-place fixed-capacity KV
cache through `TensorScatter`, the standard `Attention`, `RMSNormalization`
and `RotaryEmbedding` ops of opsets 23/24) is not what `torch.onnx` emits for
transformers' Granite code, whose cache object and mask helpers also break
graph capture. Writing the graph directly (as onnxruntime-genai's builder
does) gives a small, readable graph that TensorRT's parser and ONNX Runtime's
CPU provider both accept; `validate.py` then proves it against the PyTorch
model.

Weights are streamed into one external-data file as they are added, so the
builder never holds a second in-memory copy of a multi-GB model.

Half precision (`weight_dtype` float16 or bfloat16) is mixed precision, laid
out so that a strongly typed TensorRT network gets exactly these types:
weights, MatMuls, RoPE, the KV cache and Attention run in the half type; the
embedding output, the residual stream and every RMSNormalization stay float32
(each branch output is Cast to float32 before its residual Add, each norm
output is Cast to the half type before its MatMul); logits are float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .checkpoint import GraniteArch
from .io_spec import INPUT_IDS, NUM_LOGITS_TO_KEEP, POSITION_IDS, cache_names, graph_io, state_names
from .mamba import build_mamba_mixer, causal_masks

NP_TO_ONNX = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
              "int64": TensorProto.INT64}
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
EXTERNAL_ALIGN = 4096  # page-aligned offsets let ONNX Runtime mmap the weights
MIN_OPSET = 24  # TensorScatter
MAX_OPSET = onnx.defs.onnx_opset_version()


def conv_ssm_names(layer: int) -> tuple[str, str, str, str]:
    """(past conv, past ssm, present conv, present ssm) names of a Mamba layer."""
    (pc, oc), (ps, os_) = state_names(layer, "conv"), state_names(layer, "ssm")
    return pc, ps, oc, os_


class GraphBuilder:
    """Collects nodes and initializers; big initializers go to the external data file."""

    def __init__(self, data_file, data_location: str):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._data = data_file
        self._location = data_location
        self._names: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    def _fresh(self, hint: str) -> str:
        n = self._names.get(hint, 0)
        self._names[hint] = n + 1
        return hint if n == 0 else f"{hint}__{n}"  # "__" never appears in a hint

    def weight(self, name: str, array: np.ndarray) -> str:
        """Add a weight, stored in the external data file at an aligned offset."""
        array = np.ascontiguousarray(array)
        offset = self._data.tell()
        pad = (-offset) % EXTERNAL_ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            offset += pad
        self._data.write(array.tobytes())
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self._location), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def const(self, name: str, value, dtype=None) -> str:
        """A small inline constant (shapes, scalars); asking twice for the same one reuses it."""
        array = np.asarray(value, dtype=dtype)
        key = (name, array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self.initializers.append(onnx.numpy_helper.from_array(array, self._fresh(name)))
            self._consts[key] = self.initializers[-1].name
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], hint: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [self._fresh(f"{hint}" if outputs == 1 else f"{hint}_{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self._fresh(f"{hint}/{op_type}"), **attrs))
        return names[0] if outputs == 1 else names


def build_decoder_graph(
    arch: GraniteArch,
    get_weight: Callable[[str], np.ndarray],
    out_dir: Path,
    opset: int,
    weight_dtype: str = "float32",
    softmax_fp32: bool = False,
) -> tuple[Path, Path]:
    """Write model.onnx + model.onnx.data into out_dir and return their paths.

    get_weight(name) returns a Hugging Face state-dict tensor as a float32
    numpy array (names as in `GraniteMoeHybridForCausalLM.state_dict()`).
    weight_dtype float16/bfloat16 gives the mixed-precision graph described in
    the module docstring; softmax_fp32 asks Attention for a float32 softmax
    (its `softmax_precision` attribute) when Q/K/V are half.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset: {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET} (TensorScatter needs 24)")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype: {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    model_path = out_dir / "model.onnx"
    data_name = "model.onnx.data"
    a = arch
    D, nH, kvH = a.head_dim, a.num_heads, a.num_kv_heads
    half = weight_dtype != "float32"
    if weight_dtype == "bfloat16":
        import ml_dtypes  # numpy's bfloat16 (a dependency of onnx)

        wdt = np.dtype(ml_dtypes.bfloat16)
    else:
        wdt = np.dtype(weight_dtype)
    HALF = NP_TO_ONNX[weight_dtype]

    def w(name):  # HF weights are [out, in]; MatMul wants [in, out]. Cast rounds to nearest even.
        return get_weight(name).astype(wdt, copy=False)

    def w32(name):  # norm weights stay float32 (the norms run in float32)
        return get_weight(name).astype(np.float32, copy=False)

    def to_half(t, hint):
        return g.op("Cast", [t], hint, to=HALF) if half else t

    def to_f32(t, hint):
        return g.op("Cast", [t], hint, to=TensorProto.FLOAT) if half else t

    attention_attrs = {"scale": a.attention_multiplier}
    if half and softmax_fp32:
        attention_attrs["softmax_precision"] = TensorProto.FLOAT

    with open(out_dir / data_name, "wb") as data_file:
        g = GraphBuilder(data_file, data_name)
        inputs, outputs = graph_io(a, cache_dtype=weight_dtype)

        # Embedding (tied with the output projection when the config says so).
        embed = g.weight("model.embed_tokens.weight", w("model.embed_tokens.weight"))
        x = to_f32(g.op("Gather", [embed, INPUT_IDS], "embed", axis=0), "embed_f32")
        x = g.op("Mul", [x, g.const("embedding_multiplier", a.embedding_multiplier, np.float32)], "embed_scaled")

        # Shared per-step tensors: rotary cos/sin, the attention mask, the cache write index.
        inv_freq = 1.0 / (a.rope_theta ** (np.arange(0, D, 2, dtype=np.float32) / D))
        pos_f = g.op("Cast", [POSITION_IDS], "pos_f", to=TensorProto.FLOAT)
        freqs = g.op("Mul", [g.op("Unsqueeze", [pos_f, g.const("axes_last", [-1], np.int64)], "pos_f3"),
                             g.const("inv_freq", inv_freq.astype(np.float32))], "rope_freqs")
        cos = to_half(g.op("Cos", [freqs], "rope_cos"), "rope_cos_half")
        sin = to_half(g.op("Sin", [freqs], "rope_sin"), "rope_sin_half")

        first_attention = a.attention_layers[0] if a.layer_types else 0
        # Shape(start, end) of one cache input: the only place the graph reads the capacity axis
        # (the CPU flavour in export/cpu_graph.py moves that axis and patches start/end).
        capacity_1d = g.op("Shape", [cache_names(first_attention)[0]], "cache_capacity_1d", start=2, end=3)
        capacity = g.op("Squeeze", [capacity_1d, g.const("axes_0", [0], np.int64)], "cache_capacity")
        kv_pos = g.op("Range", [g.const("zero", 0, np.int64), capacity, g.const("one", 1, np.int64)], "kv_positions")
        q_pos = g.op("Unsqueeze", [POSITION_IDS, g.const("axes_1_3", [1, 3], np.int64)], "q_positions")  # [B,1,S,1]
        mask = g.op("LessOrEqual", [kv_pos, q_pos], "attn_mask")  # [B,1,S,cap]: key j visible iff j <= p
        write_index = g.op("Gather", [POSITION_IDS, g.const("zero_idx", 0, np.int64)], "write_index", axis=1)

        res_mult = g.const("residual_multiplier", a.residual_multiplier, np.float32)
        shape_q = g.const("shape_q", [0, 0, nH, D], np.int64)
        shape_kv = g.const("shape_kv", [0, 0, kvH, D], np.int64)
        shape_merge = g.const("shape_merge", [0, 0, nH * D], np.int64)
        qkv_split = g.const("qkv_split", [nH * D, kvH * D, kvH * D], np.int64)

        def mlp_block(x, i, p):
            """RMSNorm + SwiGLU: input_linear holds [gate; up], output_linear is down."""
            h = g.op("RMSNormalization", [x, g.weight(f"{p}.post_attention_layernorm.weight",
                                                       w32(f"{p}.post_attention_layernorm.weight"))],
                     f"l{i}/mlp_norm", axis=-1, epsilon=a.rms_norm_eps)
            h = to_half(h, f"l{i}/mlp_norm_half")
            gate_up = g.op("MatMul", [h, g.weight(f"{p}.shared_mlp.input_linear.weight_t",
                                                  w(f"{p}.shared_mlp.input_linear.weight").T)], f"l{i}/gate_up")
            gate, up = g.op("Split", [gate_up], f"l{i}/gate_up_split", outputs=2, axis=-1, num_outputs=2)
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], f"l{i}/sigmoid")], f"l{i}/silu"), up],
                       f"l{i}/swiglu")
            down = g.op("MatMul", [act, g.weight(f"{p}.shared_mlp.output_linear.weight_t",
                                                 w(f"{p}.shared_mlp.output_linear.weight").T)], f"l{i}/down")
            down = to_f32(down, f"l{i}/down_f32")
            return g.op("Add", [x, g.op("Mul", [down, res_mult], f"l{i}/mlp_scaled")], f"l{i}/mlp_residual")

        if a.mamba:
            causal_incl, causal_strict = causal_masks(g, INPUT_IDS)
        for i in range(a.num_layers):
            p = f"model.layers.{i}"
            past_k, past_v, present_k, present_v = cache_names(i)
            h = g.op("RMSNormalization", [x, g.weight(f"{p}.input_layernorm.weight", w32(f"{p}.input_layernorm.weight"))],
                     f"l{i}/attn_norm", axis=-1, epsilon=a.rms_norm_eps)
            h = to_half(h, f"l{i}/attn_norm_half")
            if a.layer_types and a.layer_types[i] == "mamba":
                # Mamba2 block: projections in the export precision, the scan in float32.
                o = build_mamba_mixer(g, h, f"{p}.mamba", f"l{i}/mamba", a.mamba, w32, w, to_half, to_f32,
                                      *conv_ssm_names(i), causal_incl, causal_strict)
                x = g.op("Add", [x, g.op("Mul", [o, res_mult], f"l{i}/mamba_scaled")], f"l{i}/mamba_residual")
                x = mlp_block(x, i, p)
                continue
            # Attention block.
            w_qkv = np.concatenate([w(f"{p}.self_attn.q_proj.weight"), w(f"{p}.self_attn.k_proj.weight"),
                                    w(f"{p}.self_attn.v_proj.weight")], axis=0).T
            qkv = g.op("MatMul", [h, g.weight(f"{p}.self_attn.qkv_proj.weight_t", w_qkv)], f"l{i}/qkv")
            q, k, v = g.op("Split", [qkv, qkv_split], f"l{i}/qkv_split", outputs=3, axis=-1)
            q = g.op("Transpose", [g.op("Reshape", [q, shape_q], f"l{i}/q4")], f"l{i}/q_bhsd", perm=[0, 2, 1, 3])
            k = g.op("Transpose", [g.op("Reshape", [k, shape_kv], f"l{i}/k4")], f"l{i}/k_bhsd", perm=[0, 2, 1, 3])
            v = g.op("Transpose", [g.op("Reshape", [v, shape_kv], f"l{i}/v4")], f"l{i}/v_bhsd", perm=[0, 2, 1, 3])
            if a.rope:  # Granite 4.0 H attention layers are NoPE
                q = g.op("RotaryEmbedding", [q, cos, sin], f"l{i}/q_rope")
                k = g.op("RotaryEmbedding", [k, cos, sin], f"l{i}/k_rope")
            # axis -2 is the capacity axis of the 4D cache (same as 2); TensorRT's parser accepts only -2.
            g.nodes.append(helper.make_node("TensorScatter", [past_k, k, write_index], [present_k],
                                            name=f"l{i}/write_key", axis=-2))
            g.nodes.append(helper.make_node("TensorScatter", [past_v, v, write_index], [present_v],
                                            name=f"l{i}/write_value", axis=-2))
            y = g.op("Attention", [q, present_k, present_v, mask], f"l{i}/attention", **attention_attrs)
            y = g.op("Reshape", [g.op("Transpose", [y], f"l{i}/y_bshd", perm=[0, 2, 1, 3]), shape_merge], f"l{i}/y")
            o = g.op("MatMul", [y, g.weight(f"{p}.self_attn.o_proj.weight_t", w(f"{p}.self_attn.o_proj.weight").T)],
                     f"l{i}/o_proj")
            o = to_f32(o, f"l{i}/o_proj_f32")
            x = g.op("Add", [x, g.op("Mul", [o, res_mult], f"l{i}/attn_scaled")], f"l{i}/attn_residual")
            x = mlp_block(x, i, p)

        # Keep the last k positions (k = num_logits_to_keep, 0 = all) before the norm and head.
        seq_len = g.op("Gather", [g.op("Shape", [INPUT_IDS], "ids_shape"), g.const("one_idx", [1], np.int64)],
                       "seq_len", axis=0)
        keep = g.op("Unsqueeze", [NUM_LOGITS_TO_KEEP, g.const("axes_0", [0], np.int64)], "keep_1d")
        keep = g.op("Where", [g.op("Equal", [keep, g.const("zero_1d", [0], np.int64)], "keep_all"), seq_len, keep],
                    "keep")
        start = g.op("Sub", [seq_len, keep], "keep_start")
        x = g.op("Slice", [x, start, seq_len, g.const("axes_1", [1], np.int64)], "hidden_kept")
        x = g.op("RMSNormalization", [x, g.weight("model.norm.weight", w32("model.norm.weight"))],
                 "final_norm", axis=-1, epsilon=a.rms_norm_eps)
        x = to_half(x, "final_norm_half")
        # Output projection as Gemm(transB=1) so a tied embedding is stored once.
        lm_head = embed if a.tie_word_embeddings else g.weight("lm_head.weight", w("lm_head.weight"))
        x2 = g.op("Reshape", [x, g.const("shape_2d", [-1, a.hidden_size], np.int64)], "hidden_2d")
        logits2 = to_f32(g.op("Gemm", [x2, lm_head], "logits_2d_half" if half else "logits_2d", transB=1),
                         "logits_2d")
        out_shape = g.op("Concat", [g.op("Shape", [x], "kept_shape", start=0, end=2),
                                    g.const("vocab", [a.vocab_size], np.int64)], "logits_shape", axis=0)
        logits = g.op("Reshape", [logits2, out_shape], "logits_unscaled")
        g.nodes.append(helper.make_node("Div", [logits, g.const("logits_scaling", a.logits_scaling, np.float32)],
                                        ["logits"], name="logits/Div"))

    def value_info(spec):
        return helper.make_tensor_value_info(spec.name, NP_TO_ONNX[spec.dtype], list(spec.shape))

    for spec in inputs:  # optional inputs: an initializer of the same name is the default
        if spec.default is not None:
            g.const(spec.name, spec.default, np.dtype(spec.dtype))
    graph = helper.make_graph(g.nodes, "granite_decoder", [value_info(s) for s in inputs],
                              [value_info(s) for s in outputs], initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="granite-deploy")
    model.ir_version = 11
    onnx.save_model(model, str(model_path))
    return model_path, out_dir / data_name
