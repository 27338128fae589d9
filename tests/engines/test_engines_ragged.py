"""The ragged step (docs/ragged-step.md): SlotTable.plan_ragged (pure Python), and the ONNX Runtime
engine on the decoder_ragged graph against the per-call engine on decoder_cpu."""

from __future__ import annotations

import random

import numpy as np
import pytest

from granite_deploy.engines.base import CacheFull, Chunk, EngineError
from granite_deploy.engines.slots import RaggedInfeasible, SlotTable, Swap


def table(lengths: list[int], max_batch: int = 8) -> SlotTable:
    t = SlotTable(max_batch)
    for s, n in enumerate(lengths):
        assert t.reserve(s) == s
        t.set_length(s, n)
    return t


def check_call(t: SlotTable, chunks: list[Chunk], call, max_seq_len: int = 10**6) -> None:
    """Everything the contract says of a RaggedCall, checked against the chunks and the table (whose
    rows already reflect the call's swaps)."""
    g0, g1 = call.groups
    assert g0.lo <= g0.hi and g1.lo <= g1.hi
    assert g0.hi <= g1.lo or g1.hi <= g0.lo or g1.lo == g1.hi, "group ranges overlap"
    tokens = call.input_ids.shape[1]
    assert call.input_ids.shape == call.position_ids.shape == (1, tokens)
    assert call.unpad_index.shape == (tokens,)
    assert tokens == sum(len(c.token_ids) for c in chunks)
    # the padded layout of both groups, slot by slot: (row, position, token index or None)
    seq_at = {r: s for s, r in t.rows.items()}
    chunk_of = {c.seq_id: c for c in chunks}
    slot_base, flat_order = 0, []
    for g in (g0, g1):
        rows = g.hi - g.lo
        assert g.token_index.shape == g.position_ids.shape == (rows, g.width) and g.lengths.shape == (rows,)
        for r in range(g.lo, g.hi):
            seq = seq_at.get(r)
            start = t.lengths[seq] if seq is not None else 0
            assert g.position_ids[r - g.lo].tolist() == list(range(start, start + g.width))
            assert start + g.width <= call.capacity <= max_seq_len
            c = chunk_of.get(seq)
            if c is None:
                assert g.lengths[r - g.lo] == 0
                assert 0 <= g.token_index[r - g.lo].min() and g.token_index[r - g.lo].max() < tokens
                continue
            k = len(c.token_ids)
            assert g.lengths[r - g.lo] == k <= g.width
            idx = g.token_index[r - g.lo]
            assert idx[:k].tolist() == list(range(idx[0], idx[0] + k))
            assert (idx[k:] == idx[k - 1]).all()  # padding repeats the last token
            assert call.input_ids[0, idx[:k]].tolist() == list(c.token_ids)
            assert call.position_ids[0, idx[:k]].tolist() == list(range(c.start, c.start + k))
            assert call.unpad_index[idx[:k]].tolist() == [slot_base + (r - g.lo) * g.width + j for j in range(k)]
            flat_order.append(int(idx[0]))
        slot_base += rows * g.width
    assert flat_order == sorted(flat_order)  # group 0's rows first, then group 1's, rows in order
    assert len(chunk_of) == len(flat_order), "every chunk in exactly one group"
    # logits: chunk i's rows, its last token last
    assert len(call.logits_offsets) == len(chunks) + 1 and call.logits_offsets[0] == 0
    for i, c in enumerate(chunks):
        rows = call.logits_index[call.logits_offsets[i]:call.logits_offsets[i + 1]]
        got = call.input_ids[0, rows].tolist()
        assert got == (list(c.token_ids) if c.all_logits else [c.token_ids[-1]])
        assert call.position_ids[0, rows[-1]] == c.start + len(c.token_ids) - 1


def test_decodes_and_a_prefill_make_two_groups_without_padding_the_decodes():
    t = table([5, 7, 9, 3, 0])
    chunks = [Chunk(0, (10,), 5), Chunk(1, (11,), 7), Chunk(2, (12,), 9), Chunk(3, (13,), 3),
              Chunk(4, tuple(range(20, 52)), 0)]
    call = t.plan_ragged(chunks, capacity=256, max_seq_len=1000)
    check_call(t, chunks, call)
    g0, g1 = call.groups
    assert (g0.lo, g0.hi, g0.width) == (0, 4, 1) and (g1.lo, g1.hi, g1.width) == (4, 5, 32)
    assert call.swaps == () and call.padded_slots == 36
    assert call.input_ids[0, :4].tolist() == [10, 11, 12, 13]
    assert call.logits_index.tolist() == [0, 1, 2, 3, 35] and call.capacity == 32


def test_threshold_minimises_padded_slots():
    # lengths 1, 1, 4, 5 and 32: {1,1,4,5} + {32} pads 4*5 + 32 = 52; {1,1} + {4,5,32} 2 + 96
    t = table([0] * 5)
    chunks = [Chunk(0, (1,), 0), Chunk(1, (1,), 0), Chunk(2, (1,) * 4, 0), Chunk(3, (1,) * 5, 0),
              Chunk(4, (1,) * 32, 0)]
    call = t.plan_ragged(chunks, 64, 1000)
    check_call(t, chunks, call)
    assert [(g.lo, g.hi, g.width) for g in call.groups] == [(0, 4, 5), (4, 5, 32)]
    # all one length: one group, group 1 empty (or the spare row with a 1-slot dummy)
    t = table([3, 4])
    chunks = [Chunk(0, (1,), 3), Chunk(1, (2,), 4)]
    call = t.plan_ragged(chunks, 64, 1000)
    check_call(t, chunks, call)
    assert [(g.lo, g.hi, g.width) for g in call.groups] == [(0, 2, 1), (0, 0, 1)]
    spare = t.plan_ragged(chunks, 64, 1000, spare_row=8).groups[1]
    assert (spare.lo, spare.hi, spare.width) == (8, 9, 1)
    assert spare.lengths.tolist() == [0] and spare.token_index.tolist() == [[0]]


def test_idle_rows_inside_a_range_get_length_zero():
    t = table([5, 7, 9])
    chunks = [Chunk(2, (12,), 9), Chunk(0, (10,), 5)]  # row 1 idle, between two decodes
    call = t.plan_ragged(chunks, 256, 1000)
    check_call(t, chunks, call)
    g0 = call.groups[0]
    assert (g0.lo, g0.hi) == (0, 3) and g0.lengths.tolist() == [1, 0, 1]
    assert g0.position_ids.tolist() == [[5], [7], [9]]
    assert call.input_ids.tolist() == [[10, 12]] and call.logits_index.tolist() == [1, 0]


def test_interleaved_groups_swap_the_cheapest_rows():
    # rows: decode, prefill (row 1, 100 cached), decode, decode: the prefill row must leave the middle
    t = table([50, 100, 3, 60])
    chunks = [Chunk(0, (1,), 50), Chunk(1, (1,) * 16, 100), Chunk(2, (2,), 3), Chunk(3, (3,), 60)]
    call = t.plan_ragged(chunks, 256, 1000)
    check_call(t, chunks, call)
    # the prefill row goes to an end: swapping with row 0 (50 cached) beats row 3 (60)
    assert call.swaps == (Swap(a=1, b=0, length_a=100, length_b=50),)
    assert t.rows == {0: 1, 1: 0, 2: 2, 3: 3}
    assert [(g.lo, g.hi, g.width) for g in call.groups] == [(1, 4, 1), (0, 1, 16)]


def test_swaps_are_weighed_against_padding():
    # one long row in the middle of two decodes: swapping 5000 cached positions costs more than
    # padding the 2 decodes to 2 slots; a cheap swap is taken instead of the padding
    t = table([10, 5000, 10])
    chunks = [Chunk(0, (1,), 10), Chunk(1, (1, 2), 5000), Chunk(2, (1,), 10)]
    call = t.plan_ragged(chunks, 256, 100000)
    check_call(t, chunks, call)
    assert [(g.lo, g.hi, g.width) for g in call.groups] == [(0, 3, 2), (0, 0, 1)] and call.swaps == ()
    t = table([10, 20, 10])
    chunks = [Chunk(0, (1,), 10), Chunk(1, tuple(range(64)), 20), Chunk(2, (1,), 10)]
    call = t.plan_ragged(chunks, 256, 100000)
    check_call(t, chunks, call)
    assert len(call.swaps) == 1 and call.padded_slots == 2 + 64


def test_all_logits_gives_a_row_per_chunk_token():
    t = table([0, 4])
    chunks = [Chunk(0, (7, 8, 9), 0, all_logits=True), Chunk(1, (5,), 4, all_logits=True)]
    call = t.plan_ragged(chunks, 64, 100)
    check_call(t, chunks, call)
    assert call.logits_offsets == (0, 3, 4)


def test_rows_near_max_seq_len_stay_out_of_wide_groups():
    # a decode at 98 of 100 cannot sit in a group of width 4; the 4-token chunk goes to group 1
    t = table([98, 0, 0])
    chunks = [Chunk(0, (1,), 98), Chunk(1, (1, 2, 3), 0), Chunk(2, (1, 2, 3, 4), 0)]
    call = t.plan_ragged(chunks, 64, 100)
    check_call(t, chunks, call, max_seq_len=100)
    assert call.groups[0].width == 1
    # three lengths and no two-group layout within 100 positions: infeasible; one chunk alone fits
    t = table([99, 97, 0])
    chunks = [Chunk(0, (1,), 99), Chunk(1, (1, 2), 97), Chunk(2, (1, 2, 3, 4), 0)]
    with pytest.raises(RaggedInfeasible):
        t.plan_ragged(chunks, 64, 100)
    assert t.rows == {0: 0, 1: 1, 2: 2}  # a refused plan changes nothing
    for c in chunks:
        check_call(t, [c], t.plan_ragged([c], 64, 100), max_seq_len=100)


def test_plan_ragged_refuses_bad_steps():
    t = table([5, 0])
    with pytest.raises(EngineError, match="starts at 4, cache holds 5"):
        t.plan_ragged([Chunk(0, (1,), 4)], 8, 100)
    with pytest.raises(EngineError, match="two chunks"):
        t.plan_ragged([Chunk(0, (1,), 5), Chunk(0, (1,), 5)], 8, 100)
    with pytest.raises(CacheFull):
        t.plan_ragged([Chunk(1, tuple(range(11)), 0)], 8, 10)


@pytest.mark.parametrize("seed", range(40))
def test_random_steps_always_give_a_valid_plan(seed):
    rng = random.Random(seed)
    max_batch, max_seq_len = rng.choice([(4, 64), (8, 200), (16, 1000)])
    t = SlotTable(max_batch)
    next_id = 0
    for _ in range(30):
        if len(t) < max_batch and rng.random() < 0.5:
            t.reserve(next_id)
            next_id += 1
        if len(t) and rng.random() < 0.2:
            t.release(rng.choice(list(t.rows)))
        chunks = []
        for s in list(t.rows):
            room = max_seq_len - t.lengths[s]
            if room and rng.random() < 0.8:
                k = min(room, rng.choice([1, 1, 1, 2, 3, 5, 16, 40]))
                chunks.append(Chunk(s, tuple(rng.randrange(100) for _ in range(k)), t.lengths[s],
                                    all_logits=rng.random() < 0.2))
        rng.shuffle(chunks)
        if not chunks:
            continue
        before = dict(t.rows)
        try:
            call = t.plan_ragged(chunks, 256, max_seq_len, spare_row=max_batch)
        except RaggedInfeasible:
            assert t.rows == before
            for c in chunks:
                check_call(t, [c], t.plan_ragged([c], 256, max_seq_len, spare_row=max_batch), max_seq_len)
        else:
            check_call(t, chunks, call, max_seq_len)
            moved = {s for s in t.rows if t.rows[s] != before[s]}
            assert moved == {before_s for sw in call.swaps for before_s in t.rows
                             if before[before_s] in (sw.a, sw.b)}
            assert sorted(t.rows.values()) == list(range(len(t)))
        t.advance(chunks)
        if rng.random() < 0.2 and len(t):
            s = rng.choice(list(t.rows))
            t.truncate(s, rng.randrange(t.lengths[s] + 1))


# --- the engine on the ragged graph vs the per-call engine on decoder_cpu ---------------------------------
_DERIVED: dict = {}


def ragged_artifact(artifact, tmp_path_factory):
    """The artifact with its decoder_ragged flavour: as exported when the exporter adds it, else a
    copy with the flavour derived here (export/ragged_graph.py) and added to the manifest."""
    import dataclasses
    import shutil

    from granite_deploy.artifact import DECODER_CPU, DECODER_RAGGED, file_records, load_manifest, write_manifest
    from granite_deploy.export.ragged_graph import derive_ragged_graph, ragged_graph_record

    manifest = load_manifest(artifact)
    if DECODER_RAGGED in manifest.graphs:
        return artifact
    if artifact not in _DERIVED:
        out = tmp_path_factory.mktemp("ragged") / "art"
        shutil.copytree(artifact, out)
        cpu = manifest.graphs[DECODER_CPU]
        path = derive_ragged_graph(out / cpu.file, manifest.architecture)
        record = ragged_graph_record(cpu, path, manifest.architecture)
        files = {**manifest.files, **file_records(out, [path.name])}
        write_manifest(out, dataclasses.replace(manifest, graphs={**manifest.graphs, DECODER_RAGGED: record},
                                                files=files))
        _DERIVED[artifact] = out
    return _DERIVED[artifact]


def engines(artifact, max_batch=4, max_seq_len=None):
    from granite_deploy.artifact import DECODER_CPU
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

    ragged = OnnxRuntimeEngine(artifact, max_batch=max_batch, max_seq_len=max_seq_len, threads=1)
    assert ragged.ragged and ragged.graph_name == "decoder_ragged"  # the default on the CPU provider
    per_call = OnnxRuntimeEngine(artifact, max_batch=max_batch, max_seq_len=max_seq_len, threads=1,
                                 graph=DECODER_CPU)
    assert not per_call.ragged
    swaps = []
    inner = ragged._swap_rows
    ragged._swap_rows = lambda swap: (swaps.append(swap), inner(swap))
    return ragged, per_call, swaps


def both(ragged, per_call, method, *args):
    getattr(ragged, method)(*args)
    getattr(per_call, method)(*args)


def run_workload(ragged, per_call, seed: int, steps: int, rollback: bool, vocab: int):
    """A random serving mixture, the same on both engines: sequences join (prompts fed in chunks of
    2-9 tokens), decode greedily (the ragged engine's argmax), some idle for a step, some feed
    k-token chunks (and, with `rollback`, truncate part of them and re-feed), leave (rows move);
    now and then all_logits. Returns the number of steps compared."""
    rng = np.random.default_rng(seed)
    prompt: dict[int, list[int]] = {}  # seq -> prompt tokens not yet fed
    cached: dict[int, int] = {}
    next_tok: dict[int, int] = {}
    fed: dict[int, list[int]] = {}
    next_id, compared, tokens_equal = 0, 0, 0
    for step in range(steps):
        if len(cached) < ragged.max_batch and (rng.random() < 0.45 or not cached):
            s = next_id
            next_id += 1
            both(ragged, per_call, "reserve", s)
            prompt[s] = [int(x) for x in rng.integers(3, vocab, int(rng.integers(2, 30)))]
            cached[s], fed[s] = 0, []
        if len(cached) > 1 and rng.random() < 0.12:
            s = int(rng.choice(list(cached)))
            both(ragged, per_call, "release", s)
            for d in (prompt, cached, next_tok, fed):
                d.pop(s, None)
        chunks = []
        for s in list(cached):
            if rng.random() < 0.15:
                continue  # idle this step
            if prompt[s]:
                k = min(len(prompt[s]), int(rng.integers(2, 10)))
                toks, prompt[s] = prompt[s][:k], prompt[s][k:]
            elif rollback and rng.random() < 0.3:  # a k-token verification chunk
                toks = [next_tok[s]] + [int(x) for x in rng.integers(3, vocab, int(rng.integers(1, 5)))]
            else:
                toks = [next_tok[s]]
            if cached[s] + len(toks) > ragged.max_seq_len:
                continue
            chunks.append(Chunk(s, tuple(toks), cached[s], all_logits=bool(rng.random() < 0.15)))
        if not chunks:
            continue
        order = rng.permutation(len(chunks))
        chunks = [chunks[i] for i in order]
        a = ragged.step(chunks)
        b = per_call.step(chunks)
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=f"step {step}")
        assert (a.argmax(-1) == b.argmax(-1)).all(), f"greedy tokens differ at step {step}"
        for c in chunks:
            if c.all_logits:
                np.testing.assert_allclose(ragged.chunk_logits[c.seq_id], per_call.chunk_logits[c.seq_id],
                                           atol=1e-4, rtol=0)
                assert ragged.chunk_logits[c.seq_id].shape[0] == len(c.token_ids)
        compared += 1
        for c, row in zip(chunks, a):
            s = c.seq_id
            cached[s] = c.start + len(c.token_ids)
            fed[s].extend(c.token_ids)
            next_tok[s] = int(row.argmax())
            if rollback and len(c.token_ids) > 1 and not prompt[s] and rng.random() < 0.7:
                keep = c.start + int(rng.integers(1, len(c.token_ids)))
                both(ragged, per_call, "truncate", s, keep)
                cached[s] = keep
                del fed[s][keep:]
                next_tok[s] = int(c.token_ids[keep - c.start])  # re-feed the first dropped token
    return compared


@pytest.mark.parametrize("seed", [0, 1])
def test_ragged_engine_equals_the_per_call_engine_dense(tiny_fp32_artifact, tmp_path_factory, seed):
    ragged, per_call, swaps = engines(ragged_artifact(tiny_fp32_artifact, tmp_path_factory))
    assert run_workload(ragged, per_call, seed, steps=45, rollback=True, vocab=ragged.info.vocab_size) >= 30
    assert swaps, "the workload should make the groups interleave at least once"


@pytest.mark.parametrize("seed", [0, 1])
def test_ragged_engine_equals_the_per_call_engine_hybrid(hybrid_artifact, tmp_path_factory, seed):
    ragged, per_call, swaps = engines(ragged_artifact(hybrid_artifact, tmp_path_factory))
    assert ragged.recurrent
    assert run_workload(ragged, per_call, seed, steps=45, rollback=False, vocab=ragged.info.vocab_size) >= 30
    assert swaps
    with pytest.raises(EngineError):
        ragged.truncate(next(iter(ragged.slots.rows)), 0)


def test_ragged_engine_near_max_seq_len_runs_each_chunk_alone(tiny_fp32_artifact, tmp_path_factory):
    # rows within a group's width of max_seq_len: no two-group layout fits, the engine runs chunks alone
    ragged, per_call, _ = engines(ragged_artifact(tiny_fp32_artifact, tmp_path_factory), max_seq_len=40)
    for s, n in enumerate((39, 37, 5)):
        both(ragged, per_call, "reserve", s)
        both(ragged, per_call, "step", [Chunk(s, tuple(range(3, 3 + n)), 0)])
    chunks = [Chunk(0, (4,), 39), Chunk(1, (5, 6), 37), Chunk(2, (7, 8, 9, 10), 5)]
    with pytest.raises(RaggedInfeasible):
        SlotTable.plan_ragged(ragged.slots, chunks, ragged.capacity, 40)
    np.testing.assert_allclose(ragged.step(chunks), per_call.step(chunks), atol=1e-4, rtol=0)


def test_graph_argument_still_selects_the_per_call_flavours(tiny_fp32_artifact, tmp_path_factory):
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

    for graph in ("decoder_cpu", "decoder"):
        e = OnnxRuntimeEngine(ragged_artifact(tiny_fp32_artifact, tmp_path_factory), max_batch=2, threads=1, graph=graph)
        assert not e.ragged and e.graph_name == graph
        e.reserve(0)
        assert e.step([Chunk(0, (1, 2, 3), 0)]).shape == (1, e.info.vocab_size)


def test_empty_group_on_the_dummy_row_where_zero_rows_do_not_run(tiny_fp32_artifact, tmp_path_factory, monkeypatch):
    """The fallback for runtimes without zero-row tensors: an empty group 1 bound to a one-row dummy state."""
    from granite_deploy.engines import onnxruntime_engine

    monkeypatch.setattr(onnxruntime_engine, "RAGGED_ZERO_ROWS", False)
    ragged, per_call, _ = engines(ragged_artifact(tiny_fp32_artifact, tmp_path_factory))
    assert ragged._dummy
    assert run_workload(ragged, per_call, 3, steps=12, rollback=True, vocab=ragged.info.vocab_size) >= 8


def test_ragged_engine_equals_the_per_call_engine_across_cache_resizes(tiny_fp32_artifact, tmp_path_factory,
                                                                        monkeypatch):
    """The ragged engine keeps its state bindings per row range between steps: a resize (new buffers)
    must drop them. Capacity blocks of 8 make the workload grow (and shrink) the cache many times."""
    from granite_deploy.engines import onnxruntime_engine

    monkeypatch.setattr(onnxruntime_engine, "CAPACITY_BLOCK", 8)
    ragged, per_call, _ = engines(ragged_artifact(tiny_fp32_artifact, tmp_path_factory))
    resizes = []
    inner = ragged._resize
    ragged._resize = lambda cap: (resizes.append(cap), inner(cap))
    assert run_workload(ragged, per_call, 5, steps=40, rollback=True, vocab=ragged.info.vocab_size) >= 25
    assert len(resizes) >= 3 and ragged._ragged_bindings  # bindings were kept between resizes, then rebuilt
