"""The gRPC server: fmaas.GenerationService and granite.v1.ChatService over the Scheduler.

A thin asyncio layer (``grpc.aio``) that only wires: it loads the engine and
tokenizer, builds the :class:`~.session.ModelSession` (tokenizer, scheduler,
limits, prompt encoding in a worker pool, submit) that both servicers
receive, and runs the lifecycle (listen, load, warm-up, drain, stop).

This module holds the configuration, server options / credentials, the
:class:`GraniteServer` lifecycle, :class:`ServerThread` and the CLI entry. The
other parts: :mod:`.session` (the protocol-free model session),
:mod:`.fmaas_service` (fmaas.GenerationService), :mod:`.chat_service`
(granite.v1.ChatService), :mod:`.bridge` (the ``rpc`` decorator: status
mapping, access logs, malformed requests) and :mod:`.auth` (the bearer token).

Wire behaviour (see SERVING.md; per service in its module):

* Errors: bad fields -> INVALID_ARGUMENT naming the field; unknown model ->
  NOT_FOUND; queue full -> RESOURCE_EXHAUSTED; draining -> UNAVAILABLE; an
  engine failure ends a stream with stop reason ERROR (INTERNAL for unary)
  and the server keeps serving.
* A client that cancels, or whose deadline passes, cancels its scheduler
  ticket (try/finally around the stream plus ``context.add_done_callback``),
  so the sequence leaves the batch within one engine step.

Also: grpc.health.v1 (NOT_SERVING until a real warm-up generation succeeded,
and again while draining), server reflection, TLS / mutual TLS, an optional
bearer token (health checks exempt), keepalive settings that keep long silent
prefills alive, explicit message-size limits, JSON-lines access logs carrying
the client's ``x-correlation-id``, Prometheus metrics and a graceful drain.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as _health_aio
from grpc_reflection.v1alpha import reflection

from ..errors import EngineUnusable, InvalidField
from ..protos import generation_pb2_grpc as gen_grpc
from ..protos import granite_chat_pb2_grpc as chat_grpc
from .adapters import AdapterSet, load_adapters
from .auth import HEALTH_SERVICE, BearerTokenInterceptor
from .bridge import JsonLogFormatter, MalformedRequestInterceptor
from .chat_service import CHAT_SERVICE, ChatServicer
from .fmaas_service import FMAAS_SERVICE, GenerationServicer
from .metrics import Metrics, engine_label
from .sampling import SamplingParams
from .scheduler import Request, Scheduler
from .session import ModelSession
from .stopping import StoppingParams, StopReason
from .validation import InputLimits

__all__ = ["GraniteServer", "JsonLogFormatter", "ServerConfig", "ServerThread", "serve_forever"]

log = logging.getLogger(__name__)

SERVICE_NAMES = (FMAAS_SERVICE, CHAT_SERVICE)

DEFAULT_MAX_NEW_TOKENS = 20  # fmaas: "max_new_tokens 0 means the server default, 20"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


# ============================================================================ configuration

@dataclass
class ServerConfig:
    artifact: str
    host: str = "127.0.0.1"
    port: int = 8033  # 0: any free port (see GraniteServer.port)
    max_batch: int = 8
    max_queue: int = 64
    # Tokens per scheduler step (serve/scheduler.py): every decode token and speculative draft,
    # then prompt chunks oldest first; prompts always get at least a quarter of it. Bounds how long
    # running streams stall behind a new prompt and how many weight passes a prompt costs.
    # None: default_token_budget() -- 32 on CPU, 512 on GPUs (provisional, see there).
    token_budget: int | None = None
    prefill_chunk: int | None = None  # deprecated alias of token_budget (--prefill-chunk)
    # Prompt-lookup speculative decoding (serve/speculative.py): None (off) or "ngram"; dense
    # (attention-only) models only. Draft tokens per step, and the n-gram sizes tried (max down to min).
    speculative: str | None = None
    speculative_tokens: int = 4
    speculative_ngram: int = 3
    speculative_ngram_min: int = 1
    # Prefix cache budget in MiB (engines/prefix_cache.py): None sizes it from the engine device's free
    # memory (20%, at most 8 GiB); 0 turns prefix caching off.
    prefix_cache_mb: int | None = None
    max_seq_len: int | None = None
    engine: str = "auto"
    threads: int | None = None
    metrics_port: int | None = None  # None: off; 0: any free port (the CLI's 0 means off)
    metrics_host: str | None = None  # default: the gRPC host
    # The OpenAI-compatible HTTP API (serve/openai_api.py) on the same session: None: off; 0: any free port
    http_port: int | None = None
    http_host: str | None = None  # default: the gRPC host
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: mutual TLS (client certificates required)
    auth_token: str | None = None
    model_id: str | None = None  # default: the artifact folder's name
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_new_tokens_limit: int | None = None  # default: min(1024, context - 1)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # fmaas: TGIS includes a matched stop sequence in the text unless told otherwise;
    # chat: OpenAI-style, excluded by default.
    fmaas_include_stop_sequence: bool = True
    chat_include_stop_sequence: bool = False
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 20_000
    min_client_ping_interval_ms: int = 5_000
    drain_grace_s: float = 30.0
    warmup: bool = True
    warmup_timeout_s: float = 120.0  # a warm-up generation that takes longer: the engine is unusable
    # Input limits (None: sized for the context window, see validation.InputLimits.for_context)
    max_prompt_bytes: int | None = None
    template_time_s: float | None = None
    encode_workers: int = 2
    # tgis: fmaas model_id must name this model (NOT_FOUND otherwise; --strict-model-id); TGIS ignores it
    strict_model_id: bool = False
    # tgis: (name, adapter artifact) pairs answering fmaas adapter_id, one engine each (serve/adapters.py)
    adapters: tuple[tuple[str, str], ...] = ()
    # Trusted artifacts (artifact.open_trusted): sizes are always checked before loading; sha256 unless
    # verify_hashes is False (--skip-verify, for operators who verified at deploy time); manifest_digest
    # pins manifest.json's own sha256 (--manifest-digest).
    verify_hashes: bool = True
    manifest_digest: str | None = None


def default_token_budget(device: str) -> int:
    """The step token budget when --token-budget is not given. Provisional (bench/bench_ragged.py
    sweeps it): on CPU 32 -- its reserve of 8 prompt tokens per step while streams decode is the old
    CPU prefill chunk (about 0.2 s of 1B prefill on 2 cores), and a prompt alone prefills 32 tokens a
    step, so one ragged weight pass is shared by 32 tokens; on GPUs 512, where a step of a few hundred
    tokens costs about what one token does (vLLM's chunked-prefill budgets are 512..8192)."""
    return 32 if str(device).startswith("cpu") else 512


def speculative_config(config: ServerConfig):
    """The SpeculativeConfig of --speculative (None: off); InvalidField('--speculative...') when bad."""
    if not config.speculative:
        return None
    from .speculative import SpeculativeConfig

    try:
        return SpeculativeConfig(method=config.speculative, num_tokens=config.speculative_tokens,
                                 ngram_max=config.speculative_ngram,
                                 ngram_min=config.speculative_ngram_min).validate()
    except ValueError as exc:
        option, _, message = str(exc).partition(": ")
        raise InvalidField(option, message) from None


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments of the server.

    Keepalive: the server pings idle connections every ``keepalive_time_ms``
    (also with no call active, and with no limit on pings without data), so a
    stream that is silent for minutes during a long prefill is neither
    reaped by a proxy nor mistaken for a dead peer; clients may ping as often
    as every ``min_client_ping_interval_ms`` without getting a GOAWAY
    ("too_many_pings"), which gRPC's 5-minute default would send.
    """
    return [
        ("grpc.max_receive_message_length", int(config.max_message_bytes)),
        ("grpc.max_send_message_length", int(config.max_message_bytes)),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_ms)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", int(config.min_client_ping_interval_ms)),
        ("grpc.so_reuseport", 0),
    ]


def _read_bytes(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def _check_port_free(host: str, port: int, option: str) -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            raise InvalidField(option, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (None: plaintext). A client CA turns on mutual TLS."""
    if not (config.tls_cert or config.tls_key or config.tls_client_ca):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("--tls-cert/--tls-key: both are needed for TLS (and for --tls-client-ca)")
    cert = _read_bytes(config.tls_cert, "--tls-cert")
    key = _read_bytes(config.tls_key, "--tls-key")
    ca = _read_bytes(config.tls_client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


# ============================================================================ the server

class GraniteServer:
    """One artifact served over gRPC. Use from a running event loop:

        server = GraniteServer(ServerConfig(artifact, port=0))
        await server.start()          # listening, warmed up, health SERVING
        ...
        await server.drain()          # NOT_SERVING, finish in-flight, stop

    `engine` / `tokenizer` may be given (tests, embedding); otherwise they are
    loaded from the artifact.
    """

    def __init__(self, config: ServerConfig, engine=None, tokenizer=None):
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.session: ModelSession | None = None
        self.scheduler: Scheduler | None = None
        self.adapters = AdapterSet()  # tgis: --adapter NAME=ARTIFACT engines and schedulers
        self.metrics: Metrics | None = None
        self.metrics_port: int | None = None
        self.http = None  # the OpenAI-compatible HTTP server (openai_api.HttpServer), when http_port is set
        self.http_port: int | None = None
        self.health = _health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.model_id = config.model_id or Path(config.artifact).resolve().name
        self._model_ids = {self.model_id}
        self._stopped = asyncio.Event()
        self.fatal: str | None = None  # why the engine became unusable while serving
        self._fatal_event = asyncio.Event()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._shut_down = False
        self._drain_task: asyncio.Task | None = None

    # --- what the session knows, for callers of the server ------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self.session and self.session.ready)

    @property
    def context_window(self) -> int:
        return self.session.context_window if self.session else 0

    @property
    def max_new_tokens_limit(self) -> int:
        return self.session.max_new_tokens_limit if self.session else 0

    def _rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(reason)

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> "GraniteServer":
        cfg = self.config
        self._event_loop = asyncio.get_running_loop()
        credentials = server_credentials(cfg)  # fail fast on bad TLS files, before loading the model
        if cfg.port:  # a busy port: one clear line (gRPC would also log its own error)
            _check_port_free(cfg.host, cfg.port, "--port")
        if cfg.metrics_port:  # fail fast on a busy metrics port too (it is opened after loading)
            _check_port_free(cfg.metrics_host or cfg.host, cfg.metrics_port, "--metrics-port")
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        interceptors = []
        if cfg.auth_token:
            interceptors.append(BearerTokenInterceptor(cfg.auth_token,
                                                       on_reject=lambda: self._rejected("unauthenticated")))
        interceptors.append(MalformedRequestInterceptor(SERVICE_NAMES))
        self.server = grpc.aio.server(interceptors=interceptors, options=server_options(cfg))
        host = f"[{cfg.host}]" if ":" in cfg.host and not cfg.host.startswith("[") else cfg.host
        address = f"{host}:{cfg.port}"
        # The session exists before the model is loaded (it refuses with UNAVAILABLE until ready)
        self.session = ModelSession(None, model_id=self.model_id, workers=cfg.encode_workers)
        gen_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(self.session, cfg.fmaas_include_stop_sequence, strict_model_id=cfg.strict_model_id),
            self.server)
        chat_grpc.add_ChatServiceServicer_to_server(
            ChatServicer(self.session, cfg.chat_include_stop_sequence), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(SERVICE_NAMES + (HEALTH_SERVICE, reflection.SERVICE_NAME), self.server)
        try:
            port = (self.server.add_secure_port(address, credentials) if credentials
                    else self.server.add_insecure_port(address))
        except RuntimeError as exc:
            reason = str(exc).split("; set GRPC_VERBOSITY")[0]
            raise InvalidField("--port", f"cannot listen on {address}: {reason} (is the port in use?)") from None
        if not port:
            raise InvalidField("--port", f"cannot listen on {address} (is the port in use?)")
        self.port = port
        await self.server.start()  # health answers NOT_SERVING while the model loads and warms up
        try:
            if cfg.http_port is not None:  # /health, /ready answer while the model loads
                await self._start_http()
            await asyncio.get_running_loop().run_in_executor(None, self._load)
            if cfg.metrics_port is not None:
                metrics_host = cfg.metrics_host or cfg.host
                try:
                    self.metrics_port = self.metrics.serve_http(cfg.metrics_port, metrics_host)
                except OSError as exc:
                    raise InvalidField("--metrics-port", f"cannot listen on {metrics_host}:{cfg.metrics_port}: "
                                                         f"{exc.strerror or exc}") from None
            self.scheduler.start()
            self.adapters.start()
            if cfg.warmup:
                try:
                    await asyncio.wait_for(self._warm_up(), cfg.warmup_timeout_s)
                except asyncio.TimeoutError:
                    raise EngineUnusable(f"the warm-up generation did not finish within {cfg.warmup_timeout_s:g} s "
                                         "(the engine is unusable)") from None
            if self.scheduler.unusable:
                raise EngineUnusable(f"the engine is unusable: {self.scheduler.unusable}")
        except BaseException:
            await self.server.stop(None)
            if self.http is not None:
                await self.http.stop(0)
            if self.scheduler:
                self.scheduler.shutdown(timeout=5)
            self.adapters.shutdown(timeout=5)
            if self.metrics:
                self.metrics.close()
            if self.session:
                self.session.close()
            raise
        self.session.ready = True
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d", cfg.artifact, cfg.host, port, extra={"fields": {
            "event": "serving", "artifact": str(cfg.artifact), "port": port, "model_id": self.model_id,
            "engine": self.engine_description()}})
        return self

    def _load(self) -> None:
        cfg = self.config
        manifest = None
        if self.tokenizer is None or self.engine is None:
            from ..artifact import open_trusted

            manifest = open_trusted(cfg.artifact, verify_hashes=cfg.verify_hashes,
                                    manifest_digest=cfg.manifest_digest)
        if self.tokenizer is None:
            from .tokenizer import GraniteTokenizer

            self.tokenizer = GraniteTokenizer.from_dir(cfg.artifact, trusted_files=manifest.files)
        if self.engine is None:
            from ..engines import load_engine

            source = manifest.source_model
            if isinstance(source, str) and source:
                self._model_ids.add(source)
            self.engine = load_engine(cfg.artifact, engine=cfg.engine, max_batch=cfg.max_batch,
                                      max_seq_len=cfg.max_seq_len, threads=cfg.threads)
        info = self.engine.info
        context_window = int(info.max_seq_len)
        limit = cfg.max_new_tokens_limit or min(1024, context_window - 1)
        if limit < 1:
            raise ValueError(f"--max-new-tokens-limit: must be >= 1, got {limit}")
        limit = min(int(limit), max(1, context_window - 1))
        self.metrics = Metrics(engine_label(info))
        limits = InputLimits.for_context(context_window, max_prompt_bytes=cfg.max_prompt_bytes,
                                         template_time_s=cfg.template_time_s)
        budget = cfg.token_budget or cfg.prefill_chunk or default_token_budget(info.device)
        speculative = speculative_config(cfg)
        from ..engines.prefix_cache import make_prefix_cache

        prefix_cache = make_prefix_cache(self.engine, cfg.prefix_cache_mb)
        if prefix_cache is not None:
            self.metrics.watch_prefix_cache(prefix_cache)
        try:
            self.scheduler = Scheduler(self.engine, self.tokenizer, max_queue=cfg.max_queue,
                                       max_running=cfg.max_batch, token_budget=budget, on_step=self.session.on_step,
                                       prefix_cache=prefix_cache, on_fatal=self._on_fatal, speculative=speculative)
        except ValueError as exc:  # --speculative on an engine that cannot roll back (recurrent state)
            option, _, message = str(exc).partition(": ")
            raise InvalidField(option if option.startswith("--") else "--token-budget", message) from None
        self.metrics.watch_speculation(self.scheduler)
        log.info("scheduler: token budget %d per step%s", budget,
                 f", speculative decoding {speculative.method} (k={speculative.num_tokens}, "
                 f"n={speculative.ngram_max}..{speculative.ngram_min})" if speculative else
                 ", speculative decoding off",
                 extra={"fields": {"event": "scheduler", "token_budget": budget,
                                   "speculative": speculative.method if speculative else None}})
        self.session.configure(
            self.tokenizer, self.scheduler, model_ids=self._model_ids, context_window=context_window,
            max_new_tokens_limit=limit, default_max_new_tokens=max(1, min(cfg.default_max_new_tokens, limit)),
            metrics=self.metrics, limits=limits, engine_info=info)
        self._load_adapters(budget, speculative)

    def _load_adapters(self, budget: int, speculative=None) -> None:
        """tgis: one engine and scheduler per --adapter artifact, like the base's (serve/adapters.py)."""
        cfg = self.config
        if not cfg.adapters:
            return
        from ..artifact import open_trusted
        from ..engines import load_engine

        def make_engine(artifact):
            open_trusted(artifact, verify_hashes=cfg.verify_hashes)
            return load_engine(artifact, engine=cfg.engine, max_batch=cfg.max_batch, max_seq_len=cfg.max_seq_len,
                               threads=cfg.threads)

        self.adapters = load_adapters(
            cfg.adapters, cfg.artifact, self.engine, make_engine,
            lambda engine: Scheduler(engine, self.tokenizer, max_queue=cfg.max_queue, max_running=cfg.max_batch,
                                     token_budget=budget, on_step=self.session.on_step, speculative=speculative))
        self.session.adapters = dict(self.adapters.schedulers)

    def engine_description(self) -> str:
        info = self.engine.info
        return f"{info.kind} {info.device} {info.precision}, max batch {info.max_batch}, context {info.max_seq_len}"

    async def _warm_up(self) -> None:
        """One real tiny generation through the whole path before reporting SERVING."""
        ids = tuple(self.tokenizer.encode("Hello")) or (0,)
        request = Request(ids, SamplingParams(), StoppingParams(max_new_tokens=2), request_id="warmup")
        stream = self.session.submit(request, check_ready=False)
        final = None
        try:
            while not stream.finished:
                batch = await stream.get()
                final = batch[-1]
        finally:
            stream.cancel()
        if final.stop_reason == StopReason.ERROR:
            raise EngineUnusable(f"the warm-up generation failed: {final.error}")

    def _on_fatal(self, reason: str) -> None:  # scheduler thread
        try:
            self._event_loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._engine_unusable(reason)))
        except (RuntimeError, AttributeError):  # the loop is closed (or never ran)
            pass

    async def _engine_unusable(self, reason: str) -> None:
        """The engine cannot serve: NOT_SERVING everywhere, new requests UNAVAILABLE; serve_forever exits."""
        if self.fatal is not None:
            return
        self.fatal = reason
        if self.session is not None:
            self.session.unusable = reason
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._fatal_event.set()

    async def _start_http(self) -> None:
        from .openai_api import HttpConfig, HttpServer  # FastAPI/uvicorn load only when asked for

        cfg = self.config
        self.http = HttpServer(self.session, HttpConfig(
            host=cfg.http_host or cfg.host, port=cfg.http_port, auth_token=cfg.auth_token, tls_cert=cfg.tls_cert,
            tls_key=cfg.tls_key, tls_client_ca=cfg.tls_client_ca, max_body_bytes=cfg.max_message_bytes,
            graceful_s=cfg.drain_grace_s))
        await self.http.start()
        self.http_port = self.http.port

    async def drain(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new generations, let in-flight ones finish
        (up to `grace` seconds), then stop the server and the scheduler."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain(self.config.drain_grace_s if grace is None else grace))
        await asyncio.shield(self._drain_task)

    async def _drain(self, grace: float) -> None:
        log.info("draining (grace %.1f s)", grace, extra={"fields": {"event": "draining", "grace_s": grace}})
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.begin_drain()  # /ready 503, new HTTP generations 503
        deadline = time.monotonic() + grace
        if self.scheduler is not None:
            self.scheduler.stop_accepting()
            self.adapters.stop_accepting()
            while not (self.scheduler.idle() and self.adapters.idle()) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        if self.server is not None:
            # in-flight handlers only have their last messages left to write
            await self.server.stop(max(0.5, deadline - time.monotonic()))
        if self.http is not None:
            await self.http.stop(max(0.5, deadline - time.monotonic()))
        await self._shutdown_rest()
        log.info("stopped", extra={"fields": {"event": "stopped"}})

    async def stop(self) -> None:
        """Immediate stop: cancels everything in flight."""
        if self.scheduler is not None:
            self.scheduler.stop_accepting()
        self.adapters.stop_accepting()
        if self.server is not None:
            await self.server.stop(None)
        if self.http is not None:
            await self.http.stop(0)
        await self._shutdown_rest()

    async def _shutdown_rest(self) -> None:
        if self._shut_down:
            return await self._stopped.wait()
        self._shut_down = True
        if self.scheduler is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.scheduler.shutdown, 10.0)
        await asyncio.get_running_loop().run_in_executor(None, self.adapters.shutdown, 10.0)
        if self.session is not None:
            self.session.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def wait_fatal(self) -> str:
        """Until the engine became unusable; returns the reason."""
        await self._fatal_event.wait()
        return self.fatal or "the engine is unusable"


# ============================================================================ running in a thread

class ServerThread:
    """A GraniteServer on its own event loop in a background thread (tests, embedding).

        with ServerThread(ServerConfig(artifact, port=0)) as st:
            channel = grpc.insecure_channel(f"127.0.0.1:{st.port}")
    """

    def __init__(self, config: ServerConfig, engine=None, tokenizer=None, start_timeout: float = 120.0,
                 wait: bool = True):
        self.server = GraniteServer(config, engine=engine, tokenizer=tokenizer)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="granite-grpc", daemon=True)
        self._thread.start()
        if wait:
            self.wait_ready(start_timeout)

    def wait_ready(self, timeout: float = 120.0) -> "ServerThread":
        """Block until start() finished (listening, warmed up, SERVING); re-raises its error."""
        if not self._ready.wait(timeout):
            raise TimeoutError("server did not start in time")
        if self._error is not None:
            self._thread.join(5)
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # reported to the constructor
            self._error = exc
            self._ready.set()
            self.loop.close()
            return
        self._ready.set()
        try:
            self.loop.run_until_complete(self.server.wait_stopped())
            # let handlers finishing after the stop write their last log lines
            self.loop.run_until_complete(asyncio.sleep(0))
        finally:
            self.loop.close()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def call(self, coro, timeout: float | None = 60):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def drain_async(self, grace: float | None = None):
        """Start draining; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(self.server.drain(grace), self.loop)

    def drain(self, grace: float | None = None, timeout: float | None = 120) -> None:
        self.drain_async(grace).result(timeout)
        self._thread.join(timeout)

    def stop(self, timeout: float = 60) -> None:
        """Stop at once (cancels what is in flight); a no-op after drain()."""
        if self._thread.is_alive() and not self.server._stopped.is_set():
            try:
                future = asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop)
            except RuntimeError:  # the loop is already closed
                future = None
            end = time.monotonic() + timeout
            while future is not None and not future.done() and self._thread.is_alive() and time.monotonic() < end:
                time.sleep(0.02)
        self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ============================================================================ CLI entry

async def serve_forever(config: ServerConfig, on_ready: Callable[[GraniteServer], None] | None = None) -> None:
    """Start, wait for SIGTERM/SIGINT, drain (a second signal stops at once).

    Raises EngineUnusable (after stopping) when the warm-up fails or the engine becomes
    unusable while serving, so that the process exits non-zero with the reason."""
    import signal

    server = GraniteServer(config)
    await server.start()
    if on_ready:
        on_ready(server)
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)

    def first_signal():
        signalled.set()
        for sig in signals:  # a second signal: stop now
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))

    for sig in signals:
        loop.add_signal_handler(sig, first_signal)
    try:
        stopped = asyncio.ensure_future(server.wait_stopped())
        waiter = asyncio.ensure_future(signalled.wait())
        fatal = asyncio.ensure_future(server.wait_fatal())
        await asyncio.wait({stopped, waiter, fatal}, return_when=asyncio.FIRST_COMPLETED)
        if fatal.done():
            waiter.cancel()
            await server.stop()
            raise EngineUnusable(f"the engine is unusable: {fatal.result()}")
        fatal.cancel()
        if not server._stopped.is_set():
            drain = asyncio.ensure_future(server.drain())
            await asyncio.wait({drain, stopped}, return_when=asyncio.FIRST_COMPLETED)
            await server.wait_stopped()
        waiter.cancel()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
