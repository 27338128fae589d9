"""Our own ONNX Runtime CPU kernels, built on the machine that runs them (`granite-deploy kernels build`).

One so far: `ai.granite_deploy.MatMulQ4` (q4_matmul.cc, q4_tile.h), ONNX Runtime's 4-bit `MatMulNBits`
over the same packed weights and scales, for AVX2 + FMA, with an AVX-512 VNNI variant chosen at load
where the CPU has it (not executed on this project's machines, which lack VNNI: it is used only after
it reproduced the AVX2 path bit for bit on the machine itself). The artifact keeps the standard `com.microsoft`
node; when the library is built and the CPU has AVX2 and FMA, the engine rewrites the eligible
nodes of the graph it loads, in memory (`use_kernels`), so an artifact runs unchanged where the
library is absent (MLAS then runs them, with the same numerics: both quantise the input to int8
per block and sum exactly in int32).

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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("q4_matmul.cc")
SOURCES = (SOURCE, Path(__file__).with_name("q4_tile.h"))  # what the library is built from
DOMAIN = "ai.granite_deploy"
OP = "MatMulQ4"
HEADERS_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
               "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
CXXFLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden"]
DISABLE_ENV = "GRANITE_DEPLOY_CPU_KERNELS"  # "0": never use them (A/B runs, debugging)


class KernelBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("GRANITE_DEPLOY_CACHE") or Path.home() / ".cache" / "granite-deploy"
    return Path(root) / "kernels"


def library_path() -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(CXXFLAGS).encode()).hexdigest()[:16]
    return cache_dir() / digest / "libgranite_kernels.so"


def cpu_supported() -> bool:
    """AVX2 and FMA, from /proc/cpuinfo (x86-64 Linux only; elsewhere False)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    have = set(flags.split(":", 1)[1].split())
    return {"avx2", "fma"} <= have


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


def use_kernels(model) -> int:
    """Rewrite the eligible MatMulNBits nodes of model (in place, subgraphs too) to MatMulQ4;
    return how many. The caller registers the library with the session."""
    from onnx import helper

    constants = {t.name for t in model.graph.initializer}
    count = 0

    def visit(graph):
        nonlocal count
        for node in graph.node:
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    visit(attr.g)
            if eligible(node, constants):
                keep = [a for a in node.attribute if a.name in ("K", "N", "bits", "block_size")]
                del node.attribute[:]
                node.attribute.extend(keep)
                del node.input[3:]
                node.op_type, node.domain = OP, DOMAIN
                count += 1

    visit(model.graph)
    if count and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return count
