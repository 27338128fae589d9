"""TensorRT: the static op check, the build's machine checks and profiles, plan selection and refusal
(all run anywhere), and the GPU path (build + greedy parity vs ONNX Runtime), which needs the tensorrt
package and a CUDA GPU and is skipped elsewhere with that reason."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from granite_deploy.export.exporter import export
from granite_deploy.export.opcheck import check_artifact, check_graph_file, check_model, load_supported_ops

CLI = [sys.executable, "-m", "granite_deploy.cli"]
TRT_SKIP = "tensorrt is not installed (needs an NVIDIA GPU machine)"


@pytest.fixture
def artifacts(tiny_fp32_artifact, tiny_fp16_artifact, tiny_bf16_artifact):
    """The session's fp32, fp16 and bf16 artifacts (tests/conftest.py; none of these tests changes them)."""
    return {"fp32": tiny_fp32_artifact, "fp16": tiny_fp16_artifact, "bf16": tiny_bf16_artifact}


# --- op check (export/opcheck.py, `granite-deploy check-ops`) ---------------------------------------


def test_supported_op_list_names_its_source():
    ops = load_supported_ops()
    header = ops.source.read_text().split("\n\n")[0]
    assert "onnx-tensorrt" in header and "docs/operators.md" in header and "10.15" in header
    assert (ops.min_opset, ops.max_opset) == (9, 24)
    for name in ("Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter", "MatMul", "Gemm", "Cast"):
        assert ops.ops[name][0] is True, name
    assert ops.ops["MatMulInteger"][0] is False and ops.ops["DynamicQuantizeLinear"][0] is False


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_exported_graphs_pass(dtype, artifacts):
    (report,) = check_artifact(artifacts[dtype])
    assert report.ok, "\n".join(report.lines())
    assert report.opset == 24
    names = {s.op_type for s in report.ops}
    assert {"Attention", "TensorScatter", "RMSNormalization", "RotaryEmbedding", "MatMul"} <= names


def _tiny_graph(nodes, inputs, outputs, initializers=(), opset=24, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 11
    return model


def _bad_model():
    """One standard MatMul, a com.microsoft MatMulNBits and a MatMulInteger."""
    f = lambda n, s, t=TensorProto.FLOAT: helper.make_tensor_value_info(n, t, s)  # noqa: E731
    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    wq = onnx.numpy_helper.from_array(np.ones((4, 4), np.uint8), "wq")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="plain"),
        helper.make_node("MatMulNBits", ["y", "wq"], ["z"], name="q4", domain="com.microsoft", K=4, N=4, bits=4,
                         block_size=16),
        helper.make_node("MatMulInteger", ["xi", "wq"], ["zi"], name="int8_mm"),
    ]
    return _tiny_graph(nodes, [f("x", [2, 4]), f("xi", [2, 4], TensorProto.UINT8)],
                       [f("z", None), f("zi", None, TensorProto.INT32)], [w, wq],
                       extra_opsets=[helper.make_opsetid("com.microsoft", 1)])


def test_contrib_and_integer_ops_fail_with_the_op_named():
    report = check_model(_bad_model(), name="bad")
    assert not report.ok
    bad = {s.qualified_name: s for s in report.unsupported}
    assert set(bad) == {"com.microsoft::MatMulNBits", "MatMulInteger"}
    assert any("com.microsoft" in p for p in bad["com.microsoft::MatMulNBits"].problems)
    assert bad["MatMulInteger"].nodes == ["int8_mm"]
    text = "\n".join(report.lines())
    assert "com.microsoft::MatMulNBits" in text and "MatMulInteger" in text and "UNSUPPORTED" in text
    assert next(s for s in report.ops if s.op_type == "MatMul").supported


def test_dynamic_quantize_and_restrictions_are_checked():
    f = lambda n, s, t=TensorProto.FLOAT: helper.make_tensor_value_info(n, t, s)  # noqa: E731
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "zp"], name="dq"),
        # axis 2 on a 4D cache is the same axis as -2, but TensorRT's parser only takes -2.
        helper.make_node("TensorScatter", ["cache", "upd", "idx"], ["out"], name="ts", axis=2),
    ]
    model = _tiny_graph(nodes, [f("x", [2, 4]), f("cache", [1, 2, 8, 4]), f("upd", [1, 2, 1, 4]),
                                f("idx", [1], TensorProto.INT64)],
                        [f("q", None, TensorProto.UINT8), f("s", None), f("zp", None, TensorProto.UINT8),
                         f("out", None)])
    report = check_model(model)
    bad = {s.op_type: s for s in report.unsupported}
    assert set(bad) == {"DynamicQuantizeLinear", "TensorScatter"}
    assert any("axis must be -2" in p for p in bad["TensorScatter"].problems)


def test_opset_outside_parser_range_fails():
    f = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
    model = _tiny_graph([helper.make_node("Relu", ["x"], ["y"])], [f("x")], [f("y")], opset=25)
    report = check_model(model)
    assert not report.ok and "opset 25" in report.graph_problems[0]


def test_cli_check_ops(artifacts, tmp_path):
    r = subprocess.run(CLI + ["check-ops", str(artifacts["fp16"])], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for op in ("Attention", "TensorScatter", "RMSNormalization", "RotaryEmbedding", "Cast"):
        assert any(line.split()[:1] == [op] and line.rstrip().endswith("ok") for line in r.stdout.splitlines()), op
    bad = tmp_path / "bad.onnx"
    onnx.save_model(_bad_model(), str(bad))
    r = subprocess.run(CLI + ["check-ops", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "com.microsoft::MatMulNBits" in r.stdout and "MatMulInteger" in r.stdout
    assert "2 unsupported op type(s)" in r.stdout
    assert check_graph_file(bad).ok is False


# --- build: machine checks, profiles (no GPU needed) ---------------------------------------------


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(_tensorrt_importable(), reason="tensorrt is installed here; this checks the refusal without it")
def test_build_without_tensorrt_exits_nonzero_naming_what_is_missing(artifacts):
    art = artifacts["fp32"]
    before = (art / "manifest.json").read_bytes()
    files_before = sorted(p.name for p in art.iterdir())
    r = subprocess.run(CLI + ["build", str(art), "--max-batch", "2", "--max-seq", "64"], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert "granite-deploy build: error:" in r.stderr
    assert TRT_SKIP in r.stderr
    import torch

    if torch.version.cuda is None:  # CPU-only torch here: the GPU side is named too
        assert "CPU-only build" in r.stderr
    assert (art / "manifest.json").read_bytes() == before and sorted(p.name for p in art.iterdir()) == files_before


@pytest.fixture
def qdq_artifact(tiny_qdq_artifact):
    return tiny_qdq_artifact


def _onnx_inputs(path) -> set[str]:
    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}


def test_profiles_agree_and_cover_the_graph_inputs(artifacts):
    from granite_deploy.artifact import load_manifest
    from granite_deploy.engines.tensorrt_build import check_profiles, plan_profiles

    m = load_manifest(artifacts["fp32"])
    graph = m.graph("decoder")
    prefill, decode = profiles = plan_profiles(graph, max_batch=4, max_seq=128, opt_seq=32)
    assert check_profiles(profiles, graph) == []
    assert set(prefill) == set(decode) == _onnx_inputs(artifacts["fp32"] / "model.onnx")
    assert prefill["input_ids"] == {"min": [1, 1], "opt": [1, 32], "max": [1, 128]}
    assert decode["input_ids"] == {"min": [1, 1], "opt": [4, 1], "max": [4, 1]}
    assert prefill["num_logits_to_keep"] == {"min": [], "opt": [], "max": []}
    kv, d = m.architecture.num_kv_heads, m.architecture.head_dim
    assert decode["past_key_values.0.key"] == {"min": [1, kv, 128, d], "opt": [4, kv, 128, d], "max": [4, kv, 128, d]}
    assert prefill["past_key_values.2.value"] == {k: [1, kv, 128, d] for k in ("min", "opt", "max")}
    broken = json.loads(json.dumps(profiles))
    broken[1]["position_ids"]["max"][0] = 3  # disagrees with input_ids' batch
    broken[0]["past_key_values.0.key"]["max"][2] = 64  # capacity below the sequence
    del broken[1]["past_key_values.1.key"]
    problems = check_profiles(broken, graph)
    assert any("disagree on batch" in p for p in problems) and any("capacity 64 < sequence 128" in p for p in problems)
    assert any("missing ['past_key_values.1.key']" in p for p in problems)


def _plan_only(art, *args):
    r = subprocess.run(CLI + ["build", str(art), "--plan-only", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("kind", ["fp32", "fp16", "bf16", "int8-qdq", "hybrid", "hybrid-fp16"])
def test_plan_only_profiles_cover_exactly_the_graph_inputs(kind, artifacts, hybrid_artifact, hybrid_fp16_artifact,
                                                           qdq_artifact):
    """`build --plan-only` needs neither TensorRT nor a GPU; every profile names exactly the ONNX graph's inputs,
    KV inputs at the static capacity, Mamba conv/ssm state at its fixed per-sequence shape."""
    from granite_deploy.artifact import load_manifest

    art = {**artifacts, "int8-qdq": qdq_artifact, "hybrid": hybrid_artifact, "hybrid-fp16": hybrid_fp16_artifact}[kind]
    plan = _plan_only(art, "--max-batch", "3", "--max-seq", "96", "--opt-seq", "16")
    names = _onnx_inputs(art / "model.onnx")
    assert len(plan["profiles"]) == 2 and plan["profile_names"] == ["prefill", "decode"]
    for profile in plan["profiles"]:
        assert set(profile) == names
        for shapes in profile.values():
            assert set(shapes) == {"min", "opt", "max"}
    prefill, decode = plan["profiles"]
    m = load_manifest(art)
    for st in m.graph("decoder").state:
        if st.kind == "kv":
            assert decode[st.input]["max"] == [3, *st.row_shape(96)] and prefill[st.input]["min"][0] == 1
        else:
            assert decode[st.input] == {"min": [1, *st.shape], "opt": [3, *st.shape], "max": [3, *st.shape]}
    if kind.startswith("hybrid"):
        kinds = {st.kind for st in m.graph("decoder").state}
        assert kinds == {"kv", "conv", "ssm"} and any(n.endswith(".conv") for n in prefill)
    assert prefill["input_ids"]["max"] == [1, 96] and decode["input_ids"]["max"] == [3, 1]


def test_plan_only_refuses_bad_options_and_onnxruntime_only_graphs(artifacts, qdq_artifact, tmp_path):
    art = artifacts["fp32"]
    for args, field in ((["--max-batch", "0"], "--max-batch"), (["--max-seq", "100000"], "--max-seq"),
                        (["--max-seq", "64", "--opt-seq", "65"], "--opt-seq")):
        r = subprocess.run(CLI + ["build", str(art), "--plan-only", *args], capture_output=True, text=True)
        assert r.returncode == 2 and field in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run(CLI + ["build", str(tmp_path / "nowhere"), "--plan-only"], capture_output=True, text=True)
    assert r.returncode == 2 and "no such directory" in r.stderr
    # build checks the artifact before the machine: a tampered graph is refused (exit 3) even without TensorRT.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[-1] ^= 1
    (bad / "model.onnx").write_bytes(bytes(data))
    r = subprocess.run(CLI + ["build", str(bad), "--max-seq", "64"], capture_output=True, text=True)
    assert r.returncode == 3 and "model.onnx: contents changed" in r.stderr and TRT_SKIP not in r.stderr


# --- plan records: selection, refusal, fallback (simulated machines, tensorrt never imported) -----

H100 = {"tensorrt": "10.15.1.29", "tensorrt_error": None, "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0", "gpu_error": None}
A100 = {**H100, "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
H100_OTHER_TRT = {**H100, "tensorrt": "10.16.0.1"}
NO_TRT = {"tensorrt": None, "tensorrt_error": TRT_SKIP, "gpu": None, "compute_capability": None,
          "gpu_error": "no CUDA GPU usable: torch is a CPU-only build"}


@pytest.fixture
def artifact_with_h100_plan(artifacts, tmp_path):
    """A copy of the fp32 artifact whose manifest records a (fake) plan built on an H100."""
    import shutil

    from granite_deploy.artifact import load_manifest
    from granite_deploy.engines.tensorrt_build import PROFILE_NAMES, plan_filename, plan_profiles, record_plan
    from granite_deploy.manifest import PlanRecord, ProfileRecord

    art = tmp_path / "art"
    shutil.copytree(artifacts["fp32"], art)
    name = plan_filename(H100)
    (art / name).write_bytes(b"not a real plan")
    profiles = plan_profiles(load_manifest(art).graph("decoder"), 2, 64, 16)
    record_plan(art, PlanRecord(file=name, tensorrt_version=H100["tensorrt"], gpu_name=H100["gpu"],
                                compute_capability=H100["compute_capability"], precision="fp32",
                                profiles=tuple(ProfileRecord(n, i, profiles[i]) for i, n in enumerate(PROFILE_NAMES)),
                                max_batch=2, max_seq=64, cache_capacity=64))
    return art


def test_plan_record_is_hashed_in_the_manifest(artifact_with_h100_plan):
    from granite_deploy.artifact import verify

    m = verify(artifact_with_h100_plan, load_graph=False)
    assert m.plans[0].file == "model.sm90.trt10.15.1.29.plan" and m.plans[0].profile_index("decode") == 1
    assert "model.sm90.trt10.15.1.29.plan" in m.files
    on_disk = json.loads((artifact_with_h100_plan / "manifest.json").read_text())
    assert on_disk["tensorrt_plans"][0]["profiles"][1]["shapes"]["input_ids"] == {"min": [1, 1], "opt": [2, 1],
                                                                                "max": [2, 1]}
    (artifact_with_h100_plan / "model.sm90.trt10.15.1.29.plan").write_bytes(b"tampered")
    from granite_deploy.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="plan"):
        verify(artifact_with_h100_plan, load_graph=False)


@pytest.mark.parametrize("runtime, expected", [
    (A100, ["NVIDIA H100 80GB HBM3", "compute capability 9.0", "compute capability 8.0", "NVIDIA A100"]),
    (H100_OTHER_TRT, ["TensorRT 10.15.1.29", "TensorRT here is 10.16.0.1"]),
    (NO_TRT, [TRT_SKIP, "CPU-only build"]),
])
def test_plan_for_another_machine_is_refused(artifact_with_h100_plan, monkeypatch, runtime, expected):
    import granite_deploy.engines.tensorrt_engine as te
    from granite_deploy.engines.base import EngineError
    from granite_deploy.engines.tensorrt_build import plan_compatibility

    from granite_deploy.artifact import load_manifest

    record = load_manifest(artifact_with_h100_plan).plans[0]
    assert plan_compatibility(record, H100) == []
    (problem,) = plan_compatibility(record, runtime)
    for text in expected:
        assert text in problem
    plan, why = te.select_plan(artifact_with_h100_plan, runtime=runtime)
    assert plan is None and "no TensorRT plan fits this machine" in why
    # The engine itself refuses before touching tensorrt.
    monkeypatch.setattr(te, "current_runtime", lambda: runtime)
    with pytest.raises(EngineError, match="refusing TensorRT plan"):
        te.TensorRTEngine(artifact_with_h100_plan, plan=record)


def test_load_engine_falls_back_to_onnxruntime_cpu_with_the_reason(artifact_with_h100_plan, monkeypatch, caplog):
    import granite_deploy.engines.tensorrt_engine as te
    from granite_deploy.engines import load_engine
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine, available_providers

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("onnxruntime-gpu is installed: the fallback here is ONNX Runtime CUDA, not CPU")
    monkeypatch.setattr(te, "current_runtime", lambda: A100)
    with caplog.at_level(logging.INFO, logger="granite_deploy.engines"):
        eng = load_engine(artifact_with_h100_plan, max_batch=1, threads=1)
    assert isinstance(eng, OnnxRuntimeEngine) and eng.info.kind == "onnxruntime" and eng.info.device == "cpu"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine:")]
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("engine: onnxruntime CPUExecutionProvider, graph decoder_ragged (CPU fallback: no TensorRT plan fits")
    assert "NVIDIA H100 80GB HBM3" in line and "NVIDIA A100-SXM4-80GB" in line
    assert "CPU fallback" in eng.info.reason
    with pytest.raises(ValueError, match="tensorrt requested but no TensorRT plan fits"):
        load_engine(artifact_with_h100_plan, engine="tensorrt")


def test_load_engine_without_plans_never_probes_the_gpu(artifacts, monkeypatch, caplog):
    import granite_deploy.engines.tensorrt_engine as te
    from granite_deploy.engines import load_engine

    def boom():
        raise AssertionError("current_runtime() called for an artifact without plans")

    monkeypatch.setattr(te, "current_runtime", boom)
    with caplog.at_level(logging.INFO, logger="granite_deploy.engines"):
        eng = load_engine(artifacts["fp32"], engine="auto", max_batch=1, threads=1)
    assert eng.info.kind == "onnxruntime"
    assert "has no TensorRT plan" in eng.info.reason


# --- the GPU path (skipped without tensorrt + CUDA) ---------------------------------------------


@pytest.fixture(scope="module")
def gpu():
    trt = pytest.importorskip("tensorrt", reason=TRT_SKIP)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible (tensorrt imports, but torch.cuda.is_available() is False)")
    return trt


def _greedy(engine, prompts, steps):
    """Greedy continuations of several prompts run together (prefill each, then batched decodes)."""
    from granite_deploy.engines.base import Chunk

    seqs = {i: list(p) for i, p in enumerate(prompts)}
    for i in seqs:
        engine.reserve(i)
    logits = engine.step([Chunk(i, tuple(p), 0) for i, p in seqs.items()])
    for _ in range(steps):
        for i in seqs:
            seqs[i].append(int(logits[i].argmax()))
        logits = engine.step([Chunk(i, (s[-1],), len(s) - 1) for i, s in seqs.items()])
    for i in seqs:
        engine.release(i)
    return seqs, logits


@pytest.mark.tensorrt
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_build_and_greedy_parity_with_onnxruntime(gpu, artifacts, dtype, tmp_path):
    import shutil

    from granite_deploy.artifact import verify
    from granite_deploy.engines import load_engine
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
    from granite_deploy.engines.tensorrt_build import build
    from granite_deploy.engines.tensorrt_engine import TensorRTEngine

    art = tmp_path / "art"
    shutil.copytree(artifacts[dtype], art)
    cache = tmp_path / "timing.cache"
    record = build(art, max_batch=4, max_seq=128, opt_seq=16, timing_cache=cache)
    assert (art / record.file).is_file() and cache.is_file()
    assert record.tensorrt_version == gpu.__version__ and record.precision == dtype
    assert [p.name for p in record.profiles] == ["prefill", "decode"]
    m = verify(art, load_graph=False)
    assert m.plans[-1].file == record.file and record.file in m.files

    trt_engine = load_engine(art, max_batch=4)
    assert isinstance(trt_engine, TensorRTEngine) and trt_engine.info.kind == "tensorrt"
    ort_engine = OnnxRuntimeEngine(art, max_batch=4, threads=2)
    prompts = [[5, 17, 42, 99, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [8]]
    got, got_logits = _greedy(trt_engine, prompts, 16)
    want, want_logits = _greedy(ort_engine, prompts, 16)
    if dtype == "fp32":
        assert got == want
        assert np.abs(got_logits - want_logits).max() < 1e-2
    else:  # fp16 on both sides, different kernels: allow a near-tie flip late in one sequence
        agree = sum(a == b for i in got for a, b in zip(got[i], want[i])) / sum(len(s) for s in got.values())
        assert agree >= 0.95
    trt_engine.close()


@pytest.mark.tensorrt
def test_timing_cache_is_reused(gpu, artifacts, tmp_path):
    import shutil

    from granite_deploy.engines.tensorrt_build import build

    art = tmp_path / "art"
    shutil.copytree(artifacts["fp32"], art)
    cache = tmp_path / "timing.cache"
    first = build(art, max_batch=2, max_seq=64, opt_seq=8, timing_cache=cache)
    second = build(art, max_batch=2, max_seq=64, opt_seq=8, timing_cache=cache)
    assert first.extra["timing_cache"]["reused"] is False and second.extra["timing_cache"]["reused"] is True
    m = json.loads((art / "manifest.json").read_text())
    assert len(m["tensorrt_plans"]) == 1  # same GPU + version: the record is replaced, not duplicated


@pytest.mark.tensorrt
def test_cli_build(gpu, artifacts, tmp_path):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifacts["fp32"], art)
    r = subprocess.run(CLI + ["build", str(art), "--max-batch", "2", "--max-seq", "64", "--opt-seq", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and ".plan" in r.stdout
