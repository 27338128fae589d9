"""decoder_ragged (export/ragged_graph.py, docs/ragged-step.md): one call over a mixture of chunks equals the
same chunks run one by one through decoder_cpu, in logits and in the state it leaves behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from granite_deploy.export import ragged_graph as rg
from granite_deploy.export.io_spec import state_records

from granite_deploy.artifact import (
    DECODER_CPU,
    DECODER_RAGGED,
    load_manifest,
    verify,
    write_manifest,
)
from granite_deploy.manifest import from_dict, ragged_state_name

# (cached tokens before the step, chunk tokens) per cache row, and the row range of each group.
SCENARIOS = {
    # decodes around an idle row in group 0; a prefill chunk and a 3-token verification chunk in group 1
    "mixed": (((6, 1), (4, 0), (9, 1), (0, 7), (5, 3)), ((0, 3), (3, 5))),
    # prefill chunks of different lengths in group 0, an idle row and a decode in group 1
    "prefills_idle_in_group1": (((0, 4), (3, 9), (2, 0), (7, 1)), ((0, 2), (2, 4))),
    "group1_empty": (((3, 1), (2, 1), (0, 5)), ((0, 3), (3, 3))),
    "group0_empty": (((3, 1), (0, 6), (2, 2)), ((0, 0), (0, 3))),
    "only_decodes": (((5, 1), (8, 1), (1, 1)), ((0, 2), (2, 3))),
    # one multi-token row per group after a cached prefix (GroupQueryAttention's one-row chunk path)
    "one_chunk_per_group": (((4, 3), (6, 5)), ((0, 1), (1, 2))),
}
LOGIT_TOL = 1e-4


def _int4(tiny_fp32_artifact):
    from conftest import QUANTIZE_TEST_GATE
    from granite_deploy.export.quantize import quantize

    out = tiny_fp32_artifact.parent / "int4"
    if not (out / "manifest.json").exists():
        quantize(tiny_fp32_artifact, out, "int4", thresholds=QUANTIZE_TEST_GATE["int4"])
    return out


@pytest.fixture(scope="module", params=["dense", "hybrid", "int4"])
def artifact(request):
    if request.param == "dense":
        return request.getfixturevalue("tiny_fp32_artifact")
    if request.param == "hybrid":
        return request.getfixturevalue("hybrid_artifact")
    return _int4(request.getfixturevalue("tiny_fp32_artifact"))


@pytest.fixture(scope="module")
def sessions(artifact):
    """(arch, decoder_cpu session, decoder_ragged session), MatMulNBits at accuracy_level 0 (float compute)."""
    m = load_manifest(artifact)
    with rg.float_compute_copy(artifact / m.graph(DECODER_CPU).file) as (cpu, _), \
            rg.float_compute_copy(artifact / m.graph(DECODER_RAGGED).file) as (ragged, _):
        yield m.architecture, rg.float_check_session(cpu), rg.float_check_session(ragged)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_one_ragged_call_equals_chunks_one_by_one(sessions, scenario):
    arch, cpu, ragged = sessions
    rows, groups = SCENARIOS[scenario]
    rng = np.random.default_rng(len(scenario))
    capacity = max(p for p, _ in rows) + max(n for _, n in rows) + 3
    records = state_records(arch, "float32", head_dim_major=True)
    state = {st.input: np.zeros((len(rows), *st.row_shape(capacity)), np.float32) for st in records}
    rg.run_chunks_cpu(cpu, arch, state, [(0, rng.integers(0, arch.vocab_size, p).tolist()) for p, _ in rows],
                      all_logits=False)
    chunks = [(p, rng.integers(0, arch.vocab_size, n).tolist()) for p, n in rows]
    before = {k: v.copy() for k, v in state.items()}
    reference_state = {k: v.copy() for k, v in state.items()}
    reference = rg.run_chunks_cpu(cpu, arch, reference_state, chunks)
    got = rg.run_ragged(ragged, arch, state, groups, chunks)

    for r, (want, have) in enumerate(zip(reference, got)):
        if want is None:
            assert have is None
            continue
        assert have.shape == want.shape
        np.testing.assert_allclose(have, want, atol=LOGIT_TOL, rtol=0, err_msg=f"row {r} logits")
        assert (have.argmax(-1) == want.argmax(-1)).all(), f"row {r} argmax"
    for st in records:
        for r, (p, n) in enumerate(rows):
            want, have = reference_state[st.input][r], state[st.input][r]
            if st.kind == "kv":  # real positions only: padding writes land past the row's length
                want, have = want[..., :p + n], have[..., :p + n]
            elif n == 0:  # an idle row's recurrent state does not move at all
                assert np.array_equal(have, before[st.input][r]), f"{st.input} row {r} (idle) changed"
            scale = max(1.0, float(np.abs(want).max()))  # random-weight Mamba states reach ~1e3
            np.testing.assert_allclose(have, want, atol=1e-5 * scale, rtol=0, err_msg=f"{st.input} row {r}")
            if st.kind == "kv" and n == 0:
                assert np.array_equal(have, before[st.input][r][..., :p + n])


def test_last_token_logits_only(sessions):
    """logits_index picks rows of the output in its order: the chunks' last tokens."""
    arch, _, ragged = sessions
    rows, groups = SCENARIOS["mixed"]
    rng = np.random.default_rng(7)
    records = state_records(arch, "float32")  # decoder_ragged's layout
    chunks = [(p, rng.integers(0, arch.vocab_size, n).tolist()) for p, n in rows]
    state = {st.input: rng.standard_normal((len(rows), *st.row_shape(20))).astype(np.float32) for st in records}

    def run(logits):
        feeds = rg.ragged_feeds([[chunks[r] for r in range(lo, hi)] for lo, hi in groups], logits=logits)
        for g, (lo, hi) in enumerate(groups):
            for st in records:
                feeds[ragged_state_name(st.input, g)] = state[st.input][lo:hi]
        return ragged.run(["logits"], feeds)[0], feeds

    everything, _ = run("all")
    last, feeds = run("last")
    assert last.shape == (1, sum(1 for _, n in rows if n), arch.vocab_size)
    np.testing.assert_allclose(last[0], everything[0][feeds["logits_index"]], atol=1e-5, rtol=0)


def test_graph_io_matches_the_manifest(artifact):
    import onnxruntime as ort

    m = load_manifest(artifact)
    g = m.graph(DECODER_RAGGED)
    session = ort.InferenceSession(str(artifact / g.file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(g.input_names)
    assert [o.name for o in session.get_outputs()] == list(g.output_names)
    assert "num_logits_to_keep" not in g.input_names
    # weights are never copied: the flavour points at the CPU graph's data file and is small
    assert g.external_data == m.graph(DECODER_CPU).external_data
    assert (artifact / g.file).stat().st_size < 1 << 20


def test_manifest_record_round_trip(artifact):
    m = load_manifest(artifact)
    g = m.graph(DECODER_RAGGED)
    cpu = m.graph(DECODER_CPU)
    assert g.derived_from == DECODER_CPU and g.engines == ("onnxruntime",)
    assert g.kv_cache["step"] == "ragged" and g.kv_cache["groups"] == 2
    assert g.kv_cache["kind"] == cpu.kv_cache["kind"]
    # the portable layout (GroupQueryAttention's), not decoder_cpu's head-dim-major one
    assert g.kv_cache["tensor_layout"] == ["batch", "kv_heads", "cache_capacity", "head_dim"]
    assert g.state == state_records(m.architecture, "float32")  # one set (group 0's names); group 1 binds them renamed
    assert [st.input for st in g.state] == [st.input for st in cpu.state]
    for st in g.state:
        for g_ in (0, 1):
            assert ragged_state_name(st.input, g_) in g.input_names
            assert ragged_state_name(st.output, g_) in g.output_names
    assert g.validation["passed"] and g.validation["max_abs_logit_diff"] <= rg.PARITY_MAX_ABS_DIFF
    again = from_dict(json.loads(m.to_json())).graph(DECODER_RAGGED)
    assert again == g
    assert g.file in m.files


def test_add_ragged_flavour_to_an_existing_artifact(hybrid_artifact, tmp_path):
    """An artifact written before the flavour existed gets it, with the manifest's file list and hashes."""
    art = tmp_path / "art"
    shutil.copytree(hybrid_artifact, art)
    m = load_manifest(art)
    ragged_file = m.graph(DECODER_RAGGED).file
    (art / ragged_file).unlink()
    old = m.replace(graphs={k: v for k, v in m.graphs.items() if k != DECODER_RAGGED},
                    files={k: v for k, v in m.files.items() if k != ragged_file})
    write_manifest(art, old)
    assert DECODER_RAGGED not in verify(art).graphs

    path = rg.add_ragged_flavour(art)
    assert path == art / ragged_file
    m2 = verify(art)  # every hash checks, the graph loads
    assert m2.graph(DECODER_RAGGED).validation["passed"]
    assert m2.graph(DECODER_RAGGED).inputs == m.graph(DECODER_RAGGED).inputs


def test_refuses_an_artifact_without_decoder_cpu(tiny_fp32_artifact, tmp_path):
    """(fp16/bf16 artifacts have no decoder_cpu)"""
    art = tmp_path / "art"
    shutil.copytree(tiny_fp32_artifact, art)
    m = load_manifest(art)
    write_manifest(art, m.replace(graphs={k: v for k, v in m.graphs.items() if k not in (DECODER_CPU, DECODER_RAGGED)}))
    (art / rg.RAGGED_GRAPH_FILE).unlink()
    with pytest.raises(rg.RaggedGraphError, match="no decoder_cpu"):
        rg.add_ragged_flavour(art)
    assert not (art / rg.RAGGED_GRAPH_FILE).exists()


def test_attention_is_group_query_attention_with_a_fallback(artifact):
    """Each attention layer's group runs GroupQueryAttention (cache written in place by it), with the
    MatMul/Softmax fallback (TensorScatter writes) for groups of several multi-token rows."""
    import onnx

    m = load_manifest(artifact)
    model = onnx.load(str(artifact / m.graph(DECODER_RAGGED).file), load_external_data=False)

    def ops(graph):
        for n in graph.node:
            yield n.op_type
            for at in n.attribute:
                if at.HasField("g"):
                    yield from ops(at.g)

    found = list(ops(model.graph))
    attention_layers = sum(1 for k in (m.architecture.layer_types or ("attention",) * m.architecture.num_layers)
                           if k == "attention")
    assert found.count("GroupQueryAttention") == 2 * attention_layers
    assert found.count("TensorScatter") == 2 * 2 * attention_layers  # K and V, per group, in the fallback only
    assert "com.microsoft" in {o.domain for o in model.opset_import}
