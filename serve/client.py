"""A small synchronous client for the granite-deploy gRPC server, for one replica or many.

    from granite_deploy.serve.client import GraniteClient

    with GraniteClient("localhost:8033") as client:
        print(client.generate("Hello", max_new_tokens=20).text)
        for piece in client.generate_stream("Hello", text_only=True):
            print(piece, end="", flush=True)
        reply = client.chat([{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL])
        print(reply.content, [(c.name, c.arguments_json) for c in reply.tool_calls])

Targets: ``host``, ``host:port``, ``[v6]:port`` (the port defaults to 8033, the
server's, not gRPC's 443), a ``dns:///name[:port]`` name whose addresses are all
used (a Kubernetes headless Service), or a list of several of these (several
replicas). The channel balances calls round-robin with gRPC's own ``round_robin``
policy, skips replicas whose ``grpc.health.v1`` status is not SERVING (loading,
warming up, draining: client-side health checking), and retries a call that
failed with UNAVAILABLE before producing any output on another replica (gRPC's
retry policy: up to 5 attempts with exponential backoff; a streaming call is
committed by its first message). A stream that already produced output is never
retried: if it breaks, iteration raises :class:`StreamInterrupted` (a
``grpc.RpcError``) naming the status and how many messages had arrived.

Generation parameters are keyword arguments (all optional; unknown ones raise
TypeError): max_new_tokens, min_new_tokens, temperature (> 0 samples), top_k,
top_p, typical_p, seed, repetition_penalty, stop_sequences, include_stop_sequence,
time_limit_ms, and for `generate*`: decoding_method ("greedy"/"sample"),
truncate_input_tokens, generated_tokens, token_logprobs, token_ranks,
top_n_tokens, input_text, input_tokens; for `chat`: logprobs, top_n_tokens.
Every call also takes timeout (seconds), correlation_id and model_id.
Chat messages are checked before sending with the server's own rules
(:func:`granite_deploy.serve.validation.validate_messages`: known roles, content
required), raising ``InvalidField`` naming the message.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grpc

from ..errors import InvalidField

from ..protos import generation_pb2 as gen_pb2
from ..protos import generation_pb2_grpc as gen_grpc
from ..protos import granite_chat_pb2 as chat_pb2
from ..protos import granite_chat_pb2_grpc as chat_grpc

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_PORT = 8033  # the server's default gRPC port (gRPC's own default for a bare name is 443)

# The services whose calls are balanced and retried (health and reflection are not retried).
BALANCED_SERVICES = ("fmaas.GenerationService", "granite.v1.ChatService")

RETRY_POLICY = {
    # gRPC caps maxAttempts at 5. Only UNAVAILABLE: the server's answer while loading or
    # draining ("retry on another replica") and the channel's when a replica went away. A
    # call is committed (never retried) once it has received a response message or headers.
    "maxAttempts": 5,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(retry: bool = True, health_check: bool = True) -> dict:
    """The channel's service config: round_robin over every address, client-side
    grpc.health.v1 checking (a replica that is not SERVING gets no calls), and the
    retry policy for the generation and chat services."""
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": ""}
    if retry:
        config["methodConfig"] = [{"name": [{"service": s} for s in BALANCED_SERVICES],
                                   "retryPolicy": dict(RETRY_POLICY)}]
    return config


_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def _port(text: str, target: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InvalidField("--target", f"port must be a number in 1..65535, got {text!r} in {target!r}")
    return int(text)


def split_host_port(target: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address -> (host, port)."""
    t = target.strip()
    if not t:
        raise InvalidField("--target", "is empty")
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            raise InvalidField("--target", f"unclosed '[' in {target!r}")
        host, rest = t[1:end], t[end + 1:]
        if rest and not rest.startswith(":"):
            raise InvalidField("--target", f"expected ':PORT' after ']' in {target!r}")
        return host, _port(rest[1:], target) if rest else default_port
    if t.count(":") > 1:  # a bare IPv6 address: no port possible without brackets
        try:
            ipaddress.IPv6Address(t)
        except ValueError:
            raise InvalidField("--target", f"{target!r} is neither HOST:PORT nor an IPv6 address "
                                           "(write IPv6 with a port as [ADDRESS]:PORT)") from None
        return t, default_port
    host, sep, port = t.partition(":")
    if not host:
        raise InvalidField("--target", f"no host in {target!r}")
    if re.search(r"[\s/]", host):
        raise InvalidField("--target", f"{target!r} is not HOST[:PORT]")
    return host, _port(port, target) if sep else default_port


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalize_target(target: str, default_port: int = DEFAULT_PORT) -> str:
    """One target as a gRPC target with an explicit port: ``localhost`` -> ``localhost:8033``,
    ``dns:///granite-headless`` -> ``dns:///granite-headless:8033``; other URI schemes
    (``ipv4:``, ``ipv6:``, ``unix:``) pass through with missing ports added to ipv4/ipv6 lists."""
    t = target.strip()
    low = t.lower()
    if low.startswith("dns:"):
        rest = t[4:]
        authority = ""
        if rest.startswith("//"):
            authority, slash, rest = rest[2:].partition("/")
            if not slash:
                raise InvalidField("--target", f"expected dns:///NAME[:PORT] or dns://DNS-SERVER/NAME[:PORT], got {target!r}")
            prefix = f"dns://{authority}/"
        else:
            prefix = "dns:"
        return prefix + _join(*split_host_port(rest, default_port))
    if low.startswith(("ipv4:", "ipv6:")):
        scheme, _, rest = t.partition(":")
        parts = [_join(*split_host_port(a, default_port)) for a in rest.split(",")]
        return f"{scheme.lower()}:{','.join(parts)}"
    if low.startswith(_SCHEMES) or "://" in t:
        return t
    return _join(*split_host_port(t, default_port))


def channel_target(targets: str | Sequence[str], default_port: int = DEFAULT_PORT) -> tuple[str, str | None]:
    """(gRPC target, authority override or None) for one target or several replicas.

    Several ``host:port`` targets become one ``ipv4:``/``ipv6:`` address list (gRPC's
    static resolver), so one channel balances over all of them; host names among them
    are resolved once, here (use a ``dns:///`` name for a set that changes). The
    authority of the first target is kept for TLS name checks and virtual hosting.
    """
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items:
        raise InvalidField("--target", "give at least one target")
    if len(items) == 1:
        return normalize_target(items[0], default_port), None
    pairs = []
    for t in items:
        if t.strip().lower().startswith(_SCHEMES) or "://" in t:
            raise InvalidField("--target", f"{t!r}: a URI target (dns:///, ipv4:, unix:) cannot be combined with "
                                           "others; give one dns:/// name or several HOST[:PORT]")
        pairs.append(split_host_port(t, default_port))
    addresses: list[tuple[int, str, int]] = []
    for host, port in pairs:
        try:
            ip = ipaddress.ip_address(host)
            addresses.append((ip.version, str(ip), port))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise InvalidField("--target", f"cannot resolve {host!r}: {exc.strerror}") from None
        v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
        v6 = [i[4][0] for i in infos if i[0] == socket.AF_INET6]
        for addr in dict.fromkeys(v4 or v6):
            addresses.append((4 if v4 else 6, addr, port))
    versions = {v for v, _, _ in addresses}
    if len(versions) > 1:
        # gRPC's static resolver takes one family per list: use IPv4 where a host has both
        raise InvalidField("--target", "mixes IPv4 and IPv6 addresses; give targets of one family "
                                       "(or one dns:/// name)")
    version = versions.pop()
    uri = f"ipv{version}:" + ",".join(_join(a, p) for _, a, p in addresses)
    return uri, _join(*pairs[0])


class StreamInterrupted(grpc.RpcError):
    """A stream failed after it had produced output: it is not retried (the caller has
    seen part of the reply), and this says so. ``code()``/``details()`` as for any RpcError;
    ``received`` is the number of messages that had arrived."""

    def __init__(self, error: grpc.RpcError, received: int, rpc: str):
        super().__init__()
        self.error, self.received, self.rpc = error, received, rpc
        self._code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        self._details = error.details() if hasattr(error, "details") else str(error)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return (f"{self.rpc} stream interrupted after {self.received} message(s), not retried: "
                f"{self._details}")

    def __str__(self) -> str:
        return f"{self._code.name}: {self.details()}"


def _guarded_stream(call, rpc: str) -> Iterator:
    """Yield a streaming call's messages; a failure after the first one is a StreamInterrupted."""
    received = 0
    try:
        for msg in call:
            received += 1
            yield msg
    except grpc.RpcError as exc:
        if received and not isinstance(exc, StreamInterrupted):
            raise StreamInterrupted(exc, received, rpc) from exc
        raise
    finally:
        call.cancel()


_COMMON = {"max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "typical_p", "seed",
           "repetition_penalty", "stop_sequences", "include_stop_sequence", "time_limit_ms"}
_FMAAS_ONLY = {"decoding_method", "truncate_input_tokens", "generated_tokens", "token_logprobs", "token_ranks",
               "top_n_tokens", "input_text", "input_tokens"}
_CHAT_ONLY = {"logprobs", "top_n_tokens"}


def _check_kwargs(params: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise TypeError(f"{where}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")


def build_parameters(**params) -> gen_pb2.Parameters:
    """fmaas Parameters from keyword arguments (temperature > 0 or decoding_method="sample" samples)."""
    _check_kwargs(params, _COMMON | _FMAAS_ONLY, "generate")
    method = params.get("decoding_method")
    temperature = float(params.get("temperature") or 0.0)
    if method is None:
        sample = temperature > 0
    elif str(method).lower() in ("sample", "sampling"):
        sample = True
    elif str(method).lower() == "greedy":
        sample = False
    else:
        raise ValueError(f"decoding_method: must be 'greedy' or 'sample', got {method!r}")
    p = gen_pb2.Parameters(method=gen_pb2.SAMPLE if sample else gen_pb2.GREEDY)
    s = p.sampling
    if temperature:  # optional field (vllm-tgis-adapter): an explicit 0.0 would mean greedy
        s.temperature = temperature
    s.top_k = int(params.get("top_k") or 0)
    s.top_p = float(params.get("top_p") or 0.0)
    s.typical_p = float(params.get("typical_p") or 0.0)
    if params.get("seed") is not None:
        s.seed = int(params["seed"])
    p.decoding.repetition_penalty = float(params.get("repetition_penalty") or 0.0)
    st = p.stopping
    st.max_new_tokens = int(params.get("max_new_tokens") or 0)
    st.min_new_tokens = int(params.get("min_new_tokens") or 0)
    st.time_limit_millis = int(params.get("time_limit_ms") or 0)
    st.stop_sequences.extend(params.get("stop_sequences") or ())
    if params.get("include_stop_sequence") is not None:
        st.include_stop_sequence = bool(params["include_stop_sequence"])
    r = p.response
    for name in ("generated_tokens", "token_logprobs", "token_ranks", "input_text", "input_tokens"):
        setattr(r, name, bool(params.get(name)))
    r.top_n_tokens = int(params.get("top_n_tokens") or 0)
    p.truncate_input_tokens = int(params.get("truncate_input_tokens") or 0)
    return p


def _conversation(messages, tools=None, documents=None) -> chat_pb2.Conversation:
    """The wire Conversation, after the server's own checks (roles, content, tool calls, limits)."""
    from .validation import validate_documents, validate_messages, validate_tools

    messages = validate_messages(messages, "messages")
    tools = validate_tools(tools, "tools")
    documents = validate_documents(documents, "documents")
    conv = chat_pb2.Conversation()
    for m in messages:
        msg = conv.messages.add(role=m["role"], content=m.get("content") or "")
        if m.get("name") is not None:
            msg.name = m["name"]
        if m.get("tool_call_id"):
            msg.tool_call_id = m["tool_call_id"]
        for i, call in enumerate(m.get("tool_calls") or ()):
            fn = call.get("function", call)
            args = fn.get("arguments", {})
            msg.tool_calls.add(index=i, id=call.get("id", ""), name=fn["name"],
                               arguments_json=args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
    for i, t in enumerate(tools or ()):
        fn = t.get("function", t)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidField(f"tools[{i}]", "needs a function name")
        params = fn.get("parameters")
        conv.tools.add(type=t.get("type", "function"), function=chat_pb2.FunctionDefinition(
            name=fn["name"], description=fn.get("description", ""),
            parameters_json=(params if isinstance(params, str) else json.dumps(params, ensure_ascii=False))
            if params else ""))
    for d in documents or ():
        doc = conv.documents.add(id=str(d.get("id", d.get("doc_id", ""))), title=str(d.get("title", "")),
                                 text=str(d.get("text", "")))
        for k, v in d.items():
            if k not in ("id", "doc_id", "title", "text"):
                doc.metadata[k] = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return conv


def build_chat_request(messages=None, tools=None, documents=None, fim: tuple[str, str] | None = None,
                       model_id: str = "", **params) -> chat_pb2.ChatRequest:
    _check_kwargs(params, _COMMON | _CHAT_ONLY, "chat")
    req = chat_pb2.ChatRequest(model_id=model_id)
    if fim is not None:
        req.fim.prefix, req.fim.suffix = fim
    else:
        req.conversation.CopyFrom(_conversation(messages or [], tools, documents))
    req.temperature = float(params.get("temperature") or 0.0)
    req.top_k = int(params.get("top_k") or 0)
    req.top_p = float(params.get("top_p") or 0.0)
    req.typical_p = float(params.get("typical_p") or 0.0)
    req.repetition_penalty = float(params.get("repetition_penalty") or 0.0)
    if params.get("seed") is not None:
        req.seed = int(params["seed"])
    req.max_new_tokens = int(params.get("max_new_tokens") or 0)
    req.min_new_tokens = int(params.get("min_new_tokens") or 0)
    req.stop_sequences.extend(params.get("stop_sequences") or ())
    if params.get("include_stop_sequence") is not None:
        req.include_stop_sequence = bool(params["include_stop_sequence"])
    req.time_limit_millis = int(params.get("time_limit_ms") or 0)
    req.logprobs = bool(params.get("logprobs"))
    req.top_n_tokens = int(params.get("top_n_tokens") or 0)
    return req


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class GraniteClient:
    """Synchronous client for fmaas.GenerationService and granite.v1.ChatService.

    TLS: give ``tls_ca`` (PEM of the CA that signed the server certificate);
    for mutual TLS also ``client_cert`` and ``client_key``. ``token`` is sent as
    ``authorization: Bearer <token>`` on every call.
    """

    def __init__(self, target: str | Sequence[str], tls_ca: str | None = None, client_cert: str | None = None,
                 client_key: str | None = None, token: str | None = None, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, server_name: str | None = None,
                 options: Iterable[tuple[str, object]] = (), retry: bool = True, health_check: bool = True,
                 wait_for_ready: bool = False):
        self.target, authority = channel_target(target)
        self.timeout, self.token, self.wait_for_ready = timeout, token, wait_for_ready
        opts = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # ping every 30 s while a call is open, so a long silent prefill keeps the connection alive
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.max_pings_without_data", 0),
            # round_robin + health checking + retries; a service config from DNS TXT records is ignored
            ("grpc.service_config", json.dumps(service_config(retry=retry, health_check=health_check))),
            ("grpc.service_config_disable_resolution", 1),
            ("grpc.enable_retries", 1 if retry else 0),
        ]
        if authority and not server_name:
            opts.append(("grpc.default_authority", authority))
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        opts.extend(options)
        if tls_ca or client_cert or client_key:
            if bool(client_cert) != bool(client_key):
                raise ValueError("client_cert/client_key: give both for mutual TLS")
            creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca), private_key=_read(client_key),
                                                 certificate_chain=_read(client_cert))
            self.channel = grpc.secure_channel(self.target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(self.target, options=opts)
        self.generation = gen_grpc.GenerationServiceStub(self.channel)
        self.chat_service = chat_grpc.ChatServiceStub(self.channel)

    # --- plumbing ---------------------------------------------------------------------------
    def _kw(self, timeout, correlation_id) -> dict:
        md = []
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        if correlation_id:
            md.append(("x-correlation-id", correlation_id))
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": md or None,
                "wait_for_ready": self.wait_for_ready or None}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GraniteClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    # --- fmaas ----------------------------------------------------------------------------------
    def generate(self, prompt: str | list[str], *, model_id: str = "", timeout: float | None = None,
                 correlation_id: str | None = None, **params):
        """One GenerationResponse for a prompt (a list for a list of prompts, generated together)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        req = gen_pb2.BatchedGenerationRequest(model_id=model_id, params=build_parameters(**params),
                                               requests=[gen_pb2.GenerationRequest(text=p) for p in prompts])
        responses = list(self.generation.Generate(req, **self._kw(timeout, correlation_id)).responses)
        return responses[0] if isinstance(prompt, str) else responses

    def generate_stream(self, prompt: str, *, model_id: str = "", timeout: float | None = None,
                        correlation_id: str | None = None, text_only: bool = False, **params) -> Iterator:
        """Yields GenerationResponse messages as they arrive (or only their text with text_only).
        Closing the iterator early cancels the request on the server."""
        req = gen_pb2.SingleGenerationRequest(model_id=model_id, params=build_parameters(**params),
                                              request=gen_pb2.GenerationRequest(text=prompt))
        stream = _guarded_stream(self.generation.GenerateStream(req, **self._kw(timeout, correlation_id)),
                                 "GenerateStream")
        try:
            for msg in stream:
                if text_only:
                    if msg.text:
                        yield msg.text
                else:
                    yield msg
        finally:
            stream.close()

    def tokenize(self, text: str | list[str], *, return_tokens: bool = False, return_offsets: bool = False,
                 truncate_input_tokens: int = 0, model_id: str = "", timeout: float | None = None,
                 correlation_id: str | None = None):
        texts = [text] if isinstance(text, str) else list(text)
        req = gen_pb2.BatchedTokenizeRequest(model_id=model_id, return_tokens=return_tokens,
                                             return_offsets=return_offsets,
                                             truncate_input_tokens=truncate_input_tokens,
                                             requests=[gen_pb2.TokenizeRequest(text=t) for t in texts])
        responses = list(self.generation.Tokenize(req, **self._kw(timeout, correlation_id)).responses)
        return responses[0] if isinstance(text, str) else responses

    # --- chat -------------------------------------------------------------------------------------
    def chat(self, messages: list[dict] | None = None, tools: list[dict] | None = None,
             documents: list[dict] | None = None, stream: bool = False, *, fim: tuple[str, str] | None = None,
             model_id: str = "", timeout: float | None = None, correlation_id: str | None = None, **params):
        """A ChatResponse, or with stream=True an iterator of ChatEvents (Start, TextDelta/ToolCall, Final).
        `fim=(prefix, suffix)` asks for fill-in-the-middle instead of a conversation."""
        req = build_chat_request(messages, tools, documents, fim=fim, model_id=model_id, **params)
        kw = self._kw(timeout, correlation_id)
        if not stream:
            return self.chat_service.Chat(req, **kw)
        return self._chat_stream(req, kw)

    def _chat_stream(self, req, kw) -> Iterator[chat_pb2.ChatEvent]:
        yield from _guarded_stream(self.chat_service.ChatStream(req, **kw), "ChatStream")

    def chat_tokenize(self, messages=None, tools=None, documents=None, text: str | None = None,
                      return_tokens: bool = False, timeout: float | None = None):
        req = chat_pb2.TokenizeRequest(return_tokens=return_tokens)
        if text is not None:
            req.text = text
        else:
            req.conversation.CopyFrom(_conversation(messages or [], tools, documents))
        return self.chat_service.Tokenize(req, **self._kw(timeout, None))

    def model_info(self, model_id: str = "", timeout: float | None = None) -> chat_pb2.ModelInfoResponse:
        return self.chat_service.ModelInfo(chat_pb2.ModelInfoRequest(model_id=model_id), **self._kw(timeout, None))

    # --- health ---------------------------------------------------------------------------------
    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The grpc.health.v1 status of `service` ("" = the whole server): "SERVING",
        "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN". Use a client made with
        ``health_check=False`` to ask a replica that is not serving (a health-checked channel
        sends no call to it)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service),
                          timeout=self.timeout if timeout is None else timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def check_health(target: str, service: str = "", timeout: float = 3.0, **tls) -> str:
    """One grpc.health.v1 Check against one replica (no balancing, no retries): its status
    name, or raises grpc.RpcError when it cannot be reached in `timeout` seconds."""
    with GraniteClient(target, timeout=timeout, retry=False, health_check=False, **tls) as client:
        return client.health(service)
