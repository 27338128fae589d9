"""What checking an artifact costs before `serve`/`generate` load it (granite_deploy.artifact.open_trusted).

On the full-size granite-4.0-1b artifact (random weights, fp32, ~6.5 GB) from the shared bench cache, one run:
sizes + paths only (`--skip-verify`), sha256 of every file (the default) twice (the second with the files in the
page cache, as right after a copy or a previous start), a plain sha256 read of the weights file, and, for scale,
opening the ONNX Runtime CPU engine on the same artifact. Run under the bench lock:

    flock /tmp/granite-bench.lock .venv/bin/python bench/bench_verify.py
    .venv/bin/python bench/bench_verify.py --hash-only    # no engine load (hashing needs ~10 MB of memory)
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, machine, print_table  # noqa: E402

from granite_deploy import progress  # noqa: E402
from granite_deploy.artifact import open_trusted  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    hash_only = "--hash-only" in sys.argv  # no engine load: a few MB of memory, runnable outside the lock
    art = Path(args[0]) if args else CACHE / "granite-4.0-1b-random-artifact"
    progress.set_enabled(False)
    m = open_trusted(art, verify_hashes=False)
    total = sum(r.bytes for r in m.files.values())
    rows = []
    t, _ = timed(lambda: open_trusted(art, verify_hashes=False))
    rows.append(["sizes + paths only (--skip-verify)", f"{t:.3f}", "-"])
    for label in ("sha256 of every file (default), 1st run", "sha256 of every file (default), 2nd run"):
        t, _ = timed(lambda: open_trusted(art, verify_hashes=True))
        rows.append([label, f"{t:.1f}", f"{total / t / 1e9:.2f}"])
    data = art / "model.onnx.data"

    def plain():
        h = hashlib.sha256()
        with open(data, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        return h.hexdigest()

    t, _ = timed(plain)
    rows.append([f"plain hashlib.sha256 of {data.name} ({data.stat().st_size / 1e9:.2f} GB)", f"{t:.1f}",
                 f"{data.stat().st_size / t / 1e9:.2f}"])
    if not hash_only:
        from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

        t, eng = timed(lambda: OnnxRuntimeEngine(art, max_batch=1, threads=2))
        rows.append([f"for scale: open the ONNX Runtime CPU engine (graph {eng.graph_name})", f"{t:.1f}", "-"])
    print(f"artifact {art.name}: {len(m.files)} files, {total / 1e9:.2f} GB; machine: {machine()}")
    print_table("open_trusted cost (one run)", ["check", "seconds", "GB/s"], rows)


if __name__ == "__main__":
    main()
