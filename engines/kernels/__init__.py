"""Our own ONNX Runtime CPU kernels, built on the machine that runs them (`granite-deploy kernels build`).

Four ops, all in q4_matmul.cc (the artifact keeps standard nodes; the engine rewrites the eligible
ones of the graph it loads, in memory (`use_kernels`), over weights rearranged at load into each
kernel's tiled layout (layout.py), so an artifact runs unchanged where the library is absent):
- `MatMulQ4` (q4_tile.h): ONNX Runtime's 4-bit `MatMulNBits`, AVX2 + FMA + F16C, with an AVX-512 VNNI
  variant chosen at load where the CPU has it (used only after it reproduced the AVX2 path bit for bit
  on the machine itself); same numerics as MLAS (input quantised to int8 per block, exact int32 sums).
- `MatMulQ8Dynamic` (q8_tile.h, dynamic_int8.py): the ten-node per-row dynamic int8 GEMM of
  `quantize --int8` as one node.
- `MatMulF32` (f32_tile.h): fp32 MatMul (and the head's Gemm) over a constant weight, AVX-512F; stored
  as bf16 where every value of the weight is one (exact).
- `DecodeAttention` (decode_attention.h): GroupQueryAttention's one-token calls over the in-place cache.

The library compiles against ONNX Runtime's C/C++ headers (the stable C ABI: a header of API
version 21 loads in every later runtime). The `onnxruntime` wheel ships none, so `build` takes
them from Debian's `libonnxruntime-dev` package (pinned by SHA-256) and compiles with the system
g++ into a cache folder named after the source's hash: a changed source is rebuilt, never loaded
stale.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("q4_matmul.cc")
SOURCES = (SOURCE, *(Path(__file__).with_name(h) for h in ("q4_tile.h", "q8_tile.h", "f32_tile.h", "decode_attention.h")))  # what the library is built from
DOMAIN = "ai.granite_deploy"
OP = "MatMulQ4"
OP_Q8 = "MatMulQ8Dynamic"
HEADERS_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
               "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
CXXFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden"]
DISABLE_ENV = "GRANITE_DEPLOY_CPU_KERNELS"  # "0": never use them (A/B runs, debugging)
ATTENTION_ENV = "GRANITE_DEPLOY_DECODE_ATTENTION"  # "0": decode attention stays ONNX Runtime's GroupQueryAttention
OP_F32 = "MatMulF32"
F32_ENV = "GRANITE_DEPLOY_F32_MATMUL"  # "0": fp32 MatMuls stay ONNX Runtime's (MLAS)
BF16_ENV = "GRANITE_DEPLOY_F32_BF16"  # "0": MatMulF32 keeps fp32 strips even for bf16-valued weights (A/B runs)


class KernelBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("GRANITE_DEPLOY_CACHE") or Path.home() / ".cache" / "granite-deploy"
    return Path(root) / "kernels"


def library_path() -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(CXXFLAGS).encode()).hexdigest()[:16]
    return cache_dir() / digest / "libgranite_kernels.so"


def _cpu_flags() -> set[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(flags.split(":", 1)[1].split())


def cpu_supported() -> bool:
    """AVX2, FMA and F16C, from /proc/cpuinfo (x86-64 Linux only; elsewhere False)."""
    return {"avx2", "fma", "f16c"} <= _cpu_flags()


def f32_supported() -> bool:
    """Whether MatMulF32 can run here: AVX-512F and VL (and the switch F32_ENV is not "0")."""
    return os.environ.get(F32_ENV, "1") != "0" and {"avx512f", "avx512vl"} <= _cpu_flags()


def available() -> Path | None:
    """The built library when this machine can use it, else None."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or not cpu_supported():
        return None
    path = library_path()
    return path if path.is_file() else None


def isa(library: Path) -> str:
    """The instruction set MatMulQ4 chose in this process ("avx2", or "avx512vnni" where the CPU has it
    and its outputs matched the AVX2 path's bit for bit at registration); call after registering."""
    import ctypes

    fn = ctypes.CDLL(str(library)).GraniteQ4Isa
    fn.restype = ctypes.c_char_p
    return fn().decode()


def _deb_member(deb: bytes, prefix: str) -> bytes:
    """A .deb is an `ar` archive; return the member whose name starts with prefix."""
    if not deb.startswith(b"!<arch>\n"):
        raise KernelBuildError("headers package: not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(deb):
        name = deb[pos:pos + 16].decode().strip().rstrip("/")
        size = int(deb[pos + 48:pos + 58].decode().strip())
        if name.startswith(prefix):
            return deb[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise KernelBuildError(f"headers package: no {prefix}* member")


def _headers(work: Path) -> Path:
    """ONNX Runtime's headers, unpacked under work (downloaded once, checked against the pin)."""
    include = work / "include" / "onnxruntime"
    if (include / "onnxruntime_cxx_api.h").is_file():
        return include
    url, sha = HEADERS_DEB
    deb_path = work / Path(url).name
    if not deb_path.is_file():
        log.info("downloading ONNX Runtime headers: %s", url)
        with urllib.request.urlopen(url, timeout=120) as response:
            data = response.read()
        if hashlib.sha256(data).hexdigest() != sha:
            raise KernelBuildError(f"{url}: SHA-256 does not match the pinned {sha}")
        deb_path.write_bytes(data)
    data = deb_path.read_bytes()
    payload = _deb_member(data, "data.tar")
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        for member in tar.getmembers():
            if member.isfile() and "/usr/include/onnxruntime/" in "/" + member.name.lstrip("./"):
                rel = member.name.lstrip("./").split("usr/include/onnxruntime/", 1)[1]
                target = include / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    if not (include / "onnxruntime_cxx_api.h").is_file():
        raise KernelBuildError(f"{url}: no onnxruntime_cxx_api.h inside")
    return include


def build(force: bool = False) -> Path:
    """Compile the library (if not built for this source yet); return its path."""
    out = library_path()
    if out.is_file() and not force:
        return out
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise KernelBuildError("no C++ compiler (g++ or $CXX) on PATH")
    work = cache_dir() / "headers"
    work.mkdir(parents=True, exist_ok=True)
    include = _headers(work)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".so.partial")
    cmd = [compiler, *CXXFLAGS, f"-I{include}", str(SOURCE), "-o", str(partial)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise KernelBuildError(f"compiling {SOURCE.name} failed:\n{result.stderr[-4000:]}")
    partial.replace(out)  # only a complete library ever carries the final name
    return out


def eligible(node, inputs_with_values: set[str]) -> bool:
    """A MatMulNBits our kernel computes exactly as MLAS would: 4 bits, accuracy level 4, no zero
    points / g_idx / bias, constant weights, K a multiple of 128, block_size 32..256 (MLAS quantises
    the input of larger blocks in sub-blocks: 0.6% apart at 512, measured)."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return False
    attrs = {a.name: a.i for a in node.attribute}
    extra = [name for name in node.input[3:] if name]
    k, block = attrs.get("K", 0), attrs.get("block_size", 0)
    return (attrs.get("bits", 4) == 4 and attrs.get("accuracy_level", 0) == 4 and not extra
            and len(node.input) >= 3 and node.input[1] in inputs_with_values
            and 32 <= block <= 256 and block & (block - 1) == 0 and k % 128 == 0 and k % block == 0)


class KernelRewrite:
    """What `use_kernels` did to a graph: how many nodes now run MatMulQ4, and their tiled weights,
    which the session reads from this object's arrays (no copy) for as long as it lives."""

    def __init__(self) -> None:
        self.nodes = 0  # MatMulQ4 + MatMulQ8Dynamic + MatMulF32
        self.q8_nodes = 0  # dynamic int8 GEMMs (ten nodes each) now one MatMulQ8Dynamic
        self.f32_nodes = 0  # fp32 MatMuls (and the head's Gemm) over a constant weight now MatMulF32
        self.f32_bf16_weights = 0  # of their weights, those every value of which is bf16, stored as bf16
        self.attention_nodes = 0  # GroupQueryAttention nodes whose one-token calls run DecodeAttention
        self.weights: dict[str, np.ndarray] = {}
        self._values: list = []

    def attach(self, options) -> None:
        """Give the tiled weights to a session about to be created with options; keep this object
        alive with the session (`keep_with`)."""
        import onnxruntime as ort

        for name, array in self.weights.items():
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self._values.append(value)
            options.add_initializer(name, value)

    def keep_with(self, session):
        session._granite_tiled_weights = self  # ONNX Runtime reads our buffers, it did not copy them
        return session


def _read_initializer(tensor, folder: Path | None) -> np.ndarray:
    """An initializer's values, from the proto or, for external data, from its file under folder
    (read directly: onnx's loader would keep a copy in the proto)."""
    from onnx import TensorProto, external_data_helper, helper, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    if folder is None:
        raise KernelBuildError(f"initializer {tensor.name}: external data but no folder to read it from")
    info = external_data_helper.ExternalDataInfo(tensor)
    path = (folder / info.location).resolve()
    if Path(info.location).is_absolute() or folder.resolve() not in path.parents:
        raise KernelBuildError(f"initializer {tensor.name}: external data {info.location!r} is outside {folder}")
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims))
    if info.length is not None and info.length != count * dtype.itemsize:
        raise KernelBuildError(f"initializer {tensor.name}: {info.length} bytes in {info.location}, shape needs "
                               f"{count * dtype.itemsize}")
    data = np.fromfile(path, dtype=dtype, count=count, offset=info.offset or 0)
    if data.size != count:
        raise KernelBuildError(f"initializer {tensor.name}: {info.location} ends before its {count} values")
    return data.reshape(tuple(tensor.dims))


def _nodes(graph):
    """Every node of graph, each subgraph's (If branches, loop bodies) before the node holding it."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _nodes(attr.g)
        yield node


def _f32_weight(node, initializers) -> tuple[int, int, bool] | None:
    """(K, N, transposed) where node is an fp32 MatMul over a constant [K, N] weight, or a Gemm
    x @ W^T over a constant [N, K] one (the tied head: transB, no C, unscaled); else None."""
    from onnx import TensorProto

    if node.domain != "" or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    t = initializers.get(node.input[1])
    if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2 or min(t.dims) <= 0:
        return None
    if node.op_type == "MatMul":
        return int(t.dims[0]), int(t.dims[1]), False
    attrs = {a.name: a for a in node.attribute}
    plain = (len(node.input) == 2 and attrs.get("transB") is not None and attrs["transB"].i == 1
             and ("transA" not in attrs or attrs["transA"].i == 0) and ("alpha" not in attrs or attrs["alpha"].f == 1.0))
    return (int(t.dims[1]), int(t.dims[0]), True) if plain else None


def _use_f32(model, initializers, folder: Path | None, library: Path, rewrite: KernelRewrite) -> set[str]:
    """Every MatMul (subgraphs too) whose B is an fp32 [K, N] initializer, and the head's Gemm(transB),
    becomes MatMulF32 over a strip-tiled copy (one per weight, however many nodes share it), as bf16
    where every value of the weight is one (layout.bf16_exact). Returns the weights it replaced."""
    from onnx import helper

    from .layout import bf16_exact, tile_f32

    allow_bf16 = os.environ.get(BF16_ENV, "1") != "0"
    tiled: dict[tuple[str, bool], tuple[str, bool]] = {}  # (weight, transposed) -> (tiled name, stored as bf16)
    chosen = [(node, shape) for node in _nodes(model.graph) if (shape := _f32_weight(node, initializers))]
    skipped: set[tuple[str, bool]] = set()
    for node, (k, n, transposed) in chosen:  # every copy first: an unreadable weight leaves the graph as it was
        weight = node.input[1]
        if (weight, transposed) not in tiled and (weight, transposed) not in skipped:
            values = _read_initializer(initializers[weight], folder)
            bf16 = allow_bf16 and bf16_exact(values)
            if transposed and not bf16:
                # A transposed weight is the head's, tied to the embedding (every Granite 4.0), which stays
                # for the Gather: an fp32 copy would add its size for no fewer bytes read (MLAS streams as fast).
                skipped.add((weight, transposed))
                continue
            name = f"{weight}/{OP_F32}_tiled" + ("_t" if transposed else "")
            rewrite.weights[name] = tile_f32(library, values, k, n, bf16=bf16, transposed=transposed)
            tiled[weight, transposed] = (name, bf16)
            rewrite.f32_bf16_weights += bf16
    chosen = [(node, shape) for node, shape in chosen if (node.input[1], shape[2]) in tiled]
    for node, (k, n, transposed) in chosen:
        name, bf16 = tiled[node.input[1], transposed]
        node.input[1] = name
        node.op_type, node.domain = OP_F32, DOMAIN
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("K", k), helper.make_attribute("N", n),
                               helper.make_attribute("bf16", int(bf16))])
    rewrite.nodes += len(chosen)
    rewrite.f32_nodes = len(chosen)
    return {weight for weight, _ in tiled}


def use_kernels(model, folder: str | Path | None = None, library: Path | None = None) -> KernelRewrite:
    """Rewrite the eligible MatMulNBits nodes of model (in place, subgraphs too) to MatMulQ4, and the
    main graph's per-row dynamic int8 GEMMs (`quantize --int8`, dynamic_int8.py) to MatMulQ8Dynamic,
    over tiled copies of their weights (layout.py), and wrap each eligible GroupQueryAttention so its
    one-token calls run DecodeAttention (decode_attention.py; `GRANITE_DEPLOY_DECODE_ATTENTION=0` keeps
    ONNX Runtime's); external data is read from folder. The original
    weights and scales leave the graph where nothing else uses them. The caller registers the
    library and calls `attach` on the session options (`open_session` does both). The library
    (default: this source's build) rearranges the weights."""
    from onnx import TensorProto, helper

    from . import decode_attention, dynamic_int8
    from .layout import fp16_scales_fit, on_fp16_grid, tile, tile8

    folder = Path(folder) if folder is not None else None
    library = library or library_path()
    initializers = {t.name: t for t in model.graph.initializer}
    rewrite = KernelRewrite()
    tiled_names: dict[tuple[str, str], str] = {}

    chosen = [node for node in _nodes(model.graph) if eligible(node, set(initializers)) and node.input[2] in initializers]
    # Every tiled copy is made before any node changes: an unreadable weight leaves the graph as it was.
    left_to_mlas, rounded = set(), 0
    for node in chosen:
        attrs = {a.name: a.i for a in node.attribute}
        key = (node.input[1], node.input[2])
        if key not in tiled_names and key not in left_to_mlas:
            name = f"{node.input[1]}/{OP}_tiled"
            scales = _read_initializer(initializers[key[1]], folder)
            if not fp16_scales_fit(scales):  # the tiled layout's fp16 scales would lose precision
                left_to_mlas.add(key)
                continue
            rounded += not on_fp16_grid(scales)
            packed = _read_initializer(initializers[key[0]], folder)
            try:
                rewrite.weights[name] = tile(library, packed, scales, attrs["K"], attrs["N"], attrs["block_size"])
            except ValueError as exc:
                raise KernelBuildError(f"{node.name or node.output[0]} ({key[0]}, {key[1]}): {exc}") from None
            tiled_names[key] = name
    if left_to_mlas:
        log.info("MatMulQ4: %d weight(s) with scales outside fp16's normal range stay on MLAS", len(left_to_mlas))
    if rounded:
        log.info("MatMulQ4: %d weight(s) with fp32 scales (an artifact from before fp16 scales) run with them "
                 "rounded to fp16 (2^-11 relative at most)", rounded)
    chosen = [node for node in chosen if (node.input[1], node.input[2]) in tiled_names]

    def small_constant(name):
        t = initializers.get(name)
        return _read_initializer(t, folder) if t is not None and int(np.prod(t.dims)) <= 16 else None

    chosen8, originals_q8 = [], set()
    for gemm in dynamic_int8.find(model.graph, initializers, small_constant):
        weights = _read_initializer(initializers[gemm.weight], folder)
        if int(np.abs(weights.astype(np.int16)).max(initial=0)) > dynamic_int8.WEIGHT_LIMIT:
            continue  # not quantize.py's 7-bit weights: ONNX Runtime's kernel keeps it
        scales = _read_initializer(initializers[gemm.weight_scale], folder)
        name = f"{gemm.weight}/{OP_Q8}_tiled"
        try:
            rewrite.weights[name] = tile8(library, weights, scales, gemm.k, gemm.n)
        except ValueError as exc:
            raise KernelBuildError(f"{gemm.output} ({gemm.weight}, {gemm.weight_scale}): {exc}") from None
        chosen8.append((gemm, name))

    for node in chosen:
        key = (node.input[1], node.input[2])
        keep = [a for a in node.attribute if a.name in ("K", "N", "bits", "block_size")]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.input[1] = tiled_names[key]
        del node.input[2:]
        node.op_type, node.domain = OP, DOMAIN
        rewrite.nodes += 1

    if chosen8:
        replaced, dropped = {}, set()
        for gemm, name in chosen8:
            dropped.update(id(node) for node in gemm.nodes)
            replaced[id(gemm.nodes[-1])] = helper.make_node(
                OP_Q8, [gemm.x, name], [gemm.output], name=f"{gemm.output}/{OP_Q8}", domain=DOMAIN,
                K=gemm.k, N=gemm.n, eps=gemm.eps, inv127=gemm.inv127)
            originals_q8.update(i for node in gemm.nodes for i in node.input if i in initializers)
        nodes = [replaced.get(id(node), node) for node in model.graph.node
                 if id(node) not in dropped or id(node) in replaced]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        rewrite.nodes += len(chosen8)
        rewrite.q8_nodes = len(chosen8)

    originals_f32 = _use_f32(model, initializers, folder, library, rewrite) if f32_supported() else set()
    if os.environ.get(ATTENTION_ENV, "1") != "0":
        rewrite.attention_nodes = decode_attention.rewrite(model, DOMAIN)
    if rewrite.attention_nodes and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    if not rewrite.nodes:
        return rewrite
    used: set[str] = set()

    def inputs_of(graph):
        for node in graph.node:
            used.update(node.input)
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    inputs_of(attr.g)

    inputs_of(model.graph)
    used.update(o.name for o in model.graph.output)
    originals = ({name for key in tiled_names for name in key} | originals_q8 | originals_f32) - used
    kept = [t for t in model.graph.initializer if t.name not in originals]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for name in rewrite.weights:
        # An overridable initializer (graph input + empty placeholder): the session takes the array
        # given to add_initializer as is, where add_external_initializers would copy it.
        model.graph.initializer.append(helper.make_tensor(name, TensorProto.UINT8, [0], b"", raw=True))
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.UINT8, None))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return rewrite
