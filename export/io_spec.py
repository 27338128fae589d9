"""The exported graph's inputs, outputs and dynamic axes, declared in one place.

Names follow Optimum's decoder convention. The KV cache is a fixed-capacity
buffer written in place rather than Optimum's concatenated past/present:

- `past_key_values.{i}.key|value` is the whole cache buffer of layer i,
  [batch, kv_heads, cache_capacity, head_dim]; `cache_capacity` is chosen by
  the engine and must be >= the largest position written plus one.
- The new keys/values of the step are written (ONNX `TensorScatter`, opset 24)
  at positions `position_ids[b, 0] ...` of row b, and `present.{i}.*` is the
  updated buffer, the same shape as the past. An engine that binds past and
  present to one buffer gets the update in place: no per-step cache copy.
- Query token s of row b attends to cache positions 0..position_ids[b, s].
  A row's cache slots at positions above its length may hold anything (they
  are masked out), so rows of different lengths share one batch, padded on
  the right, with no attention mask input.
"""

from __future__ import annotations

from ..manifest import CACHE_CAPACITY, RAGGED_GROUPS, StateSpec, TensorRecord, ragged_state_name
from .checkpoint import GraniteArch

# Symbolic dimension names (also written into the manifest).
BATCH = "batch"
SEQUENCE = "sequence"
# The fixed graph inputs and output every decoder graph has (state tensors come from state_records).
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
NUM_LOGITS_TO_KEEP = "num_logits_to_keep"
LOGITS = "logits"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."

CACHE_LAYOUT = {
    "kind": "fixed_capacity_in_place",
    "tensor_layout": [BATCH, "kv_heads", CACHE_CAPACITY, "head_dim"],
    "write_position": "position_ids[:, 0]",
    "write_op": "TensorScatter (opset 24, mode=linear, axis=-2)",
    "attention": "query at position p attends to cache positions 0..p",
    "in_place": "bind past_key_values.{i}.* and present.{i}.* to the same buffer",
}


# The ONNX Runtime CPU flavour (export/cpu_graph.py) stores K and V head-dim-major, so
# that both attention products run as bandwidth-bound matrix-vector kernels at decode.
CPU_CACHE_LAYOUT = {
    **CACHE_LAYOUT,
    "tensor_layout": [BATCH, "kv_heads", "head_dim", CACHE_CAPACITY],
    "write_op": "TensorScatter (opset 24, mode=linear, axis=-1)",
}

# The ragged flavour (export/ragged_graph.py) keeps the portable layout, which ONNX Runtime's
# GroupQueryAttention reads and writes in place.
RAGGED_CACHE_LAYOUT = {
    **CACHE_LAYOUT,
    "write_op": "GroupQueryAttention (com.microsoft; past and present bound to one buffer), or TensorScatter "
                "(axis 2) for a group of several multi-token rows",
    "attention": "query at position p attends to cache positions 0..p (GroupQueryAttention: each row up to "
                 "its chunk's end only)",
}


# A graph input/output as the manifest records it (name, numpy dtype name, shape: ints for fixed
# dims, strings for symbolic ones, optional default).
TensorSpec = TensorRecord


def state_names(layer: int, part: str) -> tuple[str, str]:
    """(graph input, graph output) names of one state tensor; part: key, value, conv or ssm."""
    return f"{PAST_PREFIX}{layer}.{part}", f"{PRESENT_PREFIX}{layer}.{part}"


def cache_names(layer: int) -> tuple[str, str, str, str]:
    """(past key, past value, present key, present value) names of one layer."""
    (past_k, present_k), (past_v, present_v) = state_names(layer, "key"), state_names(layer, "value")
    return past_k, past_v, present_k, present_v


def is_kv_name(name: str) -> bool:
    """Whether a graph input/output name is an attention KV cache tensor."""
    return name.startswith((PAST_PREFIX, PRESENT_PREFIX)) and name.endswith((".key", ".value"))


def state_records(arch: GraniteArch, cache_dtype: str = "float32",
                  head_dim_major: bool = False) -> tuple[StateSpec, ...]:
    """Every per-sequence state tensor, for the manifest's `state` record (what engines allocate).

    kv: attention K/V, written in place by TensorScatter. conv: the Mamba2 conv
    window (the graph reads the whole input before writing it, so in place is
    safe). ssm: the Mamba2 state, read by two branches, one of which also
    writes it: engines give it a separate output buffer. Mamba states stay
    float32 at every export precision. head_dim_major: the CPU flavour's KV layout.
    """
    records = []
    for i, kind in enumerate(arch.layer_types or ("attention",) * arch.num_layers):
        if kind == "attention":
            shape = ((arch.num_kv_heads, arch.head_dim, CACHE_CAPACITY) if head_dim_major
                     else (arch.num_kv_heads, CACHE_CAPACITY, arch.head_dim))
            for part in ("key", "value"):
                records.append(StateSpec(*state_names(i, part), "kv", i, shape, cache_dtype, True))
        else:
            m = arch.mamba
            records.append(StateSpec(*state_names(i, "conv"), "conv", i, (m["conv_dim"], m["d_conv"]), "float32",
                                     True))
            records.append(StateSpec(*state_names(i, "ssm"), "ssm", i, (m["heads"], m["head_dim"], m["d_state"]),
                                     "float32", False))
    return tuple(records)


def graph_io(arch: GraniteArch, cache_dtype: str = "float32",
             head_dim_major: bool = False) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [
        TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)),
        TensorSpec(POSITION_IDS, "int64", (BATCH, SEQUENCE)),
        # Optional: logits only for the last k positions (0 = all). Engines pass 1
        # when prefilling one sequence, which skips the vocabulary projection of
        # every prompt token but the last.
        TensorSpec(NUM_LOGITS_TO_KEEP, "int64", (), default=0),
    ]
    outputs = [TensorSpec(LOGITS, "float32", (BATCH, "kept_positions", arch.vocab_size))]
    for st in state_records(arch, cache_dtype, head_dim_major):
        shape = (BATCH, *st.shape)
        inputs.append(TensorSpec(st.input, st.dtype, shape))
        outputs.append(TensorSpec(st.output, st.dtype, shape))
    return inputs, outputs


# The ragged-step flavour (export/ragged_graph.py, docs/ragged-step.md): one call per scheduler step.
TOKENS = "tokens"
LOGITS_INDEX = "logits_index"
UNPAD_INDEX = "unpad_index"
RAGGED_GROUP_INPUTS = ("token_index", "position_ids", "lengths")


def ragged_group_input(group: int, what: str) -> str:
    """group{g}.token_index | group{g}.position_ids | group{g}.lengths."""
    assert what in RAGGED_GROUP_INPUTS, what
    return f"group{group}.{what}"


def ragged_graph_io(arch: GraniteArch) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """decoder_ragged's inputs and outputs: flat tokens, the index inputs, both groups' state."""
    inputs = [
        TensorSpec(INPUT_IDS, "int64", (1, TOKENS)),
        TensorSpec(POSITION_IDS, "int64", (1, TOKENS)),
        TensorSpec(LOGITS_INDEX, "int64", (LOGITS,)),
        TensorSpec(UNPAD_INDEX, "int64", (TOKENS,)),
    ]
    for g in range(RAGGED_GROUPS):
        rows, width = f"group{g}.rows", f"group{g}.width"
        inputs += [TensorSpec(ragged_group_input(g, "token_index"), "int64", (rows, width)),
                   TensorSpec(ragged_group_input(g, "position_ids"), "int64", (rows, width)),
                   TensorSpec(ragged_group_input(g, "lengths"), "int64", (rows,))]
    outputs = [TensorSpec(LOGITS, "float32", (1, LOGITS, arch.vocab_size))]
    for g in range(RAGGED_GROUPS):
        for st in state_records(arch, "float32"):
            shape = (f"group{g}.rows", *st.shape)
            inputs.append(TensorSpec(ragged_state_name(st.input, g), st.dtype, shape))
            outputs.append(TensorSpec(ragged_state_name(st.output, g), st.dtype, shape))
    return inputs, outputs
