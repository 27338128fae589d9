"""fmaas.GenerationService: request validation / parameter mapping, response building, the servicer.

Streaming: the first message carries ``input_token_count`` (+ seed for
sampling, input text / input tokens when asked); then one message per token
with the text delta, the running ``generated_token_count`` and at most one
TokenInfo; the last one adds ``stop_reason`` / ``stop_sequence`` (it is the
last token's message when the request ended on a token). Token events whose
delta is empty (half a UTF-8 character, a possible stop-sequence prefix) are
not sent unless TokenInfo was requested. Unary text is the concatenation of
the streamed texts, by construction (both are built from the same events).
"""

from __future__ import annotations

import asyncio
import dataclasses

from ..errors import InvalidField, NotFound
from ..protos import generation_pb2 as gen_pb2
from ..protos import generation_pb2_grpc as gen_grpc
from .bridge import GenerationFailed, Prepared, final_fields, rpc
from .sampling import SamplingParams
from .scheduler import Event, Request
from .session import ModelSession, Stream
from .stopping import StopReason, fmaas_stop_reason
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
}


# ============================================================================ message building

def _fmaas_token_info(tokenizer, event: Event, prepared: Prepared) -> gen_pb2.TokenInfo:
    token = event.token
    # the scheduler already decoded the token when logprobs were asked for
    info = gen_pb2.TokenInfo(text=event.token_text or tokenizer.decode([token.token_id]))
    if prepared.logprobs and token.logprob is not None:
        info.logprob = token.logprob
    if prepared.ranks and token.rank is not None:
        info.rank = token.rank
    for tid, lp in token.top_tokens:
        info.top_tokens.add(text=tokenizer.decode([tid]), logprob=lp)
    return info


class FmaasStreamBuilder:
    """Scheduler events -> fmaas GenerationResponse messages (stream) and the unary response."""

    def __init__(self, tokenizer, prepared: Prepared, index: int = 0):
        self.tokenizer, self.p, self.index = tokenizer, prepared, index
        self.final: Event | None = None

    def messages(self, batch: list[Event]) -> list[gen_pb2.GenerationResponse]:
        p = self.p
        first = batch[0]
        if first.kind == "start":
            msg = gen_pb2.GenerationResponse(input_token_count=first.prompt_token_count,
                                             seed=(first.seed or 0) if p.sample else 0)
            if p.input_text:
                msg.text = p.texts[self.index]
            if p.input_tokens:
                for tid in p.requests[self.index].prompt_ids:
                    msg.input_tokens.add(text=self.tokenizer.decode([tid]))
            return [msg]
        token = first if first.kind == "token" else None
        final = batch[-1] if batch[-1].kind == "final" else None
        if final is None and token is not None and not token.text and not p.want_info:
            return []  # held back: nothing visible yet
        msg = gen_pb2.GenerationResponse()
        if token is not None:
            msg.text = token.text
            msg.generated_token_count = token.generated_count
            if p.want_info and token.token is not None:
                msg.tokens.append(_fmaas_token_info(self.tokenizer, token, p))
        if final is not None:
            self.final = final
            msg.generated_token_count = final.generated_count
            msg.stop_reason = int(fmaas_stop_reason(final.stop_reason))  # fmaas has no CONSTRAINT_UNMET
            msg.stop_sequence = final.stop_sequence
        return [msg]


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
    """fmaas.GenerationService over a :class:`~.session.ModelSession`."""

    def __init__(self, session: ModelSession, include_stop_sequence: bool = True):
        self.session = session
        self.include_stop_sequence = include_stop_sequence  # TGIS: a matched stop sequence is in the text

    def _check_model(self, model_id: str, prefix_id: str) -> None:
        self.session.check_model(model_id)
        if prefix_id:
            raise NotFound(f"prefix_id: no prompt prefix {prefix_id!r} (this server has no prompt-tuning prefixes)")

    async def _prepare(self, texts: list[str], params: gen_pb2.Parameters, batched: bool) -> Prepared:
        """Validate the parameters and tokenize the prompts (raises InvalidField & co)."""
        self.session.check_ready()
        method = params.method
        if method not in (gen_pb2.GREEDY, gen_pb2.SAMPLE):
            raise InvalidField("parameters.method", f"unknown decoding method {method}")
        sample = method == gen_pb2.SAMPLE
        s, st, r, d = params.sampling, params.stopping, params.response, params.decoding
        if d.HasField("length_penalty") and d.length_penalty.decay_factor not in (0.0, 1.0):
            raise InvalidField("parameters.decoding.length_penalty", "not supported by this server")
        seed = s.seed if s.HasField("seed") else None
        # fmaas: 0 means "disabled"; sampling fields are checked whatever the method
        sampling = SamplingParams(temperature=s.temperature or 1.0, top_k=s.top_k, top_p=s.top_p or 1.0,
                                  typical_p=s.typical_p or 1.0, repetition_penalty=d.repetition_penalty or 1.0,
                                  seed=seed, logprobs=bool(r.token_logprobs or r.token_ranks),
                                  top_n_tokens=r.top_n_tokens)
        include = (st.include_stop_sequence if st.HasField("include_stop_sequence")
                   else self.include_stop_sequence)
        stopping = self.session.stopping_params(st.max_new_tokens, st.min_new_tokens, st.stop_sequences, include,
                                                st.time_limit_millis, "parameters.stopping.max_new_tokens")
        validate_params(sampling, stopping, _FMAAS_FIELDS)
        if not sample:
            sampling = dataclasses.replace(sampling, temperature=0.0)
        requests = []
        for i, text in enumerate(texts):
            name = f"requests[{i}].text" if batched else "request.text"
            ids = await self.session.encode_text(text, name, params.truncate_input_tokens)
            requests.append(Request(ids, sampling, stopping))
        return Prepared(requests=requests, texts=list(texts), sample=sample, seed=seed,
                        want_info=bool(r.generated_tokens or r.token_logprobs or r.token_ranks or r.top_n_tokens),
                        logprobs=r.token_logprobs, ranks=r.token_ranks, input_text=r.input_text,
                        input_tokens=r.input_tokens)

    def _submit(self, request: Request, call) -> Stream:
        try:
            stream = self.session.submit(request, params_checked=True)
        except InvalidField as exc:
            raise rename(exc, _FMAAS_FIELDS) from None
        call.watch(stream)
        return stream

    @rpc("fmaas.GenerationService/Generate")
    async def Generate(self, request, context, call):
        self._check_model(request.model_id, request.prefix_id if request.HasField("prefix_id") else "")
        if not request.requests:
            raise InvalidField("requests", "is empty (give at least one GenerationRequest)")
        prepared = await self._prepare([r.text for r in request.requests], request.params, batched=True)
        streams = [self._submit(r, call) for r in prepared.requests]  # clean-ups cancel them all

        async def collect(i: int, stream: Stream):
            builder = FmaasStreamBuilder(self.session.tokenizer, prepared, i)
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
        self._check_model(request.model_id, request.prefix_id if request.HasField("prefix_id") else "")
        prepared = await self._prepare([request.request.text], request.params, batched=False)
        stream = self._submit(prepared.requests[0], call)
        builder = FmaasStreamBuilder(self.session.tokenizer, prepared)
        call.fields_from(lambda: final_fields(builder.final))
        while builder.final is None:
            for msg in builder.messages(await stream.get()):
                yield msg

    @rpc("fmaas.GenerationService/Tokenize")
    async def Tokenize(self, request, context, call):
        s = self.session
        s.check_ready()
        s.check_model(request.model_id)
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
        s.check_model(request.model_id)
        return gen_pb2.ModelInfoResponse(model_kind=gen_pb2.ModelInfoResponse.DECODER_ONLY,
                                         max_sequence_length=s.context_window,
                                         max_new_tokens=s.max_new_tokens_limit)
