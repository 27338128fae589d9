"""Export-side CLI hygiene: one line and exit 2 for bad input, 3 for a failed verification or gate, never a
traceback for a user mistake; a missing extra names what to install; SIGTERM/SIGINT during export leave nothing."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "granite_deploy.cli"]


def cli(*args, timeout=300):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def one_line_error(r, code, *texts):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for t in texts:
        assert t in r.stderr, r.stderr


def checkpoint_copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def test_checkpoint_without_weights(tiny_checkpoint, tmp_path):
    ckpt = checkpoint_copy(tiny_checkpoint, tmp_path)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    r = cli("export", "--model", ckpt, "--output", tmp_path / "out")
    one_line_error(r, 2, "no weights", str(ckpt))
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    ckpt = checkpoint_copy(tiny_checkpoint, tmp_path)
    weights = next(ckpt.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1000])
    r = cli("export", "--model", ckpt, "--output", tmp_path / "out")
    one_line_error(r, 2, f"{weights.name}: truncated")
    weights.write_bytes(b"\x05")
    r = cli("export", "--model", ckpt, "--output", tmp_path / "out")
    one_line_error(r, 2, "truncated or not a safetensors file")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("command, module", [("export", "torch"), ("export", "transformers"),
                                             ("quantize", "onnx_ir")])
def test_missing_export_extra_names_the_install(tiny_checkpoint, tiny_fp32_artifact, tmp_path, command, module):
    """A serve-only install (simulated: the module cannot be imported) gets the extra to install, not a traceback."""
    if command == "export":
        argv = ["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "out")]
    else:
        argv = ["quantize", str(tiny_fp32_artifact), "--output", str(tmp_path / "out"), "--int4"]
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from granite_deploy.cli import main\n"
            f"sys.exit(main({argv!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    one_line_error(r, 2, module, 'pip install "granite-deploy[export]"')
    assert not (tmp_path / "out").exists()


def test_export_progress_shows_the_pytorch_reference_run(tiny_checkpoint, tmp_path):
    r = cli("--progress", "on", "export", "--model", tiny_checkpoint, "--output", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    for label in ("loading", "running the PyTorch reference", "validating decoder against PyTorch",
                  "hashing files"):
        assert label in r.stderr


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_export_leaves_nothing(tiny_checkpoint, tmp_path, sig, code):
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    proc = subprocess.Popen(CLI + ["export", "--model", str(tiny_checkpoint), "--output", str(out_parent / "art")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any(p.name.startswith(".art.partial-") for p in out_parent.iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "export never started staging"
            time.sleep(0.05)
        time.sleep(0.1)  # inside the export (a tiny one can finish ~0.5 s after staging starts)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # SIGINT: 130, or death by SIGINT itself (-2) when Python re-raises an interrupt it saw at exit; either way
    # after the staging folder was removed.
    assert proc.returncode in (code, -sig), (proc.returncode, err)
    assert "Traceback" not in err
    assert list(out_parent.iterdir()) == []  # no .partial folder, nothing at the output


def test_exit_codes_of_verify_and_build(tiny_fp32_artifact, tmp_path):
    one_line_error(cli("verify", tmp_path / "nowhere"), 2, "no such directory")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("verify", tmp_path / "empty"), 2, "manifest.json: missing")
    art = tmp_path / "art"
    shutil.copytree(tiny_fp32_artifact, art)
    (art / "generation_config.json").unlink()
    one_line_error(cli("verify", art), 3, "generation_config.json: missing")
    one_line_error(cli("build", tiny_fp32_artifact, "--plan-only", "--max-batch", "-1"), 2, "--max-batch")
