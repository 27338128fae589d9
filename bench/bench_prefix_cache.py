"""Prefix caching: time to first token of each turn of a 4-turn tool chat, cache on vs off, one run.

The conversation is rendered with the real Granite 4.0 chat template
(../shared/reference/granite-4.0-chat-template.jinja) with 3 tools (a ~600-token
system preamble) and ~40-token user turns; each turn's prompt is the whole
conversation so far (earlier assistant replies included, as chat clients send it).

Token ids: the full-size checkpoints have random weights and no real tokenizer here, so
the rendered text is split with the GPT-2/cl100k-style pre-tokenizer regex (about what the
real Granite BPE makes of English and JSON) and each piece gets a fixed id; the template's
special tokens keep their real ids. Speed depends only on how many tokens there are and
which are shared, not on their values.

Per model (full-size architecture, random weights, fp32, ONNX Runtime CPU, 2 threads):
one engine; per turn the same prompt goes through a scheduler without a prefix cache (off)
and one with it (on, warm from the earlier turns), 1 generated token each (TTFT). "new
only" is the time to prefill only the tokens the cache did not hold, measured on the
engine directly (the prefix prefilled untimed first): the target is on <= 1.3 x new-only,
and off / on >= 5 from turn 2. For the hybrid model also: the cost of pausing the prefill
at every N-token snapshot point, and the bytes each snapshot holds (how N was chosen).

    flock /tmp/granite-bench.lock .venv/bin/python bench/bench_prefix_cache.py [--models granite-4.0-1b,granite-4.0-h-1b]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # granite_deploy without install

from common import REPO, artifact_for, machine, random_checkpoint  # noqa: E402

TEMPLATE = REPO.parent / "shared" / "reference" / "granite-4.0-chat-template.jinja"
SPECIAL = {"<|end_of_text|>": 100257, "<|start_of_role|>": 100264, "<|end_of_role|>": 100265,
           "<tool_call>": 100270, "</tool_call>": 100271, "<tool_response>": 100272, "</tool_response>": 100273,
           "<tools>": 100280, "</tools>": 100281}
PIECES = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_current_weather",
        "description": "Get the current weather conditions for a city, including temperature, humidity, wind "
                       "speed and a short text summary of the sky.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city name, for example Boston or San Francisco"},
            "country": {"type": "string", "description": "ISO 3166 country code of the city, e.g. US or FR"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search_flights",
        "description": "Search for available flights between two airports on a given date. Returns flights "
                       "with airline, times, stops and price.",
        "parameters": {"type": "object", "properties": {
            "origin": {"type": "string", "description": "IATA code of the departure airport, e.g. BOS"},
            "destination": {"type": "string", "description": "IATA code of the arrival airport, e.g. SFO"},
            "date": {"type": "string", "description": "Departure date in the format YYYY-MM-DD"},
            "passengers": {"type": "integer", "description": "Number of adult passengers, between 1 and 9"},
            "cabin": {"type": "string", "enum": ["economy", "premium", "business", "first"],
                      "description": "Cabin class to search"}},
            "required": ["origin", "destination", "date"]}}},
    {"type": "function", "function": {
        "name": "book_restaurant",
        "description": "Book a table at a restaurant for a number of people at a given date and time. Returns a "
                       "confirmation code, or the nearest available times when the requested slot is taken.",
        "parameters": {"type": "object", "properties": {
            "restaurant": {"type": "string", "description": "Name of the restaurant as the user gave it"},
            "city": {"type": "string", "description": "City the restaurant is in"},
            "date": {"type": "string", "description": "Date of the reservation, YYYY-MM-DD"},
            "time": {"type": "string", "description": "Time of the reservation, 24-hour HH:MM"},
            "people": {"type": "integer", "description": "Number of guests including the user"},
            "notes": {"type": "string", "description": "Dietary needs"}},
            "required": ["restaurant", "city", "date", "time", "people"]}}},
]
USER = [
    "I am planning a trip from Boston to San Francisco next Friday with my partner. Can you check what the weather "
    "will be like there this week and whether we should pack warm jackets?",
    "Thanks. Please look for flights from Boston Logan to SFO on 2026-12-11 for two adults in economy, ideally "
    "nonstop and leaving in the morning so we arrive before dinner.",
    "The second option looks good. Now find us a table for two at a nice seafood restaurant near Fisherman's Wharf "
    "on Friday evening around eight, and mention that one of us is vegetarian.",
    "Perfect. Finally, summarise the whole plan for me in a few short bullet points with the times, the flight "
    "number and the restaurant confirmation so I can forward it to my partner.",
]
ASSISTANT = [
    "<tool_call>\n{\"name\": \"get_current_weather\", \"arguments\": {\"city\": \"San Francisco\", \"country\": "
    "\"US\", \"unit\": \"celsius\"}}\n</tool_call>",
    "<tool_call>\n{\"name\": \"search_flights\", \"arguments\": {\"origin\": \"BOS\", \"destination\": \"SFO\", "
    "\"date\": \"2026-12-11\", \"passengers\": 2, \"cabin\": \"economy\"}}\n</tool_call>",
    "<tool_call>\n{\"name\": \"book_restaurant\", \"arguments\": {\"restaurant\": \"Scoma's\", \"city\": \"San "
    "Francisco\", \"date\": \"2026-12-11\", \"time\": \"20:00\", \"people\": 2, \"notes\": \"one vegetarian\"}}\n"
    "</tool_call>",
]


def ids_of(text: str) -> list[int]:
    out = []
    for part in re.split("(" + "|".join(re.escape(s) for s in SPECIAL) + ")", text):
        if part in SPECIAL:
            out.append(SPECIAL[part])
        elif part:
            out.extend(zlib.crc32(p.encode()) % 100000 for p in PIECES.findall(part))
    return out


def turn_prompts() -> list[list[int]]:
    from granite_deploy.serve.chat_template import render_chat_template

    template = TEMPLATE.read_text()
    messages, prompts = [], []
    for k, user in enumerate(USER):
        messages.append({"role": "user", "content": user})
        text = render_chat_template(template, messages, tools=TOOLS, add_generation_prompt=True,
                                    special_tokens={"eos_token": "<|end_of_text|>", "bos_token": "<|end_of_text|>"})
        prompts.append(ids_of(text))
        if k < len(ASSISTANT):
            messages.append({"role": "assistant", "content": ASSISTANT[k]})
    return prompts


def ttft(scheduler, prompt) -> tuple[float, int]:
    from granite_deploy.serve.generate import stream
    from granite_deploy.serve.scheduler import Request
    from granite_deploy.serve.stopping import StoppingParams

    t = time.perf_counter()
    first, final = None, None
    for ev in stream(scheduler, Request(tuple(prompt), stopping=StoppingParams(max_new_tokens=1))):
        if ev.kind == "token" and first is None:
            first = time.perf_counter() - t
        final = ev
    return first, final.cached_prompt_tokens


def new_only(engine, cache, prompt, seq_id: int) -> tuple[float, int]:
    """Seconds to prefill only what `cache` does not hold of `prompt`, on the bare engine: the cached
    prefix is restored untimed first (the same state a prefill of it would leave)."""
    from granite_deploy.engines import Chunk

    hit = cache.lookup(prompt)
    cached = hit.length if hit is not None else 0
    engine.reserve(seq_id)
    try:
        if hit is not None:
            engine.restore(seq_id, hit.length, list(hit.kv), hit.recurrent)
        t = time.perf_counter()
        for s in range(cached, len(prompt), 256):
            engine.step([Chunk(seq_id, tuple(prompt[s:s + 256]), s)])
        return time.perf_counter() - t, cached
    finally:
        engine.release(seq_id)


def bench_model(name: str, threads: int, intervals: list[int], repeats: int) -> dict:
    from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
    from granite_deploy.engines.prefix_cache import DEFAULT_INTERVAL, PrefixCache
    from granite_deploy.serve.scheduler import Scheduler

    art = artifact_for(random_checkpoint(name), validate=False)
    engine = OnnxRuntimeEngine(art, max_batch=2, threads=threads)
    prompts = turn_prompts()

    class Tok:  # the scheduler only needs stop ids and decoding of the (one) generated token
        stop_token_ids = (100257,)
        eos_token_id = 100257

        def decode(self, ids, skip_special_tokens=False):
            return "x" * len(ids)

    off = Scheduler(engine, Tok(), prefill_chunk=256).start()
    # warm-up: ONNX Runtime's first calls of each shape are slower
    ttft(off, prompts[0][:40])
    # Each number is the best of `repeats` (the machine is shared: noise only ever adds time). Every
    # repeat of the cache-on chat starts from an empty cache, so turn 1 is always a miss.
    best = [dict(ttft_off_s=1e9, ttft_on_s=1e9, new_only_s=1e9) for _ in prompts]
    for rep in range(repeats):
        cache = PrefixCache(engine, 4 << 30)
        on = Scheduler(engine, Tok(), prefill_chunk=256, prefix_cache=cache).start()
        for k, prompt in enumerate(prompts):
            t_off, _ = ttft(off, prompt)
            t_new, expect = new_only(engine, cache, prompt, 10_000 + k)  # (before this turn is cached)
            t_on, hit = ttft(on, prompt)
            assert hit == expect, (hit, expect)
            if not hit:
                t_new = t_off
            b = best[k]
            b.update(turn=k + 1, prompt_tokens=len(prompt), cached=hit, new_tokens=len(prompt) - hit,
                     ttft_off_s=min(b["ttft_off_s"], t_off), ttft_on_s=min(b["ttft_on_s"], t_on),
                     new_only_s=min(b["new_only_s"], t_new))
            print(f"#   run {rep + 1} turn {k + 1}: {len(prompt)} tokens, {hit} cached: off {t_off:.2f} s, "
                  f"on {t_on:.3f} s, new-only {t_new:.3f} s", flush=True)
        on.shutdown()
    rows = best
    covered = max(int(len(e.tokens)) for e in cache._entries)
    result = {"model": name, "rows": rows, "cache_bytes": cache.bytes, "covered_tokens": covered,
              "entries": cache.entries(), "recurrent": cache.recurrent}
    kv = sum(s.nbytes for s in cache._snaps.values() if s.kind == "kv")
    kv_tokens = sum(s.end - s.start for s in cache._snaps.values() if s.kind == "kv")
    result["kv_bytes_per_token"] = kv / max(1, kv_tokens)
    rec = [s for s in cache._snaps.values() if s.kind == "recurrent"]
    result["recurrent_snapshots"] = len(rec)
    result["recurrent_snapshot_bytes"] = rec[0].nbytes if rec else 0
    if cache.recurrent:  # the snapshot interval: cold-prefill cost of pausing every N tokens
        sweeps = []
        preamble = prompts[0]
        for n in intervals:
            t = 1e9
            for _ in range(repeats):
                c = PrefixCache(engine, 4 << 30, interval=n)
                s = Scheduler(engine, Tok(), prefill_chunk=256, prefix_cache=c).start()
                t = min(t, ttft(s, preamble)[0])
                s.shutdown()
            sweeps.append({"interval": n, "cold_ttft_s": t, "snapshots": sum(1 for x in c._snaps.values()
                                                                            if x.kind == "recurrent"),
                           "bytes": c.bytes})
            print(f"#   interval {n}: cold TTFT {t:.2f} s, {sweeps[-1]['snapshots']} snapshots, "
                  f"{c.bytes / 2**20:.0f} MiB", flush=True)
        t = min(ttft(off, preamble)[0] for _ in range(repeats))
        sweeps.append({"interval": None, "cold_ttft_s": t, "snapshots": 0, "bytes": 0})
        print(f"#   no cache: cold TTFT {t:.2f} s", flush=True)
        result["interval_sweep"] = sweeps
        result["default_interval"] = DEFAULT_INTERVAL
    off.shutdown()
    engine.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="granite-4.0-1b,granite-4.0-h-1b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--intervals", default="32,64,128")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per number")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    print(f"# machine: {machine()}, {args.threads} threads, best of {args.repeats}", flush=True)
    results = []
    for name in args.models.split(","):
        print(f"# {name}", flush=True)
        results.append(bench_model(name, args.threads, [int(x) for x in args.intervals.split(",")], args.repeats))
    print("\n| model | turn | prompt tokens | cached | TTFT off (s) | TTFT on (s) | off / on | new-only prefill (s) "
          "| on / new-only |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for row in r["rows"]:
            print(f"| {r['model']} fp32 | {row['turn']} | {row['prompt_tokens']} | {row['cached']} | "
                  f"{row['ttft_off_s']:.2f} | {row['ttft_on_s']:.3f} | {row['ttft_off_s'] / row['ttft_on_s']:.1f}x | "
                  f"{row['new_only_s']:.3f} | {row['ttft_on_s'] / row['new_only_s']:.2f} |")
    print("\n| model | cache bytes | tokens covered | KV bytes / token | recurrent snapshots | bytes / snapshot |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['cache_bytes'] / 2**20:.1f} MiB | {r['covered_tokens']} | "
              f"{r['kv_bytes_per_token'] / 1024:.1f} KiB | {r['recurrent_snapshots']} | "
              f"{r['recurrent_snapshot_bytes'] / 2**20:.1f} MiB |")
    for r in results:
        if "interval_sweep" in r:
            base = r["interval_sweep"][-1]["cold_ttft_s"]
            print(f"\n{r['model']}: snapshot interval N (cold prefill of the {r['rows'][0]['prompt_tokens']}-token "
                  f"first turn)\n\n| N | cold TTFT (s) | vs no cache | snapshots | MiB held |\n|---|---|---|---|---|")
            for s in r["interval_sweep"]:
                print(f"| {s['interval'] or 'cache off'} | {s['cold_ttft_s']:.2f} | {s['cold_ttft_s'] / base:.2f} | "
                      f"{s['snapshots']} | {s['bytes'] / 2**20:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
