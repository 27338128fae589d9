"""fmaas.GenerationService: request validation / parameter mapping, response building, the servicer.

TGIS semantics (IBM's text-generation-inference router and server, and the
vllm-tgis-adapter extensions; README "TGIS compatibility" lists every rule):
``model_id`` is ignored (``strict_model_id`` restores NOT_FOUND for other names);
an empty ``requests`` list is OK with no responses; sampling parameters apply
only to SAMPLE; ``prefix_id`` is INVALID_ARGUMENT unless it names a loaded
adapter; ``adapter_id`` routes to that adapter's artifact or is INVALID_ARGUMENT;
guided decoding fields become a ConstraintSpec; TokenInfo texts are vocabulary
token strings (``id_to_token``).

Streaming: the first message carries ``input_token_count`` (+ the seed for
sampling, the input text when asked); when input tokens are asked for, the next
message carries them (with their logprobs/ranks/top-n once the prompt was
scored, TGIS's dedicated input-token message); then one message per token with
the text delta, the running ``generated_token_count`` and at most one TokenInfo;
the last one adds ``stop_reason`` / ``stop_sequence`` and the seed again (it is
the last token's message when the request ended on a token). Token events whose
delta is empty (half a UTF-8 character, a possible stop-sequence prefix) are not
sent unless generated tokens were requested. Unary text is the concatenation of
the streamed texts, by construction (both are built from the same events).
"""

from __future__ import annotations

import asyncio
import dataclasses

from ..errors import InvalidField
from ..protos import generation_pb2 as gen_pb2
from ..protos import generation_pb2_grpc as gen_grpc
from .bridge import GenerationFailed, Prepared, final_fields, rpc
from .constraints import ConstraintSpec
from .sampling import SamplingParams
from .scheduler import Event, Request
from .session import ModelSession, Stream
from .stopping import StopReason, fmaas_stop_reason
from .tgis import LENGTH_PENALTY_RANGE
from .validation import rename, validate_params


FMAAS_SERVICE = gen_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name  # fmaas.GenerationService

_FMAAS_FIELDS = {
    "temperature": "parameters.sampling.temperature",
    "top_k": "parameters.sampling.top_k",
    "top_p": "parameters.sampling.top_p",
    "typical_p": "parameters.sampling.typical_p",
    "seed": "parameters.sampling.seed",
    "repetition_penalty": "parameters.decoding.repetition_penalty",
    "logprobs": "parameters.response.token_logprobs",
    "top_n_tokens": "parameters.response.top_n_tokens",
    "max_new_tokens": "parameters.stopping.max_new_tokens",
    "min_new_tokens": "parameters.stopping.min_new_tokens",
    "stop_sequences": "parameters.stopping.stop_sequences",
    "include_stop_sequence": "parameters.stopping.include_stop_sequence",
    "time_limit_s": "parameters.stopping.time_limit_millis",
    "prompt_logprobs": "parameters.response.input_tokens",
    "length_penalty": "parameters.decoding.length_penalty",
}

# TGIS (router/src/validation.rs): sampling temperatures below this are refused (0 means 1.0)
MIN_TEMPERATURE = 0.05
MAX_STOP_SEQUENCE_BYTES = 240
_GUIDED_FIELD = "parameters.decoding"


# ============================================================================ message building

def _token_info(session, token, prepared: Prepared) -> gen_pb2.TokenInfo:
    """A TokenInfo as TGIS builds it: the vocabulary token string (``id_to_token``: 'Ġla',
    not ' la'), the logprob / rank / top tokens only when asked (top tokens carry their logprob
    only with token_logprobs). Prompt token 0 has logprob NaN and rank 0."""
    strings = session.token_strings
    info = gen_pb2.TokenInfo(text=strings([token.token_id])[0])
    if prepared.logprobs and token.logprob is not None:
        info.logprob = token.logprob
    if prepared.ranks and token.rank is not None:
        info.rank = token.rank
    if token.top_tokens:
        texts = strings([tid for tid, _ in token.top_tokens])
        for text, (_, lp) in zip(texts, token.top_tokens):
            top = info.top_tokens.add(text=text)
            if prepared.logprobs:
                top.logprob = lp
    return info


class FmaasStreamBuilder:
    """Scheduler events -> fmaas GenerationResponse messages (stream) and the unary response."""

    def __init__(self, session, prepared: Prepared, index: int = 0):
        self.session, self.p, self.index = session, prepared, index
        self.request = prepared.requests[index] if index < len(prepared.requests) else None
        self.final: Event | None = None
        self._input_sent = False

    def _input_tokens_message(self, scores=None) -> gen_pb2.GenerationResponse:
        ids = self.request.prompt_ids
        msg = gen_pb2.GenerationResponse(input_token_count=len(ids))
        if scores is not None:
            msg.input_tokens.extend(_token_info(self.session, s, self.p) for s in scores)
        else:
            msg.input_tokens.extend(gen_pb2.TokenInfo(text=text) for text in self.session.token_strings(list(ids)))
        self._input_sent = True
        return msg

    def messages(self, batch: list[Event]) -> list[gen_pb2.GenerationResponse]:
        p = self.p
        first = batch[0]
        if first.kind == "start":
            msg = gen_pb2.GenerationResponse(input_token_count=first.prompt_token_count,
                                             seed=(first.seed or 0) if p.sample else 0)
            if p.input_text:
                msg.text = p.texts[self.index]
            out = [msg]
            if p.input_tokens and self.request is not None and not self.request.prompt_logprobs:  # nothing to wait for
                out.append(self._input_tokens_message())
            return out
        out = []
        token = first if first.kind == "token" else None
        if p.input_tokens and not self._input_sent and token is not None and token.prompt_tokens is not None:
            out.append(self._input_tokens_message(token.prompt_tokens))
        final = batch[-1] if batch[-1].kind == "final" else None
        if final is None and token is not None and not token.text and not p.want_info:
            return out  # held back: nothing visible yet
        msg = gen_pb2.GenerationResponse()
        if token is not None:
            msg.text = token.text
            msg.generated_token_count = token.generated_count
            if p.want_info and token.token is not None:
                msg.tokens.append(_token_info(self.session, token.token, p))
        if final is not None:
            self.final = final
            msg.generated_token_count = final.generated_count
            msg.stop_reason = int(fmaas_stop_reason(final.stop_reason))  # fmaas has no CONSTRAINT_UNMET
            msg.stop_sequence = final.stop_sequence
            if p.sample:  # TGIS echoes the seed on the final message too
                msg.seed = final.seed or 0
        out.append(msg)
        return out


def accumulate_fmaas(messages: list[gen_pb2.GenerationResponse]) -> gen_pb2.GenerationResponse:
    """The unary response equivalent to a stream of messages (text concatenated)."""
    out = gen_pb2.GenerationResponse()
    text = []
    for m in messages:
        if m.input_token_count:
            out.input_token_count = m.input_token_count
        if m.seed:
            out.seed = m.seed
        out.input_tokens.extend(m.input_tokens)
        text.append(m.text)
        out.tokens.extend(m.tokens)
        out.generated_token_count = max(out.generated_token_count, m.generated_token_count)
        if m.stop_reason:
            out.stop_reason = m.stop_reason
            out.stop_sequence = m.stop_sequence
    out.text = "".join(text)
    return out


# ============================================================================ the servicer

class GenerationServicer(gen_grpc.GenerationServiceServicer):
    """fmaas.GenerationService over a :class:`~.session.ModelSession`.

    ``strict_model_id``: refuse a ``model_id`` the session does not serve with NOT_FOUND
    (TGIS ignores the field; `serve --strict-model-id`)."""

    def __init__(self, session: ModelSession, include_stop_sequence: bool = True, strict_model_id: bool = False):
        self.session = session
        self.include_stop_sequence = include_stop_sequence  # TGIS: a matched stop sequence is in the text
        self.strict_model_id = strict_model_id

    def _check_model(self, model_id: str) -> None:
        if self.strict_model_id:
            self.session.check_model(model_id)

    def _adapter(self, request) -> str:
        """The adapter a request names ("" = the base model); InvalidField for one not loaded here.

        ``adapter_id`` (vllm-tgis-adapter) must name a loaded adapter; ``prefix_id`` is its
        deprecated alias there, and a prompt-tuning prefix in IBM's TGIS, which this server does
        not have: INVALID_ARGUMENT unless it names a loaded adapter."""
        fields = request.DESCRIPTOR.fields_by_name
        loaded = getattr(self.session, "adapters", {}) or {}
        if "adapter_id" in fields and request.HasField("adapter_id") and request.adapter_id:
            name = request.adapter_id
            if name not in loaded:
                have = f" (loaded: {', '.join(sorted(loaded))})" if loaded else " (this server loads none)"
                raise InvalidField("adapter_id", f"no adapter {name!r} is loaded{have}")
            return name
        if "prefix_id" in fields and request.HasField("prefix_id"):
            name = request.prefix_id
            if name and name in loaded:
                return name
            raise InvalidField("prefix_id", f"can't retrieve prompt prefix with id {name!r}: this server has no "
                                            "prompt-tuning prefixes (use adapter_id for a loaded adapter)")
        return ""

    @staticmethod
    def _constraint(d: gen_pb2.DecodingParameters) -> ConstraintSpec | None:
        """vllm-tgis-adapter's guided decoding (the ``guided`` oneof) as a ConstraintSpec."""
        kind = d.WhichOneof("guided")
        if kind is None:
            return None
        field = f"{_GUIDED_FIELD}.{kind}"
        if kind == "format":
            if d.format == gen_pb2.DecodingParameters.TEXT:
                return None  # plain text: no constraint
            if d.format != gen_pb2.DecodingParameters.JSON:
                raise InvalidField(field, f"unknown response format {d.format}")
            return ConstraintSpec("json", field=field)
        if kind == "choice":
            if not d.choice.choices:
                raise InvalidField(f"{field}.choices", "is empty (give at least one choice)")
            return ConstraintSpec("choice", choices=tuple(d.choice.choices), field=field)
        value = getattr(d, kind)
        if not value:
            raise InvalidField(field, "is empty")
        return ConstraintSpec(kind, value=value, field=field)

    def _check_constraints_supported(self, spec: ConstraintSpec | None) -> None:
        scheduler = self.session.scheduler
        if spec is not None and not getattr(scheduler, "supports_constraints", False):
            raise InvalidField(spec.field, "guided decoding is not supported by this server yet")

    async def _prepare(self, texts: list[str], params: gen_pb2.Parameters, batched: bool,
                       adapter: str = "") -> Prepared:
        """Validate the parameters and tokenize the prompts (raises InvalidField & co)."""
        self.session.check_ready()
        method = params.method
        if method not in (gen_pb2.GREEDY, gen_pb2.SAMPLE):
            raise InvalidField("parameters.method", f"unknown decoding method {method}")
        sample = method == gen_pb2.SAMPLE
        s, st, r, d = params.sampling, params.stopping, params.response, params.decoding
        if sample and s.HasField("temperature") and s.temperature == 0.0:
            sample = False  # vllm-tgis-adapter: an explicit temperature 0.0 is greedy (IBM's clients cannot send it)
        # fmaas: 0 means "disabled"; as in TGIS, sampling fields apply (and are checked) only when sampling
        if sample:
            temperature = s.temperature or 1.0
            if temperature < MIN_TEMPERATURE:
                raise InvalidField("parameters.sampling.temperature",
                                   f"must be >= {MIN_TEMPERATURE} (0 means 1.0), got {s.temperature:g}")
            seed = s.seed if s.HasField("seed") else None
            sampling = SamplingParams(temperature=temperature, top_k=s.top_k, top_p=s.top_p or 1.0,
                                      typical_p=s.typical_p or 1.0, repetition_penalty=d.repetition_penalty or 1.0,
                                      seed=seed, logprobs=bool(r.token_logprobs or r.token_ranks),
                                      top_n_tokens=r.top_n_tokens)
        else:
            seed = None
            sampling = SamplingParams(temperature=0.0, repetition_penalty=d.repetition_penalty or 1.0,
                                      logprobs=bool(r.token_logprobs or r.token_ranks), top_n_tokens=r.top_n_tokens)
        length_penalty = None
        if d.HasField("length_penalty"):  # TGIS: a given length_penalty needs a factor in [1, 10]
            lp = d.length_penalty
            lo, hi = LENGTH_PENALTY_RANGE
            if not lo <= lp.decay_factor <= hi:
                raise InvalidField("parameters.decoding.length_penalty.decay_factor",
                                   f"must be >= {lo:g} and <= {hi:g}, got {lp.decay_factor:g}")
            if lp.decay_factor > 1.0:
                length_penalty = (int(lp.start_index), float(lp.decay_factor))
        details = bool(r.token_logprobs or r.token_ranks or r.top_n_tokens)
        if details and not (r.generated_tokens or r.input_tokens):
            raise InvalidField("parameters.response", "token_logprobs, token_ranks and top_n_tokens need "
                                                      "generated_tokens and/or input_tokens (must request input "
                                                      "and/or generated tokens to request extra token detail)")
        for stop in st.stop_sequences:  # TGIS counts UTF-8 bytes
            if len(stop.encode("utf-8")) > MAX_STOP_SEQUENCE_BYTES:
                raise InvalidField("parameters.stopping.stop_sequences",
                                   f"each must be at most {MAX_STOP_SEQUENCE_BYTES} UTF-8 bytes, got one of "
                                   f"{len(stop.encode('utf-8'))}")
        constraint = self._constraint(d)
        self._check_constraints_supported(constraint)
        include = (st.include_stop_sequence if st.HasField("include_stop_sequence")
                   else self.include_stop_sequence)
        stopping = self.session.stopping_params(st.max_new_tokens, st.min_new_tokens, st.stop_sequences, include,
                                                st.time_limit_millis, "parameters.stopping.max_new_tokens")
        validate_params(sampling, stopping, _FMAAS_FIELDS)
        context = self.session.context_window
        requests = []
        for i, text in enumerate(texts):
            name = f"requests[{i}].text" if batched else "request.text"
            ids = await self.session.encode_text(text, name, params.truncate_input_tokens)
            if len(ids) + stopping.min_new_tokens > context:
                raise InvalidField(name, f"input tokens ({len(ids)}) plus min_new_tokens "
                                         f"({stopping.min_new_tokens}) must be <= {context} (the context window)")
            requests.append(Request(ids, sampling, stopping, constraint=constraint, adapter=adapter,
                                    prompt_logprobs=bool(r.input_tokens and details),
                                    length_penalty=length_penalty))
        return Prepared(requests=requests, texts=list(texts), sample=sample, seed=seed,
                        want_info=bool(r.generated_tokens), logprobs=r.token_logprobs, ranks=r.token_ranks,
                        input_text=r.input_text, input_tokens=r.input_tokens)

    def _submit(self, request: Request, call) -> Stream:
        if not request.request_id:  # the access log's id, also in the scheduler's error log lines
            request = dataclasses.replace(request, request_id=call.request_id)
        try:
            stream = self.session.submit(request, params_checked=True)
        except InvalidField as exc:
            raise rename(exc, _FMAAS_FIELDS) from None
        call.watch(stream)
        return stream

    @rpc("fmaas.GenerationService/Generate")
    async def Generate(self, request, context, call):
        self._check_model(request.model_id)
        if not request.requests:
            return gen_pb2.BatchedGenerationResponse()  # TGIS: nothing asked, nothing to answer
        adapter = self._adapter(request)
        prepared = await self._prepare([r.text for r in request.requests], request.params, batched=True,
                                       adapter=adapter)
        streams = [self._submit(r, call) for r in prepared.requests]  # clean-ups cancel them all

        async def collect(i: int, stream: Stream):
            builder = FmaasStreamBuilder(self.session, prepared, i)
            msgs = []
            while builder.final is None:
                msgs.extend(builder.messages(await stream.get()))
            return accumulate_fmaas(msgs), builder.final

        results = await asyncio.gather(*(collect(i, b) for i, b in enumerate(streams)))
        call.fields["n"] = len(results)
        errors = [f.error for _, f in results if f.stop_reason == StopReason.ERROR]
        if errors:
            raise GenerationFailed(f"generation failed: {errors[0]}")
        call.fields.update(generated_tokens=sum(f.generated_count for _, f in results),
                           stop_reasons=[f.stop_reason.name for _, f in results])
        return gen_pb2.BatchedGenerationResponse(responses=[r for r, _ in results])

    @rpc("fmaas.GenerationService/GenerateStream")
    async def GenerateStream(self, request, context, call):
        self._check_model(request.model_id)
        if not request.HasField("request"):
            raise InvalidField("request", "is missing")
        adapter = self._adapter(request)
        prepared = await self._prepare([request.request.text], request.params, batched=False, adapter=adapter)
        stream = self._submit(prepared.requests[0], call)
        builder = FmaasStreamBuilder(self.session, prepared)
        call.fields_from(lambda: final_fields(builder.final))
        while builder.final is None:
            for msg in builder.messages(await stream.get()):
                yield msg

    @rpc("fmaas.GenerationService/Tokenize")
    async def Tokenize(self, request, context, call):
        s = self.session
        s.check_ready()
        self._check_model(request.model_id)
        self._adapter(request)  # adapters share the base tokenizer (checked when they are loaded)
        out = gen_pb2.BatchedTokenizeResponse()
        n = request.truncate_input_tokens
        for i, r in enumerate(request.requests):
            ids, offsets = await s.encode_with_offsets(r.text, f"requests[{i}].text")
            if n and len(ids) > n:
                ids, offsets = ids[-n:], offsets[-n:]
            resp = out.responses.add(token_count=len(ids))
            if request.return_tokens:
                resp.tokens.extend(s.token_strings(ids))
            if request.return_offsets:
                for a, b in offsets:
                    resp.offsets.add(start=a, end=b)
        call.fields["n"] = len(request.requests)
        return out

    @rpc("fmaas.GenerationService/ModelInfo")
    async def ModelInfo(self, request, context, call):
        s = self.session
        s.check_ready()
        self._check_model(request.model_id)
        return gen_pb2.ModelInfoResponse(model_kind=gen_pb2.ModelInfoResponse.DECODER_ONLY,
                                         max_sequence_length=s.context_window,
                                         max_new_tokens=s.max_new_tokens_limit)
