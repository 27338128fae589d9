"""Shared fixtures: tiny random Granite checkpoints made at test time."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A 3-layer random Granite 4.0 (dense) checkpoint folder with tokenizer and chat template."""
    from granite_deploy.export.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-granite"), seed=0)


# Session-scoped tiny artifacts, each exported once for the whole run (the export-area tests share them;
# a test that changes an artifact copies it first). Dense fp32 is validated against PyTorch.
HYBRID = dict(num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "mamba"], position_embedding_type="nope",
              mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_expand=2, mamba_d_conv=4, mamba_chunk_size=64)


@pytest.fixture(scope="session")
def tiny_fp32_artifact(tiny_checkpoint, tmp_path_factory):
    """The dense tiny checkpoint exported fp32, validated (with its decoder_cpu flavour)."""
    from granite_deploy.export.exporter import export

    return export(tiny_checkpoint, tmp_path_factory.mktemp("shared-fp32") / "art")


@pytest.fixture(scope="session")
def tiny_fp16_artifact(tiny_checkpoint, tmp_path_factory):
    """The dense tiny checkpoint exported fp16, validated."""
    from granite_deploy.export.exporter import export

    return export(tiny_checkpoint, tmp_path_factory.mktemp("shared-fp16") / "art", dtype="fp16")


@pytest.fixture(scope="session")
def tiny_bf16_artifact(tiny_checkpoint, tmp_path_factory):
    """The dense tiny checkpoint exported bf16, validated (ONNX reference evaluator)."""
    from granite_deploy.export.exporter import export

    return export(tiny_checkpoint, tmp_path_factory.mktemp("shared-bf16") / "art", dtype="bf16")


@pytest.fixture(scope="session")
def hybrid_checkpoint(tmp_path_factory):
    """A 4-layer random Granite 4.0 H (Mamba2 + attention, NoPE) checkpoint."""
    from granite_deploy.export.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("shared-hybrid") / "ckpt", seed=1, **HYBRID)


@pytest.fixture(scope="session")
def hybrid_artifact(hybrid_checkpoint, tmp_path_factory):
    """The hybrid checkpoint exported fp32, validated."""
    from granite_deploy.export.exporter import export

    return export(hybrid_checkpoint, tmp_path_factory.mktemp("shared-hybrid-art") / "art")


@pytest.fixture(scope="session")
def hybrid_fp16_artifact(hybrid_checkpoint, tmp_path_factory):
    """The hybrid checkpoint exported fp16, validated."""
    from granite_deploy.export.exporter import export

    return export(hybrid_checkpoint, tmp_path_factory.mktemp("shared-hybrid-fp16") / "art", dtype="fp16")


# Random weights make the default accuracy gate meaningless: the quantized test artifacts use these thresholds.
QUANTIZE_TEST_GATE = {
    "int8": {"max_ppl_increase": 0.05, "min_greedy_agreement": 0.8},
    "int8-qdq": {"max_ppl_increase": 0.05, "min_greedy_agreement": 0.8},
    "int8-dynamic": {"max_ppl_increase": 0.05, "min_greedy_agreement": 0.8},
    "int4": {"max_ppl_increase": 0.5, "min_greedy_agreement": 0.25},
}


@pytest.fixture(scope="session")
def tiny_qdq_artifact(tiny_fp32_artifact):
    """tiny_fp32_artifact quantized int8-qdq (standard ONNX ops, TensorRT-bound), made once per session."""
    from granite_deploy.export.quantize import quantize

    out = tiny_fp32_artifact.parent / "int8-qdq"
    return quantize(tiny_fp32_artifact, out, "int8-qdq", thresholds=QUANTIZE_TEST_GATE["int8-qdq"])


def pytest_configure(config):
    # Plain session.run (no IO binding) cannot update the cache in place; ONNX
    # Runtime warns about the copy on every call. Tests that use it don't care.
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
