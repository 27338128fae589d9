"""Shared fixtures: tiny random Granite checkpoints made at test time."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A 3-layer random Granite 4.0 (dense) checkpoint folder with tokenizer and chat template."""
    from granite_deploy.export.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-granite"), seed=0)


def pytest_configure(config):
    # Plain session.run (no IO binding) cannot update the cache in place; ONNX
    # Runtime warns about the copy on every call. Tests that use it don't care.
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
