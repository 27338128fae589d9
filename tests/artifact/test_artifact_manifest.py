"""The typed manifest (granite_deploy/manifest.py): round trip, typed reads, malformed manifests refused by field."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from granite_deploy import manifest as M
from granite_deploy.artifact import ArtifactError, load_manifest, verify

CLI = [sys.executable, "-m", "granite_deploy.cli"]


@pytest.fixture
def art(tiny_fp32_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(tiny_fp32_artifact, dst)
    return dst


def edit_manifest(art, change):
    path = art / "manifest.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d, indent=2))


def test_round_trip_is_byte_identical(tiny_fp32_artifact, hybrid_artifact, tmp_path):
    for src in (tiny_fp32_artifact, hybrid_artifact):
        m = M.load(src)
        assert m.to_dict() == json.loads((src / "manifest.json").read_text())
        out = tmp_path / src.parent.name
        out.mkdir()
        M.save(out, m)
        assert (out / "manifest.json").read_bytes() == (src / "manifest.json").read_bytes()
        assert M.parse((out / "manifest.json").read_bytes()) == m


def test_typed_reads(tiny_fp32_artifact, hybrid_artifact):
    m = load_manifest(tiny_fp32_artifact)
    assert isinstance(m, M.Manifest) and isinstance(m.architecture, M.Architecture)
    decoder, cpu = m.graph(M.DECODER), m.graph(M.DECODER_CPU)
    assert decoder.input_names[:3] == ("input_ids", "position_ids", "num_logits_to_keep")
    kv = decoder.state[0]
    assert (kv.input, kv.output, kv.kind, kv.in_place) == ("past_key_values.0.key", "present.0.key", "kv", True)
    assert kv.shape[kv.capacity_axis] == M.CACHE_CAPACITY and kv.capacity_axis == 1
    assert cpu.state[0].capacity_axis == 2 and cpu.derived_from == M.DECODER and cpu.engines == ("onnxruntime",)
    assert kv.batched_shape(3, 64) == (3, m.architecture.num_kv_heads, 64, m.architecture.head_dim)
    assert isinstance(m.files["model.onnx"], M.FileRecord) and m.context_length == m.architecture.max_position_embeddings
    h = load_manifest(hybrid_artifact).graph(M.DECODER)
    ssm = next(st for st in h.state if st.kind == "ssm")
    assert ssm.in_place is False and ssm.capacity_axis is None and h.recurrent
    with pytest.raises(ArtifactError, match="no graph named 'nope'"):
        m.graph("nope")
    with pytest.raises(Exception):  # frozen
        m.context_length = 5


@pytest.mark.parametrize("change, field", [
    (lambda d: d["graphs"]["decoder"]["state"][3].update(shape=[2, "oops", 8]),
     r"manifest.json: graphs.decoder.state\[3\].shape: a kv state has exactly one symbolic axis"),
    (lambda d: d["graphs"]["decoder"]["state"][3].update(shape=[2, 16, "cache_capacity"]),
     r"graphs.decoder.state\[3\].shape: \[2, 16, 'cache_capacity'\] differs from the graph input"),
    (lambda d: d["graphs"]["decoder"]["state"][1].update(input="past_key_values.9.key"),
     r"graphs.decoder.state\[1\].input: 'past_key_values.9.key' is not one of the graph's inputs"),
    (lambda d: d["graphs"]["decoder"]["state"][0].update(in_place="yes"),
     r"graphs.decoder.state\[0\].in_place: expected true or false"),
    (lambda d: d["architecture"].pop("vocab_size"), r"manifest.json: architecture.vocab_size: missing"),
    (lambda d: d["architecture"].update(num_layers=-1), r"architecture.num_layers: expected an integer >= 1"),
    (lambda d: d.update(context_length="long"), r"manifest.json: context_length: expected an integer >= 1"),
    (lambda d: d["graphs"]["decoder"]["inputs"][0].update(dtype="float99"), r"graphs.decoder.inputs\[0\].dtype"),
    (lambda d: d["graphs"]["decoder"].update(file="../../etc/passwd"),
     r"graphs.decoder.file: '../../etc/passwd': is not a normalised relative path"),
    (lambda d: d["graphs"]["decoder"].update(file="/etc/passwd"), r"graphs.decoder.file: '/etc/passwd': is an absolute"),
    (lambda d: d["files"].update({"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}),
     r'files\["../../etc/passwd"\]: .*not a normalised relative path'),
    (lambda d: d["files"].pop("model.onnx.data"),
     r"graphs.decoder.external_data\[0\]: 'model.onnx.data' is not in the manifest's file list"),
    (lambda d: d["files"]["config.json"].update(sha256="xyz"), r'files\["config.json"\].sha256: .*not a lowercase hex'),
    (lambda d: d.pop("graphs"), r"manifest.json: graphs: missing"),
    (lambda d: d.update(format_version=2), r"format_version: 2 is not supported .*re-export"),
])
def test_malformed_manifest_is_refused_naming_the_field(art, change, field):
    edit_manifest(art, change)
    with pytest.raises(M.ManifestError, match=field):
        load_manifest(art)
    with pytest.raises(ArtifactError, match=field):
        verify(art, load_graph=False)


def test_cli_refuses_a_malformed_manifest_with_one_line(art):
    edit_manifest(art, lambda d: d["graphs"]["decoder"]["state"][3].update(shape="x"))
    r = subprocess.run(CLI + ["verify", str(art)], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert "graphs.decoder.state[3].shape: expected a list" in r.stderr and "Traceback" not in r.stderr
    (art / "manifest.json").write_text("{not json")
    r = subprocess.run(CLI + ["verify", str(art)], capture_output=True, text=True)
    assert r.returncode == 3 and "unreadable manifest" in r.stderr and "Traceback" not in r.stderr


def test_old_artifacts_without_a_state_record_still_load(art):
    """format_version 1 manifests written before the `state` record: KV state derived from the inputs."""
    edit_manifest(art, lambda d: [g.pop("state") for g in d["graphs"].values()])
    m = load_manifest(art)
    st = m.graph().state
    assert [s.input for s in st][:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert st[0].shape[st[0].capacity_axis] == M.CACHE_CAPACITY
