"""The artifact directory: hashing, trusted opening, verification and atomic staging.

An artifact is a folder holding `manifest.json` plus every file it lists (the
ONNX graph and its external data, the checkpoint's config, generation config,
tokenizer files and chat template, copied unchanged). The manifest's types,
validation and on-disk format live in `manifest.py`; this module decides what may
be read: only files the manifest lists, only inside the folder (no `..`, no
absolute paths, no symlink leaving it), only after their sizes (always) and
sha256 (by default) match. `open_trusted` is what `serve` and `generate` call
before loading anything. This module has no heavy imports: the server loads it
without torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from . import progress
from .manifest import (CACHE_CAPACITY, DECODER, DECODER_CPU, DECODER_RAGGED, FORMAT, FORMAT_VERSION, MANIFEST,
                       ArtifactError, BadArtifactPath, FileRecord, Manifest, ManifestError)
from .manifest import load as _load
from .manifest import save as _save

log = logging.getLogger(__name__)
_HASH_CHUNK = 8 << 20

__all__ = ["ArtifactError", "ManifestError", "BadArtifactPath", "Manifest", "load_manifest", "write_manifest",
           "open_trusted", "verify", "check_files", "file_records", "sha256_file", "manifest_sha256", "graph_path",
           "staging_dir", "unlisted_files", "MANIFEST", "FORMAT", "FORMAT_VERSION", "CACHE_CAPACITY", "DECODER",
           "DECODER_CPU", "DECODER_RAGGED"]


def sha256_file(path: Path, bar: progress.Bar | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            if bar:
                bar.advance(len(chunk))
    return digest.hexdigest()


def file_records(folder: Path, names: list[str]) -> dict[str, FileRecord]:
    """{name: FileRecord} for the files of an artifact, with a progress bar over the bytes."""
    total = sum((folder / n).stat().st_size for n in names)
    records = {}
    with progress.bar("hashing files", total, unit="B") as bar:
        for name in sorted(names):
            path = folder / name
            records[name] = FileRecord(sha256_file(path, bar), path.stat().st_size)
    return records


def load_manifest(artifact: str | Path) -> Manifest:
    """The validated, typed manifest (no file is checked; see `open_trusted`)."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise BadArtifactPath(f"{artifact}: not an artifact folder (no such directory)")
    return _load(artifact)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    _save(folder, manifest)


def manifest_sha256(artifact: str | Path) -> str:
    """sha256 of manifest.json's bytes: record it outside the artifact to pin the manifest itself."""
    return sha256_file(Path(artifact) / MANIFEST)


def _inside(root: Path, name: str) -> tuple[Path, str | None]:
    """(path, problem): the listed file's path and why it may not be read (None when it may)."""
    path = root / name
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        return path, "missing"
    except (OSError, RuntimeError) as exc:  # a symlink loop
        return path, f"cannot be resolved ({exc})"
    if not real.is_relative_to(root):
        return path, f"is a symlink leaving the artifact folder (to {real})"
    if not real.is_file():
        return path, "is not a regular file"
    return path, None


def check_files(artifact: Path, manifest: Manifest, verify_hashes: bool = True) -> list[str]:
    """Every problem with the files the manifest lists (missing, outside the folder, truncated, changed);
    [] when sound. Sizes are always checked; sha256 when verify_hashes."""
    root = Path(artifact).resolve()
    problems = []
    checked = []
    for name, rec in sorted(manifest.files.items()):
        path, problem = _inside(root, name)
        if problem:
            problems.append(f"{path}: {problem}")
            continue
        size = path.stat().st_size
        if size != rec.bytes:
            kind = "truncated" if size < rec.bytes else "grown"
            problems.append(f"{path}: {kind} ({size} bytes, manifest says {rec.bytes})")
            continue
        checked.append((path, rec))
    if verify_hashes:
        with progress.bar("verifying hashes", sum(r.bytes for _, r in checked), unit="B") as bar:
            for path, rec in checked:
                if sha256_file(path, bar) != rec.sha256:
                    problems.append(f"{path}: contents changed (sha256 differs from the manifest)")
    return problems


def check_graph_references(artifact: Path, manifest: Manifest) -> list[str]:
    """Each graph's external-data locations must be files its manifest record lists (read without weights)."""
    import onnx
    from onnx import TensorProto

    problems = []
    for name, graph in manifest.graphs.items():
        path = Path(artifact) / graph.file
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            problems.append(f"{path}: not a readable ONNX graph ({exc})")
            continue
        allowed = set(graph.external_data)
        for tensor in model.graph.initializer:
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location not in allowed:
                problems.append(f"{path}: initializer {tensor.name} reads external data from {location!r}, which is "
                                f"not in graphs.{name}.external_data {sorted(allowed)}")
                break
    return problems


def unlisted_files(artifact: Path, manifest: Manifest) -> list[str]:
    """Files in the folder the manifest does not list (never read; reported with a warning)."""
    root = Path(artifact)
    listed = set(manifest.files) | {MANIFEST}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for f in filenames:
            name = (rel / f).as_posix()
            if name not in listed:
                out.append(name)
    return sorted(out)


def open_trusted(artifact: str | Path, verify_hashes: bool = True, manifest_digest: str | None = None,
                 check_graphs: bool = True) -> Manifest:
    """The manifest of an artifact whose files may be loaded: every listed file inside the folder, of the
    listed size and (verify_hashes) sha256, graphs reading only their listed external data, and
    (manifest_digest) manifest.json itself matching a sha256 recorded elsewhere. Raises ArtifactError
    naming every problem; warns about files the manifest does not list (they are never read)."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise BadArtifactPath(f"{artifact}: not an artifact folder (no such directory)")
    if manifest_digest is not None:
        want = manifest_digest.strip().lower()
        got = manifest_sha256(artifact) if (artifact / MANIFEST).is_file() else None
        if got is not None and got != want:
            raise ArtifactError(f"{artifact / MANIFEST}: sha256 {got} differs from the pinned --manifest-digest {want}")
    manifest = _load(artifact)
    problems = check_files(artifact, manifest, verify_hashes=verify_hashes)
    if not problems and check_graphs:
        problems = check_graph_references(artifact, manifest)
    if problems:
        raise ArtifactError("artifact failed verification:\n  " + "\n  ".join(problems))
    extra = unlisted_files(artifact, manifest)
    if extra:
        log.warning("%s: ignoring %d file(s) the manifest does not list: %s", artifact, len(extra),
                    ", ".join(extra[:10]) + (" ..." if len(extra) > 10 else ""))
    return manifest


def graph_path(artifact: Path, manifest: Manifest, graph: str = DECODER) -> Path:
    return Path(artifact) / manifest.graph(graph).file


def verify(artifact: str | Path, load_graph: bool = True, manifest_digest: str | None = None) -> Manifest:
    """Check paths, sizes and every hash, then that each graph loads in ONNX Runtime. Raises ArtifactError."""
    artifact = Path(artifact)
    manifest = open_trusted(artifact, verify_hashes=True, manifest_digest=manifest_digest)
    if load_graph:
        import onnxruntime as ort

        for name, graph in manifest.graphs.items():
            path = artifact / graph.file
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

    An interrupted or failed export removes the staging folder (SIGTERM is turned into an
    exception by the CLI, so this cleanup runs for it too); nothing at `output` ever looks
    valid before the rename.
    """
    output = output.resolve()
    parent = output.parent
    if output.exists() and not output.is_dir():
        raise BadArtifactPath(f"{output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise BadArtifactPath(f"{output}: exists and is not empty; pass --force to replace it")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadArtifactPath(f"{parent}: cannot create the output's parent folder ({exc.strerror})") from exc
    if not os.access(parent, os.W_OK):
        raise BadArtifactPath(f"{parent}: not writable")
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
