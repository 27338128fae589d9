"""Prometheus metrics for the gRPC server, served on their own HTTP port.

Every server owns a dedicated ``CollectorRegistry`` (so several servers can
live in one process, as the tests do) and every metric carries an ``engine``
label (engine kind and precision, e.g. ``onnxruntime-cpu/fp32``).

Latency histograms are observed from the scheduler thread (the moment a token
is produced), not from the asyncio side, so they measure the engine and the
queue rather than the event loop's scheduling.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

# Seconds. Fine at the low end (tiny models, decode steps of a few ms) and wide
# enough for long prompts on CPU.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                0.15, 0.25, 0.5, 1.0, 2.5)


def engine_label(info) -> str:
    """``<kind>-<device type>/<precision>``, e.g. ``onnxruntime-cpu/fp32``."""
    device = str(getattr(info, "device", "") or "").split(":")[0]
    kind = getattr(info, "kind", "unknown")
    return f"{kind}-{device}/{getattr(info, 'precision', '')}" if device else f"{kind}/{getattr(info, 'precision', '')}"


class Metrics:
    """The server's metrics. Methods are thread-safe (prometheus-client locks internally)."""

    def __init__(self, engine: str, registry: CollectorRegistry | None = None, prefix: str = ""):
        self.engine = engine
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p, e = self.registry, prefix, ("engine",)
        self._prefix = prefix
        self.time_to_first_token = Histogram(
            f"{p}time_to_first_token_seconds", "Seconds from request arrival to its first generated token.",
            e, registry=r, buckets=_LATENCY_BUCKETS)
        self.inter_token_latency = Histogram(
            f"{p}inter_token_latency_seconds", "Seconds between consecutive generated tokens of a request.",
            e, registry=r, buckets=_ITL_BUCKETS)
        self.queue_time = Histogram(
            f"{p}queue_time_seconds", "Seconds a request waited for admission into the running batch.",
            e, registry=r, buckets=_LATENCY_BUCKETS)
        self.e2e_latency = Histogram(
            f"{p}e2e_latency_seconds", "Seconds from request arrival to its final event.",
            e, registry=r, buckets=_LATENCY_BUCKETS)
        self.running = Gauge(f"{p}running_requests", "Requests in the running batch.", e, registry=r)
        self.waiting = Gauge(f"{p}waiting_requests", "Requests queued for admission.", e, registry=r)
        self.finished = Counter(f"{p}requests_finished", "Requests finished, by stop reason.",
                                e + ("stop_reason",), registry=r)
        self.cancellations = Counter(f"{p}cancellations", "Requests cancelled by the client (or its deadline).",
                                     e, registry=r)
        self.rejections = Counter(f"{p}rejections", "Requests refused before generation, by reason.",
                                  e + ("reason",), registry=r)
        # Children with the engine label bound once (labels() takes a lock and a dict lookup).
        self._ttft = self.time_to_first_token.labels(engine)
        self._itl = self.inter_token_latency.labels(engine)
        self._queue = self.queue_time.labels(engine)
        self._e2e = self.e2e_latency.labels(engine)
        self._running = self.running.labels(engine)
        self._waiting = self.waiting.labels(engine)
        self._cancel = self.cancellations.labels(engine)
        self._cancel.inc(0)
        self._http = None

    # --- observations -----------------------------------------------------------------
    def on_step(self, counts: dict) -> None:
        """The Scheduler's on_step hook: running/waiting gauges."""
        self._running.set(counts.get("running", 0))
        self._waiting.set(counts.get("waiting", 0))

    def observe_queue(self, seconds: float) -> None:
        self._queue.observe(max(0.0, seconds))

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(max(0.0, seconds))

    def observe_itl(self, seconds: float) -> None:
        self._itl.observe(max(0.0, seconds))

    def observe_finished(self, stop_reason_name: str, e2e_seconds: float) -> None:
        self.finished.labels(self.engine, stop_reason_name).inc()
        self._e2e.observe(max(0.0, e2e_seconds))
        if stop_reason_name == "CANCELLED":
            self._cancel.inc()

    def rejected(self, reason: str) -> None:
        self.rejections.labels(self.engine, reason).inc()

    def watch_prefix_cache(self, cache) -> None:
        """Export the prefix cache's counters (engines/prefix_cache.py), read at scrape time:
        ``prefix_cache_lookup_tokens_total`` (prompt tokens looked up),
        ``prefix_cache_hit_tokens_total`` (prompt tokens served from the cache instead of prefilled),
        ``prefix_cache_lookups_total``, ``prefix_cache_hits_total``, ``prefix_cache_evictions_total``,
        ``prefix_cache_bytes`` (held now) and ``prefix_cache_budget_bytes``."""
        self.registry.register(_PrefixCacheCollector(cache, self.engine, self._prefix))

    def watch_speculation(self, scheduler) -> None:
        """Export a scheduler's speculative-decoding counters (serve/speculative.py), read at scrape
        time: ``speculative_draft_tokens_proposed_total`` (draft tokens sent for verification),
        ``speculative_draft_tokens_accepted_total`` (of those, accepted: tokens generated beyond one
        per step) and ``speculative_verification_steps_total`` (chunks that verified a draft).
        Acceptance rate = accepted / proposed; tokens per verification = 1 + accepted / steps."""
        self.registry.register(_SpeculationCollector(scheduler, self.engine, self._prefix))

    # --- reading (tests, debugging) ---------------------------------------------------------
    def value(self, name: str, **labels) -> float:
        """A sample's current value (0.0 when absent), e.g. value("cancellations_total")."""
        v = self.registry.get_sample_value(name, {"engine": self.engine, **labels})
        return 0.0 if v is None else v

    # --- HTTP -------------------------------------------------------------------------------
    def serve_http(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP endpoint (port 0: any free port); returns the bound port."""
        httpd, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._http = httpd
        bound = httpd.server_port
        log.info("metrics on http://%s:%d/metrics", addr, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _PrefixCacheCollector:
    """Reads the prefix cache's plain counters when Prometheus scrapes (the scheduler thread
    updates them; a scrape sees each value as of some recent step)."""

    _COUNTERS = (("prefix_cache_lookup_tokens", "looked_up_tokens", "Prompt tokens looked up in the prefix cache."),
                 ("prefix_cache_hit_tokens", "hit_tokens",
                  "Prompt tokens served from the prefix cache instead of being prefilled."),
                 ("prefix_cache_lookups", "lookups", "Requests looked up in the prefix cache."),
                 ("prefix_cache_hits", "hits", "Requests that reused a cached prefix."),
                 ("prefix_cache_evictions", "evictions", "Prefix-cache entries evicted (LRU, by bytes)."))

    def __init__(self, cache, engine: str, prefix: str):
        self.cache, self.engine, self.prefix = cache, engine, prefix

    def collect(self):
        p, c = self.prefix, self.cache
        for name, attr, doc in self._COUNTERS:
            family = CounterMetricFamily(f"{p}{name}", doc, labels=["engine"])
            family.add_metric([self.engine], getattr(c, attr))
            yield family
        for name, value, doc in ((f"{p}prefix_cache_bytes", c.bytes, "Bytes the prefix cache holds."),
                                 (f"{p}prefix_cache_budget_bytes", c.budget, "The prefix cache's byte budget.")):
            family = GaugeMetricFamily(name, doc, labels=["engine"])
            family.add_metric([self.engine], value)
            yield family


class _SpeculationCollector:
    """Reads the scheduler's plain speculation counters when Prometheus scrapes."""

    _COUNTERS = (("speculative_draft_tokens_proposed", "draft_tokens_proposed",
                  "Prompt-lookup draft tokens sent to the engine for verification."),
                 ("speculative_draft_tokens_accepted", "draft_tokens_accepted",
                  "Draft tokens the target model accepted (generated without a step of their own)."),
                 ("speculative_verification_steps", "draft_steps",
                  "Decode chunks that verified a draft (one per sequence per step)."))

    def __init__(self, scheduler, engine: str, prefix: str):
        self.scheduler, self.engine, self.prefix = scheduler, engine, prefix

    def collect(self):
        for name, attr, doc in self._COUNTERS:
            family = CounterMetricFamily(f"{self.prefix}{name}", doc, labels=["engine"])
            family.add_metric([self.engine], getattr(self.scheduler, attr, 0))
            yield family
