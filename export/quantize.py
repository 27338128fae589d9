"""`granite-deploy quantize`: an fp32 artifact in, a quantized, accuracy-gated artifact out.

Three methods, all weight-only (activations stay float32 in the graph):

- `int8` / `int4` (CPU fallback, ONNX Runtime only): every linear MatMul
  becomes `com.microsoft.MatMulNBits` through ONNX Runtime's own
  `MatMulNBitsQuantizer` (round to nearest, symmetric, blockwise along the
  input dimension, `block_size` weights per scale). The tied embedding /
  output head is quantized too, stored once: the head becomes a MatMulNBits
  over the transposed embedding, and the token lookup a
  `com.microsoft.GatherBlockQuantized` that reads the same packed bytes and
  scales (MatMulNBits packs the head's [vocab, hidden] weight row by row in
  blocks along hidden, which is exactly GatherBlockQuantized's layout with
  gather_axis 0, quantize_axis 1; both default the zero point to 2^(bits-1)).
  No float copy of the 100352 x hidden table is left in the file.
  `accuracy_level` 4 (default) lets MatMulNBits quantize its input per block
  to int8 on the fly and use integer dot products; on the development CPU
  (AMD EPYC, AVX-512 VNNI) an 8-bit MatMulNBits with float compute
  (`accuracy_level` 0) was 17x slower than the float32 MatMul it replaced.
- `int8-qdq` (TensorRT's explicit INT8, standard ONNX only): each linear
  weight is stored as int8 with one float32 scale per output channel and an
  explicit zero point of 0, and a `DequantizeLinear(axis=1)` feeds the
  MatMul. The QuantizeLinear half of each pair is applied here, offline (the
  weight is stored already quantized), which is what TensorRT's strongly
  typed weight-only INT8 wants; no MatMulInteger, DynamicQuantizeLinear or
  com.microsoft op. The head becomes a MatMul over its own int8 copy of the
  transposed embedding; the embedding lookup stays a float32 Gather (only the
  looked-up rows are read per step; quantizing the lookup would need a
  Gather on int8 data whose TensorRT support is unverified). ONNX Runtime's
  CPU provider runs this graph (it fuses DequantizeLinear -> MatMul into
  MatMulNBits itself).

The in-place KV-cache inputs and outputs are untouched, so every engine binds
the same names. Each quantized graph is then gated against its fp32 source
(`accuracy.py`); past the thresholds nothing is written unless `skip_gate`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import platform
import shutil
import time
from pathlib import Path
from types import MappingProxyType

import numpy as np

from .. import __version__, progress
from ..errors import GraniteDeployError, VerificationFailed
from ..artifact import (MANIFEST, ArtifactError, BadArtifactPath, file_records, load_manifest, staging_dir, verify,
                        write_manifest)
from ..manifest import DECODER, DECODER_CPU, DECODER_RAGGED, KV_LAYOUT_IN_PLACE, Manifest
from .cpu_graph import DYNAMIC_GEMM, check_against_portable, cpu_graph_record, derive_cpu_graph
from .ragged_graph import derive_checked, ragged_graph_record

METHODS = {
    # method: (bits, precision written to the manifest)
    "int8": (8, "int8-weight-only"),
    "int4": (4, "int4-weight-only"),
    "int8-qdq": (8, "int8-qdq"),
    "int8-dynamic": (8, "int8-dynamic"),
}
# int8-dynamic: every layer weight int8 (7-bit values) per output channel in a standard-op integer GEMM (MatMulInteger),
# its input quantised to uint8 per row at run time (_matmuls_to_dynamic). Measured on one full-width
# layer's shapes (2-core Xeon with AMX, quiet host, 200-300 runs each, median ms; MatMulNBits 8-bit
# block 128 / this): M=1 0.150/0.136 (qkv), 0.342/0.348 (gate+up), 0.207/0.179 (down); M=8 0.331/0.181,
# 0.776/0.424, 0.432/0.231. The head too (_head_to_dynamic), over its own copy; the tied embedding's
# lookup stays GatherBlockQuantized over an 8-bit block-128 table.
DEFAULT_BLOCK_SIZE = 32
# int8 without --block-size: 128 weights per scale when every quantised weight's K divides by 128 (else 32).
# Measured on the full-width 4-layer granite-4.0-1b slice (bench/ab_cpu.py, 2-core Xeon with AVX-512 VNNI,
# 30 interleaved rounds, best step): 128-token prefill 234 -> 141 ms, batch-8 decode 52 -> 37 ms, batch-1
# decode unchanged (27 vs 29 ms), 0.15 GiB less RSS; an 8-bit scale per 128 weights costs little accuracy.
# int4 keeps 32 (the block onnxruntime-genai and llama.cpp's Q4_0 use): 128 was faster there too, but a
# 4-bit step over 128 weights is coarse, and the gate on a real model decides (--block-size 128).
DEFAULT_BLOCK_SIZE_BY_METHOD = {"int8": 128, "int8-dynamic": 128}
DEFAULT_ACCURACY_LEVEL = 4
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXTERNAL_ALIGN = 4096  # page-aligned offsets let ONNX Runtime mmap the weights
EXTERNAL_MIN_BYTES = 1024
HEAD_NAME = "lm_head.weight_t"  # the head's own [hidden, vocab] weight, before quantization

log = logging.getLogger(__name__)


class QuantizeError(GraniteDeployError):
    """Quantization was refused (bad input, exit 2) or failed; nothing was written at the output path."""

    exit_code = 2


class GateFailed(QuantizeError, VerificationFailed):
    """The quantized graph failed its accuracy gate (exit 3); nothing was written."""

    exit_code = 3


# --- inputs ----------------------------------------------------------------------------------
def check_options(method: str, block_size: int | None, accuracy_level: int | None) -> int:
    if method not in METHODS:
        raise QuantizeError(f"method: {method!r} is not one of {', '.join(METHODS)} "
                            "(CLI: --int8 / --int8-dynamic, --int8-weight-only, --int4, --int8-qdq)")
    if method == "int8-qdq":
        if block_size is not None:
            raise QuantizeError("--block-size: applies to --int8/--int4 only (--int8-qdq uses one scale per "
                                "output channel)")
        return 0
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizeError(f"--block-size: {block_size} must be a power of two and at least 16 (MatMulNBits)")
    if accuracy_level not in (None, 0, 1, 4):
        raise QuantizeError(f"--accuracy-level: {accuracy_level} is not one of 0 (unset), 1 (fp32), 4 (int8)")
    return block_size


def read_source(artifact: Path) -> Manifest:
    """The source manifest, after checking every file's hash and that it is an fp32 graph."""
    with progress.step(f"verifying source artifact {artifact}"):
        manifest = verify(artifact, load_graph=False)
    path = artifact / MANIFEST
    graph = manifest.graph(DECODER)
    if "quantization" in manifest.extra or graph.precision != "fp32":
        raise QuantizeError(
            f"{path}: graphs.decoder.precision is {graph.precision!r}; quantize needs an fp32 artifact "
            "made by `granite-deploy export` (re-quantizing a quantized or half-precision graph compounds "
            "its rounding error)"
        )
    if graph.kv_layout != KV_LAYOUT_IN_PLACE:
        raise QuantizeError(f"{path}: decoder cache layout {dict(graph.kv_cache)} is not {KV_LAYOUT_IN_PLACE!r}")
    return manifest


def default_block_size(model, method: str) -> int:
    """The block size for `method` when none was asked for: DEFAULT_BLOCK_SIZE_BY_METHOD's when it divides
    the input dimension K of every weight to quantise (MatMul weights [K, N], the head Gemm's [N, K]), else
    DEFAULT_BLOCK_SIZE."""
    block = DEFAULT_BLOCK_SIZE_BY_METHOD.get(method, DEFAULT_BLOCK_SIZE)
    inits = _initializers(model)
    ks = [int(inits[n.input[1]].dims[0]) for n in model.graph.node
          if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    ks += [int(inits[n.input[1]].dims[1]) for n in model.graph.node
           if n.op_type == "Gemm" and len(n.input) >= 2 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    return block if ks and all(k % block == 0 for k in ks) else DEFAULT_BLOCK_SIZE


# --- graph surgery -----------------------------------------------------------------------------
def _initializers(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def _to_array(tensor) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def _find_head(model, inits: dict):
    """(head Gemm node, embedding Gather node or None) for the graph's output projection."""
    gemms = [n for n in model.graph.node if n.op_type == "Gemm" and len(n.input) == 2 and n.input[1] in inits]
    if len(gemms) != 1:
        return None, None
    gemm = gemms[0]
    attrs = {a.name: a for a in gemm.attribute}
    if attrs.get("transA") and attrs["transA"].i or "transB" not in attrs or attrs["transB"].i != 1 \
            or any(k in attrs and attrs[k].f != 1.0 for k in ("alpha", "beta")):
        return None, None
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == gemm.input[1]
               and all(a.i == 0 for a in n.attribute if a.name == "axis")]
    return gemm, (gathers[0] if len(gathers) == 1 else None)


def _head_to_matmul(model, gemm) -> str:
    """Replace the head's Gemm(x, W, transB=1) by MatMul(x, W^T) over a new [hidden, vocab] initializer."""
    from onnx import helper, numpy_helper

    inits = _initializers(model)
    weight = _to_array(inits[gemm.input[1]])
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), HEAD_NAME))
    matmul = helper.make_node("MatMul", [gemm.input[0], HEAD_NAME], list(gemm.output), name="lm_head/MatMul")
    nodes = [matmul if n.op_type == "Gemm" and list(n.output) == list(gemm.output) else n for n in model.graph.node]
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return matmul.output[0]


def _drop_unused_initializers(model) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used or t.name in {i.name for i in model.graph.input}]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(keep)


# 7-bit weights: on x86 CPUs without VNNI (AVX2, e.g. AMD Zen 2) MLAS's uint8 x int8 kernel multiplies with
# vpmaddubsw, which adds two u8*s8 products into a saturating int16: 255*127*2 overflows it and wrecked
# the result (greedy agreement 58% on the tiny test model, a 64-term dot product of 255s and 127s gave 8160
# instead of 1032256); 255*63*2 fits. ONNX Runtime's quantiser calls this reduce_range. VNNI/AMX hosts
# would not need it, but the artifact does not know where it will run.
DYNAMIC_WEIGHT_QMAX = 63


def _matmuls_to_dynamic(model, keep: set) -> list:
    """Every MatMul(x, W) with a constant 2-D W not in `keep` becomes an integer GEMM over W rounded to
    [-63, 63] per output channel (symmetric; DYNAMIC_WEIGHT_QMAX), with x quantised at run time one row
    (token) at a time:

        s = max|x| / 127 over the last axis;  xq = QuantizeLinear(x, s, 128)  (uint8, the row as one block)
        y = DequantizeLinear(MatMulInteger(xq, Wq, 128), s) * w_scale  (int32 accumulators, the row as one block)

    Per row, not per tensor (com.microsoft.DynamicQuantizeMatMul's one scale for the whole input), so a
    token's result does not depend on which other tokens share the step: the ragged step and the
    per-request graph agree. uint8 x int8 is MLAS's VNNI/AMX integer GEMM (int8 x int8 was ~20x slower
    in the same measurement). Returns the weights it replaced."""
    from onnx import TensorProto, helper, numpy_helper

    inits = _initializers(model)
    consts = {"dyn8/axis": np.array([-1], np.int64), "dyn8/eps": np.float32(1e-12),
              "dyn8/inv127": np.float32(1.0 / 127.0), "dyn8/zero": np.uint8(128)}
    done, nodes = [], []
    new_inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items() if k not in inits]
    for n in model.graph.node:
        w = inits.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
        if w is None or n.input[1] in keep or len(w.dims) != 2:
            nodes.append(n)
            continue
        weight = _to_array(w).astype(np.float32)
        scale = np.abs(weight).max(axis=0) / DYNAMIC_WEIGHT_QMAX
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(weight / scale), -DYNAMIC_WEIGHT_QMAX, DYNAMIC_WEIGHT_QMAX).astype(np.int8)
        wq, ws = f"{n.input[1]}_i8", f"{n.input[1]}_i8_scale"
        new_inits += [numpy_helper.from_array(q, wq), numpy_helper.from_array(scale, ws)]
        p = f"{n.name or n.output[0]}{DYNAMIC_GEMM}"
        x = n.input[0]
        k_in, n_out = (int(d) for d in w.dims)
        nodes += [
            helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/abs"),
            helper.make_node("ReduceMax", [f"{p}/abs", "dyn8/axis"], [f"{p}/absmax"], name=f"{p}/absmax", keepdims=1),
            helper.make_node("Max", [f"{p}/absmax", "dyn8/eps"], [f"{p}/absmax_eps"], name=f"{p}/absmax_eps"),
            helper.make_node("Mul", [f"{p}/absmax_eps", "dyn8/inv127"], [f"{p}/scale"], name=f"{p}/scale"),
            # One scale per row is a blocked QuantizeLinear with the whole row as the block; its zero
            # point must have the scale's shape (ONNX Runtime checks).
            helper.make_node("Shape", [f"{p}/scale"], [f"{p}/scale_shape"], name=f"{p}/scale_shape"),
            helper.make_node("ConstantOfShape", [f"{p}/scale_shape"], [f"{p}/x_zero"], name=f"{p}/x_zero",
                             value=numpy_helper.from_array(np.array([128], np.uint8))),
            helper.make_node("QuantizeLinear", [x, f"{p}/scale", f"{p}/x_zero"], [f"{p}/xq"], name=f"{p}/xq",
                             axis=-1, block_size=k_in),
            helper.make_node("MatMulInteger", [f"{p}/xq", wq, "dyn8/zero"], [f"{p}/acc"], name=f"{p}/gemm"),
            helper.make_node("DequantizeLinear", [f"{p}/acc", f"{p}/scale"], [f"{p}/row_scaled"], name=f"{p}/row_scaled",
                             axis=-1, block_size=n_out),
            helper.make_node("Mul", [f"{p}/row_scaled", ws], list(n.output), name=f"{p}/out"),
        ]
        done.append(n.input[1])
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new_inits)
    _drop_unused_initializers(model)
    return done


def quantize_nbits(model, bits: int, block_size: int, accuracy_level: int | None, quantize_head: bool = True,
                   dynamic_layers: bool = False) -> dict:
    """MatMulNBits for every MatMul with a constant weight (and the tied head + lookup). Returns what it did.

    dynamic_layers (int8-dynamic): every MatMul but the head first becomes a per-row dynamic int8 GEMM
    (`_matmuls_to_dynamic`), so MatMulNBits is left with the head (and the lookup sharing its table)."""
    from onnx import helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    inits = _initializers(model)
    gemm, gather = _find_head(model, inits)
    embed_name = gemm.input[1] if gemm is not None else None
    head_out = _head_to_matmul(model, gemm) if (quantize_head and gemm is not None) else None
    weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in _initializers(model)]
    head_float = None
    if dynamic_layers:
        _matmuls_to_dynamic(model, keep={HEAD_NAME})
        if head_out is not None:  # the head becomes a dynamic GEMM too, after the lookup's table is built
            head_float = _to_array(_initializers(model)[HEAD_NAME]).astype(np.float32)

    quant_logger = logging.getLogger("onnxruntime.quantization")
    old_level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)
    try:
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                         accuracy_level=accuracy_level or None)
        quantizer.process()
    finally:
        quant_logger.setLevel(old_level)
    model = quantizer.model.model
    if bits == 4:
        _scales_to_fp16_values(model)
    left = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in _initializers(model)]
    if left:
        raise QuantizeError(f"MatMulNBitsQuantizer left {len(left)} MatMul weight(s) unquantized: {left[:3]}")

    record = {"head": "float32 Gemm over the tied float32 embedding (not quantized)",
              "embedding": "float32 Gather", "model": model}
    if head_out is not None:
        head = next(n for n in model.graph.node if head_out in n.output)
        if head.op_type != "MatMulNBits":
            raise QuantizeError(f"the output head was not quantized (got {head.op_type})")
        record["head"] = f"MatMulNBits over the transposed embedding ({bits}-bit, block {block_size})"
        inits = _initializers(model)
        hidden = int(inits[embed_name].dims[1]) if embed_name in inits else 0
        if gather is not None and hidden and hidden % block_size == 0:
            # Share the head's packed weight and scales with the token lookup.
            # MatMulNBits insists on B's 3-D shape [vocab, k_blocks, blob] and GatherBlockQuantized on
            # [vocab, hidden * bits / 8]: two initializers with the same bytes, which `save_model` stores once.
            packed = _initializers(model)[head.input[1]]
            rows = copy.deepcopy(packed)
            rows.name = f"{embed_name}_q{bits}"
            del rows.dims[:]
            rows.dims.extend([packed.dims[0], hidden * bits // 8])
            model.graph.initializer.append(rows)
            lookup = helper.make_node(
                "GatherBlockQuantized", [rows.name, gather.input[1], head.input[2]], list(gather.output),
                name="embed/GatherBlockQuantized", domain="com.microsoft",
                gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits,
            )
            nodes = [lookup if n.op_type == "Gather" and list(n.output) == list(gather.output) else n
                     for n in model.graph.node]
            model.graph.ClearField("node")
            model.graph.node.extend(nodes)
            record["embedding"] = (f"GatherBlockQuantized sharing the head's {bits}-bit weight and scales "
                                   "(the tied table is stored once, quantized)")
        _drop_unused_initializers(model)
        if head_float is not None:
            record["head"] = _head_to_dynamic(model, head, head_float)
            if gather is not None and record["embedding"].startswith("GatherBlockQuantized"):
                record["embedding"] = (f"GatherBlockQuantized over the {bits}-bit block-{block_size} table "
                                       "(the tied embedding; the head reads its own 7-bit copy)")
    record["weights"] = weights
    return record


def _scales_to_fp16_values(model) -> int:
    """Round each 4-bit MatMulNBits' fp32 scales to the nearest fp16 value (still stored as fp32); returns
    how many scale tensors changed.

    Why: the CPU engine's MatMulQ4 keeps scales as fp16 (4.5 bits a weight at block 32 instead of 5, a
    tenth fewer bytes per decode step); scales that are fp16 values already convert exactly, so every
    runtime (MLAS, MatMulQ4, TensorRT) multiplies by the same scales. The change is at most 2^-11 of a
    scale, far inside 4-bit rounding. A tensor with a scale outside fp16's normal range is left as it is
    (the engine then leaves its node to MLAS)."""
    from onnx import numpy_helper

    from ..engines.kernels.layout import fp16_scales_fit

    inits = _initializers(model)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        tensor = inits[node.input[2]]
        scales = _to_array(tensor)
        if scales.dtype != np.float32 or not fp16_scales_fit(scales):
            continue
        rounded = scales.astype(np.float16).astype(np.float32)
        if not np.array_equal(rounded, scales):
            tensor.CopyFrom(numpy_helper.from_array(rounded, tensor.name))
            changed += 1
    return changed


def _head_to_dynamic(model, head, weight) -> str:
    """Replace the head's MatMulNBits by the per-row dynamic int8 GEMM of the layers (_matmuls_to_dynamic)
    over its own 7-bit per-channel copy of `weight` [hidden, vocab]; the lookup keeps the MatMulNBits table.

    Why: MLAS's integer GEMM reads the 1B head (100352 x 2048) in 8.4 ms at batch 1 and 20.7 ms at batch 8
    where 8-bit MatMulNBits takes 10.1 and 41.9 (AMD EPYC Zen 2, AVX2, 2 threads), for 205 MB more on disk."""
    from onnx import helper, numpy_helper

    name = f"{HEAD_NAME}_dynamic"
    model.graph.initializer.append(numpy_helper.from_array(weight, name))
    matmul = helper.make_node("MatMul", [head.input[0], name], list(head.output), name="lm_head/MatMul")
    nodes = [matmul if list(n.output) == list(head.output) else n for n in model.graph.node]
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    if _matmuls_to_dynamic(model, keep=set()) != [name]:
        raise QuantizeError("internal error: the dynamic head conversion touched other weights")
    return (f"MatMulInteger over its own int8 copy of the transposed embedding ({DYNAMIC_WEIGHT_QMAX * 2 + 1} "
            "levels per output channel), input quantised per row at run time, as the layers")


def quantize_qdq(model, quantize_head: bool = True) -> dict:
    """int8 per-output-channel weights + DequantizeLinear(zero point 0) before every MatMul; standard ops."""
    from onnx import TensorProto, helper, numpy_helper

    inits = _initializers(model)
    gemm, _ = _find_head(model, inits)
    if quantize_head and gemm is not None:
        _head_to_matmul(model, gemm)
    inits = _initializers(model)
    new_nodes, quantized = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and inits[node.input[1]].data_type == TensorProto.FLOAT:
            name = node.input[1]
            w = _to_array(inits[name])
            if w.ndim != 2:
                new_nodes.append(node)
                continue
            scale = np.abs(w).max(axis=0) / 127.0
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            model.graph.initializer.extend([
                numpy_helper.from_array(q, f"{name}_int8"),
                numpy_helper.from_array(scale, f"{name}_scale"),
                numpy_helper.from_array(np.zeros(w.shape[1], np.int8), f"{name}_zero_point"),
            ])
            new_nodes.append(helper.make_node(
                "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"], [f"{name}_dequantized"],
                name=f"{node.name or name}/DequantizeLinear", axis=1))
            new_nodes.append(helper.make_node("MatMul", [node.input[0], f"{name}_dequantized"], list(node.output),
                                              name=node.name))
            quantized.append(name)
        else:
            new_nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(new_nodes)
    _drop_unused_initializers(model)
    return {
        "model": model,
        "weights": quantized,
        "head": ("int8 per-channel DequantizeLinear -> MatMul over its own copy of the transposed embedding"
                 if quantize_head and gemm is not None else "float32 Gemm over the tied float32 embedding"),
        "embedding": "float32 Gather (the lookup reads only the rows it needs)",
    }


# --- saving ----------------------------------------------------------------------------------------
def save_model(model, out_dir: Path, graph_file: str = GRAPH_FILE, data_file: str = DATA_FILE) -> tuple[Path, Path]:
    """Write the graph with every initializer of >= 1 KiB in one external data file, at page-aligned offsets;
    tensors with identical bytes are stored once."""
    import onnx
    from onnx import TensorProto

    seen: dict[tuple, int] = {}
    with open(out_dir / data_file, "wb") as f:
        for tensor in model.graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL:
                raise QuantizeError(f"initializer {tensor.name} still points to external data")
            if not tensor.HasField("raw_data"):
                array = _to_array(tensor)
                if array.nbytes < EXTERNAL_MIN_BYTES:
                    continue
                raw = array.tobytes()
                tensor.ClearField(onnx.helper.tensor_dtype_to_field(tensor.data_type))
            else:
                raw = tensor.raw_data
            if len(raw) < EXTERNAL_MIN_BYTES:
                continue
            key = (len(raw), hashlib.sha256(raw).digest())
            if key in seen:
                offset = seen[key]
            else:
                offset = f.tell()
                pad = (-offset) % EXTERNAL_ALIGN
                if pad:
                    f.write(b"\0" * pad)
                    offset += pad
                f.write(raw)
                seen[key] = offset
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            del tensor.external_data[:]
            for k, v in (("location", data_file), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = k, v
    onnx.save_model(model, str(out_dir / graph_file))
    return out_dir / graph_file, out_dir / data_file


def graph_ops(path: Path) -> dict:
    """{domain: sorted op types} of a saved graph (weights not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: dict[str, set] = {}
    for n in model.graph.node:
        ops.setdefault(n.domain or "ai.onnx", set()).add(n.op_type)
    return {d: sorted(v) for d, v in sorted(ops.items())}


def _tool_versions() -> dict:
    import onnx
    import onnxruntime

    return {
        "granite-deploy": __version__,
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


# --- the command -------------------------------------------------------------------------------------
def quantize(
    artifact: str | Path,
    output: str | Path,
    method: str,
    block_size: int | None = None,
    calibration: str | Path | None = None,
    force: bool = False,
    skip_gate: bool = False,
    thresholds: dict | None = None,
    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL,
    quantize_head: bool = True,
    decode_steps: int | None = None,
    ppl_max_tokens: int | None = None,
) -> Path:
    """Quantize the fp32 artifact at `artifact` into a new artifact folder at `output`; returns its path.

    `calibration` is a UTF-8 text file held out from training: the perplexity
    half of the accuracy gate runs on it (the built-in sample text otherwise).
    `thresholds` overrides the gate's defaults ({"max_ppl_increase": 0.02,
    "min_greedy_agreement": 0.9}, either key). Raises QuantizeError (or
    ArtifactError for a bad source/output) and writes nothing on failure.
    """
    from . import accuracy

    block_requested = block_size
    block_size = check_options(method, block_size, accuracy_level)
    if method == "int8-qdq":
        accuracy_level = None
    bits, precision = METHODS[method]
    source, output = Path(artifact), Path(output)
    if not source.is_dir():
        raise BadArtifactPath(f"{source}: not an artifact folder (no such directory)")
    if output.resolve() == source.resolve():
        raise QuantizeError(f"--output: {output} is the source artifact itself")
    text_path = None
    if calibration is not None:
        text_path = Path(calibration)
        if not text_path.is_file():
            raise QuantizeError(f"--calibration: {text_path} is not a file")
    gate = accuracy.thresholds_for(method, thresholds)
    if output.is_dir() and any(output.iterdir()) and not force:  # fail before hashing a multi-GB source
        raise BadArtifactPath(f"{output.resolve()}: exists and is not empty; pass --force to replace it")
    src_manifest = read_source(source)
    src_graph = src_manifest.graph(DECODER)
    started = time.time()

    with staging_dir(output, force) as stage:
        import onnx

        with progress.step(f"loading {source / src_graph.file}"):
            model = onnx.load(str(source / src_graph.file))
        if block_requested is None and method != "int8-qdq":
            block_size = default_block_size(model, method)
        with progress.step(f"quantizing ({method}{'' if method == 'int8-qdq' else f', block {block_size}'})"):
            if method == "int8-qdq":
                done = quantize_qdq(model, quantize_head)
            else:
                done = quantize_nbits(model, bits, block_size, accuracy_level, quantize_head,
                                      dynamic_layers=method == "int8-dynamic")
            model = done.pop("model")
        with progress.step("writing the graph"):
            onnx_path, data_path = save_model(model, stage)
            del model
            onnx.checker.check_model(str(onnx_path), full_check=False)
        ops = graph_ops(onnx_path)
        custom = [d for d in ops if d not in ("ai.onnx",)]
        if method == "int8-qdq" and custom:
            raise QuantizeError(f"internal error: the QDQ graph uses non-standard domains {custom}")

        # Every graph of the source (and its weights) is replaced; the rest is copied.
        graph_files = {MANIFEST}
        for g in src_manifest.graphs.values():
            graph_files |= {g.file, *g.external_data}
        for name in src_manifest.files:
            if name not in graph_files:
                shutil.copy2(source / name, stage / name)

        with progress.step(f"accuracy gate against the fp32 source ({method})"):
            record = accuracy.evaluate(
                source / src_graph.file, onnx_path, src_manifest.architecture, source, gate,
                text_path=text_path, **({"decode_steps": decode_steps} if decode_steps else {}),
                **({"max_tokens": ppl_max_tokens} if ppl_max_tokens else {}),
            )
        record["gate"] = "skipped (--skip-gate): written despite failing" if skip_gate and not record["passed"] \
            else ("skipped (--skip-gate)" if skip_gate else "enforced")
        if not record["passed"] and not skip_gate:
            raise GateFailed(
                f"accuracy gate failed for {method}: " + "; ".join(record["failures"])
                + f"; nothing written at {output} (pass --skip-gate to write it anyway, with the failure recorded)"
            )

        arch = src_manifest.architecture
        with progress.step("deriving the ONNX Runtime CPU flavour and checking it against the quantized graph"):
            cpu_path = derive_cpu_graph(onnx_path, arch.num_heads)
            onnx.checker.check_model(str(cpu_path), full_check=False)
            cpu_check = check_against_portable(onnx_path, cpu_path, arch)
        if not cpu_check["passed"]:
            raise QuantizeError(f"internal error: {cpu_path.name} differs from {onnx_path.name} by "
                                f"{cpu_check['max_abs_logit_diff']:.3g} in logits; nothing written")
        with progress.step("deriving the ragged-step flavour and checking it against the CPU flavour"):
            ragged_path, ragged_check = derive_checked(cpu_path, arch)

        source_record = {
            "path": str(source.resolve()),
            "manifest_sha256": hashlib.sha256((source / MANIFEST).read_bytes()).hexdigest(),
            "precision": src_graph.precision,
            "graph_sha256": src_manifest.files[src_graph.file].sha256,
        }
        validation = dict(src_manifest.validation)
        if validation:
            validation["applies_to"] = "the fp32 source graph; see 'accuracy' for this graph"
        ort_only = "com.microsoft" in ops
        graph = dataclasses.replace(
            src_graph,
            file=onnx_path.name,
            external_data=(data_path.name,),
            precision=precision,
            engines=("onnxruntime",) if ort_only else ("onnxruntime", "tensorrt"),
            extra=MappingProxyType({
                **src_graph.extra,
                "ops": ("standard ONNX + com.microsoft " + ", ".join(ops["com.microsoft"]) + " (ONNX Runtime only)"
                        if ort_only else "standard ONNX only (no com.microsoft)"),
                "op_domains": ops,
                "onnxruntime_only_ops": ort_only,
            }),
        )
        graphs = {DECODER: graph, DECODER_CPU: cpu_graph_record(graph, cpu_path, arch, cpu_check)}
        graphs[DECODER_RAGGED] = ragged_graph_record(graphs[DECODER_CPU], ragged_path, arch, ragged_check)
        import onnxruntime

        quantization = {
            "method": method,
            "algorithm": ("round-to-nearest, symmetric, one scale per output channel for the layer weights, "
                          f"7-bit values [-{DYNAMIC_WEIGHT_QMAX}, {DYNAMIC_WEIGHT_QMAX}] in int8 (MatMulInteger over a per-row "
                          "uint8 quantisation of the input; 7 bits so non-VNNI x86 kernels cannot overflow), the head likewise over "
                          "its own copy; the embedding lookup's table blockwise along hidden (MatMulNBitsQuantizer)"
                          if method == "int8-dynamic" else
                          "round-to-nearest, symmetric, blockwise along the input dimension "
                          "(onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer)"
                          if method != "int8-qdq" else
                          "round-to-nearest, symmetric, one scale per output channel, zero point 0; "
                          "DequantizeLinear(axis=1) -> MatMul (QuantizeLinear applied offline)"),
            "bits": bits,
            "block_size": block_size if method != "int8-qdq" else None,
            "granularity": (f"per output channel (layers, head), block of {block_size} along hidden (embedding lookup)"
                            if method == "int8-dynamic" else
                            f"block of {block_size} along K" if method != "int8-qdq" else "per output channel"),
            "symmetric": True,
            "weight_only": method != "int8-dynamic",  # int8-dynamic quantises activations too
            "activations": ("float32 in the graph; each layer GEMM and the head quantise their input to uint8 "
                            "at run time, one symmetric scale per row (token), zero point 128"
                            if method == "int8-dynamic" else
                            f"float32 in the graph; MatMulNBits accuracy_level {accuracy_level or 0} ("
                            + ("int8 compute inside the kernel" if accuracy_level == 4 else "float compute") + ")"
                            if method != "int8-qdq" else "float32"),
            "accuracy_level": accuracy_level if method != "int8-qdq" else None,
            "weights": done["weights"],
            "head": done["head"],
            "embedding": done["embedding"],
            "not_quantized": "RMSNorm weights, rotary tables, scalar multipliers (float32)",
            "runtime_note": ("ONNX Runtime's CPU optimizer fuses each DequantizeLinear -> MatMul into an 8-bit "
                             "MatMulNBits (session option session.qdq_matmulnbits_accuracy_level, default 4); "
                             "TensorRT reads the Q/DQ graph as explicit INT8 weights"
                             if method == "int8-qdq" else
                             "each layer GEMM is MatMulInteger (uint8 x int8: MLAS's VNNI/AMX integer kernels); "
                             "the per-row quantisation of its input is standard elementwise ops"
                             if method == "int8-dynamic" else
                             "accuracy_level 4 quantizes each MatMulNBits input per block to int8 inside the "
                             "kernel; 0/1 keep float compute (8-bit MatMulNBits with float compute measured "
                             "~17x slower than float32 MatMul for the 1B head on an AVX-512 CPU)"),
            "tools": {**_tool_versions(), "quantizer": (f"onnxruntime {onnxruntime.__version__} MatMulNBitsQuantizer"
                                                        if method != "int8-qdq" else
                                                        "granite_deploy.export.quantize (numpy), onnx")},
        }
        extra = {k: v for k, v in src_manifest.extra.items() if k not in ("quantization", "accuracy")}
        manifest = src_manifest.replace(
            created_unix=int(started),
            graphs=graphs,
            validation=validation,
            plans=(),  # plans were built from the source graph
            extra={**extra, "source_artifact": source_record, "quantization": quantization, "accuracy": record,
                   "tools": {**src_manifest.extra.get("tools", {}), **_tool_versions()}},
            files=file_records(stage, [p.name for p in stage.iterdir() if p.is_file()]),
        )
        write_manifest(stage, manifest)
    return output


def summary(artifact: Path) -> str:
    m = load_manifest(artifact)
    a, g = m.extra["accuracy"], m.graph(DECODER)
    size = sum(r.bytes for n, r in m.files.items() if n in (g.file, *g.external_data))
    p = a["perplexity"]
    return (
        f"wrote {artifact} ({g.precision}, graph {size / 2**20:.1f} MiB, engines: {', '.join(g.engines)}): "
        f"greedy agreement {a['greedy']['agreement']:.1%} over {a['greedy']['decode_steps']} steps x "
        f"{len(a['greedy']['prompt_lengths'])} prompts, perplexity {p['reference']:.3f} -> {p['quantized']:.3f} "
        f"({p['relative_increase']:+.2%}); gate {'passed' if a['passed'] else 'FAILED'} ({a['gate']})"
    )


__all__ = ["quantize", "QuantizeError", "METHODS", "summary", "quantize_nbits", "quantize_qdq", "save_model"]
