"""`granite-deploy quantize --int8-dynamic`: int8 per-channel layer weights in integer GEMMs
(MatMulInteger) over a per-row uint8 quantisation of the input, the head likewise over its own copy,
the tied embedding's lookup GatherBlockQuantized over an 8-bit table.

What could go wrong and is checked: the graph is not what the manifest says (ops, weight bytes),
it disagrees with fp32 beyond int8 noise, and a token's logits depend on which other tokens share
the step (a per-tensor activation scale would do that; the ragged step batches every request into
one tensor)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import QUANTIZE_TEST_GATE
from granite_deploy.artifact import verify
from test_quantize import _agreement, _prompt_ids


@pytest.fixture(scope="module")
def dynamic(tiny_fp32_artifact, tmp_path_factory):
    from granite_deploy.export.quantize import quantize

    out = tmp_path_factory.mktemp("dyn") / "int8-dynamic"
    return quantize(tiny_fp32_artifact, out, "int8-dynamic", thresholds=QUANTIZE_TEST_GATE["int8-dynamic"])


def test_manifest_ops_and_bytes(tiny_fp32_artifact, dynamic):
    import onnx

    manifest = verify(dynamic).to_dict()
    src = json.loads((tiny_fp32_artifact / "manifest.json").read_text())
    g = manifest["graphs"]["decoder"]
    assert g["precision"] == "int8-dynamic" and g["engines"] == ["onnxruntime"]
    assert g["op_domains"]["com.microsoft"] == ["GatherBlockQuantized"]  # the lookup; no MatMulNBits left
    assert "MatMulInteger" in g["op_domains"]["ai.onnx"] and "MatMul" not in g["op_domains"]["ai.onnx"]
    q = manifest["quantization"]
    assert q["method"] == "int8-dynamic" and q["bits"] == 8 and "per row" in q["activations"]
    layers = src["architecture"]["num_layers"]
    model = onnx.load(str(dynamic / g["file"]), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") == 4 * layers + 1  # qkv, o, gate+up, down per layer; the head
    assert ops.count("MatMulNBits") == 0
    assert "MatMulInteger" in q["head"] and "GatherBlockQuantized" in q["embedding"]
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 4 * layers + 1
    # 7-bit range: a full-range int8 weight overflows the int16 pair sums of the non-VNNI x86 kernel.
    full = onnx.load(str(dynamic / g["file"]))
    peaks = [int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max())
             for t in full.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(peaks) == 4 * layers + 1 and set(peaks) == {63}
    weights = sum(manifest["files"][n]["bytes"] for n in g["external_data"])
    fp32_weights = sum(src["files"][n]["bytes"] for n in src["graphs"]["decoder"]["external_data"])
    assert weights < 0.4 * fp32_weights
    assert manifest["accuracy"]["passed"] and manifest["accuracy"]["gate"] == "enforced"
    # The derived flavours were checked against the graph they came from in float compute, to float rounding.
    for flavour in ("decoder_cpu", "decoder_ragged"):
        check = manifest["graphs"][flavour]["validation"]
        assert check["passed"] and check["max_abs_logit_diff"] < 1e-3 and "int8-dynamic" in check["note"]


def test_agrees_with_fp32(tiny_fp32_artifact, dynamic):
    # Teacher-forced over 4 prompts x 16 steps; measured 60/64 (MatMulNBits int8 59/64).
    agree, total = _agreement(tiny_fp32_artifact, dynamic)
    assert total == 64 and agree >= 52, f"{agree}/{total}"


@pytest.mark.parametrize("graph", ["decoder_cpu", "decoder_ragged"])
def test_token_logits_do_not_depend_on_batch_mates(tiny_fp32_artifact, dynamic, graph):
    from granite_deploy.engines.base import Chunk
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

    a, b = _prompt_ids(tiny_fp32_artifact)[:2]
    alone = OnnxRuntimeEngine(dynamic, max_batch=2, max_seq_len=128, threads=1, graph=graph)
    alone.reserve(0)
    ref = alone.step([Chunk(0, tuple(a), 0)])[0]
    together = OnnxRuntimeEngine(dynamic, max_batch=2, max_seq_len=128, threads=1, graph=graph)
    together.reserve(0)
    together.reserve(1)
    # A different, longer prompt shares the step (and, in the ragged graph, the same flat tensor).
    got = together.step([Chunk(1, tuple(b) * 3, 0), Chunk(0, tuple(a), 0)])
    np.testing.assert_allclose(got[1], ref, rtol=0, atol=1e-4)


def test_cli_int8_is_the_dynamic_form_and_weight_only_stays_available(tiny_fp32_artifact, tmp_path, capsys):
    """`quantize --int8` writes this method (the fastest 8-bit form on CPU); `--int8-weight-only`
    the MatMulNBits one; giving both is a usage error."""
    from granite_deploy.cli import main

    gate = ["--min-agreement", "0.8", "--max-ppl-increase", "0.05"]
    for flag, precision, gemm in (("--int8", "int8-dynamic", "MatMulInteger"),
                                  ("--int8-weight-only", "int8-weight-only", "MatMulNBits")):
        out = tmp_path / flag.strip("-")
        assert main(["quantize", str(tiny_fp32_artifact), "--output", str(out), flag, *gate]) == 0, capsys.readouterr().err
        manifest = json.loads((out / "manifest.json").read_text())
        decoder = manifest["graphs"]["decoder"]
        assert decoder["precision"] == precision
        assert gemm in {op for ops in decoder["op_domains"].values() for op in ops}
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(tiny_fp32_artifact), "--output", str(tmp_path / "x"), "--int8", "--int8-weight-only"])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()


def test_hybrid_mamba_checkpoint(hybrid_artifact, tmp_path):
    """The hybrid (Mamba2 + attention) artifact: its projections become integer GEMMs too, the derived
    flavours pass their float-compute checks, and the engine's default graph gives the portable graph's
    logits up to activation rounding."""
    from granite_deploy.engines import Chunk, load_engine
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
    from granite_deploy.export.quantize import quantize

    out = quantize(hybrid_artifact, tmp_path / "h-int8", "int8-dynamic", thresholds=QUANTIZE_TEST_GATE["int8-dynamic"])
    manifest = verify(out).to_dict()
    assert manifest["accuracy"]["passed"]
    assert "MatMulInteger" in manifest["graphs"]["decoder"]["op_domains"]["ai.onnx"]
    for flavour in ("decoder_cpu", "decoder_ragged"):
        assert manifest["graphs"][flavour]["validation"]["passed"]
    logits = []
    for engine in (load_engine(out, max_batch=2, threads=1),
                   OnnxRuntimeEngine(out, max_batch=2, threads=1, graph="decoder")):
        engine.reserve(0)
        logits.append(engine.step([Chunk(0, (5, 17, 29, 3), 0)])[0])
    assert engine.graph_name == "decoder" and np.isfinite(logits[0]).all()
    assert np.abs(logits[0] - logits[1]).max() < 0.25, np.abs(logits[0] - logits[1]).max()
