"""Trusted artifacts: only listed files, inside the folder, of the listed size and sha256, before anything loads;
the manifest itself pinned by digest or signed (OpenSSF model-signing). Refused by `verify` AND `serve`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from granite_deploy.artifact import ArtifactError, manifest_sha256, open_trusted, verify

CLI = [sys.executable, "-m", "granite_deploy.cli"]


@pytest.fixture
def art(tiny_fp32_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(tiny_fp32_artifact, dst)
    return dst


def cli(*args, timeout=120):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def serve(art, *extra):
    """`granite-deploy serve` on a bad artifact must exit (non-zero, one line) before it ever listens."""
    r = cli("serve", art, "--port", "0", "--threads", "1", *extra, timeout=90)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    return r


def flip_byte(path, at=-1):
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def edit_manifest(art, change):
    path = art / "manifest.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d, indent=2))


# --- the cases: verify and serve refuse each -----------------------------------------------------------------
def test_tampered_weights_refused_by_verify_serve_and_generate(art):
    flip_byte(art / "model.onnx.data", 1000)
    r = cli("verify", art)
    assert r.returncode == 3 and "model.onnx.data: contents changed" in r.stderr
    assert "model.onnx.data: contents changed" in serve(art).stderr
    r = cli("generate", art, "--prompt", "hi", "--max-new-tokens", "2", "--threads", "1")
    assert r.returncode == 3 and "model.onnx.data: contents changed" in r.stderr
    # Operators who verified at deploy time may skip the hashes; sizes are still checked.
    r = cli("generate", art, "--prompt", "hi", "--max-new-tokens", "2", "--threads", "1", "--skip-verify")
    # (the generation is what counts here: `generate` sometimes segfaults at interpreter exit, after printing
    # its stats, independent of this option; see the artifact helper's report)
    assert "generated tokens: 2" in r.stderr and "contents changed" not in r.stderr, r.stderr
    (art / "config.json").write_bytes((art / "config.json").read_bytes()[:-3])
    r = cli("generate", art, "--prompt", "hi", "--max-new-tokens", "2", "--threads", "1", "--skip-verify")
    assert r.returncode == 3 and "config.json: truncated" in r.stderr


def test_server_load_refuses_tampered_files(art):
    """The server's own load path (ServerConfig -> open_trusted), not only the CLI."""
    from granite_deploy.serve.server import GraniteServer, ServerConfig

    flip_byte(art / "model.onnx.data", 1000)
    server = GraniteServer(ServerConfig(str(art), port=0, threads=1, warmup=False))
    with pytest.raises(ArtifactError, match="model.onnx.data: contents changed"):
        server._load()
    assert ServerConfig(str(art)).verify_hashes is True  # hashes by default
    assert open_trusted(art, verify_hashes=False).files  # what --skip-verify (verify_hashes=False) lets through


def test_edited_manifest_caught_by_the_pinned_digest(art):
    digest = manifest_sha256(art)
    r = cli("verify", art, "--no-load")
    assert r.returncode == 0 and f"manifest sha256: {digest}" in r.stdout
    edit_manifest(art, lambda d: d.update(context_length=d["context_length"] * 64))
    assert cli("verify", art, "--no-load").returncode == 0  # the manifest is consistent with itself...
    r = cli("verify", art, "--no-load", "--manifest-digest", digest)  # ...but not with what was recorded
    assert r.returncode == 3 and "differs from the pinned --manifest-digest" in r.stderr
    assert "differs from the pinned --manifest-digest" in serve(art, "--manifest-digest", digest).stderr


@pytest.mark.parametrize("where, bad", [
    ("files", "../outside.txt"), ("files", "/etc/hostname"), ("graph", "../art-copy/model.onnx"),
    ("graph", "/tmp/model.onnx"),
])
def test_paths_leaving_the_folder_refused_by_verify_and_serve(art, tmp_path, where, bad):
    (tmp_path / "outside.txt").write_text("secret")
    if where == "files":
        edit_manifest(art, lambda d: d["files"].update({bad: {"sha256": "0" * 64, "bytes": 6}}))
    else:
        edit_manifest(art, lambda d: d["graphs"]["decoder"].update(file=bad))
    for r in (cli("verify", art), serve(art)):
        assert r.returncode == 3, r.stderr
        assert bad in r.stderr and ("absolute path" in r.stderr or "relative path" in r.stderr)


def test_symlink_leaving_the_folder_refused(art, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.copy2(art / "tokenizer_config.json", outside)  # same bytes: size and sha256 would match
    (art / "tokenizer_config.json").unlink()
    os.symlink(outside, art / "tokenizer_config.json")
    r = cli("verify", art, "--no-load")
    assert r.returncode == 3 and "tokenizer_config.json: is a symlink leaving the artifact folder" in r.stderr
    assert "symlink leaving the artifact folder" in serve(art).stderr
    # A symlink that stays inside the folder is fine.
    (art / "tokenizer_config.json").unlink()
    shutil.copy2(outside, art / "real.json")
    os.symlink("real.json", art / "tokenizer_config.json")
    assert open_trusted(art).files["tokenizer_config.json"]


def test_graph_reading_unlisted_external_data_refused(art):
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    next(e for e in t.external_data if e.key == "location").value = "../../etc/passwd"
    onnx.save_model(model, str(art / "model.onnx"))
    size = (art / "model.onnx").stat().st_size
    sha = __import__("hashlib").sha256((art / "model.onnx").read_bytes()).hexdigest()
    edit_manifest(art, lambda d: d["files"]["model.onnx"].update(sha256=sha, bytes=size))
    with pytest.raises(ArtifactError, match=r"reads external data from '../../etc/passwd'"):
        verify(art, load_graph=False)


def test_unlisted_chat_template_is_ignored_with_a_warning(art, caplog, tmp_path):
    from granite_deploy.serve.tokenizer import GraniteTokenizer

    messages = [{"role": "user", "content": "hi"}]
    listed = GraniteTokenizer.from_dir(art, trusted_files=open_trusted(art).files).render_chat(messages)
    (art / "chat_template.jinja").write_text("INJECTED {{ messages[0].content }}")
    with caplog.at_level(logging.WARNING):
        manifest = open_trusted(art)
        tok = GraniteTokenizer.from_dir(art, trusted_files=manifest.files)
    assert tok.render_chat(messages) == listed and "INJECTED" not in listed
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "chat_template.jinja" in text and "does not list" in text
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(messages))
    r = cli("render", art, "--chat", chat)
    assert r.returncode == 0 and "INJECTED" not in r.stdout and r.stdout == listed


# --- signing (OpenSSF model-signing, elliptic-curve key pair) -----------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pytest.importorskip("model_signing", reason='needs the sign extra: pip install "granite-deploy[sign]"')
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("keys")
    pairs = {}
    for name in ("producer", "other"):
        k = ec.generate_private_key(ec.SECP256R1())
        (d / f"{name}.pem").write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
        (d / f"{name}.pub").write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                                    serialization.PublicFormat.SubjectPublicKeyInfo))
        pairs[name] = (d / f"{name}.pem", d / f"{name}.pub")
    return pairs


@pytest.mark.parametrize("target", ["model.onnx.data", "manifest.json", "tokenizer.json"])
def test_signed_artifact_verifies_and_one_byte_breaks_it(art, keys, target):
    key, pub = keys["producer"]
    r = cli("sign", art, "--key", key)
    assert r.returncode == 0, r.stderr
    sig = art.with_name(art.name + ".sig")
    assert sig.is_file() and not (art / sig.name).exists()
    r = cli("verify", art, "--signature", sig, "--public-key", pub)
    assert r.returncode == 0 and "signature verified" in r.stdout, r.stderr
    r = cli("verify", art, "--no-load", "--signature", sig, "--public-key", keys["other"][1])
    assert r.returncode == 3 and "does not verify" in r.stderr
    if target == "manifest.json":  # still a valid manifest, so only the signature can tell
        edit_manifest(art, lambda d: d.update(context_length=d["context_length"] + 1))
        assert cli("verify", art, "--no-load").returncode == 0
    else:
        flip_byte(art / target, 100)
    r = cli("verify", art, "--no-load", "--signature", sig, "--public-key", pub)
    assert r.returncode == 3 and "Traceback" not in r.stderr
    if target == "manifest.json":
        assert "manifest.json" in r.stderr


def test_sign_refuses_bad_input(art, keys, tmp_path):
    r = cli("sign", art, "--key", tmp_path / "missing.pem")
    assert r.returncode == 2 and "--key" in r.stderr and "no such file" in r.stderr
    r = cli("sign", art, "--key", keys["producer"][0], "--signature", art / "inside.sig")
    assert r.returncode == 2 and "inside the artifact folder" in r.stderr
    flip_byte(art / "config.json", 3)
    r = cli("sign", art, "--key", keys["producer"][0])
    assert r.returncode == 3 and "config.json: contents changed" in r.stderr  # never signs a broken artifact
    r = cli("verify", art, "--signature", tmp_path / "x.sig")
    assert r.returncode == 2 and "--signature/--public-key: give both" in r.stderr
