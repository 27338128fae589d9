"""The accuracy gate every quantized artifact passes before it is written.

Both graphs run in ONNX Runtime's CPU provider; the fp32 source artifact is
the reference (it was itself validated against PyTorch at export).

(a) Greedy agreement: the fp32 graph decodes `decode_steps` (64) tokens
    greedily from each of a few fixed prompts (prefilled together, right-padded,
    then one token per step through the in-place cache, as an engine runs it).
    The quantized graph is then run teacher-forced on exactly those tokens
    (`validate.run_graph_teacher_forced`), and agreement is the fraction of
    generated positions where its argmax equals the fp32 choice. Teacher
    forcing keeps one early flip from derailing every later position.
(b) Perplexity: token negative log-likelihood of held-out text (windows of
    `window` tokens, each prefilled from position 0), for both graphs on the
    same tokens; the gate bounds exp(mean NLL) of the quantized graph relative
    to the fp32 one.

Default thresholds (`DEFAULT_THRESHOLDS`) are for trained weights: INT8 may
raise perplexity by 2% and must agree on >= 90% of greedy steps, INT4 8% and
75%. They mean nothing for a random-weight model (its "perplexity" is that of
noise and its logits have no learned margins), so tests on tiny random models
pass their own thresholds; `bench/bench_quant_accuracy.py` shows the method on
a small trained model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import GraniteDeployError
from .io_spec import INPUT_IDS, POSITION_IDS, state_records

DEFAULT_THRESHOLDS = {
    "int8": {"max_ppl_increase": 0.02, "min_greedy_agreement": 0.90},
    "int8-qdq": {"max_ppl_increase": 0.02, "min_greedy_agreement": 0.90},
    "int8-dynamic": {"max_ppl_increase": 0.02, "min_greedy_agreement": 0.90},
    "int4": {"max_ppl_increase": 0.08, "min_greedy_agreement": 0.75},
}
DECODE_STEPS = 64
WINDOW = 256
MAX_TOKENS = 4096
MIN_TOKENS = 32
ACCURACY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    # Return the n-th Fibonacci number, computed iteratively so that",
    "Here is a short summary of how a hash table works:",
    "Question: What causes the seasons on Earth?\nAnswer:",
)
# Held-out text used when no --calibration file is given: plain prose and code,
# written for this project (not taken from any training set).
SAMPLE_TEXT = """\
A lighthouse keeper's log from a small island records the weather twice a day. In the morning the keeper notes
the wind, the height of the swell and whether the ferry is expected to run; in the evening, the temperature, any
ships that passed, and the state of the lamp. Over forty years the entries grow shorter: the lamp was automated,
the ferry timetable changed, and fewer ships came close to the rocks. Reading the log from start to finish, one
sees the slow change of a place that looked, on any single day, exactly as it had the day before.

Most programs spend their time waiting. A web server waits for requests, a database waits for the disk, and a
user interface waits for the next key press. Writing a program that waits well means deciding what to do while
nothing happens: keep a small pool of workers ready, put long jobs on a queue, and never block the thread that
draws the screen. Measure before changing anything, because the slow part is rarely the part you expect.

def moving_average(values, window):
    \"\"\"Return the averages of each run of `window` consecutive values.\"\"\"
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages

Bread dough needs time more than effort. Mix flour, water, salt and a little yeast, then leave it covered for
several hours; the gluten develops on its own. A few folds during that time give it strength, and a cool night
in the refrigerator adds flavour. Bake it hot, with steam for the first twenty minutes, and let it cool before
cutting, since the crumb is still setting as the loaf cools.

class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count=1):
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count=1):
        if self.items.get(name, 0) < count:
            raise KeyError(f"not enough {name} in stock")
        self.items[name] -= count

The committee met on Tuesday to review the budget for the coming year. Three proposals were discussed: repairing
the bridge on the north road, extending the library's opening hours, and replacing the heating in the school.
After a long debate the members agreed to fund the bridge first, because the inspection report described cracks
in two of its supports, and to revisit the other proposals in the spring when the final figures are known.
"""


class GateError(GraniteDeployError, ValueError):
    """The gate cannot run as asked (bad thresholds, text too short): bad input, exit 2."""

    exit_code = 2


def thresholds_for(method: str, overrides: dict | None = None) -> dict:
    """The gate's thresholds for a method, with the caller's overrides; says where they came from."""
    gate = dict(DEFAULT_THRESHOLDS[method])
    source = "defaults for a trained model"
    if overrides:
        unknown = set(overrides) - set(gate)
        if unknown:
            raise GateError(f"unknown gate threshold(s) {sorted(unknown)}; known: {sorted(gate)}")
        for key, value in overrides.items():
            if value is not None:
                if not np.isfinite(value) or value < 0:
                    raise GateError(f"gate threshold {key}={value} must be a finite number >= 0")
                gate[key] = float(value)
                source = "given by the caller"
    gate["source"] = source
    return gate


def open_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _arch(arch):
    """The architecture as the graph runners want it (GraniteArch; manifests store it as a dict)."""
    if not isinstance(arch, dict):
        return arch
    from .checkpoint import GraniteArch

    try:
        return GraniteArch.from_dict(arch)
    except TypeError:  # a manifest from another version: fall back to attribute access
        return SimpleNamespace(**{"layer_types": (), "mamba": None, **arch})


class _State:
    """Zeroed per-sequence state (KV cache, Mamba conv/ssm) for `batch` rows, fed and updated per step."""

    def __init__(self, session, arch, batch: int, capacity: int):
        self.records = state_records(arch)
        self.tensors = {st.input: np.zeros((batch, *st.row_shape(capacity)),
                                              np.dtype(st.dtype)) for st in self.records}
        self.session = session
        self.out_names = [o.name for o in session.get_outputs()]

    def step(self, ids: np.ndarray, pos: np.ndarray, rows=slice(None)) -> np.ndarray:
        feeds = {INPUT_IDS: ids, POSITION_IDS: pos, **{k: v[rows] for k, v in self.tensors.items()}}
        results = dict(zip(self.out_names, self.session.run(None, feeds)))
        for st in self.records:
            self.tensors[st.input][rows] = results[st.output]
        return np.asarray(results["logits"], np.float32)


def greedy_decode(session, arch, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy continuation of each prompt: prefill (one right-padded batch; row by row for hybrid models,
    whose recurrent state would absorb padding), then all rows decode one token per step.

    Returns the sequences (prompt + `steps` tokens) and, per sequence, the logits at positions
    0..len-2, the same layout as `validate.run_graph_teacher_forced`.
    """
    arch = _arch(arch)
    batch, lens = len(prompts), [len(p) for p in prompts]
    state = _State(session, arch, batch, max(lens) + steps + 1)
    if getattr(arch, "mamba", None):
        collected = [[state.step(np.array([p], np.int64), np.arange(len(p), dtype=np.int64)[None],
                                 slice(b, b + 1))[0]] for b, p in enumerate(prompts)]
    else:
        ids = np.zeros((batch, max(lens)), np.int64)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
        prefill = state.step(ids, np.tile(np.arange(max(lens), dtype=np.int64), (batch, 1)))
        collected = [[prefill[b, : lens[b]]] for b in range(batch)]
    seqs = [list(p) for p in prompts]
    last = np.stack([c[0][-1] for c in collected])
    for t in range(steps):
        nxt = last.argmax(-1)
        for b in range(batch):
            seqs[b].append(int(nxt[b]))
        if t == steps - 1:
            break
        last = state.step(nxt.astype(np.int64)[:, None], np.array([[n + t] for n in lens], np.int64))[:, -1]
        for b in range(batch):
            collected[b].append(last[b][None])
    return seqs, [np.concatenate(c, axis=0) for c in collected]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def token_nll(session, arch, windows: list[list[int]], batch: int = 2) -> np.ndarray:
    """Negative log-likelihood of every token after the first of each window (teacher-forced prefill
    from position 0; windows of equal length share a batch, so nothing is padded)."""
    arch = _arch(arch)
    out = []
    groups: dict[int, list[list[int]]] = {}
    for w in windows:
        groups.setdefault(len(w), []).append(w)
    for length, group in sorted(groups.items()):
        for i in range(0, len(group), batch):
            chunk = np.array(group[i: i + batch], np.int64)
            pos = np.tile(np.arange(length, dtype=np.int64), (len(chunk), 1))
            logits = _State(session, arch, len(chunk), length).step(chunk, pos)
            logp = _log_softmax(logits[:, :-1])
            out.append(-np.take_along_axis(logp, chunk[:, 1:, None], axis=-1)[..., 0].ravel())
    return np.concatenate(out)


def _tokenizer(artifact_dir: Path):
    path = Path(artifact_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def text_windows(artifact_dir: Path, vocab_size: int, text: str, window: int = WINDOW,
                 max_tokens: int = MAX_TOKENS) -> tuple[list[list[int]], str]:
    """Split the text's tokens into windows of `window` tokens (at most `max_tokens` in all)."""
    tok = _tokenizer(artifact_dir)
    if tok is None:
        rng = np.random.default_rng(0)
        ids, how = rng.integers(0, vocab_size, size=min(max_tokens, 1024)).tolist(), "random ids (no tokenizer.json)"
    else:
        ids, how = tok.encode(text, add_special_tokens=False).ids[:max_tokens], "tokenizer.json"
    if len(ids) < MIN_TOKENS:
        raise GateError(f"held-out text has {len(ids)} tokens; the perplexity check needs at least {MIN_TOKENS}")
    windows = [ids[i: i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 2], how


def evaluate(
    reference_graph: Path,
    candidate_graph: Path,
    arch,
    artifact_dir: Path,
    thresholds: dict,
    text_path: Path | None = None,
    decode_steps: int = DECODE_STEPS,
    window: int = WINDOW,
    max_tokens: int = MAX_TOKENS,
    prompts=ACCURACY_PROMPTS,
    threads: int | None = None,
) -> dict:
    """Compare the candidate graph against the reference graph; returns the manifest's accuracy record."""
    import onnxruntime as ort

    from .validate import prompt_token_ids, run_graph_teacher_forced

    arch = _arch(arch)
    ref = open_session(reference_graph, threads)
    cand = open_session(candidate_graph, threads)

    # (a) greedy agreement, teacher-forced on the reference's greedy tokens
    prompt_ids = prompt_token_ids(Path(artifact_dir), arch.vocab_size, prompts)
    sequences, ref_logits = greedy_decode(ref, arch, prompt_ids, decode_steps)
    got = run_graph_teacher_forced(cand, arch, sequences, [len(p) for p in prompt_ids])
    agree = total = 0
    max_diff = kl_sum = 0.0
    for p, r, c in zip(prompt_ids, ref_logits, got):
        gen = slice(len(p) - 1, None)
        agree += int((r[gen].argmax(-1) == c[gen].argmax(-1)).sum())
        total += r[gen].shape[0]
        max_diff = max(max_diff, float(np.abs(r - c).max()))
        lr, lc = _log_softmax(r[gen]), _log_softmax(c[gen])
        kl_sum += float((np.exp(lr) * (lr - lc)).sum())
    greedy = {
        "prompts": len(prompt_ids),
        "prompt_lengths": [len(p) for p in prompt_ids],
        "decode_steps": decode_steps,
        "positions": total,
        "agreement": agree / total,
        "max_abs_logit_diff": max_diff,
        "mean_kl_nats": kl_sum / total,
    }

    # (b) perplexity on held-out text, relative to the reference
    if text_path is not None:
        text = Path(text_path).read_text(encoding="utf-8")
        text_source = str(text_path)
    else:
        text, text_source = SAMPLE_TEXT, "built-in sample text (export/accuracy.py SAMPLE_TEXT)"
    windows, how = text_windows(Path(artifact_dir), arch.vocab_size, text, window, max_tokens)
    nll_ref = token_nll(ref, arch, windows)
    nll_cand = token_nll(cand, arch, windows)
    ppl_ref, ppl_cand = float(np.exp(nll_ref.mean())), float(np.exp(nll_cand.mean()))
    perplexity = {
        "text": {"source": text_source, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                 "chars": len(text), "tokenized_with": how},
        "window": window,
        "tokens": int(nll_ref.size),
        "reference": ppl_ref,
        "quantized": ppl_cand,
        "relative_increase": ppl_cand / ppl_ref - 1.0,
    }

    failures = []
    if greedy["agreement"] < thresholds["min_greedy_agreement"]:
        failures.append(f"greedy agreement {greedy['agreement']:.1%} < {thresholds['min_greedy_agreement']:.1%}")
    if perplexity["relative_increase"] > thresholds["max_ppl_increase"]:
        failures.append(f"perplexity +{perplexity['relative_increase']:.2%} (fp32 {ppl_ref:.3f} -> {ppl_cand:.3f}) "
                        f"> +{thresholds['max_ppl_increase']:.2%}")
    return {
        "reference": "fp32 source artifact graph in ONNX Runtime (validated against PyTorch at export)",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "thresholds": thresholds,
        "greedy": greedy,
        "perplexity": perplexity,
        "passed": not failures,
        "failures": failures,
    }
