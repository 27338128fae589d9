"""The artifact manifest as types: the one contract between export, engines and serve.

`manifest.json` is read and written only here. `load` parses and validates it into
frozen dataclasses (`Manifest`, `GraphRecord`, `StateSpec`, `TensorRecord`,
`FileRecord`, `PlanRecord`, `Architecture`) and refuses a malformed one with the
field path named (``.../manifest.json: graphs.decoder.state[3].shape: ...``);
`save` writes one back atomically in the same on-disk layout (format version 1,
which every artifact written so far uses). Producers (export, quantize, the CPU
flavour rewrite, the TensorRT build) build these types; consumers read attributes,
never string keys.

Every file name the manifest holds (the file list, graph files, external data,
tokenizer files, plans) must be a plain relative path inside the artifact folder:
no absolute paths, no `..`, no empty or `.` parts, no backslashes.

This module imports nothing heavy (the server loads it without torch) and nothing
of the project but `errors`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Iterable, Mapping

from .errors import VerificationFailed

MANIFEST = "manifest.json"
FORMAT = "granite-deploy-artifact"
FORMAT_VERSION = 1
# The symbolic dimension of a KV state's shape that engines size (see export/io_spec.py).
CACHE_CAPACITY = "cache_capacity"
# Graph names: the portable decoder, and the optional ONNX Runtime CPU flavour of it
# (same weights file, head-dim-major KV cache; export/cpu_graph.py).
DECODER = "decoder"
DECODER_CPU = "decoder_cpu"
# The ragged-step flavour of decoder_cpu (export/ragged_graph.py, docs/ragged-step.md): every chunk of a
# scheduler step in one call. Its `state` lists group 0's tensors (decoder_cpu's names); group g >= 1
# binds the same tensors under ragged_state_name(name, g).
DECODER_RAGGED = "decoder_ragged"
RAGGED_GROUPS = 2


def ragged_state_name(name: str, group: int) -> str:
    """A decoder_ragged state input/output name for group `group` (group 0: the name itself)."""
    return name if group == 0 else f"group{group}.{name}"


STATE_KINDS = ("kv", "conv", "ssm")
KV_LAYOUT_IN_PLACE = "fixed_capacity_in_place"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")


class ArtifactError(VerificationFailed):
    """An artifact is missing, incomplete, altered or unsafe; the message names the file (exit 3)."""


class BadArtifactPath(ArtifactError):
    """The artifact or output folder named on the command line is unusable (no such folder, no manifest,
    not empty, ...): bad input, exit 2."""

    exit_code = 2


class ManifestError(ArtifactError):
    """manifest.json fails validation; the message names the field path."""

    def __init__(self, where: str, field_path: str, problem: str):
        super().__init__(f"{where}: {field_path}: {problem}" if field_path else f"{where}: {problem}")
        self.field, self.problem = field_path, problem


def _frozen(d: Mapping | None) -> Mapping:
    return MappingProxyType(dict(d or {}))


def _plain(value):
    """JSON-ready copy of a value (mappings and tuples back to dicts and lists)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- the types ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class TensorRecord:
    """One graph input or output: ints for fixed dims, strings for symbolic ones."""

    name: str
    dtype: str
    shape: tuple
    default: int | None = None  # optional input: an initializer gives this value when not fed

    def to_dict(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.default is not None:
            d["default"] = self.default
        return d


@dataclass(frozen=True)
class StateSpec:
    """A per-sequence state tensor: what engines allocate and bind as graph input and output.

    shape is one sequence's (without the batch axis); a KV state names its capacity axis
    CACHE_CAPACITY. in_place: output may be bound to the input's buffer (the graph reads
    the input before writing); False: it needs its own output buffer, copied back.
    """

    input: str
    output: str
    kind: str  # "kv" | "conv" | "ssm"
    layer: int
    shape: tuple
    dtype: str
    in_place: bool

    @property
    def capacity_axis(self) -> int | None:
        """Index of the capacity axis in `shape` (None for fixed-size state)."""
        return self.shape.index(CACHE_CAPACITY) if CACHE_CAPACITY in self.shape else None

    def row_shape(self, capacity: int) -> tuple[int, ...]:
        """One sequence's shape with the capacity axis set to `capacity`."""
        return tuple(capacity if d == CACHE_CAPACITY else d for d in self.shape)

    def batched_shape(self, batch: int, capacity: int) -> tuple[int, ...]:
        return (batch, *self.row_shape(capacity))

    def to_dict(self) -> dict:
        return {"input": self.input, "output": self.output, "kind": self.kind, "layer": self.layer,
                "shape": list(self.shape), "dtype": self.dtype, "in_place": self.in_place}


@dataclass(frozen=True)
class GraphRecord:
    name: str
    file: str
    external_data: tuple[str, ...]
    precision: str
    inputs: tuple[TensorRecord, ...]
    outputs: tuple[TensorRecord, ...]
    state: tuple[StateSpec, ...]
    kv_cache: Mapping = field(default_factory=lambda: _frozen({}))
    opset: int | None = None
    engines: tuple[str, ...] = ()  # empty: every engine
    derived_from: str | None = None
    validation: Mapping | None = None
    extra: Mapping = field(default_factory=lambda: _frozen({}))  # descriptive keys kept as written

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def tensor(self, name: str) -> TensorRecord:
        for t in (*self.inputs, *self.outputs):
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def kv_layout(self) -> str | None:
        return self.kv_cache.get("kind")

    @property
    def recurrent(self) -> bool:
        """Whether any state changes with every token fed (Mamba conv/ssm)."""
        return any(st.kind != "kv" for st in self.state)

    def to_dict(self) -> dict:
        d = {"file": self.file, "external_data": list(self.external_data)}
        if self.opset is not None:
            d["opset"] = self.opset
        d["precision"] = self.precision
        d.update(_plain(self.extra))
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        d["kv_cache"] = _plain(self.kv_cache)
        d["state"] = [s.to_dict() for s in self.state]
        if self.engines:
            d["engines"] = list(self.engines)
        if self.derived_from is not None:
            d["derived_from"] = self.derived_from
        if self.validation is not None:
            d["validation"] = _plain(self.validation)
        return d


@dataclass(frozen=True)
class ProfileRecord:
    """One TensorRT optimisation profile: {input: {"min", "opt", "max"}} shapes."""

    name: str
    index: int
    shapes: Mapping

    def to_dict(self) -> dict:
        return {"name": self.name, "index": self.index, "shapes": _plain(self.shapes)}


@dataclass(frozen=True)
class PlanRecord:
    """A TensorRT plan built into the artifact (engines/tensorrt_build.py)."""

    file: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    max_batch: int
    max_seq: int
    cache_capacity: int
    precision: str
    profiles: tuple[ProfileRecord, ...]
    graph: str = DECODER  # the manifest graph it was built from
    extra: Mapping = field(default_factory=lambda: _frozen({}))

    def profile_index(self, name: str) -> int:
        for p in self.profiles:
            if p.name == name:
                return p.index
        raise KeyError(name)

    def to_dict(self) -> dict:
        d = {"file": self.file, "graph_name": self.graph, **_plain(self.extra),
             "tensorrt_version": self.tensorrt_version, "gpu_name": self.gpu_name,
             "compute_capability": self.compute_capability, "precision": self.precision,
             "profiles": [p.to_dict() for p in self.profiles], "max_batch": self.max_batch,
             "max_seq": self.max_seq, "cache_capacity": self.cache_capacity}
        return d


@dataclass(frozen=True)
class Architecture:
    """Everything the graph builder and engines need about the model (from config.json at export)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    embedding_multiplier: float
    attention_multiplier: float
    residual_multiplier: float
    logits_scaling: float
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    layer_types: tuple[str, ...] = ()  # "attention" or "mamba" per layer
    rope: bool = True  # False: NoPE (Granite 4.0 H)
    mamba: dict | None = None  # Mamba2 dimensions (export/checkpoint.py mamba_dims) when any layer is Mamba

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "attention"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Architecture":
        """From a manifest's `architecture` record (keys this version does not know are ignored)."""
        kwargs = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        if "layer_types" in kwargs:
            kwargs["layer_types"] = tuple(kwargs["layer_types"] or ())
        return cls(**kwargs)


@dataclass(frozen=True)
class Manifest:
    format_version: int
    created_unix: int
    source: Mapping
    architecture: Architecture
    export_options: Mapping
    graphs: Mapping  # name -> GraphRecord, in the order written
    tokenizer_files: tuple[str, ...]
    context_length: int
    validation: Mapping
    files: Mapping = field(default_factory=lambda: _frozen({}))  # name -> FileRecord
    plans: tuple[PlanRecord, ...] = ()
    extra: Mapping = field(default_factory=lambda: _frozen({}))  # activation_report, tools, quantization, ...

    def graph(self, name: str = DECODER) -> GraphRecord:
        try:
            return self.graphs[name]
        except KeyError:
            raise ArtifactError(f"{MANIFEST}: no graph named {name!r} (it has {', '.join(self.graphs)})") from None

    @property
    def source_model(self) -> str | None:
        return self.source.get("model")

    def referenced_files(self) -> list[tuple[str, str]]:
        """(field path, file name) of every file another record points at."""
        refs = []
        for gname, g in self.graphs.items():
            refs.append((f"graphs.{gname}.file", g.file))
            refs += [(f"graphs.{gname}.external_data[{i}]", n) for i, n in enumerate(g.external_data)]
        refs += [(f"tokenizer.files[{i}]", n) for i, n in enumerate(self.tokenizer_files)]
        refs += [(f"tensorrt_plans[{i}].file", p.file) for i, p in enumerate(self.plans)]
        return refs

    def replace(self, **changes) -> "Manifest":
        for key in ("graphs", "files", "source", "export_options", "validation", "extra"):
            if key in changes and not isinstance(changes[key], MappingProxyType):
                changes[key] = _frozen(changes[key])
        return replace(self, **changes)

    def with_graph(self, graph: GraphRecord) -> "Manifest":
        return self.replace(graphs={**self.graphs, graph.name: graph})

    def to_dict(self) -> dict:
        d = {
            "format": FORMAT,
            "format_version": self.format_version,
            "created_unix": self.created_unix,
            "source": _plain(self.source),
            "architecture": self.architecture.to_dict(),
            "export_options": _plain(self.export_options),
            "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
            "tokenizer": {"files": list(self.tokenizer_files)},
            "context_length": self.context_length,
            "validation": _plain(self.validation),
        }
        d.update(_plain(self.extra))
        if self.plans:
            d["tensorrt_plans"] = [p.to_dict() for p in self.plans]
        d["files"] = {name: r.to_dict() for name, r in sorted(self.files.items())}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"


def make_manifest(**kw) -> Manifest:
    """A Manifest from keyword fields, with mappings frozen."""
    for key in ("graphs", "files", "source", "export_options", "validation", "extra"):
        if key in kw:
            kw[key] = _frozen(kw[key])
    kw.setdefault("format_version", FORMAT_VERSION)
    return Manifest(**kw)


def make_graph(**kw) -> GraphRecord:
    for key in ("kv_cache", "extra"):
        if key in kw:
            kw[key] = _frozen(kw[key])
    for key in ("external_data", "inputs", "outputs", "state", "engines"):
        if key in kw:
            kw[key] = tuple(kw[key])
    if kw.get("validation") is not None:
        kw["validation"] = _frozen(kw["validation"])
    return GraphRecord(**kw)


# --- validation ------------------------------------------------------------------------------------
class _Checker:
    """Reads a JSON value with typed accessors; every failure names the field path."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, problem: str):
        raise ManifestError(self.where, path, problem)

    def get(self, d: Mapping, key: str, path: str, kind, required: bool = True, default=None):
        full = f"{path}.{key}" if path else key
        if key not in d:
            if required:
                self.fail(full, "missing")
            return default
        return self.typed(d[key], full, kind)

    def typed(self, value, path: str, kind):
        ok = {
            "str": isinstance(value, str) and value != "",
            "int": isinstance(value, int) and not isinstance(value, bool),
            "pos_int": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            "nonneg_int": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "dict": isinstance(value, dict),
            "list": isinstance(value, list),
            "opt_dict": value is None or isinstance(value, dict),
            "opt_int": value is None or (isinstance(value, int) and not isinstance(value, bool)),
            "opt_str": value is None or isinstance(value, str),
            "any": True,
        }[kind]
        if not ok:
            want = {"str": "a non-empty string", "int": "an integer", "pos_int": "an integer >= 1",
                    "nonneg_int": "an integer >= 0", "number": "a number", "bool": "true or false",
                    "dict": "an object", "list": "a list", "opt_dict": "an object or null",
                    "opt_int": "an integer or null", "opt_str": "a string or null"}[kind]
            self.fail(path, f"expected {want}, got {json.dumps(value)[:80]}")
        return value

    def relpath(self, value, path: str) -> str:
        self.typed(value, path, "str")
        problem = unsafe_path_problem(value)
        if problem:
            self.fail(path, f"{value!r}: {problem}")
        return value

    def shape(self, value, path: str, allow=("int", "symbol")) -> tuple:
        self.typed(value, path, "list")
        for i, d in enumerate(value):
            if isinstance(d, bool) or not (isinstance(d, int) and d >= 0 or isinstance(d, str) and d):
                self.fail(f"{path}[{i}]", f"expected a dimension (an integer >= 0 or a symbolic name), got "
                                          f"{json.dumps(d)[:40]}")
        return tuple(value)

    def dtype(self, value, path: str) -> str:
        self.typed(value, path, "str")
        if value not in _DTYPES:
            self.fail(path, f"unknown dtype {value!r} (one of {', '.join(_DTYPES)})")
        return value


def unsafe_path_problem(name: str) -> str | None:
    """Why `name` is not a plain relative path inside an artifact folder (None when it is)."""
    if "\\" in name or "\0" in name:
        return "has a backslash or NUL"
    if name.startswith("/") or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path (every path in the manifest is relative to the artifact folder)"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "is not a normalised relative path inside the artifact folder (no '..', '.' or empty parts)"
    if str(PurePosixPath(name)) != name:
        return "is not normalised"
    return None


def _tensor(c: _Checker, d, path: str) -> TensorRecord:
    c.typed(d, path, "dict")
    return TensorRecord(c.get(d, "name", path, "str"), c.dtype(c.get(d, "dtype", path, "str"), f"{path}.dtype"),
                        c.shape(c.get(d, "shape", path, "list"), f"{path}.shape"),
                        c.get(d, "default", path, "opt_int", required=False))


def _state(c: _Checker, d, path: str) -> StateSpec:
    c.typed(d, path, "dict")
    kind = c.get(d, "kind", path, "str")
    if kind not in STATE_KINDS:
        c.fail(f"{path}.kind", f"{kind!r} is not one of {', '.join(STATE_KINDS)}")
    shape = c.shape(c.get(d, "shape", path, "list"), f"{path}.shape")
    symbolic = [x for x in shape if isinstance(x, str)]
    if kind == "kv" and symbolic != [CACHE_CAPACITY]:
        c.fail(f"{path}.shape", f"a kv state has exactly one symbolic axis, {CACHE_CAPACITY!r} (got {list(shape)})")
    if kind != "kv" and symbolic:
        c.fail(f"{path}.shape", f"a {kind} state has fixed dimensions only (got {list(shape)})")
    return StateSpec(c.get(d, "input", path, "str"), c.get(d, "output", path, "str"), kind,
                     c.get(d, "layer", path, "nonneg_int"), shape,
                     c.dtype(c.get(d, "dtype", path, "str"), f"{path}.dtype"), c.get(d, "in_place", path, "bool"))


def _state_from_inputs(inputs: tuple[TensorRecord, ...]) -> tuple[StateSpec, ...]:
    """Artifacts written before the `state` record: every past_key_values.* input is a KV cache in place."""
    specs = []
    for t in inputs:
        if t.name.startswith("past_key_values."):
            _, layer, part = t.name.split(".")
            specs.append(StateSpec(t.name, f"present.{layer}.{part}", "kv", int(layer), tuple(t.shape[1:]), t.dtype,
                                   True))
    return tuple(specs)


_GRAPH_KEYS = {"file", "external_data", "opset", "precision", "inputs", "outputs", "kv_cache", "state", "engines",
               "derived_from", "validation"}


def _graph(c: _Checker, name: str, d, path: str) -> GraphRecord:
    c.typed(d, path, "dict")
    file = c.relpath(c.get(d, "file", path, "str"), f"{path}.file")
    external = tuple(c.relpath(v, f"{path}.external_data[{i}]")
                     for i, v in enumerate(c.get(d, "external_data", path, "list", required=False, default=[])))
    inputs = tuple(_tensor(c, v, f"{path}.inputs[{i}]") for i, v in enumerate(c.get(d, "inputs", path, "list")))
    outputs = tuple(_tensor(c, v, f"{path}.outputs[{i}]") for i, v in enumerate(c.get(d, "outputs", path, "list")))
    for what, seq in (("inputs", inputs), ("outputs", outputs)):
        seen = set()
        for i, t in enumerate(seq):
            if t.name in seen:
                c.fail(f"{path}.{what}[{i}].name", f"{t.name!r} appears twice")
            seen.add(t.name)
    if "state" in d:
        state = tuple(_state(c, v, f"{path}.state[{i}]") for i, v in enumerate(c.get(d, "state", path, "list")))
    else:
        state = _state_from_inputs(inputs)
    by_in = {t.name: t for t in inputs}
    by_out = {t.name: t for t in outputs}
    for i, st in enumerate(state):
        sp = f"{path}.state[{i}]"
        if st.input not in by_in:
            c.fail(f"{sp}.input", f"{st.input!r} is not one of the graph's inputs")
        if st.output not in by_out:
            c.fail(f"{sp}.output", f"{st.output!r} is not one of the graph's outputs")
        for t, where in ((by_in[st.input], "input"), (by_out[st.output], "output")):
            if tuple(t.shape[1:]) != st.shape:
                c.fail(f"{sp}.shape", f"{list(st.shape)} differs from the graph {where} {t.name}'s shape "
                                      f"{list(t.shape)} without its batch axis")
            if t.dtype != st.dtype:
                c.fail(f"{sp}.dtype", f"{st.dtype} differs from the graph {where} {t.name}'s dtype {t.dtype}")
    kv_cache = c.get(d, "kv_cache", path, "dict", required=False, default={})
    engines = c.get(d, "engines", path, "list", required=False, default=[])
    for i, e in enumerate(engines):
        c.typed(e, f"{path}.engines[{i}]", "str")
    return GraphRecord(
        name=name, file=file, external_data=external,
        precision=c.get(d, "precision", path, "str", required=False, default="fp32"),
        inputs=inputs, outputs=outputs, state=state, kv_cache=_frozen(kv_cache),
        opset=c.get(d, "opset", path, "opt_int", required=False),
        engines=tuple(engines), derived_from=c.get(d, "derived_from", path, "opt_str", required=False),
        validation=(_frozen(v) if (v := c.get(d, "validation", path, "opt_dict", required=False)) is not None
                    else None),
        extra=_frozen({k: v for k, v in d.items() if k not in _GRAPH_KEYS}),
    )


_PLAN_KEYS = {"file", "graph_name", "tensorrt_version", "gpu_name", "compute_capability", "max_batch", "max_seq",
              "cache_capacity", "precision", "profiles"}


def profile_shapes(shapes: Mapping) -> dict:
    """{input: {"min", "opt", "max"}} from either that form or the older {input: [min, opt, max]}."""
    out = {}
    for name, v in shapes.items():
        if isinstance(v, (list, tuple)) and len(v) == 3:
            v = {"min": v[0], "opt": v[1], "max": v[2]}
        out[name] = {k: list(v[k]) for k in ("min", "opt", "max")}
    return out


def _plan(c: _Checker, d, path: str) -> PlanRecord:
    c.typed(d, path, "dict")
    profiles = []
    for i, p in enumerate(c.get(d, "profiles", path, "list")):
        pp = f"{path}.profiles[{i}]"
        c.typed(p, pp, "dict")
        shapes = c.get(p, "shapes", pp, "dict")
        try:
            shapes = profile_shapes(shapes)
        except (KeyError, TypeError, ValueError):
            c.fail(f"{pp}.shapes", "expected {input: {min, opt, max}} shapes")
        profiles.append(ProfileRecord(c.get(p, "name", pp, "str"), c.get(p, "index", pp, "nonneg_int"),
                                      _frozen(shapes)))
    return PlanRecord(
        file=c.relpath(c.get(d, "file", path, "str"), f"{path}.file"),
        tensorrt_version=str(c.get(d, "tensorrt_version", path, "str")),
        gpu_name=c.get(d, "gpu_name", path, "str"),
        compute_capability=str(c.get(d, "compute_capability", path, "str")),
        max_batch=c.get(d, "max_batch", path, "pos_int"), max_seq=c.get(d, "max_seq", path, "pos_int"),
        cache_capacity=c.get(d, "cache_capacity", path, "pos_int"),
        precision=c.get(d, "precision", path, "str", required=False, default="fp32"),
        profiles=tuple(profiles), graph=c.get(d, "graph_name", path, "str", required=False, default=DECODER),
        extra=_frozen({k: v for k, v in d.items() if k not in _PLAN_KEYS}),
    )


_ARCH_KINDS = {"model_type": "str", "vocab_size": "pos_int", "hidden_size": "pos_int", "num_layers": "pos_int",
               "num_heads": "pos_int", "num_kv_heads": "pos_int", "head_dim": "pos_int",
               "intermediate_size": "nonneg_int", "rms_norm_eps": "number", "rope_theta": "number",
               "max_position_embeddings": "pos_int", "embedding_multiplier": "number",
               "attention_multiplier": "number", "residual_multiplier": "number", "logits_scaling": "number",
               "tie_word_embeddings": "bool", "bos_token_id": "opt_int", "eos_token_id": "any",
               "pad_token_id": "opt_int"}


def _architecture(c: _Checker, d, path: str) -> Architecture:
    c.typed(d, path, "dict")
    for key, kind in _ARCH_KINDS.items():
        c.get(d, key, path, kind)
    layer_types = c.get(d, "layer_types", path, "list", required=False, default=[])
    for i, t in enumerate(layer_types):
        if t not in ("attention", "mamba"):
            c.fail(f"{path}.layer_types[{i}]", f"{t!r} is not 'attention' or 'mamba'")
    if layer_types and len(layer_types) != d["num_layers"]:
        c.fail(f"{path}.layer_types", f"{len(layer_types)} entries for num_layers {d['num_layers']}")
    c.get(d, "rope", path, "bool", required=False)
    mamba = c.get(d, "mamba", path, "opt_dict", required=False)
    if "mamba" in layer_types and mamba is None:
        c.fail(f"{path}.mamba", "missing for a model with Mamba layers")
    return Architecture.from_dict(d)


_TOP_KEYS = {"format", "format_version", "created_unix", "source", "architecture", "export_options", "graphs",
             "tokenizer", "context_length", "validation", "tensorrt_plans", "files"}


def from_dict(d, where: str = MANIFEST) -> Manifest:
    """Validate a parsed manifest.json; ManifestError names the first bad field."""
    c = _Checker(where)
    if not isinstance(d, dict):
        c.fail("", "expected a JSON object")
    if d.get("format") != FORMAT:
        c.fail("format", f"is {d.get('format')!r}, expected {FORMAT!r} (not a granite-deploy artifact)")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        c.fail("format_version", f"{version!r} is not supported (this granite-deploy reads version "
                                 f"{FORMAT_VERSION}); re-export the artifact with this version")
    arch = _architecture(c, c.get(d, "architecture", "", "dict"), "architecture")
    graphs_d = c.get(d, "graphs", "", "dict")
    if DECODER not in graphs_d:
        c.fail("graphs", f"has no {DECODER!r} graph")
    graphs = {name: _graph(c, name, g, f"graphs.{name}") for name, g in graphs_d.items()}
    for name, g in graphs.items():
        if g.derived_from is not None and g.derived_from not in graphs:
            c.fail(f"graphs.{name}.derived_from", f"{g.derived_from!r} is not a graph of this manifest")
    tok = c.get(d, "tokenizer", "", "dict", required=False, default={})
    tok_files = tuple(c.relpath(v, f"tokenizer.files[{i}]")
                      for i, v in enumerate(c.get(tok, "files", "tokenizer", "list", required=False, default=[])))
    files = {}
    for name, rec in c.get(d, "files", "", "dict").items():
        fp = f"files[{json.dumps(name)}]"
        c.relpath(name, fp)
        c.typed(rec, fp, "dict")
        sha = c.get(rec, "sha256", fp, "str")
        if not _SHA256.match(sha):
            c.fail(f"{fp}.sha256", f"{sha[:80]!r} is not a lowercase hex sha256")
        files[name] = FileRecord(sha, c.get(rec, "bytes", fp, "nonneg_int"))
    if not files:
        c.fail("files", "lists no files")
    if MANIFEST in files:
        c.fail(f"files[{json.dumps(MANIFEST)}]", "the manifest cannot list itself")
    plans = tuple(_plan(c, p, f"tensorrt_plans[{i}]")
                  for i, p in enumerate(c.get(d, "tensorrt_plans", "", "list", required=False, default=[])))
    context = c.get(d, "context_length", "", "pos_int", required=False, default=arch.max_position_embeddings)
    m = Manifest(
        format_version=version, created_unix=c.get(d, "created_unix", "", "nonneg_int", required=False, default=0),
        source=_frozen(c.get(d, "source", "", "dict", required=False, default={})), architecture=arch,
        export_options=_frozen(c.get(d, "export_options", "", "dict", required=False, default={})),
        graphs=_frozen(graphs), tokenizer_files=tok_files, context_length=context,
        validation=_frozen(c.get(d, "validation", "", "opt_dict", required=False) or {}),
        files=_frozen(files), plans=plans,
        extra=_frozen({k: v for k, v in d.items() if k not in _TOP_KEYS}),
    )
    for path, name in m.referenced_files():
        if name not in files:
            c.fail(path, f"{name!r} is not in the manifest's file list (so it would be read unverified)")
    for i, p in enumerate(plans):
        if p.graph not in graphs:
            c.fail(f"tensorrt_plans[{i}].graph_name", f"{p.graph!r} is not a graph of this manifest")
    return m


def parse(text: str | bytes, where: str = MANIFEST) -> Manifest:
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{where}: unreadable manifest ({exc})") from exc
    return from_dict(d, where)


def load(artifact: str | Path) -> Manifest:
    """The validated manifest of an artifact folder."""
    artifact = Path(artifact)
    path = artifact / MANIFEST
    if not artifact.is_dir():
        raise BadArtifactPath(f"{artifact}: not an artifact folder (no such directory)")
    if path.is_symlink():
        raise ArtifactError(f"{path}: a symlink; the manifest must be a file inside the artifact folder")
    if not path.is_file():
        raise BadArtifactPath(f"{path}: missing; {artifact} is not a complete granite-deploy artifact")
    return parse(path.read_bytes(), str(path))


def save(folder: str | Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (a temporary file renamed into place); checks it reads back."""
    folder = Path(folder)
    text = manifest.to_json()
    from_dict(json.loads(text), str(folder / MANIFEST))  # never write what load would refuse
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def tensor_records(specs: Iterable) -> tuple[TensorRecord, ...]:
    """TensorRecords from anything with name/dtype/shape/default attributes (export/io_spec.py's specs)."""
    return tuple(TensorRecord(s.name, s.dtype, tuple(s.shape), getattr(s, "default", None)) for s in specs)


__all__ = ["Manifest", "GraphRecord", "StateSpec", "TensorRecord", "FileRecord", "PlanRecord", "ProfileRecord",
           "Architecture", "ArtifactError", "BadArtifactPath", "ManifestError", "load", "save", "parse", "from_dict", "make_manifest",
           "make_graph", "unsafe_path_problem", "MANIFEST", "FORMAT", "FORMAT_VERSION", "CACHE_CAPACITY", "DECODER",
           "DECODER_CPU", "DECODER_RAGGED", "RAGGED_GROUPS", "ragged_state_name"]
