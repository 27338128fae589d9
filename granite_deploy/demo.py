"""`granite-deploy demo`: the whole pipeline on a tiny Granite 4.0 model made on the spot.

checkpoint (random weights, real architecture and tokenizer layout) -> export
(validated against PyTorch) -> verify -> serve over gRPC -> stream a chat reply
with a real gRPC client. Every step is the same code a production run uses.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def launch_server(artifact: Path, *args: str, wrapper: tuple[str, ...] = (), stderr=subprocess.DEVNULL,
                  env: dict | None = None, cwd: str | None = None) -> subprocess.Popen:
    """Start `granite-deploy serve ARTIFACT --host 127.0.0.1 --port 0 ARGS` (under `wrapper`, e.g.
    taskset, when given); wait_serving() then reads where it listens."""
    cmd = [*wrapper, sys.executable, "-m", "granite_deploy.cli", "serve", str(artifact), "--host", "127.0.0.1",
           "--port", "0", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=cwd)


def wait_serving(proc: subprocess.Popen, timeout: float = 120.0, http: bool = False) -> tuple[str, str | None]:
    """(gRPC "host:port", OpenAI HTTP base URL or None) from the server's ready line; kills the
    process and raises if it does not say it is serving (with HTTP when `http`) within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        grpc_match = re.search(r"serving .*? on (\S+:\d+)", line)
        http_match = re.search(r"OpenAI-compatible HTTP on (\S+:\d+)", line)
        if grpc_match and (http_match or not http):
            return grpc_match.group(1), f"http://{http_match.group(1)}" if http_match else None
    proc.kill()
    what = "gRPC and HTTP" if http else "gRPC"
    raise RuntimeError(f"the server did not report that it is serving ({what}) within {timeout:.0f} s")


def start_server(artifact: Path, *args: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start `granite-deploy serve ARTIFACT --port 0 ARGS` and return (process, "host:port") once it
    prints its ready line."""
    proc = launch_server(artifact, *args)
    return proc, wait_serving(proc, timeout)[0]


def run_demo(workdir: str | None = None, keep: bool = False) -> int:
    from .artifact import verify
    from .export.exporter import export, summary
    from .export.tiny import make_tiny_checkpoint

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="granite-deploy-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        _say(f"making a tiny random Granite 4.0 checkpoint in {root / 'checkpoint'}")
        checkpoint = make_tiny_checkpoint(root / "checkpoint")
        _say("exporting it to ONNX and validating against PyTorch")
        artifact = export(checkpoint, root / "artifact", force=True)
        print(summary(artifact))
        _say("verifying the artifact (hashes + ONNX Runtime load)")
        manifest = verify(artifact)
        print(f"{artifact}: OK ({len(manifest.files)} files)")

        _say("serving it over gRPC (fmaas.GenerationService + granite.v1.ChatService)")
        server, target = start_server(artifact, "--max-batch", "4")
        try:
            print(f"server at {target}")
            chat = root / "chat.json"
            chat.write_text(json.dumps([
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"},
            ]))
            _say("streaming a chat reply (the model has random weights: expect gibberish, streamed token by token)")
            result = subprocess.run([sys.executable, "-m", "granite_deploy.cli", "client", "--target", target,
                                     "--chat", str(chat), "--stream", "--max-new-tokens", "24"])
            if result.returncode != 0:
                return result.returncode
        finally:
            server.terminate()
            server.wait(30)
        _say("done: export -> verify -> serve -> stream all worked")
        return 0
    finally:
        if not keep and not workdir:
            shutil.rmtree(root, ignore_errors=True)
        elif keep:
            print(f"(kept {root})")
