"""Export: parity with transformers, the manifest, verify, and every bad-input case."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from granite_deploy.artifact import ArtifactError, verify
from granite_deploy.export.checkpoint import CheckpointError
from granite_deploy.export.exporter import ExportError, export
from granite_deploy.export.tiny import make_tiny_checkpoint

CLI = [sys.executable, "-m", "granite_deploy.cli"]


@pytest.fixture
def tiny_artifact(tiny_fp32_artifact):
    return tiny_fp32_artifact  # tests/conftest.py: exported once per session


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run_onnx(session, manifest, ids, positions, cache):
    feeds = {"input_ids": np.asarray(ids, np.int64), "position_ids": np.asarray(positions, np.int64), **cache}
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feeds)))
    for i in range(manifest["architecture"]["num_layers"]):
        cache[f"past_key_values.{i}.key"] = out[f"present.{i}.key"]
        cache[f"past_key_values.{i}.value"] = out[f"present.{i}.value"]
    return out["logits"]


def empty_cache(manifest, batch, capacity):
    a = manifest["architecture"]
    shape = (batch, a["num_kv_heads"], capacity, a["head_dim"])
    cache = {}
    for i in range(a["num_layers"]):
        cache[f"past_key_values.{i}.key"] = np.zeros(shape, np.float32)
        cache[f"past_key_values.{i}.value"] = np.zeros(shape, np.float32)
    return cache


def check_parity(checkpoint, artifact):
    """Independent of export/validate.py: feed the graph by hand as the manifest describes."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    model = hf_model(checkpoint)
    vocab = manifest["architecture"]["vocab_size"]
    rng = np.random.default_rng(1)
    a = rng.integers(0, vocab, 9).tolist()
    b = rng.integers(0, vocab, 4).tolist()
    with torch.no_grad():
        ref_a = model(torch.tensor([a])).logits[0].numpy()
        ref_b = model(torch.tensor([b])).logits[0].numpy()

    # batch 1, past 0: whole prompt; then past > 0: two more chunks through the cache
    cache = empty_cache(manifest, 1, 16)
    got = run_onnx(session, manifest, [a[:5]], [list(range(5))], cache)
    np.testing.assert_allclose(got[0], ref_a[:5], atol=1e-3)
    got = run_onnx(session, manifest, [a[5:8]], [[5, 6, 7]], cache)
    np.testing.assert_allclose(got[0], ref_a[5:8], atol=1e-3)
    got = run_onnx(session, manifest, [a[8:]], [[8]], cache)
    np.testing.assert_allclose(got[0], ref_a[8:], atol=1e-3)

    # batch 2 with different lengths: right padding, per-row positions, then a decode step each
    cache = empty_cache(manifest, 2, 12)
    ids = [a[:8], b + [0] * 4]
    got = run_onnx(session, manifest, ids, [list(range(8))] * 2, cache)
    np.testing.assert_allclose(got[0], ref_a[:8], atol=1e-3)
    np.testing.assert_allclose(got[1, :4], ref_b[:4], atol=1e-3)
    got = run_onnx(session, manifest, [[a[8]], [b[3]]], [[8], [4]], cache)  # row 1 overwrites a pad slot
    np.testing.assert_allclose(got[0, 0], ref_a[8], atol=1e-3)
    with torch.no_grad():
        ref_b2 = model(torch.tensor([b + [b[3]]])).logits[0, -1].numpy()
    np.testing.assert_allclose(got[1, 0], ref_b2, atol=1e-3)


def test_export_parity_batch_1_and_2_past_0_and_more(tiny_checkpoint, tiny_artifact):
    check_parity(tiny_checkpoint, tiny_artifact)


def test_manifest_records_everything(tiny_checkpoint, tiny_artifact):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    assert m["format"] == "granite-deploy-artifact" and m["format_version"] == 1
    config_sha = hashlib.sha256((tiny_checkpoint / "config.json").read_bytes()).hexdigest()
    assert m["source"]["config_sha256"] == config_sha
    assert m["export_options"] == {"dtype": "fp32", "opset": 24, "validate": True, "decode_steps": 16}
    v = m["validation"]
    assert v["passed"] and v["batch"] == 2 and v["decode_steps"] >= 16
    assert len(set(v["prompt_lengths"])) == 2
    assert v["max_abs_logit_diff"] <= 1e-3 and v["greedy_agreement"] == 1.0
    graph = m["graphs"]["decoder"]
    names = [i["name"] for i in graph["inputs"]]
    assert names[:2] == ["input_ids", "position_ids"]
    assert "past_key_values.2.value" in names
    assert [o["name"] for o in graph["outputs"]][:2] == ["logits", "present.0.key"]
    assert graph["kv_cache"]["kind"] == "fixed_capacity_in_place"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_artifact / name).read_bytes() == (tiny_checkpoint / name).read_bytes()
    for name, rec in m["files"].items():
        assert hashlib.sha256((tiny_artifact / name).read_bytes()).hexdigest() == rec["sha256"]
    assert {"model.onnx", "model.onnx.data", "config.json"} <= set(m["files"])
    assert set(m["tools"]) >= {"torch", "transformers", "onnx", "onnxruntime"}


def test_graph_uses_standard_ops_and_multipliers(tiny_checkpoint, tiny_artifact):
    model = onnx.load(str(tiny_artifact / "model.onnx"), load_external_data=False)
    assert {op.domain for op in model.opset_import} == {""}
    assert model.opset_import[0].version == 24
    ops = {n.op_type for n in model.graph.node}
    assert {"Attention", "TensorScatter", "RMSNormalization", "RotaryEmbedding"} <= ops
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.data_location != 1}
    assert float(consts["embedding_multiplier"]) == pytest.approx(config["embedding_multiplier"])
    assert float(consts["residual_multiplier"]) == pytest.approx(config["residual_multiplier"])
    assert float(consts["logits_scaling"]) == pytest.approx(config["logits_scaling"])
    scales = [a.f for n in model.graph.node if n.op_type == "Attention" for a in n.attribute if a.name == "scale"]
    assert scales and all(s == pytest.approx(config["attention_multiplier"]) for s in scales)


def test_other_dims_untied_and_granite3(tmp_path):
    """A 4-layer model with other head counts and untied embeddings, and a Granite 3.x checkpoint."""
    ckpt = make_tiny_checkpoint(tmp_path / "c4", seed=3, num_hidden_layers=4, hidden_size=128, num_attention_heads=8,
                                num_key_value_heads=2, tie_word_embeddings=False, residual_multiplier=0.5)
    art = export(ckpt, tmp_path / "a4", decode_steps=16)
    check_parity(ckpt, art)

    from transformers import GraniteConfig, GraniteForCausalLM

    g3 = tmp_path / "g3"
    make_tiny_checkpoint(g3)  # tokenizer files; the model is replaced below
    config = GraniteConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, embedding_multiplier=2.0,
                           attention_multiplier=0.1, residual_multiplier=0.4, logits_scaling=3.0,
                           tie_word_embeddings=True, max_position_embeddings=256)
    torch.manual_seed(0)
    model = GraniteForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "embed" in name else 3.0 / p.shape[-1] ** 0.5) if "norm" not in name else None
    (g3 / "model.safetensors").unlink()
    model.save_pretrained(g3)
    art3 = export(g3, tmp_path / "a3")
    assert json.loads((art3 / "manifest.json").read_text())["architecture"]["model_type"] == "granite"
    check_parity(g3, art3)


# --- verify ---------------------------------------------------------------------------------


def copy_artifact(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def cli(*args, **kw):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, **kw)


def test_verify_accepts_sound_artifact(tiny_artifact):
    r = cli("verify", str(tiny_artifact))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


@pytest.mark.parametrize("target", ["model.onnx.data", "model.onnx", "tokenizer.json"])
def test_verify_rejects_changed_byte(tiny_artifact, tmp_path, target):
    art = copy_artifact(tiny_artifact, tmp_path / "a")
    data = bytearray((art / target).read_bytes())
    data[len(data) // 2] ^= 0x01
    (art / target).write_bytes(bytes(data))
    r = cli("verify", str(art))
    assert r.returncode != 0
    assert target in r.stderr and "changed" in r.stderr


def test_verify_rejects_truncated_and_missing(tiny_artifact, tmp_path):
    art = copy_artifact(tiny_artifact, tmp_path / "a")
    data = (art / "model.onnx.data").read_bytes()
    (art / "model.onnx.data").write_bytes(data[:-100])
    (art / "tokenizer_config.json").unlink()
    with pytest.raises(ArtifactError) as err:
        verify(art)
    msg = str(err.value)
    assert "model.onnx.data: truncated" in msg
    assert "tokenizer_config.json: missing" in msg
    r = cli("verify", str(art))
    assert r.returncode != 0 and "truncated" in r.stderr


def test_verify_rejects_missing_manifest(tmp_path):
    (tmp_path / "x").mkdir()
    r = cli("verify", str(tmp_path / "x"))
    assert r.returncode != 0 and "manifest.json" in r.stderr


# --- bad input ------------------------------------------------------------------------------


def test_missing_and_non_granite_folders(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        export(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"config.json: missing.*weights.bin.*Supported"):
        export(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"model_type 'llama'.*not a Granite model.*Supported"):
        export(tmp_path / "llama", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_granite_variants_are_refused_clearly(tmp_path):
    """MoE Granite (e.g. granite-4.0-h-tiny) is not supported yet: say so, write nothing."""
    config = {"model_type": "granitemoehybrid", "num_hidden_layers": 2, "layer_types": ["mamba", "attention"],
              "num_local_experts": 8, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100}
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "config.json").write_text(json.dumps(config))
    r = cli("export", "--model", str(tmp_path / "moe"), "--output", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "mixture-of-experts" in r.stderr and "not yet supported" in r.stderr and "Supported:" in r.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({**config, "num_local_experts": 0,
                                                              "layer_types": ["mamba", "conv"]}))
    r = cli("export", "--model", str(tmp_path / "odd"), "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and "layer_types[1] = 'conv'" in r.stderr


def test_output_must_be_empty_unless_forced(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = cli("export", "--model", str(tiny_checkpoint), "--output", str(out), "--skip-validation")
    assert r.returncode == 2 and "not empty" in r.stderr and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "precious"
    r = cli("export", "--model", str(tiny_checkpoint), "--output", str(out), "--skip-validation", "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    assert json.loads((out / "manifest.json").read_text())["validation"] == {"skipped": True}
    assert r.stderr == ""  # not a TTY: no progress output
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging leftovers


def test_unwritable_output(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = cli("export", "--model", str(tiny_checkpoint), "--output", str(blocker / "out"))
    assert r.returncode == 2 and str(blocker) in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp8"], "--dtype: 'fp8' is not one of"),
    (["--opset", "13"], "--opset: 13 is not supported"),
    (["--opset", "99"], "--opset: 99 is not supported"),
])
def test_bad_dtype_and_opset(tiny_checkpoint, tmp_path, args, message):
    r = cli("export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "out"), *args)
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "out").exists()


def test_failed_validation_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import granite_deploy.export.validate as validate_mod

    monkeypatch.setitem(validate_mod.TOLERANCES, "fp32", {"max_abs_diff": 0.0, "min_greedy_agreement": 1.0})
    with pytest.raises(ExportError, match="validation failed"):
        export(tiny_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    from granite_deploy.cli import main

    assert main(["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "out")]) == 3  # gate failure
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing_that_looks_valid(tiny_checkpoint, tmp_path, monkeypatch):
    import granite_deploy.export.exporter as exporter

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "file_records", boom)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_progress_on_terminal(tiny_checkpoint, tmp_path):
    r = cli("--progress", "on", "export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"),
            "--skip-validation")
    assert r.returncode == 0
    for label in ("loading", "building ONNX graph", "hashing files"):
        assert label in r.stderr
