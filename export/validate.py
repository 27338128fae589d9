"""Prove an exported graph computes what the PyTorch model computes.

The reference is transformers' own model run on the full token sequence
(no cache), one prompt at a time: the ground truth with nothing shared with
our graph. The graph runs the way an engine runs it: a batch of prompts of
different lengths prefilled together (right-padded), then decode steps that
read and write the fixed-capacity cache. Both sides see the same tokens (the
reference's greedy choices), so logits compare position by position, and
greedy agreement counts the steps where both pick the same next token.
"""

from __future__ import annotations

import numpy as np

from .io_spec import cache_names

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    # Return the n-th Fibonacci number, computed iteratively so that",
)
# Tolerances by export dtype: max |logit difference| and greedy agreement.
TOLERANCES = {"fp32": {"max_abs_diff": 1e-3, "min_greedy_agreement": 1.0}}


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


def run_graph_teacher_forced(session, arch, sequences: list[list[int]], prompt_lens: list[int]) -> list[np.ndarray]:
    """Prefill every prompt in one right-padded batch, then decode the rest one token per step.

    Returns, per sequence, logits at positions 0..len-2 (the positions that predict a next token).
    """
    batch = len(sequences)
    capacity = max(len(s) for s in sequences) + 1
    cache = {}
    for i in range(arch.num_layers):
        for name in cache_names(i)[:2]:
            cache[name] = np.zeros((batch, arch.num_kv_heads, capacity, arch.head_dim), np.float32)
    out_names = [o.name for o in session.get_outputs()]

    def step(ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
        results = dict(zip(out_names, session.run(None, {"input_ids": ids, "position_ids": pos, **cache})))
        for i in range(arch.num_layers):
            past_k, past_v, present_k, present_v = cache_names(i)
            cache[past_k], cache[past_v] = results[present_k], results[present_v]
        return results["logits"]

    pad = 0
    plen = max(prompt_lens)
    ids = np.full((batch, plen), pad, np.int64)
    for b, (s, n) in enumerate(zip(sequences, prompt_lens)):
        ids[b, :n] = s[:n]
    pos = np.tile(np.arange(plen, dtype=np.int64), (batch, 1))
    prefill = step(ids, pos)
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


def validate(model, onnx_path, arch, prompts: list[list[int]], decode_steps: int = 16, dtype: str = "fp32") -> dict:
    """Compare the graph against the PyTorch model; returns the record written to the manifest."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    sequences, ref_logits = [], []
    for p in prompts:
        tokens, logits = reference_greedy(model, p, decode_steps)
        sequences.append(tokens)
        ref_logits.append(logits[:-1])
    got = run_graph_teacher_forced(session, arch, sequences, [len(p) for p in prompts])
    max_diff, agree, total = 0.0, 0, 0
    for p, ref, out in zip(prompts, ref_logits, got):
        max_diff = max(max_diff, float(np.abs(ref - out).max()))
        gen = slice(len(p) - 1, None)  # positions that chose generated tokens
        agree += int((ref[gen].argmax(-1) == out[gen].argmax(-1)).sum())
        total += ref[gen].shape[0]
    tol = TOLERANCES[dtype]
    record = {
        "reference": "transformers PyTorch, fp32, full recompute per prompt",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "batch": len(prompts),
        "prompt_lengths": [len(p) for p in prompts],
        "decode_steps": decode_steps,
        "max_abs_logit_diff": max_diff,
        "greedy_agreement": agree / total,
        "tolerance": tol,
    }
    record["passed"] = max_diff <= tol["max_abs_diff"] and record["greedy_agreement"] >= tol["min_greedy_agreement"]
    return record
