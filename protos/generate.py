"""Regenerate the committed Python gRPC stubs from the .proto files in this folder.

    python -m granite_deploy.protos.generate            # in place
    python -m granite_deploy.protos.generate OUT_DIR    # somewhere else

Runs grpc_tools.protoc (``--python_out``, ``--pyi_out``, ``--grpc_python_out``)
and rewrites protoc's top-level imports between our own modules
(``import generation_pb2 as generation__pb2``) into package-relative ones
(``from . import generation_pb2 as generation__pb2``), so the stubs import as
``granite_deploy.protos.generation_pb2``. tests/protos/test_protos.py checks that the
committed stubs equal a fresh run of this function byte for byte.
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("generation.proto", "granite_chat.proto")
_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files() -> list[str]:
    """Names of the files generate() writes, in a fixed order."""
    return [Path(p).stem + suffix for p in PROTO_FILES for suffix in _SUFFIXES]


def _relative_imports(text: str) -> str:
    stems = "|".join(re.escape(Path(p).stem) for p in PROTO_FILES)
    pattern = re.compile(rf"^import ((?:{stems})_pb2) as (\w+)$", re.MULTILINE)
    return pattern.sub(r"from . import \1 as \2", text)


def generate(out_dir: str | Path = PROTO_DIR, proto_dir: str | Path = PROTO_DIR) -> list[Path]:
    """Compile PROTO_FILES from proto_dir into out_dir; return the written paths."""
    from grpc_tools import protoc  # dev-only dependency (grpcio-tools)

    out = Path(out_dir).resolve()
    src = Path(proto_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{src}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(src / name) for name in PROTO_FILES),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with exit code {rc}: {' '.join(args)}")

    written = []
    for name in generated_files():
        path = out / name
        text = path.read_text(encoding="utf-8")
        fixed = _relative_imports(text)
        if fixed != text:
            path.write_text(fixed, encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0]) if argv else PROTO_DIR
    for path in generate(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
