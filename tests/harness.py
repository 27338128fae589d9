"""Shared test harness: run requests concurrently through a real scheduler."""

from __future__ import annotations

import threading

from granite_deploy.serve.generate import stream
from granite_deploy.serve.scheduler import Scheduler


def run_concurrently(engine, tokenizer, requests, prefill_chunk=256, prefix_cache=None):
    """One thread per request over one scheduler; per request (token ids, text, final event)."""
    scheduler = Scheduler(engine, tokenizer, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache).start()
    results = [None] * len(requests)

    def go(i):
        tokens, text = [], ""
        for ev in stream(scheduler, requests[i]):
            if ev.kind == "token":
                tokens.append(ev.token.token_id)
                text += ev.text
            elif ev.kind == "final":
                results[i] = (tokens, text, ev)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    scheduler.shutdown()
    return results
