"""The container files, without a container engine: parsed with Docker's own parser (the
`dockerfile` package), the serve image installs only the torch-free `[serve]` extra and runs as
a non-root user with a gRPC health check and the serve entrypoint; the entrypoint scripts turn
GRANITE_DEPLOY_* / GRANITE_EXPORT_* variables into the right command lines (run here with a
stand-in for `granite-deploy`), and every option they can pass exists in the CLI.

A fresh-venv `pip install ".[serve]"` is too slow for a test; it was run by hand (README,
"Deploying on Kubernetes"): this file checks the cheap equivalents, the extras in pyproject.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

dockerfile = pytest.importorskip("dockerfile")

ROOT = Path(__file__).resolve().parents[2]
SERVE_SCRIPT = ROOT / "deploy" / "container" / "granite-deploy-serve"
EXPORT_SCRIPT = ROOT / "deploy" / "container" / "granite-deploy-export"


def _parse(name: str):
    return dockerfile.parse_file(str(ROOT / name))


def _final_stage(cmds):
    starts = [i for i, c in enumerate(cmds) if c.cmd == "FROM"]
    return cmds[starts[-1]:]


def _runs(cmds) -> str:
    return "\n".join(" ".join(c.value) for c in cmds if c.cmd == "RUN")


def _pip_installs(cmds) -> list[str]:
    return [m.strip() for m in re.findall(r"pip install ([^&\n]*)", _runs(cmds))]


def _user(stage) -> str:
    users = [c.value[0] for c in stage if c.cmd == "USER"]
    assert users, "no USER in the final stage: the image would run as root"
    return users[-1]


def _cli_options(command: str) -> set[str]:
    from granite_deploy.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {o for a in sub._actions for o in a.option_strings}


# ============================================================================ pyproject

def test_serve_extra_and_base_dependencies_are_torch_free():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    heavy = re.compile(r"^(torch|transformers|safetensors|peft|accelerate)\b", re.I)
    for req in project["dependencies"] + project["optional-dependencies"]["serve"]:
        assert not heavy.match(req), req
    assert any(r.startswith("grpcio-health-checking") for r in project["optional-dependencies"]["serve"])
    assert any(heavy.match(r) for r in project["optional-dependencies"]["export"])


# ============================================================================ Containerfile (CPU serve)

def test_serve_image_installs_only_the_serve_extra():
    cmds = _parse("Containerfile")
    installs = _pip_installs(cmds)
    assert installs == ['".[serve]"'], installs
    runs = _runs(cmds)
    assert "torch" in runs and "sys.exit" in runs  # the build fails if torch came along
    assert "granite-deploy serve --help" in runs
    # every COPY source exists (a rename would break the build)
    for c in cmds:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for src in c.value[:-1]:
                assert (ROOT / src).exists(), src


def test_serve_image_user_healthcheck_entrypoint():
    stage = _final_stage(_parse("Containerfile"))
    assert _user(stage) not in ("0", "root")
    (hc,) = [c for c in stage if c.cmd == "HEALTHCHECK"]
    assert hc.value[0] == "CMD" and list(hc.value[1:3]) == ["granite-deploy", "health"]
    assert any(f.startswith("--start-period=") for f in hc.flags)
    (ep,) = [c for c in stage if c.cmd == "ENTRYPOINT"]
    assert ep.json and ep.value == ("/usr/local/bin/granite-deploy-serve",)
    copied = [c.value for c in stage if c.cmd == "COPY"]
    assert ("deploy/container/granite-deploy-serve", "/usr/local/bin/granite-deploy-serve") in copied
    env = {}
    for c in stage:
        if c.cmd == "ENV":  # the parser gives key, value, key, value...
            env.update(zip(c.value[::2], c.value[1::2]))
    assert {k: env[k] for k in ("GRANITE_DEPLOY_ARTIFACT", "GRANITE_DEPLOY_HOST", "GRANITE_DEPLOY_PORT")} == {
        "GRANITE_DEPLOY_ARTIFACT": "/models/artifact", "GRANITE_DEPLOY_HOST": "0.0.0.0", "GRANITE_DEPLOY_PORT": "8033"}
    assert {"8033", "9090"} <= {v for c in stage if c.cmd == "EXPOSE" for v in c.value}
    # the server runs no package manager and writes nothing under /models
    assert "/models/artifact" in _runs(stage)


def test_export_and_tensorrt_images():
    export = _parse("Containerfile.export")
    (install,) = _pip_installs(export)
    assert '".[export,serve]"' in install and "download.pytorch.org/whl/cpu" in install
    stage = _final_stage(export)
    assert _user(stage) not in ("0", "root")
    (ep,) = [c for c in stage if c.cmd == "ENTRYPOINT"]
    assert ep.value == ("/usr/local/bin/granite-deploy-export",)

    trt = _parse("Containerfile.tensorrt")
    args = {c.value[0].split("=")[0]: c.value[0].split("=", 1)[1] for c in trt if c.cmd == "ARG" and "=" in c.value[0]}
    assert args["TENSORRT_IMAGE"].startswith("nvcr.io/nvidia/tensorrt:")
    assert [c.value[0] for c in trt if c.cmd == "FROM"] == ["${TENSORRT_IMAGE}"]
    assert _user(_final_stage(trt)) not in ("0", "root")
    text = (ROOT / "Containerfile.tensorrt").read_text()
    assert "NOT built or run" in text


# ============================================================================ entrypoint scripts

def _stand_in(tmp_path: Path) -> Path:
    """A `granite-deploy` that records its argv as one JSON line per call."""
    fake = tmp_path / "granite-deploy"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "with open(os.environ['CALLS'], 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    "sys.exit(int(os.environ.get('FAKE_EXIT', '0')) if 'verify' in sys.argv else 0)\n")
    fake.chmod(0o755)
    return fake


def _run(script: Path, tmp_path: Path, env: dict, *args: str):
    calls = tmp_path / "calls.jsonl"
    calls.unlink(missing_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GRANITE_DEPLOY_", "GRANITE_EXPORT_"))}
    full = {**clean, "GRANITE_DEPLOY_BIN": str(_stand_in(tmp_path)), "CALLS": str(calls), **env}
    out = subprocess.run(["bash", str(script), *args], env=full, capture_output=True, text=True, timeout=30)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return out, [json.loads(line) for line in lines]


def test_serve_entrypoint_maps_the_environment(tmp_path):
    out, calls = _run(SERVE_SCRIPT, tmp_path, {})
    assert out.returncode == 0, out.stderr
    assert calls == [["serve", "/models/artifact"]]
    env = {"GRANITE_DEPLOY_ARTIFACT": "/mnt/models", "GRANITE_DEPLOY_HOST": "0.0.0.0", "GRANITE_DEPLOY_PORT": "8033",
           "GRANITE_DEPLOY_GRACE": "30", "GRANITE_DEPLOY_THREADS": "2", "GRANITE_DEPLOY_MODEL_ID": "granite 1b",
           "GRANITE_DEPLOY_EXTRA_ARGS": "--max-queue 9  --prefill-chunk 16"}
    out, calls = _run(SERVE_SCRIPT, tmp_path, env, "--max-batch", "4")
    assert out.returncode == 0, out.stderr
    assert calls == [["serve", "/mnt/models", "--host", "0.0.0.0", "--port", "8033", "--grace", "30",
                      "--threads", "2", "--model-id", "granite 1b", "--max-queue", "9", "--prefill-chunk", "16",
                      "--max-batch", "4"]]
    # the token itself stays in the environment (serve reads it), a token file becomes an option
    out, calls = _run(SERVE_SCRIPT, tmp_path, {"GRANITE_DEPLOY_AUTH_TOKEN": "s3cret",
                                               "GRANITE_DEPLOY_AUTH_TOKEN_FILE": "/var/run/secrets/token"})
    assert out.returncode == 0, out.stderr
    assert calls == [["serve", "/models/artifact", "--auth-token-file", "/var/run/secrets/token"]]


def test_serve_entrypoint_passes_only_options_serve_has():
    text = SERVE_SCRIPT.read_text()
    flags = re.findall(r"^opt GRANITE_DEPLOY_\w+ (--[\w-]+)$", text, re.M)
    assert len(flags) >= 12
    missing = sorted(set(flags) - _cli_options("serve"))
    assert not missing, f"the entrypoint passes options `granite-deploy serve` does not have: {missing}"
    assert re.search(r'^exec "\$\{GRANITE_DEPLOY_BIN:-granite-deploy\}" "\$\{args\[@\]\}" "\$@"$', text, re.M)
    assert 'args=(serve "${GRANITE_DEPLOY_ARTIFACT' in text
    assert not re.search(r"^opt GRANITE_DEPLOY_AUTH_TOKEN --", text, re.M)  # a token on argv is visible in ps


def test_manifest_env_vars_are_all_understood():
    """Every GRANITE_DEPLOY_* variable a manifest sets is read by the entrypoint."""
    yaml = pytest.importorskip("yaml")
    known = set(re.findall(r"\b(GRANITE_DEPLOY_\w+)", SERVE_SCRIPT.read_text())) | {"GRANITE_DEPLOY_BIN"}
    seen = set()
    for path in (ROOT / "deploy").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            seen |= set(re.findall(r"\b(GRANITE_DEPLOY_\w+)", json.dumps(doc)))
    assert seen and seen <= known, seen - known


def test_export_entrypoint(tmp_path):
    env = {"GRANITE_EXPORT_MODEL": "ibm-granite/granite-4.0-1b", "GRANITE_EXPORT_OUTPUT": "/artifacts",
           "GRANITE_EXPORT_QUANTIZE": "int4,int8"}
    out, calls = _run(EXPORT_SCRIPT, tmp_path, env)
    assert out.returncode == 0, out.stderr
    base = "/artifacts/granite-4.0-1b"
    assert calls == [
        ["export", "--model", "ibm-granite/granite-4.0-1b", "--output", base, "--dtype", "fp32"],
        ["quantize", base, "--output", f"{base}-int4", "--int4"],
        ["quantize", base, "--output", f"{base}-int8", "--int8"],
        ["verify", base], ["generate", base, "--prompt", "Hello", "--max-new-tokens", "4"],
        ["verify", f"{base}-int4"], ["generate", f"{base}-int4", "--prompt", "Hello", "--max-new-tokens", "4"],
        ["verify", f"{base}-int8"], ["generate", f"{base}-int8", "--prompt", "Hello", "--max-new-tokens", "4"],
    ]
    for call in calls:  # the stand-in accepted them; the real CLI must too
        opts = {a for a in call if a.startswith("--")}
        assert opts <= _cli_options(call[0]), (call, opts - _cli_options(call[0]))
    out, calls = _run(EXPORT_SCRIPT, tmp_path, {**env, "GRANITE_EXPORT_QUANTIZE": "int3"})
    assert out.returncode == 2 and "int3" in out.stderr
    out, calls = _run(EXPORT_SCRIPT, tmp_path, {**env, "FAKE_EXIT": "3"})  # verify fails -> the job fails
    assert out.returncode == 3 and calls[-1][0] == "verify" and "artifacts verified" not in out.stderr


def test_scripts_parse_with_bash():
    for script in (SERVE_SCRIPT, EXPORT_SCRIPT):
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
        assert os.access(script, os.X_OK), f"{script} is not executable"
        assert shlex.split(script.read_text().splitlines()[0]) == ["#!/bin/bash"]
