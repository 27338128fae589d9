"""Prompt-lookup speculative decoding: the n-gram drafter and the acceptance rule.

Plain functions and a config dataclass (numpy only): no engine, no threads. The
scheduler (serve/scheduler.py) uses them like this, for a decoding sequence whose
last sampled token is ``t``:

1. ``draft = propose(prompt + output, k, ngram_max, ngram_min)``: the last n tokens
   (n from ``ngram_max`` down to ``ngram_min``, the first n that matches wins) are
   looked up in the earlier context (prompt and generated tokens); the up to k
   tokens that followed the most recent earlier occurrence are the draft. This is
   vLLM's ``ngram`` proposer / llama.cpp's prompt lookup; no draft model.
2. The step runs ``Chunk([t, *draft], all_logits=True)``: row i of its logits is
   the target's next-token distribution after ``t, draft[:i]``.
3. Position by position, the sampler verifies ``draft[i]`` against row i
   (``TokenSampler.sample(..., draft=draft[i])``), with the prefix (repetition
   penalty context, min_new_tokens suppression, TGIS length penalty) including the
   drafts accepted so far:

   * greedy: the draft is accepted while it equals the argmax; at the first
     mismatch the argmax itself is the next token (the "correction"), after a fully
     accepted draft row k gives a bonus token. The output is token-identical to
     decoding one token per step.
   * sampling: :func:`accept_draft`. For a deterministic draft (prompt lookup
     proposes with probability 1) the standard rule of Leviathan et al. / Chen et
     al. reduces to: accept x with probability p(x) under the request's final
     processed distribution p, else draw from p with x removed, renormalised. The
     emitted token is then distributed exactly as p: P(x) = p(x), and for y != x
     P(y) = (1 - p(x)) * p(y) / (1 - p(x)) = p(y).

4. Every emitted token goes through the scheduler's usual path (EOS,
   max_new_tokens, stop sequences, logprobs, detokenisation, streaming) as if it
   came one per step; a stop inside the draft ends the request there; the engine
   forgets the rejected tail (``Engine.truncate``).

Not speculated: constrained (grammar) requests (the token mask of position i+1
depends on the grammar having consumed token i: masks would have to be computed
one after the other inside the step, for drafts that are mostly rejected by the
mask anyway), and engines with recurrent (Mamba) state (the state cannot be rolled
back to an earlier position: ``truncate`` refuses). The TGIS hooks replay exactly
(the length penalty is a function of the generated count; prompt logprobs concern
the prefill), so they are speculated.

Seeded sampling: with speculation a request's tokens are distributed exactly as
without, but they are not the same tokens for the same seed (the rule draws other
uniforms), and the draft length can depend on the step's token budget, i.e. on
what else is batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The acceptance rule is a sampling rule: it lives with the sampler, which applies it (no cycle).
from .sampling import accept_draft

__all__ = ["SpeculativeConfig", "accept_draft", "propose"]

METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Server-wide speculation settings (`serve --speculative ngram`).

    ``num_tokens`` (k, `--speculative-tokens`): most draft tokens per sequence per step.
    ``ngram_max`` / ``ngram_min`` (`--speculative-ngram`, `--speculative-ngram-min`): the
    lookup tries the last ngram_max tokens first, down to ngram_min.

    Provisional defaults, to be tuned by bench/bench_ragged.py: k = 4 (vLLM's examples use
    5; a verification chunk of k+1 tokens costs little more than one decode token only
    while the step is bound by reading the weights, and a longer draft is accepted less
    often), n = 3..1 (llama.cpp's lookup and vLLM's ngram proposer go down to 1: a
    1-token match still drafts copied spans, and a rejected draft only costs its tokens'
    compute in an otherwise weight-bound step).
    """

    method: str = "ngram"
    num_tokens: int = 4
    ngram_max: int = 3
    ngram_min: int = 1

    def validate(self) -> "SpeculativeConfig":
        if self.method not in METHODS:
            raise ValueError(f"--speculative: unknown method {self.method!r} (supported: {', '.join(METHODS)})")
        if not isinstance(self.num_tokens, int) or not 1 <= self.num_tokens <= 64:
            raise ValueError(f"--speculative-tokens: must be in [1, 64], got {self.num_tokens!r}")
        if not isinstance(self.ngram_min, int) or self.ngram_min < 1:
            raise ValueError(f"--speculative-ngram-min: must be >= 1, got {self.ngram_min!r}")
        if not isinstance(self.ngram_max, int) or self.ngram_max < self.ngram_min:
            raise ValueError(f"--speculative-ngram: must be >= --speculative-ngram-min ({self.ngram_min}), "
                             f"got {self.ngram_max!r}")
        return self


def propose(context, k: int, ngram_max: int = 3, ngram_min: int = 1) -> list[int]:
    """The prompt-lookup draft for the token after ``context`` (prompt + generated ids).

    For n = ngram_max down to ngram_min: find the most recent earlier occurrence of the last n
    tokens (one that is followed by at least one token, so not the suffix itself) and return the
    up to ``k`` tokens that followed it. The first n that matches wins (longer matches are
    better evidence); no match for any n: ``[]``. O(len(context) * n) vectorised per n.
    """
    if k <= 0:
        return []
    arr = np.asarray(context, dtype=np.int64).ravel()
    size = arr.size
    for n in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        if n <= 0:
            break
        tail = arr[size - n:]
        starts = size - n  # candidate starts i in [0, size - n): i + n <= size - 1, a follower exists
        hit = arr[:starts] == tail[0]
        for j in range(1, n):
            if not hit.any():
                break
            hit &= arr[j:starts + j] == tail[j]
        found = np.flatnonzero(hit)
        if found.size:
            i = int(found[-1]) + n
            return arr[i:i + k].tolist()
    return []


def draft_length(k: int, remaining: int) -> int:
    """Draft tokens worth verifying when at most ``remaining`` more tokens may be generated: the
    verification emits up to len(draft) + 1 tokens, so k capped at remaining - 1 (never < 0)."""
    return max(0, min(k, remaining - 1))
