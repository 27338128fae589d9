"""Static check: does a graph contain only what TensorRT's ONNX parser takes?

Run before a TensorRT build (and by `granite-deploy check-ops`), so that a
graph with an ONNX Runtime contrib op, a dynamic-quantization op, a type or an
attribute the parser refuses is named up front instead of failing deep inside
`trt.OnnxParser`. The supported-op list lives in
`engines/tensorrt_supported_ops.txt` (its header names its source); besides
op names and opset range it checks each node's data type against the list's
types and the restrictions of the ops this project emits (TensorScatter axis,
Attention inputs/outputs/attributes, constant axes, ...).

This only reads the graph (no weights), so it runs anywhere: no TensorRT, no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_OPS_FILE = Path(__file__).resolve().parent.parent / "engines" / "tensorrt_supported_ops.txt"
TARGET = "TensorRT 10.15"
DEFAULT_DOMAINS = ("", "ai.onnx")
# Refused whatever the list says, with the reason spelled out.
ALWAYS_REFUSED = {
    "MatMulInteger": "integer MatMul (dynamic quantization) is not imported by TensorRT; use QuantizeLinear/"
                     "DequantizeLinear pairs (explicit QDQ) instead",
    "DynamicQuantizeLinear": "dynamic quantization is not imported by TensorRT; use explicit QDQ with static scales",
}

_TYPE_NAMES = {
    1: "FP32", 10: "FP16", 16: "BF16", 11: "DOUBLE", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL",
    17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4", 21: "UINT4", 23: "FP4", 8: "STRING", 4: "UINT16",
    5: "INT16", 12: "UINT32", 13: "UINT64",
}
# Which input carries the op's data type (default: input 0); None = do not type-check.
_DATA_INPUT = {"Where": 1, "Shape": None, "Size": None, "ConstantOfShape": None, "Constant": None,
               "DequantizeLinear": 0, "Range": 0, "If": None, "Loop": None, "Scan": None}


class OpCheckError(ValueError):
    """The graph or the supported-op list cannot be read."""


@dataclass
class SupportedOps:
    source: Path
    min_opset: int
    max_opset: int
    ops: dict[str, tuple[bool, tuple[str, ...], str]]  # name -> (supported, types, restriction text)


@dataclass
class OpStatus:
    domain: str
    op_type: str
    count: int = 0
    problems: set[str] = field(default_factory=set)
    nodes: list[str] = field(default_factory=list)

    @property
    def supported(self) -> bool:
        return not self.problems

    @property
    def qualified_name(self) -> str:
        return self.op_type if self.domain in DEFAULT_DOMAINS else f"{self.domain}::{self.op_type}"


@dataclass
class CheckReport:
    graph: str
    target: str
    opset: int | None
    ops: list[OpStatus]
    graph_problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.graph_problems and all(s.supported for s in self.ops)

    @property
    def unsupported(self) -> list[OpStatus]:
        return [s for s in self.ops if not s.supported]

    def lines(self) -> list[str]:
        out = [f"{self.graph}: opset {self.opset}, target {self.target}"]
        out += [f"  graph: UNSUPPORTED: {p}" for p in self.graph_problems]
        width = max([len(s.qualified_name) for s in self.ops] + [10])
        for s in self.ops:
            status = "ok" if s.supported else "UNSUPPORTED: " + "; ".join(sorted(s.problems))
            where = "" if s.supported else f" (e.g. node {s.nodes[0]!r})"
            out.append(f"  {s.qualified_name:<{width}} x{s.count:<4} {status}{where}")
        verdict = "all ops supported" if self.ok else f"{len(self.unsupported)} unsupported op type(s)"
        out.append(f"  => {verdict}")
        return out


def load_supported_ops(path: str | Path | None = None) -> SupportedOps:
    path = Path(path or SUPPORTED_OPS_FILE)
    if not path.is_file():
        raise OpCheckError(f"{path}: supported-op list missing")
    min_opset, max_opset, ops = None, None, {}
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("opsets "):
            min_opset, max_opset = (int(x) for x in line.split()[1:3])
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 3 or parts[1] not in ("Y", "N"):
            raise OpCheckError(f"{path}:{n}: expected 'Operator | Y/N | types | restrictions', got {raw!r}")
        types = tuple(t.strip() for t in parts[2].split(",") if t.strip())
        ops[parts[0]] = (parts[1] == "Y", types, parts[3] if len(parts) > 3 else "")
    if min_opset is None:
        raise OpCheckError(f"{path}: no 'opsets MIN MAX' line")
    return SupportedOps(path, min_opset, max_opset, ops)


def _iter_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.HasField("g"):
                yield from _iter_nodes(attr.g)
            for sub in attr.graphs:
                yield from _iter_nodes(sub)


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _restriction_problems(node, types: dict, ranks: dict, constants: set) -> list[str]:
    """Machine-checked parts of the list's restriction column, for the ops this project (and QDQ) emit."""
    op, problems = node.op_type, []
    inputs = list(node.input)

    def present(i):
        return len(inputs) > i and inputs[i] != ""

    if op == "TensorScatter":
        if _attr(node, "axis", -2) != -2:
            problems.append(f"axis must be -2 (got {_attr(node, 'axis')})")
        for i, what in ((0, "past_cache"), (1, "update")):
            if present(i) and ranks.get(inputs[i]) not in (None, 4):
                problems.append(f"{what} must be 4D (rank {ranks[inputs[i]]})")
    elif op == "Attention":
        if any(present(i) for i in (4, 5, 6)):
            problems.append("past_key/past_value/nonpad_kv_seqlen inputs are not supported")
        if len([o for o in node.output if o]) > 1:
            problems.append("only the first output (Y) is supported")
        if _attr(node, "softcap", 0.0):
            problems.append("softcap is not supported")
        if _attr(node, "qk_matmul_output_mode", 0):
            problems.append("qk_matmul_output_mode is not supported")
        for i, what in ((0, "Q"), (1, "K"), (2, "V"), (3, "attn_mask")):
            if present(i) and ranks.get(inputs[i]) not in (None, 4):
                problems.append(f"{what} must be 4D (rank {ranks[inputs[i]]})")
    elif op == "RotaryEmbedding":
        if present(3) and types.get(inputs[3]) not in (None, 7):
            problems.append("position_ids must be INT64")
    elif op in ("Squeeze", "Unsqueeze"):
        if present(1) and inputs[1] not in constants:
            problems.append("axes must be a constant")
    elif op.startswith("Reduce"):
        if present(1) and inputs[1] not in constants:
            problems.append("axes must be an initializer")
    elif op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            problems.append("sorted must be 1")
    elif op == "ScatterND":
        if _attr(node, "reduction", "none") not in ("none", b"none"):
            problems.append("reduction other than none is not supported")
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        zp = 2
        if present(zp) and inputs[zp] not in constants:
            problems.append("zero point must be a constant zero")
    elif op == "Cast":
        to = _attr(node, "to")
        name = _TYPE_NAMES.get(to, str(to))
        if name not in ("FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"):
            problems.append(f"cast to {name} is not supported")
    return problems


def check_model(model, supported: SupportedOps | None = None, name: str = "graph") -> CheckReport:
    """Check an in-memory onnx.ModelProto (weights need not be loaded)."""
    import onnx

    supported = supported or load_supported_ops()
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    graph_problems = []
    if opset is None or not supported.min_opset <= opset <= supported.max_opset:
        graph_problems.append(f"default-domain opset {opset} is outside the parser's range "
                              f"{supported.min_opset}..{supported.max_opset}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # unknown contrib ops can stop inference; check names anyway
        inferred = model
    types, ranks = {}, {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        types[v.name] = t.elem_type
        if t.HasField("shape"):
            ranks[v.name] = len(t.shape.dim)
    constants = set()
    for init in model.graph.initializer:
        types[init.name], ranks[init.name] = init.data_type, len(init.dims)
        constants.add(init.name)
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants.update(node.output)

    statuses: dict[tuple[str, str], OpStatus] = {}
    for node in _iter_nodes(model.graph):
        key = (node.domain if node.domain not in DEFAULT_DOMAINS else "", node.op_type)
        st = statuses.setdefault(key, OpStatus(*key))
        st.count += 1
        problems = []
        if key[0]:
            if key[0] == "com.microsoft":
                problems.append("com.microsoft op (ONNX Runtime contrib op): TensorRT's parser does not take it")
            else:
                problems.append(f"custom domain {key[0]!r}: not a standard ONNX op (needs a TensorRT plugin)")
        elif node.op_type in ALWAYS_REFUSED:
            problems.append(ALWAYS_REFUSED[node.op_type])
        elif node.op_type not in supported.ops:
            problems.append(f"not in {TARGET}'s supported-op list")
        else:
            ok, allowed, _ = supported.ops[node.op_type]
            if not ok:
                problems.append(f"listed as unsupported by {TARGET}")
            else:
                idx = _DATA_INPUT.get(node.op_type, 0)
                if idx is not None and len(node.input) > idx and node.input[idx]:
                    t = types.get(node.input[idx])
                    tname = _TYPE_NAMES.get(t) if t else None
                    if tname and allowed and tname not in allowed and not (tname == "DOUBLE" and "FP32" in allowed):
                        problems.append(f"input type {tname} not supported (takes {', '.join(allowed)})")
                problems += _restriction_problems(node, types, ranks, constants)
        if problems:
            st.problems.update(problems)
            if len(st.nodes) < 3:
                st.nodes.append(node.name or node.output[0])
    ops = sorted(statuses.values(), key=lambda s: (s.domain, s.op_type))
    return CheckReport(name, TARGET, opset, ops, graph_problems)


def check_graph_file(path: str | Path, supported: SupportedOps | None = None) -> CheckReport:
    import onnx

    path = Path(path)
    if not path.is_file():
        raise OpCheckError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise OpCheckError(f"{path}: not a readable ONNX model ({exc})") from exc
    return check_model(model, supported, name=str(path))


def check_artifact(artifact: str | Path, supported: SupportedOps | None = None) -> list[CheckReport]:
    """Check every TensorRT-bound graph an artifact's manifest lists (or one .onnx file given directly)."""
    from ..artifact import load_manifest

    artifact = Path(artifact)
    if artifact.is_file() and artifact.suffix == ".onnx":
        return [check_graph_file(artifact, supported)]
    manifest = load_manifest(artifact)
    # The CPU flavour (derived_from another graph) is for ONNX Runtime only; TensorRT builds the portable one.
    return [check_graph_file(artifact / g.file, supported) for g in manifest.graphs.values()
            if g.derived_from is None]
