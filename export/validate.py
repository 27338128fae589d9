"""Prove an exported graph computes what the PyTorch model computes.

The reference is transformers' own model run on the full token sequence
(no cache), one prompt at a time: the ground truth with nothing shared with
our graph. The graph runs the way an engine runs it: a batch of prompts of
different lengths prefilled together (right-padded), then decode steps that
read and write the fixed-capacity cache. Both sides see the same tokens (the
reference's greedy choices), so logits compare position by position, and
greedy agreement counts the steps where both pick the same next token.

Half-precision graphs (fp16, bf16) are compared with the same fp32 PyTorch
reference. The runtime is ONNX Runtime's CPU provider when it has kernels for
the graph (fp16: yes, though it runs MatMul/Gemm and a few element-wise ops
in float32 through inserted Casts, which the record lists), else the ONNX
reference evaluator (bf16: ONNX Runtime 1.32 has no bfloat16 CPU MatMul),
which is exact but slow and refused above `REFERENCE_EVALUATOR_MAX_PARAMS`.
The record always names the runtime that produced the numbers.
"""

from __future__ import annotations

import numpy as np

from .io_spec import INPUT_IDS, POSITION_IDS, state_records

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    # Return the n-th Fibonacci number, computed iteratively so that",
)
# Tolerances by export dtype: max |logit difference| and greedy agreement, vs the fp32 PyTorch model.
# fp16/bf16 chosen by measurement (2 prompts, 32 decode steps) on three tiny random models (3 layers h64,
# 4 layers h64, 3 layers h128; max |logit| 13-20, where the random weights amplify rounding ~3x per
# layer): fp16 max |diff| 0.071-0.098 on ONNX Runtime CPU and 0.060-0.157 on the reference evaluator,
# greedy agreement >= 98.4%; bf16 (reference evaluator) 0.52-1.52, greedy >= 93.8%. The limits give
# ~3x headroom on the difference; agreement may fall below 100% because a near-tie (top-2 gap 0.012 in
# these models) legitimately flips in half precision, while a broken graph agrees on almost nothing.
TOLERANCES = {
    "fp32": {"max_abs_diff": 1e-3, "min_greedy_agreement": 1.0},
    "fp16": {"max_abs_diff": 0.5, "min_greedy_agreement": 0.95},
    "bf16": {"max_abs_diff": 4.0, "min_greedy_agreement": 0.875},
}
MIN_HALF_DECODE_STEPS = 32
# The reference evaluator is pure numpy: fine for the tiny test models, hours for a real one.
REFERENCE_EVALUATOR_MAX_PARAMS = 50_000_000
CACHE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FP16_MAX = 65504.0
OVERFLOW_FRACTION = 0.5
CALIBRATION_PROMPTS = (
    "The capital of France is Paris, and the capital of Japan is Tokyo. Numbers: 1 2 3 100 1000.",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    '{"name": "get_current_weather", "arguments": {"city": "Boston", "unit": "celsius"}}',
    "Café naïve résumé — 東京 日本語 你好世界 한국어 🙂",
)


class ValidationUnavailable(RuntimeError):
    """No runtime on this machine can run the graph for validation (the message says why)."""


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a manifest dtype name; bfloat16 comes from ml_dtypes (a dependency of onnx)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def prompt_token_ids(model_dir, vocab_size: int, prompts=DEFAULT_PROMPTS) -> list[list[int]]:
    """Tokenize the validation prompts with the checkpoint's tokenizer (random ids if it has none)."""
    path = model_dir / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        ids = [tok.encode(p, add_special_tokens=False).ids for p in prompts]
        if all(ids) and max(max(x) for x in ids) < vocab_size:
            return ids
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in (5, 12)]


def reference_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation and logits for every position, by full recompute (no cache)."""
    import torch

    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens])).logits[0, -1]
            tokens.append(int(logits.argmax()))
        all_logits = model(torch.tensor([tokens])).logits[0].float().numpy()
    return tokens, all_logits


def run_graph_teacher_forced(session, arch, sequences: list[list[int]], prompt_lens: list[int],
                             cache_dtype: str = "float32", head_dim_major: bool = False) -> list[np.ndarray]:
    """Prefill every prompt, then decode the rest one token per step, all rows batched.

    KV-only models prefill in one right-padded batch (pad positions write cache
    slots that are masked, then overwritten). Recurrent (Mamba) state would absorb
    the padding, so hybrid models prefill row by row, as the engine does.
    Returns, per sequence, logits at positions 0..len-2 (the positions that predict a next token).
    """
    batch = len(sequences)
    capacity = max(len(s) for s in sequences) + 1
    records = state_records(arch, cache_dtype, head_dim_major)
    cache = {st.input: np.zeros((batch, *st.row_shape(capacity)),
                                   numpy_dtype(st.dtype)) for st in records}
    out_names = [o.name for o in session.get_outputs()]

    def step(ids: np.ndarray, pos: np.ndarray, rows=slice(None)) -> np.ndarray:
        feeds = {INPUT_IDS: ids, POSITION_IDS: pos, **{k: v[rows] for k, v in cache.items()}}
        results = dict(zip(out_names, session.run(None, feeds)))
        for st in records:
            cache[st.input][rows] = results[st.output]
        return np.asarray(results["logits"], np.float32)

    if arch.mamba:
        collected = []
        for b, (s, n) in enumerate(zip(sequences, prompt_lens)):
            logits = step(np.array([s[:n]], np.int64), np.arange(n, dtype=np.int64)[None], slice(b, b + 1))
            collected.append([logits[0]])
    else:
        plen = max(prompt_lens)
        ids = np.zeros((batch, plen), np.int64)
        for b, (s, n) in enumerate(zip(sequences, prompt_lens)):
            ids[b, :n] = s[:n]
        prefill = step(ids, np.tile(np.arange(plen, dtype=np.int64), (batch, 1)))
        collected = [[prefill[b, : prompt_lens[b]]] for b in range(batch)]
    decode_steps = max(len(s) - n for s, n in zip(sequences, prompt_lens)) - 1
    for t in range(decode_steps):
        ids = np.array([[s[min(n + t, len(s) - 1)]] for s, n in zip(sequences, prompt_lens)], np.int64)
        pos = np.array([[n + t] for n in prompt_lens], np.int64)
        logits = step(ids, pos)
        for b in range(batch):
            if prompt_lens[b] + t < len(sequences[b]) - 1:
                collected[b].append(logits[b])
    return [np.concatenate(c, axis=0) for c in collected]


def _count_params(arch) -> int:
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    per_layer = h * (arch.num_heads + 2 * arch.num_kv_heads) * d + arch.num_heads * d * h + 3 * h * i
    return arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2) + arch.num_layers * per_layer


def ort_float32_fallback_ops(onnx_path) -> list[str]:
    """Ops of the graph with a float16/bfloat16 input for which ONNX Runtime's CPU provider has no kernel
    of that type (it then runs them in float32 between inserted Casts), from ORT's kernel registry."""
    import onnx
    from onnxruntime.capi import _pybind_state as C

    model = onnx.load(str(onnx_path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    half = {onnx.TensorProto.FLOAT16: "tensor(float16)", onnx.TensorProto.BFLOAT16: "tensor(bfloat16)"}
    kernels: dict[str, list] = {}
    for k in C.get_all_opkernel_def():
        if k.provider == "CPUExecutionProvider" and k.domain in ("", "ai.onnx") and \
                k.version_range[0] <= opset <= k.version_range[1]:
            kernels.setdefault(k.op_name, []).append(k.type_constraints)
    upcast = set()
    for node in model.graph.node:
        if node.op_type == "Cast":
            continue
        for name in node.input:
            t = half.get(types.get(name))
            if t and not any(t in allowed for c in kernels.get(node.op_type, []) for allowed in c.values()):
                upcast.add(node.op_type)
    return sorted(upcast)


class _ReferenceSession:
    """`onnx.reference.ReferenceEvaluator` behind the two InferenceSession methods the runner uses."""

    def __init__(self, onnx_path):
        from onnx.reference import ReferenceEvaluator

        self._ev = ReferenceEvaluator(str(onnx_path))

    def get_outputs(self):
        from types import SimpleNamespace

        return [SimpleNamespace(name=n) for n in self._ev.output_names]

    def run(self, output_names, feeds):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # both branches of np.where
            return self._ev.run(output_names, feeds)


def open_runtime(onnx_path, arch, runtime: str = "auto"):
    """(session, record fields): ONNX Runtime CPU when it has kernels for the graph, else the reference evaluator.

    runtime: "auto", "onnxruntime" or "reference".
    """
    import onnx
    import onnxruntime as ort

    if runtime not in ("auto", "onnxruntime", "reference"):
        raise ValueError(f"runtime: {runtime!r} is not one of auto, onnxruntime, reference")
    why_not_ort = None
    if runtime in ("auto", "onnxruntime"):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # NOT_IMPLEMENTED: no kernel for a type
            if runtime == "onnxruntime":
                raise
            why_not_ort = str(exc).split(" : ")[-1].strip()
        else:
            fields = {"runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider"}
            upcast = ort_float32_fallback_ops(onnx_path)
            if upcast:
                fields["runtime_float32_ops"] = upcast
                fields["runtime_note"] = ("ONNX Runtime's CPU provider has no half-precision kernel for these ops "
                                          "and runs them in float32 between inserted Casts (weights are still "
                                          "rounded to the half type)")
            return session, fields
    n_params = _count_params(arch)
    if n_params > REFERENCE_EVALUATOR_MAX_PARAMS:
        raise ValidationUnavailable(
            f"ONNX Runtime's CPU provider cannot run this graph ({why_not_ort}); the ONNX reference evaluator "
            f"could, but at ~{n_params / 1e6:.0f}M parameters it would take hours (limit "
            f"{REFERENCE_EVALUATOR_MAX_PARAMS / 1e6:.0f}M)")
    fields = {"runtime": f"onnx {onnx.__version__} reference evaluator (onnx.reference.ReferenceEvaluator, numpy)"}
    if why_not_ort:
        fields["runtime_note"] = f"ONNX Runtime's CPU provider cannot run this graph: {why_not_ort}"
    return _ReferenceSession(onnx_path), fields


def reference_runs(model, prompts: list[list[int]], decode_steps: int) -> tuple[list, list]:
    """(token sequences, logits at the positions that predict a next token) of the PyTorch model."""
    sequences, ref_logits = [], []
    for p in prompts:
        tokens, logits = reference_greedy(model, p, decode_steps)
        sequences.append(tokens)
        ref_logits.append(logits[:-1])
    return sequences, ref_logits


def validate(model, onnx_path, arch, prompts: list[list[int]], decode_steps: int = 16, dtype: str = "fp32",
             runtime: str = "auto", head_dim_major: bool = False, reference: tuple | None = None) -> dict:
    """Compare the graph against the fp32 PyTorch model; returns the record written to the manifest.

    head_dim_major: the graph is the CPU flavour (its KV layout). reference: reuse `reference_runs`."""
    session, runtime_fields = open_runtime(onnx_path, arch, runtime)
    sequences, ref_logits = reference or reference_runs(model, prompts, decode_steps)
    got = run_graph_teacher_forced(session, arch, sequences, [len(p) for p in prompts], CACHE_DTYPES[dtype],
                                   head_dim_major)
    max_diff, agree, total = 0.0, 0, 0
    for p, ref, out in zip(prompts, ref_logits, got):
        max_diff = max(max_diff, float(np.abs(ref - out).max()))
        gen = slice(len(p) - 1, None)  # positions that chose generated tokens
        agree += int((ref[gen].argmax(-1) == out[gen].argmax(-1)).sum())
        total += ref[gen].shape[0]
    tol = TOLERANCES[dtype]
    record = {
        "reference": "transformers PyTorch, fp32, full recompute per prompt",
        **runtime_fields,
        "graph_precision": dtype,
        "batch": len(prompts),
        "prompt_lengths": [len(p) for p in prompts],
        "decode_steps": decode_steps,
        "max_abs_logit_diff": max_diff,
        "greedy_agreement": agree / total,
        "tolerance": tol,
    }
    passed = max_diff <= tol["max_abs_diff"] and record["greedy_agreement"] >= tol["min_greedy_agreement"]
    record["passed"] = bool(passed and np.isfinite(max_diff))
    return record


def activation_report(model, prompts: list[list[int]]) -> dict:
    """Largest |activation| per layer on calibration prompts, from the fp32 PyTorch model (forward hooks).

    residual: the residual stream after the attention and after the MLP branch; mlp_intermediate: the
    gate/up projection output and the SwiGLU product; branch_output: o_proj and down-projection outputs
    (before the residual multiplier). A layer is flagged when any of them exceeds OVERFLOW_FRACTION x the
    float16 maximum.
    """
    import torch

    layers = model.model.layers
    stats = [{"residual": 0.0, "mlp_intermediate": 0.0, "branch_output": 0.0} for _ in layers]
    hooks = []

    def record(i, key):
        def update(t):
            if torch.is_tensor(t):
                stats[i][key] = max(stats[i][key], float(t.detach().abs().max()))
        return update

    for i, layer in enumerate(layers):
        res, mlp, br = record(i, "residual"), record(i, "mlp_intermediate"), record(i, "branch_output")
        # Granite 4 names its MLP shared_mlp.{input,output}_linear; Granite 3.x mlp.{gate,up,down}_proj.
        block = getattr(layer, "shared_mlp", None) or layer.mlp
        ins = [getattr(block, n) for n in ("input_linear", "gate_proj", "up_proj") if hasattr(block, n)]
        down = getattr(block, "output_linear", None) or block.down_proj
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, f=res: f(a[0])))
        hooks.append(layer.register_forward_hook(
            lambda m, a, out, f=res: f(out[0] if isinstance(out, tuple) else out)))
        for lin in ins:
            hooks.append(lin.register_forward_hook(lambda m, a, out, f=mlp: f(out)))
        hooks.append(down.register_forward_pre_hook(lambda m, a, f=mlp: f(a[0])))
        hooks.append(down.register_forward_hook(lambda m, a, out, f=br: f(out)))
        mixer_out = layer.self_attn.o_proj if getattr(layer, "self_attn", None) is not None else layer.mamba.out_proj
        hooks.append(mixer_out.register_forward_hook(lambda m, a, out, f=br: f(out)))
    try:
        with torch.no_grad():
            for p in prompts:
                model(torch.tensor([p]))
    finally:
        for h in hooks:
            h.remove()
    threshold = OVERFLOW_FRACTION * FP16_MAX
    rows = []
    for i, st in enumerate(stats):
        over = [k for k, v in st.items() if v > threshold]
        rows.append({"layer": i, **{f"{k}_max": round(v, 4) for k, v in st.items()}, "overflow_risk": bool(over),
                     **({"over_threshold": over} if over else {})})
    return {
        "measured_on": "transformers PyTorch, fp32, forward hooks",
        "prompts": len(prompts),
        "tokens": sum(len(p) for p in prompts),
        "fp16_max": FP16_MAX,
        "threshold": threshold,
        "note": ("the residual stream and RMSNorm stay float32 in half-precision graphs; mlp_intermediate and "
                 "branch_output are computed in the half type"),
        "layers": rows,
        "layers_at_risk": [r["layer"] for r in rows if r["overflow_risk"]],
    }
