"""A small synchronous client for the granite-deploy gRPC server.

    from granite_deploy.serve.client import GraniteClient

    with GraniteClient("localhost:8033") as client:
        print(client.generate("Hello", max_new_tokens=20).text)
        for piece in client.generate_stream("Hello", text_only=True):
            print(piece, end="", flush=True)
        reply = client.chat([{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL])
        print(reply.content, [(c.name, c.arguments_json) for c in reply.tool_calls])

Generation parameters are keyword arguments (all optional; unknown ones raise
TypeError): max_new_tokens, min_new_tokens, temperature (> 0 samples), top_k,
top_p, typical_p, seed, repetition_penalty, stop_sequences, include_stop_sequence,
time_limit_ms, and for `generate*`: decoding_method ("greedy"/"sample"),
truncate_input_tokens, generated_tokens, token_logprobs, token_ranks,
top_n_tokens, input_text, input_tokens; for `chat`: logprobs, top_n_tokens.
Every call also takes timeout (seconds), correlation_id and model_id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import grpc

from ..protos import generation_pb2 as gen_pb2
from ..protos import generation_pb2_grpc as gen_grpc
from ..protos import granite_chat_pb2 as chat_pb2
from ..protos import granite_chat_pb2_grpc as chat_grpc

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

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
    for t in tools or ():
        fn = t.get("function", t)
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

    def __init__(self, target: str, tls_ca: str | None = None, client_cert: str | None = None,
                 client_key: str | None = None, token: str | None = None, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, server_name: str | None = None,
                 options: Iterable[tuple[str, object]] = ()):
        self.target, self.timeout, self.token = target, timeout, token
        opts = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # ping every 30 s while a call is open, so a long silent prefill keeps the connection alive
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        opts.extend(options)
        if tls_ca or client_cert or client_key:
            if bool(client_cert) != bool(client_key):
                raise ValueError("client_cert/client_key: give both for mutual TLS")
            creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca), private_key=_read(client_key),
                                                 certificate_chain=_read(client_cert))
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self.generation = gen_grpc.GenerationServiceStub(self.channel)
        self.chat_service = chat_grpc.ChatServiceStub(self.channel)

    # --- plumbing ---------------------------------------------------------------------------
    def _kw(self, timeout, correlation_id) -> dict:
        md = []
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        if correlation_id:
            md.append(("x-correlation-id", correlation_id))
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": md or None}

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
        call = self.generation.GenerateStream(req, **self._kw(timeout, correlation_id))
        try:
            for msg in call:
                if text_only:
                    if msg.text:
                        yield msg.text
                else:
                    yield msg
        finally:
            call.cancel()

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
        call = self.chat_service.ChatStream(req, **kw)
        try:
            yield from call
        finally:
            call.cancel()

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
