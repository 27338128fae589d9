import numpy as np, pytest
from granite_deploy.engines.base import Chunk, EngineError
from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

def test_truncate_is_a_length_reset(tiny_fp32_artifact):
    e = OnnxRuntimeEngine(tiny_fp32_artifact, max_batch=2, threads=1)
    e.reserve(0)
    e.step([Chunk(0, (1, 2, 3), 0)])
    a = e.step([Chunk(0, (4, 5), 3)])
    e.truncate(0, 3)
    b = e.step([Chunk(0, (4, 5), 3)])
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(EngineError):
        e.truncate(0, 9)
