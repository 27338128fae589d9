"""engines/kernels: ai.granite_deploy.MatMulQ4 against ONNX Runtime's own MatMulNBits (same packed
weights, same int8 input quantisation: the outputs agree to float rounding), the graph rewrite's
eligibility rules, the build's failure modes, and a 4-bit engine with and without the kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from granite_deploy.engines import kernels
from granite_deploy.engines.kernels import layout

pytestmark = pytest.mark.skipif(not kernels.cpu_supported(), reason="MatMulQ4 needs an x86-64 CPU with AVX2 and FMA")


@pytest.fixture(scope="module")
def library():
    return kernels.build()  # scripts/setup.sh built it already; a failure here is a real failure


def _weights(rng, k: int, n: int, block: int):
    packed = rng.integers(0, 256, size=(n, k // block, block // 2), dtype=np.uint8)
    # fp16 values, as `quantize --int4` writes them: MatMulQ4's layout then holds them exactly
    scales = (rng.random(n * (k // block), dtype=np.float32) * 0.05 + 0.001).astype(np.float16).astype(np.float32)
    return packed, scales


def _session(library, k, n, block, packed, scales, *, ours: bool, rank: int = 2, extra_attrs=None):
    import onnxruntime as ort

    attrs = dict(K=k, N=n, bits=4, block_size=block, accuracy_level=4, **(extra_attrs or {}))
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", **attrs)
    in_shape = ["M", k] if rank == 2 else ["b", "s", k]
    out_shape = in_shape[:-1] + [n]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)],
                              initializer=[numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if not ours:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    options.register_custom_ops_library(str(library))
    rewrite = kernels.use_kernels(model)
    assert rewrite.nodes == 1
    assert model.graph.node[0].op_type == kernels.OP
    rewrite.attach(options)
    return rewrite.keep_with(ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]))


def _dequantized(packed, scales, k, n, block):
    w = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, k).astype(np.float32) - 8.0
    return w * np.repeat(scales.reshape(n, k // block), block, axis=1)


@pytest.mark.parametrize("k,n,block", [(128, 1, 32), (256, 7, 32), (384, 100, 64), (512, 300, 128),
                                       (2048, 513, 32), (1024, 64, 256)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 33])
def test_matches_matmulnbits(library, k, n, block, m):
    rng = np.random.default_rng(k * 1000 + n * 10 + m)
    packed, scales = _weights(rng, k, n, block)
    a = rng.standard_normal((m, k), dtype=np.float32)
    a[0, :block] *= 40.0  # one block far larger than the rest: per-block input scales must not mix
    ref = _session(library, k, n, block, packed, scales, ours=False).run(None, {"A": a})[0]
    got = _session(library, k, n, block, packed, scales, ours=True).run(None, {"A": a})[0]
    assert got.shape == ref.shape == (m, n)
    # Same int8 inputs, exact int32 dot products: only the fp32 summation order differs.
    assert np.abs(got - ref).max() <= 2e-5 * np.abs(ref).max()
    w = _dequantized(packed, scales, k, n, block)
    bound = 1e-2 * (np.abs(a) @ np.abs(w).T)  # int8 input rounding: < 1/254 of each |a| per term
    assert (np.abs(got - a @ w.T) <= bound).all()


def test_fp32_scales_are_rounded_to_fp16_and_out_of_range_scales_stay_on_mlas(library):
    k, n, block = 256, 24, 32
    rng = np.random.default_rng(5)
    packed, _ = _weights(rng, k, n, block)
    scales = rng.random(n * (k // block), dtype=np.float32) * 0.05 + 0.001  # off the fp16 grid
    assert not layout.on_fp16_grid(scales) and layout.fp16_scales_fit(scales)
    a = rng.standard_normal((3, k), dtype=np.float32)
    ref = _session(library, k, n, block, packed, scales, ours=False).run(None, {"A": a})[0]
    got = _session(library, k, n, block, packed, scales, ours=True).run(None, {"A": a})[0]
    rounded = scales.astype(np.float16).astype(np.float32)
    ref16 = _session(library, k, n, block, packed, rounded, ours=False).run(None, {"A": a})[0]
    assert np.abs(got - ref16).max() <= 2e-5 * np.abs(ref16).max()  # exactly the rounded scales' product
    assert 0 < np.abs(got - ref).max() <= 2 ** -10 * np.abs(ref).max()
    for bad in (7e4, 1e-6, np.inf):  # fp16 overflow, a subnormal, not finite
        odd = scales.copy()
        odd[3] = bad
        assert not layout.fp16_scales_fit(odd)
        model = helper.make_model(helper.make_graph(
            [helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                              block_size=block, accuracy_level=4)], "g",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
            initializer=[numpy_helper.from_array(packed, "B"), numpy_helper.from_array(odd, "S")]))
        assert kernels.use_kernels(model).nodes == 0
        assert model.graph.node[0].op_type == "MatMulNBits"


def test_leading_dims_and_empty_input(library):
    rng = np.random.default_rng(7)
    k, n, block = 256, 40, 32
    packed, scales = _weights(rng, k, n, block)
    ours = _session(library, k, n, block, packed, scales, ours=True, rank=3)
    ref = _session(library, k, n, block, packed, scales, ours=False, rank=3)
    a = rng.standard_normal((2, 5, k), dtype=np.float32)
    got, want = ours.run(None, {"A": a})[0], ref.run(None, {"A": a})[0]
    assert got.shape == (2, 5, n)
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()
    assert ours.run(None, {"A": np.zeros((1, 0, k), np.float32)})[0].shape == (1, 0, n)


def test_non_finite_input_stays_in_its_row(library):
    """A NaN or inf in a row makes that row's outputs NaN (the scheduler's NaN-row check then fails only
    that sequence) and leaves every other row exact; int8 rounding must not launder it into numbers."""
    rng = np.random.default_rng(3)
    k, n, block = 256, 24, 32
    packed, scales = _weights(rng, k, n, block)
    ours = _session(library, k, n, block, packed, scales, ours=True)
    ref = _session(library, k, n, block, packed, scales, ours=False)
    a = rng.standard_normal((6, k), dtype=np.float32)
    a[1, 100] = np.nan
    a[4, 3] = np.inf
    got, want = ours.run(None, {"A": a})[0], ref.run(None, {"A": a[[0, 2, 3, 5]]})[0]
    assert np.isnan(got[[1, 4]]).all()
    assert np.abs(got[[0, 2, 3, 5]] - want).max() <= 2e-5 * np.abs(want).max()


def _node(**attrs):
    inputs = attrs.pop("inputs", ["A", "B", "S"])
    base = dict(K=256, N=8, bits=4, block_size=32, accuracy_level=4)
    base.update(attrs)
    return helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", **base)


@pytest.mark.parametrize("attrs,eligible", [
    ({}, True),
    ({"bits": 8}, False),  # 8-bit: MLAS's
    ({"accuracy_level": 0}, False),  # float compute asked for: not ours to change
    ({"block_size": 16}, False),
    ({"block_size": 512}, False),  # MLAS quantises the input of such blocks in parts
    ({"K": 192}, False),  # not a multiple of 128
    ({"inputs": ["A", "B", "S", "zp"]}, False),  # explicit zero points
    ({"inputs": ["A", "B", "S", ""]}, True),  # an omitted optional input is no input
    ({"inputs": ["A", "W", "S"]}, False),  # weights computed at run time
])
def test_eligibility(attrs, eligible):
    assert kernels.eligible(_node(**attrs), {"B", "S", "zp"}) is eligible


def test_rewrite_reaches_subgraphs_and_declares_the_domain(library):
    inner = helper.make_graph([_node()], "then", [], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    cond = helper.make_node("If", ["c"], ["Z"], then_branch=inner, else_branch=inner)
    init = [numpy_helper.from_array(np.zeros((8, 8, 16), np.uint8), "B"),
            numpy_helper.from_array(np.zeros(64, np.float32), "S")]
    graph = helper.make_graph([_node(), cond], "g", [], [], initializer=init)
    model = helper.make_model(graph)
    assert kernels.use_kernels(model).nodes == 3
    assert {n.op_type for n in model.graph.node} == {kernels.OP, "If"}
    assert [a.name for a in model.graph.node[0].attribute] == ["K", "N", "bits", "block_size"]
    assert sum(o.domain == kernels.DOMAIN for o in model.opset_import) == 1


def _reference_tiling(packed, scales, k, n, block):
    """layout.py's tiled layout, written out from its definition (an oracle for GraniteQ4Tile)."""
    w = np.stack([packed.reshape(n, k // 2) & 15, packed.reshape(n, k // 2) >> 4], axis=-1).reshape(n, k)
    groups, blocks = -(-n // 8), k // block
    w = np.concatenate([w, np.zeros((groups * 8 - n, k), np.uint8)])
    s = np.concatenate([scales.reshape(n, blocks), np.zeros((groups * 8 - n, blocks), np.float32)])
    out = bytearray()
    for g in range(groups):
        for b in range(blocks):
            for t in range(block // 8):
                for c in range(8):
                    for j in range(4):
                        kk = b * block + 8 * t + j
                        out.append(int(w[8 * g + c, kk]) | int(w[8 * g + c, kk + 4]) << 4)
            out += s[8 * g:8 * g + 8, b].astype("<f2").tobytes()  # fp16 scales, rounded to nearest even
    return np.frombuffer(bytes(out), np.uint8)


@pytest.mark.parametrize("k,n,block", [(128, 1, 32), (256, 13, 64), (512, 24, 128), (256, 9, 256)])
def test_tiled_layout_matches_its_definition(library, k, n, block):
    from granite_deploy.engines.kernels import layout

    rng = np.random.default_rng(n)
    packed, scales = _weights(rng, k, n, block)
    got = layout.tile(library, packed, scales, k, n, block)
    assert got.size == layout.tiled_size(k, n, block)
    assert np.array_equal(got, _reference_tiling(packed, scales, k, n, block))
    with pytest.raises(ValueError, match="do not fit"):
        layout.tile(library, packed[:-1], scales, k, n, block)


def test_rewrite_keeps_weights_other_nodes_use_and_drops_the_rest(library):
    init = [numpy_helper.from_array(np.zeros((8, 8, 16), np.uint8), "B"),
            numpy_helper.from_array(np.zeros(64, np.float32), "S")]
    graph = helper.make_graph([_node(), helper.make_node("Identity", ["B"], ["B_out"])], "g", [], [], initializer=init)
    model = helper.make_model(graph)
    rewrite = kernels.use_kernels(model)
    tiled = model.graph.node[0].input[1]
    assert list(rewrite.weights) == [tiled] and rewrite.weights[tiled].size == 8 * 8 * (32 * 4 + 16) // 8
    assert {t.name for t in model.graph.initializer} == {"B", tiled}  # S was only MatMulNBits'
    assert tiled in {i.name for i in model.graph.input}  # overridable: the session takes attach()'s array


def test_external_weights_outside_the_folder_leave_the_graph_alone(library, tmp_path):
    from onnx import external_data_helper

    packed = numpy_helper.from_array(np.zeros((8, 8, 16), np.uint8), "B")
    external_data_helper.set_external_data(packed, location="../elsewhere.bin", offset=0, length=1024)
    packed.ClearField("raw_data")
    packed.data_location = TensorProto.EXTERNAL
    graph = helper.make_graph([_node()], "g", [], [], initializer=[packed, numpy_helper.from_array(np.zeros(64, np.float32), "S")])
    model = helper.make_model(graph)
    with pytest.raises(kernels.KernelBuildError, match="outside"):
        kernels.use_kernels(model, tmp_path)
    assert model.graph.node[0].op_type == "MatMulNBits" and list(model.graph.node[0].input) == ["A", "B", "S"]


def _isolated_cache(tmp_path, monkeypatch):
    """A cache folder of its own with the headers already unpacked (no download in this test)."""
    import shutil

    real = kernels.cache_dir() / "headers" / "include"
    shutil.copytree(real, tmp_path / "kernels" / "headers" / "include")
    monkeypatch.setenv("GRANITE_DEPLOY_CACHE", str(tmp_path))


def test_failed_compile_leaves_no_library(library, tmp_path, monkeypatch):
    _isolated_cache(tmp_path, monkeypatch)
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(kernels.KernelBuildError, match="compiling q4_matmul.cc failed"):
        kernels.build()
    assert not list((tmp_path / "kernels").glob("*/*.so*"))
    assert kernels.available() is None  # so the engine falls back to ONNX Runtime's kernels


def test_no_compiler_is_a_clear_error(library, tmp_path, monkeypatch):
    _isolated_cache(tmp_path, monkeypatch)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(kernels.KernelBuildError, match=r"no C\+\+ compiler"):
        kernels.build()


def test_isa_is_reported(library):
    import onnxruntime as ort

    ort.SessionOptions().register_custom_ops_library(str(library))
    import os

    cpu = Path("/proc/cpuinfo").read_text()
    vnni = " avx512_vnni" in cpu and os.environ.get("GRANITE_DEPLOY_Q4_ISA") != "avx2"  # the A/B override
    assert kernels.isa(library) == ("avx512vnni" if vnni else "avx2")


def test_disabled_by_environment(library, monkeypatch):
    assert kernels.available() == library
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    assert kernels.available() is None


# --- a whole 4-bit engine ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def int4_artifact_k128(tmp_path_factory):
    """A tiny checkpoint wide enough (hidden 128, MLP 256) for every MatMulNBits to be eligible."""
    from granite_deploy.export.exporter import export
    from granite_deploy.export.quantize import quantize
    from granite_deploy.export.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("k128")
    ckpt = make_tiny_checkpoint(root / "ckpt", hidden_size=128, intermediate_size=256, shared_intermediate_size=256,
                                num_attention_heads=4, num_key_value_heads=2)
    fp32 = export(ckpt, root / "fp32")
    return quantize(fp32, root / "int4", "int4", skip_gate=True)  # random weights: the gate is not the point here


def _run(artifact, monkeypatch, enabled: bool, prompts, steps: int):
    from granite_deploy.engines.base import Chunk
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

    monkeypatch.setenv(kernels.DISABLE_ENV, "1" if enabled else "0")
    engine = OnnxRuntimeEngine(artifact, max_batch=4, max_seq_len=64, threads=2)
    try:
        nodes = engine.cpu_kernel_nodes
        for s in range(len(prompts)):
            engine.reserve(s)
        logits = engine.step([Chunk(s, tuple(p), 0) for s, p in enumerate(prompts)])
        all_logits, tokens = [logits], [list(p) for p in prompts]
        for _ in range(steps):
            nxt = logits.argmax(-1)
            chunks = [Chunk(s, (int(nxt[s]),), len(tokens[s])) for s in range(len(prompts))]
            for s in range(len(prompts)):
                tokens[s].append(int(nxt[s]))
            logits = engine.step(chunks)
            all_logits.append(logits)
        return nodes, tokens, np.stack(all_logits)
    finally:
        engine.close()


def test_engine_with_kernels_matches_onnxruntime(library, int4_artifact_k128, monkeypatch):
    prompts = [[5, 17, 42, 99, 7, 3, 250, 11, 64], [12, 300, 8], [77] * 20]
    n_ours, tokens_ours, logits_ours = _run(int4_artifact_k128, monkeypatch, True, prompts, 12)
    n_ort, tokens_ort, logits_ort = _run(int4_artifact_k128, monkeypatch, False, prompts, 12)
    assert n_ort == 0
    assert n_ours == 3 * 4 + 1  # every layer's qkv, o, gate+up, down, and the tied head
    assert tokens_ours == tokens_ort
    _assert_steps_match(logits_ours, logits_ort)


def _assert_steps_match(logits, ref):
    """Engine logits per step ([steps, rows, vocab]) against a reference run with the same tokens.

    Per step only the fp32 summation order differs (~1e-6 relative). But each 4-bit GEMM quantises its
    input to int8 (accuracy level 4), so a last-bit difference can move one input across a rounding
    boundary and that one step's logits by a quantum (0.6-1% measured, in one or two steps of 13, not
    carried on); a wrong weight, scale, row or cache entry would be off at every step after it."""
    per_step = np.abs(logits - ref).max(axis=(1, 2)) / np.abs(ref).max()
    assert np.median(per_step) <= 1e-5, per_step
    assert (per_step <= 1e-4).sum() >= 0.75 * len(per_step) and per_step.max() <= 3e-2, per_step


# --- MatMulQ8Dynamic: `quantize --int8`'s per-row dynamic int8 GEMM as one node ------------------
def _dynamic_gemm_model(rng, k: int, n: int):
    """MatMul(x, W) after export/quantize.py's own rewrite to the ten-node dynamic int8 GEMM."""
    from granite_deploy.export.quantize import _matmuls_to_dynamic

    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
                              initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert _matmuls_to_dynamic(model, keep=set()) == ["W"]
    return model


def _sessions(library, model, q8_nodes: int = 1):
    """(ONNX Runtime on model, ours on a rewritten copy)."""
    import copy

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    ref = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ours_model = copy.deepcopy(model)
    rewrite = kernels.use_kernels(ours_model)
    assert rewrite.q8_nodes == rewrite.nodes == q8_nodes
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(library))
    rewrite.attach(options)
    ours = rewrite.keep_with(ort.InferenceSession(ours_model.SerializeToString(), options, providers=["CPUExecutionProvider"]))
    return ref, ours, ours_model


@pytest.mark.parametrize("k,n", [(8, 1), (64, 9), (128, 100), (2048, 513), (1024, 64), (4096, 24)])
def test_q8_equals_the_dynamic_graph_bit_for_bit(library, k, n):
    """Same uint8 rows, same exact int32 sums, the same two float products in the same order: equal."""
    rng = np.random.default_rng(k + n)
    ref, ours, rewritten = _sessions(library, _dynamic_gemm_model(rng, k, n))
    assert [node.op_type for node in rewritten.graph.node] == [kernels.OP_Q8]
    assert {t.name for t in rewritten.graph.initializer} == {f"W_i8/{kernels.OP_Q8}_tiled"}  # the ten nodes' constants gone
    for b, s in [(1, 1), (1, 2), (1, 3), (2, 5), (1, 9), (1, 33), (3, 7)]:
        x = (rng.standard_normal((b, s, k)) * rng.random((b, s, 1)) * 8).astype(np.float32)
        x[0, 0, 0] = 0.0 if k > 1 else x[0, 0, 0]
        want, got = ref.run(None, {"x": x})[0], ours.run(None, {"x": x})[0]
        assert got.shape == (b, s, n)
        assert np.array_equal(got, want), (b, s, np.abs(got - want).max())
    zero = np.zeros((1, 2, k), np.float32)  # the eps floor: all-zero rows give zeros, not NaN
    assert np.array_equal(ours.run(None, {"x": zero})[0], ref.run(None, {"x": zero})[0])
    assert ours.run(None, {"x": np.zeros((1, 0, k), np.float32)})[0].shape == (1, 0, n)


def test_q8_non_finite_input_stays_in_its_row(library):
    rng = np.random.default_rng(11)
    k, n = 256, 40
    ref, ours, _ = _sessions(library, _dynamic_gemm_model(rng, k, n))
    x = rng.standard_normal((1, 6, k)).astype(np.float32)
    x[0, 1, 100] = np.nan
    x[0, 4, 3] = -np.inf
    got, want = ours.run(None, {"x": x})[0], ref.run(None, {"x": x[:, [0, 2, 3, 5]]})[0]
    assert np.isnan(got[0, [1, 4]]).all()
    assert np.array_equal(got[:, [0, 2, 3, 5]], want)


@pytest.mark.parametrize("k,n", [(8, 1), (16, 13), (64, 24)])
def test_q8_tiled_layout_matches_its_definition(library, k, n):
    from granite_deploy.engines.kernels import layout

    rng = np.random.default_rng(n)
    w = rng.integers(-63, 64, size=(k, n), dtype=np.int8)
    s = rng.random(n, dtype=np.float32)
    groups = -(-n // 8)
    wp = np.concatenate([w, np.zeros((k, groups * 8 - n), np.int8)], axis=1)
    sp = np.concatenate([s, np.zeros(groups * 8 - n, np.float32)])
    out = bytearray()
    for g in range(groups):
        for t in range(k // 4):
            for c in range(8):
                out += wp[4 * t:4 * t + 4, 8 * g + c].tobytes()
        out += sp[8 * g:8 * g + 8].astype("<f4").tobytes()
        out += (-128 * wp[:, 8 * g:8 * g + 8].astype(np.int32).sum(axis=0)).astype("<i4").tobytes()
    got = layout.tile8(library, w, s, k, n)
    assert got.size == layout.tiled8_size(k, n)
    assert np.array_equal(got, np.frombuffer(bytes(out), np.uint8))
    with pytest.raises(ValueError, match="do not fit"):
        layout.tile8(library, w, s[:-1], k, n)


def _tampered(change):
    model = _dynamic_gemm_model(np.random.default_rng(0), 64, 16)
    change(model)
    return model


def _set_initializer(model, name, value):
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))


@pytest.mark.parametrize("change", [
    lambda m: _set_initializer(m, "dyn8/zero", np.uint8(127)),  # another weight zero point
    lambda m: _set_initializer(m, "dyn8/inv127", np.float32(1 / 100)),  # another input range: kept, it is an attribute
    lambda m: _set_initializer(m, "W_i8", np.full((64, 16), 100, np.int8)),  # beyond the AVX2 path's +-64
    lambda m: m.graph.output.append(helper.make_tensor_value_info("mm/dyn8/scale", TensorProto.FLOAT, None)),
    lambda m: m.graph.node.append(helper.make_node("Identity", ["mm/dyn8/acc"], ["acc_copy"])),  # an intermediate used elsewhere
])
def test_q8_rewrite_leaves_other_graphs_to_onnxruntime(library, change):
    from granite_deploy.export.quantize import DYNAMIC_GEMM

    assert DYNAMIC_GEMM == "/dyn8"  # the names the tampering above uses
    model = _tampered(change)
    before = [node.op_type for node in model.graph.node]
    rewrite = kernels.use_kernels(model)
    kept_attribute = model.graph.node[0].op_type == kernels.OP_Q8  # only the inv127 case
    if kept_attribute:
        assert rewrite.q8_nodes == 1
        assert abs(helper.get_attribute_value(model.graph.node[0].attribute[3]) - 1 / 100) < 1e-9
    else:
        assert rewrite.nodes == 0 and [node.op_type for node in model.graph.node] == before


@pytest.fixture(scope="module")
def int8_dynamic_artifact_k128(int4_artifact_k128, tmp_path_factory):
    from granite_deploy.export.quantize import quantize

    fp32 = int4_artifact_k128.parent / "fp32"
    return quantize(fp32, tmp_path_factory.mktemp("k128-int8") / "int8", "int8-dynamic", skip_gate=True)


def test_int8_dynamic_engine_with_kernels_equals_onnxruntime(library, int8_dynamic_artifact_k128, monkeypatch):
    """`quantize --int8` through the engine: every layer GEMM and the head on MatMulQ8Dynamic, the same
    tokens and the same logits bit for bit (its arithmetic is the ten nodes', op for op)."""
    prompts = [[5, 17, 42, 99, 7, 3, 250, 11, 64], [12, 300, 8], [77] * 20]
    monkeypatch.setenv(kernels.ATTENTION_ENV, "0")  # DecodeAttention rounds differently (its own test below)
    n_ours, tokens_ours, logits_ours = _run(int8_dynamic_artifact_k128, monkeypatch, True, prompts, 12)
    n_ort, tokens_ort, logits_ort = _run(int8_dynamic_artifact_k128, monkeypatch, False, prompts, 12)
    assert n_ort == 0
    assert n_ours == 3 * 4 + 1  # every layer's qkv, o, gate+up, down, and the head
    assert tokens_ours == tokens_ort
    assert np.array_equal(logits_ours, logits_ort), np.abs(logits_ours - logits_ort).max()


# --- DecodeAttention: GroupQueryAttention's one-token calls ------------------------------------
def _gqa_model(heads, kv_heads, head_size, scale=None):
    extra = {} if scale is None else {"scale": scale}
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total"],
                            ["y", "present_key", "present_value"], domain="com.microsoft", name="attn",
                            num_heads=heads, kv_num_heads=kv_heads, **extra)
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    cache = ["b", kv_heads, "t", head_size]
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("q", f, ["b", "s", heads * head_size]),
         helper.make_tensor_value_info("k", f, ["b", "s", kv_heads * head_size]),
         helper.make_tensor_value_info("v", f, ["b", "s", kv_heads * head_size]),
         helper.make_tensor_value_info("past_key", f, cache), helper.make_tensor_value_info("past_value", f, cache),
         helper.make_tensor_value_info("seqlens_k", i32, ["b"]), helper.make_tensor_value_info("total", i32, [])],
        [helper.make_tensor_value_info("y", f, None), helper.make_tensor_value_info("present_key", f, None),
         helper.make_tensor_value_info("present_value", f, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _attention_sessions(library, model):
    import copy

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    ref = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ours_model = copy.deepcopy(model)
    rewrite = kernels.use_kernels(ours_model)
    assert rewrite.attention_nodes == 1 and rewrite.nodes == 0
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(library))
    return ref, ort.InferenceSession(ours_model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _attention_feed(rng, rows, tokens, heads, kv_heads, head_size, capacity, lengths):
    """lengths: each row's length after this call (seqlens_k + 1)."""
    return {"q": rng.standard_normal((rows, tokens, heads * head_size), dtype=np.float32),
            "k": rng.standard_normal((rows, tokens, kv_heads * head_size), dtype=np.float32),
            "v": rng.standard_normal((rows, tokens, kv_heads * head_size), dtype=np.float32),
            "past_key": rng.standard_normal((rows, kv_heads, capacity, head_size), dtype=np.float32),
            "past_value": rng.standard_normal((rows, kv_heads, capacity, head_size), dtype=np.float32),
            "seqlens_k": np.array(lengths, np.int32) - 1, "total": np.array(capacity, np.int32)}


@pytest.mark.parametrize("heads,kv_heads,head_size", [(16, 4, 128), (4, 2, 32), (4, 4, 24), (6, 1, 64), (16, 1, 32)])
@pytest.mark.parametrize("lengths", [[1], [7], [1024], [3, 1, 200]])
def test_decode_attention_matches_group_query_attention(library, heads, kv_heads, head_size, lengths):
    rng = np.random.default_rng(sum(lengths) + heads)
    ref, ours = _attention_sessions(library, _gqa_model(heads, kv_heads, head_size, scale=0.125))
    feed = _attention_feed(rng, len(lengths), 1, heads, kv_heads, head_size, 1030, lengths)
    want, got = ref.run(None, feed), ours.run(None, feed)
    assert got[0].shape == want[0].shape == (len(lengths), 1, heads * head_size)
    assert np.abs(got[0] - want[0]).max() <= 2e-5 * max(1.0, np.abs(want[0]).max())
    for a, b in zip(got[1:], want[1:]):  # this token's key and value written at its position, the past kept
        for r, n in enumerate(lengths):  # (past its length ONNX Runtime's unbound present is zeros, ours the past)
            assert np.array_equal(a[r, :, :n], b[r, :, :n])


def test_decode_attention_first_prompt_and_default_scale(library):
    """total_sequence_length 1 is ONNX Runtime's first-prompt mode (position 0 whatever seqlens_k says)."""
    rng = np.random.default_rng(5)
    ref, ours = _attention_sessions(library, _gqa_model(4, 2, 32))
    feed = _attention_feed(rng, 2, 1, 4, 2, 32, 1, [1, 1])
    want, got = ref.run(None, feed), ours.run(None, feed)
    assert np.abs(got[0] - want[0]).max() <= 2e-5 * np.abs(want[0]).max()
    assert all(np.array_equal(a[:, :, :1], b[:, :, :1]) for a, b in zip(got[1:], want[1:]))


def test_prompt_chunks_keep_onnxruntime_attention(library):
    """Several tokens per row take the If's other branch: ONNX Runtime's own kernel, bit for bit."""
    rng = np.random.default_rng(9)
    ref, ours = _attention_sessions(library, _gqa_model(4, 2, 32))
    feed = _attention_feed(rng, 1, 5, 4, 2, 32, 64, [12])
    got, want = ours.run(None, feed), ref.run(None, feed)
    assert np.array_equal(got[0], want[0])
    assert all(np.array_equal(a[:, :, :12], b[:, :, :12]) for a, b in zip(got[1:], want[1:]))


def test_decode_attention_position_outside_the_cache_is_an_error(library):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    rng = np.random.default_rng(2)
    _, ours = _attention_sessions(library, _gqa_model(4, 2, 32))
    with pytest.raises((Fail, InvalidArgument, RuntimeException), match="outside the cache"):
        ours.run(None, _attention_feed(rng, 1, 1, 4, 2, 32, 16, [17]))


@pytest.mark.parametrize("attrs", [{"do_rotary": 1}, {"softcap": 30.0}, {"local_window_size": 64}])
def test_decode_attention_eligibility(attrs):
    from granite_deploy.engines.kernels import decode_attention

    model = _gqa_model(4, 2, 32)
    assert decode_attention.eligible(model.graph.node[0], {"past_key", "past_value"})
    model.graph.node[0].attribute.extend(helper.make_node("X", [], [], **attrs).attribute)
    assert not decode_attention.eligible(model.graph.node[0], {"past_key", "past_value"})
    assert kernels.use_kernels(model).attention_nodes == 0


def test_engine_decode_attention_is_in_place_and_keeps_the_tokens(library, int4_artifact_k128, monkeypatch):
    import ctypes

    copies = ctypes.CDLL(str(library)).GraniteAttentionCopies
    copies.restype = ctypes.c_int64
    prompts = [[5, 17, 42, 99, 7, 3, 250, 11, 64], [12, 300, 8], [77] * 20]
    monkeypatch.setenv(kernels.ATTENTION_ENV, "0")
    _, tokens_ort, logits_ort = _run(int4_artifact_k128, monkeypatch, True, prompts, 12)
    monkeypatch.setenv(kernels.ATTENTION_ENV, "1")
    before = copies()
    _, tokens_ours, logits_ours = _run(int4_artifact_k128, monkeypatch, True, prompts, 12)
    assert copies() == before  # every call wrote the bound cache itself: no copy of past into present
    assert tokens_ours == tokens_ort
    _assert_steps_match(logits_ours, logits_ort)


def test_decode_attention_peaked_scores(library):
    """Scores tens apart: most probabilities underflow to 0 (the vector exp's lower clamp), as in ORT."""
    rng = np.random.default_rng(4)
    ref, ours = _attention_sessions(library, _gqa_model(16, 4, 128, scale=4.0))
    feed = _attention_feed(rng, 2, 1, 16, 4, 128, 300, [300, 77])
    want, got = ref.run(None, feed), ours.run(None, feed)
    assert np.abs(got[0] - want[0]).max() <= 2e-5 * np.abs(want[0]).max()


# --- MatMulF32: fp32 MatMul over a constant [K, N] weight, strip-tiled ---------------------------
needs_avx512 = pytest.mark.skipif(not kernels.f32_supported(), reason="MatMulF32 needs AVX-512F and VL")


def _f32_model(w: np.ndarray, shared: bool = False):
    k = w.shape[0]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared:
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y2"]))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              outputs, initializer=[numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _f32_session(library, model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(library))
    rewrite = kernels.use_kernels(model, None, library)
    rewrite.attach(options)
    return rewrite, rewrite.keep_with(ort.InferenceSession(model.SerializeToString(), options,
                                                           providers=["CPUExecutionProvider"]))


@needs_avx512
@pytest.mark.parametrize("k,n", [(1, 1), (37, 48), (64, 100), (300, 1000), (2048, 97)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 20, 300])
def test_f32_matches_float64(library, k, n, m):
    rng = np.random.default_rng(k * 7 + n + m)
    w = rng.standard_normal((k, n), dtype=np.float32)
    rewrite, session = _f32_session(library, _f32_model(w))
    assert rewrite.f32_nodes == 1
    x = rng.standard_normal((2, m, k), dtype=np.float32)
    y = session.run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert y.shape == (2, m, n)
    # fp32 sums of k products, k ascending: within k * 2^-24 of the exact sum's scale
    assert np.abs(y - ref).max() <= max(k, 8) * 2.0 ** -23 * np.abs(x).max() * np.abs(w).max() * 2, np.abs(y - ref).max()


@needs_avx512
def test_f32_shared_weight_is_tiled_once_and_the_original_leaves(library):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 50), dtype=np.float32)
    model = _f32_model(w, shared=True)
    rewrite, session = _f32_session(library, model)
    assert rewrite.f32_nodes == 2 and len(rewrite.weights) == 1
    tiled = next(iter(rewrite.weights))
    assert [n.input[1] for n in model.graph.node] == [tiled, tiled]
    assert {t.name for t in model.graph.initializer} == {tiled}
    assert rewrite.weights[tiled].size == layout.tiled_f32_size(64, 50) == 2 * 64 * 48 * 4
    x = rng.standard_normal((1, 5, 64), dtype=np.float32)
    y, y2 = session.run(None, {"x": x})
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)


@needs_avx512
def test_f32_strips_match_their_definition(library):
    w = np.arange(5 * 50, dtype=np.float32).reshape(5, 50)
    tiled = layout.tile_f32(library, w, 5, 50).view(np.float32).reshape(2, 5, 48)
    np.testing.assert_array_equal(tiled[0], w[:, :48])
    np.testing.assert_array_equal(tiled[1, :, :2], w[:, 48:])
    assert not tiled[1, :, 2:].any()  # the last strip's padding columns are zero


def test_f32_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(kernels.F32_ENV, "0")
    assert not kernels.f32_supported()


@pytest.fixture(scope="module")
def fp32_artifact_k128(tmp_path_factory):
    from granite_deploy.export.exporter import export
    from granite_deploy.export.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("f32k128")
    ckpt = make_tiny_checkpoint(root / "ckpt", hidden_size=128, intermediate_size=256, shared_intermediate_size=256,
                                num_attention_heads=4, num_key_value_heads=2)
    return export(ckpt, root / "fp32")


@needs_avx512
def test_fp32_engine_with_matmulf32_keeps_the_greedy_tokens(library, fp32_artifact_k128, monkeypatch):
    prompts = [[5, 17, 42, 99, 7, 3, 250, 11, 64], [12, 300, 8], [77] * 20]
    n_ours, tokens_ours, logits_ours = _run(fp32_artifact_k128, monkeypatch, True, prompts, 12)
    n_ort, tokens_ort, logits_ort = _run(fp32_artifact_k128, monkeypatch, False, prompts, 12)
    assert n_ort == 0 and n_ours >= 3 * 4  # every layer's qkv, o, gate+up and down at least
    assert tokens_ours == tokens_ort
    per_step = np.abs(logits_ours - logits_ort).max(axis=(1, 2)) / np.abs(logits_ort).max()
    assert per_step.max() <= 1e-5, per_step  # fp32 throughout: only the summation order differs


# --- MatMulF32 over bf16-valued weights: stored as bf16, widened exactly ----------------------------
def _bf16_values(a: np.ndarray) -> np.ndarray:
    """a rounded to bfloat16 values (round to nearest even), kept as fp32."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def test_bf16_exact():
    w = _bf16_values(np.random.default_rng(0).standard_normal((40, 30), dtype=np.float32))
    assert layout.bf16_exact(w)
    w[7, 3] = np.nextafter(w[7, 3], np.float32(np.inf))  # one weight with a lower half
    assert not layout.bf16_exact(w)


@needs_avx512
@pytest.mark.parametrize("k,n", [(37, 48), (300, 1000), (2048, 97)])
@pytest.mark.parametrize("m", [1, 8, 9, 300])
def test_f32_bf16_strips_give_the_fp32_strips_bits(library, monkeypatch, k, n, m):
    """Same products, same order: a bf16-valued weight gives bit-identical outputs from half the bytes."""
    rng = np.random.default_rng(k + n + m)
    w = _bf16_values(rng.standard_normal((k, n), dtype=np.float32))
    x = rng.standard_normal((1, m, k), dtype=np.float32)
    rewrite, session = _f32_session(library, _f32_model(w))
    assert rewrite.f32_bf16_weights == 1
    assert next(iter(rewrite.weights.values())).size == layout.tiled_f32_size(k, n, bf16=True) == -(-n // 48) * k * 96
    monkeypatch.setenv(kernels.BF16_ENV, "0")
    rewrite32, session32 = _f32_session(library, _f32_model(w))
    assert rewrite32.f32_bf16_weights == 0 and rewrite32.f32_nodes == 1
    y, y32 = session.run(None, {"x": x})[0], session32.run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, y32)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert np.abs(y - ref).max() <= max(k, 8) * 2.0 ** -22 * np.abs(x).max() * np.abs(w).max()


@needs_avx512
def test_f32_bf16_strips_match_their_definition(library):
    w = _bf16_values(np.random.default_rng(1).standard_normal((5, 50), dtype=np.float32))
    tiled = layout.tile_f32(library, w, 5, 50, bf16=True).view(np.uint16).reshape(2, 5, 48)
    upper = (w.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(tiled[0], upper[:, :48])
    np.testing.assert_array_equal(tiled[1, :, :2], upper[:, 48:])
    assert not tiled[1, :, 2:].any()
    # transposed: a Gemm's [N, K] weight tiles to the same strips as its [K, N] transpose
    np.testing.assert_array_equal(layout.tile_f32(library, np.ascontiguousarray(w.T), 5, 50, bf16=True, transposed=True),
                                  layout.tile_f32(library, w, 5, 50, bf16=True))


def _tied_head_model(emb: np.ndarray):
    """ids -> Gather(emb) -> Gemm(x, emb, transB=1): the exported graph's tied embedding and head."""
    vocab, hidden = emb.shape
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h"]),
             helper.make_node("Reshape", ["h", "shape"], ["h2"]),
             helper.make_node("Gemm", ["h2", "emb"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(emb, "emb"),
                                           numpy_helper.from_array(np.array([-1, hidden], np.int64), "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@needs_avx512
def test_f32_tied_head_gemm_runs_over_bf16_strips_and_the_embedding_stays(library):
    rng = np.random.default_rng(5)
    emb = _bf16_values(rng.standard_normal((300, 64), dtype=np.float32))
    model = _tied_head_model(emb)
    rewrite, session = _f32_session(library, model)
    assert rewrite.f32_nodes == 1 and rewrite.f32_bf16_weights == 1
    assert [n.op_type for n in model.graph.node] == ["Gather", "Reshape", kernels.OP_F32]
    assert "emb" in {t.name for t in model.graph.initializer}  # the Gather still reads it
    ids = np.array([3, 299, 0, 17, 17, 250, 1, 2, 9, 44], np.int64)
    got = session.run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, emb[ids] @ emb.T, rtol=1e-5, atol=1e-4)


@needs_avx512
def test_f32_tied_head_with_fp32_values_stays_on_onnxruntime(library):
    """An fp32 copy of a tied embedding would add its whole size to memory for no fewer bytes read."""
    emb = np.random.default_rng(6).standard_normal((300, 64), dtype=np.float32)
    model = _tied_head_model(emb)
    rewrite, session = _f32_session(library, model)
    assert rewrite.f32_nodes == 0 and not rewrite.weights
    assert [n.op_type for n in model.graph.node] == ["Gather", "Reshape", "Gemm"]
    ids = np.array([3, 299, 0], np.int64)
    np.testing.assert_allclose(session.run(None, {"ids": ids})[0], emb[ids] @ emb.T, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def bf16_valued_fp32_artifact_k128(tmp_path_factory):
    """An fp32 export of a checkpoint saved as bfloat16 (as every released Granite 4.0 is)."""
    import torch
    from safetensors.torch import load_file, save_file

    from granite_deploy.export.exporter import export
    from granite_deploy.export.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("bf16k128")
    ckpt = make_tiny_checkpoint(root / "ckpt", hidden_size=128, intermediate_size=256, shared_intermediate_size=256,
                                num_attention_heads=4, num_key_value_heads=2)
    weights = ckpt / "model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    return export(ckpt, root / "fp32")


@needs_avx512
def test_fp32_engine_over_bf16_valued_weights_keeps_the_greedy_tokens(library, bf16_valued_fp32_artifact_k128,
                                                                       fp32_artifact_k128, monkeypatch):
    prompts = [[5, 17, 42, 99, 7, 3, 250, 11, 64], [12, 300, 8], [77] * 20]
    n_ours, tokens_ours, logits_ours = _run(bf16_valued_fp32_artifact_k128, monkeypatch, True, prompts, 12)
    n_ort, tokens_ort, logits_ort = _run(bf16_valued_fp32_artifact_k128, monkeypatch, False, prompts, 12)
    n_fp32, _, _ = _run(fp32_artifact_k128, monkeypatch, True, prompts, 1)
    assert n_ort == 0 and n_ours == n_fp32 + 1  # the tied head too: its bf16 copy halves what it reads
    assert tokens_ours == tokens_ort
    per_step = np.abs(logits_ours - logits_ort).max(axis=(1, 2)) / np.abs(logits_ort).max()
    assert per_step.max() <= 1e-5, per_step
