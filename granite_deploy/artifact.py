"""The artifact directory and its manifest: the contract between export, engines and serve.

An artifact is a folder holding `manifest.json` plus every file it lists (the
ONNX graph and its external data, the checkpoint's config, generation config,
tokenizer files and chat template, copied unchanged). Each side reads the
manifest, never the other side's internals. This module has no heavy imports:
the server loads it without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from . import progress

MANIFEST = "manifest.json"
FORMAT = "granite-deploy-artifact"
FORMAT_VERSION = 1
_HASH_CHUNK = 8 << 20
# The symbolic dimension of a KV state's shape that engines size (see export/io_spec.py).
CACHE_CAPACITY = "cache_capacity"
# Graph names in manifest["graphs"]: the portable decoder, and the optional ONNX Runtime CPU
# flavour of it (same weights file, head-dim-major KV cache; export/cpu_graph.py).
DECODER = "decoder"
DECODER_CPU = "decoder_cpu"


class ArtifactError(Exception):
    """An artifact is missing, incomplete or altered; the message names the file."""


def sha256_file(path: Path, bar: progress.Bar | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            if bar:
                bar.advance(len(chunk))
    return digest.hexdigest()


def file_records(folder: Path, names: list[str]) -> dict:
    """{name: {sha256, bytes}} for the files of an artifact, with a progress bar over the bytes."""
    total = sum((folder / n).stat().st_size for n in names)
    records = {}
    with progress.bar("hashing files", total, unit="B") as bar:
        for name in sorted(names):
            path = folder / name
            records[name] = {"sha256": sha256_file(path, bar), "bytes": path.stat().st_size}
    return records


def load_manifest(artifact: str | Path) -> dict:
    artifact = Path(artifact)
    path = artifact / MANIFEST
    if not artifact.is_dir():
        raise ArtifactError(f"{artifact}: not an artifact folder (no such directory)")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {artifact} is not a complete granite-deploy artifact")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.get('format_version')} is not supported "
            f"(this granite-deploy reads version {FORMAT_VERSION})"
        )
    return manifest


def check_files(artifact: Path, manifest: dict) -> list[str]:
    """Every problem with the files the manifest lists (missing, truncated, changed); [] when sound."""
    problems = []
    files = manifest.get("files") or {}
    if not files:
        problems.append(f"{artifact / MANIFEST}: lists no files")
    total = sum(rec.get("bytes", 0) for rec in files.values())
    with progress.bar("verifying hashes", total, unit="B") as bar:
        for name, rec in sorted(files.items()):
            path = artifact / name
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            size = path.stat().st_size
            if size != rec["bytes"]:
                kind = "truncated" if size < rec["bytes"] else "grown"
                problems.append(f"{path}: {kind} ({size} bytes, manifest says {rec['bytes']})")
                continue
            if sha256_file(path, bar) != rec["sha256"]:
                problems.append(f"{path}: contents changed (sha256 differs from the manifest)")
    return problems


def graph_path(artifact: Path, manifest: dict, graph: str = "decoder") -> Path:
    try:
        return artifact / manifest["graphs"][graph]["file"]
    except KeyError as exc:
        raise ArtifactError(f"{artifact / MANIFEST}: no graph named {graph!r}") from exc


def verify(artifact: str | Path, load_graph: bool = True) -> dict:
    """Check every hash, then that each graph loads in ONNX Runtime. Raises ArtifactError."""
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    problems = check_files(artifact, manifest)
    if problems:
        raise ArtifactError("artifact failed verification:\n  " + "\n  ".join(problems))
    if load_graph:
        import onnxruntime as ort

        for name, graph in manifest.get("graphs", {}).items():
            path = artifact / graph["file"]
            with progress.step(f"loading graph {name!r} in ONNX Runtime"):
                try:
                    options = ort.SessionOptions()
                    options.log_severity_level = 3
                    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                except Exception as exc:
                    raise ArtifactError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
    return manifest


@contextmanager
def staging_dir(output: Path, force: bool):
    """Yield a hidden sibling folder to write into; move it to `output` only on success.

    An interrupted or failed export leaves at most a `.<name>.partial-*` folder
    with no manifest, never something at `output` that looks valid.
    """
    output = output.resolve()
    parent = output.parent
    if output.exists() and not output.is_dir():
        raise ArtifactError(f"{output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ArtifactError(f"{output}: exists and is not empty; pass --force to replace it")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"{parent}: cannot create the output's parent folder ({exc.strerror})") from exc
    if not os.access(parent, os.W_OK):
        raise ArtifactError(f"{parent}: not writable")
    stage = parent / f".{output.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if output.exists():
        old = parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(stage, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
