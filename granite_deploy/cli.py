"""The `granite-deploy` command line. Each subcommand imports only what it needs,
so `serve` and `generate` run without torch installed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from .errors import GraniteDeployError


class UsageError(GraniteDeployError):
    """Bad command-line input; the message names the option or file (exit 2)."""

    exit_code = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``granite-deploy serve: error: argument --port: ...``)
    and exit status 2, without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Optional dependencies -> the extra that installs them (a missing one is named, exit 2)
_EXTRA_OF_MODULE = {
    "torch": "export", "transformers": "export", "safetensors": "export", "onnx_ir": "export",
    "huggingface_hub": "export", "onnx": "export", "peft": "export",
    "grpc": "serve", "grpc_health": "serve", "grpc_reflection": "serve", "onnxruntime": "serve",
    "tokenizers": "serve", "jinja2": "serve", "prometheus_client": "serve", "fastapi": "serve",
    "uvicorn": "serve", "sse_starlette": "serve", "llguidance": "serve", "google": "serve",
    "tensorrt": "tensorrt", "model_signing": "sign",
}


def _needs_extra(exc: ImportError, command: str, extra: str) -> int:
    """A missing optional dependency: one line naming the extra to install (exit 2)."""
    print(f"granite-deploy {command}: error: {exc.name or exc} is not installed; `{command}` needs the {extra} extra: "
          f'pip install "granite-deploy[{extra}]"', file=sys.stderr)
    return 2


class _Terminated(BaseException):
    """SIGTERM during a command that writes an artifact: unwinds like Ctrl-C, so staging folders are removed."""


def _unwind_on_sigterm() -> None:
    import signal

    def handler(signum, frame):
        raise _Terminated()

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (tests calling main() from a thread)
        pass


_EXPORT_MODULES = ("torch", "transformers", "safetensors", "onnx_ir", "huggingface_hub", "tokenizers")


def _cmd_export(args) -> int:
    _unwind_on_sigterm()
    try:
        from .export.exporter import export, summary
    except ImportError as exc:
        return _needs_extra(exc, "export", "export")
    try:
        out = _run_export(args, export)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in _EXPORT_MODULES:
            return _needs_extra(exc, "export", "export")
        raise
    print(summary(out))
    return 0


def _run_export(args, export):
    return export(
        args.model,
        args.output,
        dtype=args.dtype,
        opset=args.opset,
        force=args.force,
        validate=not args.skip_validation,
        decode_steps=args.decode_steps,
        revision=args.revision,
        adapter=args.adapter,
    )


def _cmd_verify(args) -> int:
    from .artifact import manifest_sha256, verify

    if bool(args.signature) != bool(args.public_key):
        raise UsageError("--signature/--public-key: give both")
    manifest = verify(args.artifact, load_graph=not args.no_load, manifest_digest=args.manifest_digest)
    if args.signature:
        from .signing import verify_signature

        verify_signature(args.artifact, args.signature, args.public_key)
    n = len(manifest.files)
    print(f"{args.artifact}: OK ({n} files inside the folder match their size and sha256"
          + ("" if args.no_load else ", graphs load in ONNX Runtime")
          + (f", signature verified with {args.public_key}" if args.signature else "") + ")")
    print(f"manifest sha256: {manifest_sha256(args.artifact)} (pin it: --manifest-digest)")
    return 0


def _cmd_sign(args) -> int:
    from .signing import sign

    out = sign(args.artifact, args.key, signature=args.signature)
    print(f"signed {args.artifact}: {out} (check: granite-deploy verify {args.artifact} --signature {out} "
          "--public-key PUBLIC.pem)")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, keep=args.keep)


def _add_trust_args(p) -> None:
    g = p.add_argument_group("artifact trust (sizes are always checked before loading)")
    g.add_argument("--skip-verify", action="store_true",
                   help="do not check sha256 before loading (for operators who verified at deploy time)")
    g.add_argument("--manifest-digest", metavar="SHA256",
                   help="refuse unless manifest.json's sha256 is this (`granite-deploy verify` prints it)")


def _add_sampling_args(p) -> None:
    g = p.add_argument_group("sampling and stopping (greedy by default)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--typical-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    g.add_argument("--time-limit-ms", type=int, default=0)


def _request_params(args):
    from .serve.sampling import SamplingParams
    from .serve.stopping import StoppingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              typical_p=args.typical_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    stopping = StoppingParams(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                              stop_sequences=tuple(args.stop),
                              time_limit_s=args.time_limit_ms / 1000 if args.time_limit_ms else None)
    return sampling, stopping


def _cmd_render(args) -> int:
    from .serve.generate import render_prompt
    from .serve.tokenizer import GraniteTokenizer

    from .artifact import load_manifest

    tokenizer = GraniteTokenizer.from_dir(args.artifact, trusted_files=load_manifest(args.artifact).files)
    sys.stdout.write(render_prompt(tokenizer, chat=args.chat, tools=args.tools, documents=args.documents))
    sys.stdout.flush()
    return 0


def _cmd_generate(args) -> int:
    import time

    from .artifact import open_trusted
    from .engines import load_engine
    from .serve.generate import render_prompt, stream
    from .serve.scheduler import Request, Scheduler
    from .serve.tokenizer import GraniteTokenizer

    _check_threads(args.threads)
    manifest = open_trusted(args.artifact, verify_hashes=not args.skip_verify, manifest_digest=args.manifest_digest)
    _check_graph_files(args.artifact, args.engine)
    tokenizer = GraniteTokenizer.from_dir(args.artifact, trusted_files=manifest.files)
    text = render_prompt(tokenizer, prompt=args.prompt, chat=args.chat, tools=args.tools, documents=args.documents)
    sampling, stopping = _request_params(args)
    engine = load_engine(args.artifact, engine=args.engine, max_batch=1, threads=args.threads)
    scheduler = Scheduler(engine, tokenizer).start()
    start = time.perf_counter()
    first = None
    try:
        for event in stream(scheduler, Request(tuple(tokenizer.encode(text)), sampling, stopping)):
            if event.kind == "token":
                first = first or time.perf_counter()
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif event.kind == "final":
                final = event
    finally:
        scheduler.shutdown()
    end = time.perf_counter()
    sys.stdout.write("\n")
    if final.error:
        print(f"granite-deploy generate: error: {final.error}", file=sys.stderr)
        return 1
    decode_s = end - (first or end)
    rate = (final.generated_count - 1) / decode_s if final.generated_count > 1 and decode_s > 0 else 0.0
    print(f"prompt tokens: {final.prompt_token_count}, generated tokens: {final.generated_count}, "
          f"stop: {final.stop_reason.name}, seed: {final.seed}, time to first token: "
          f"{(first or end) - start:.3f} s, decode: {rate:.1f} tokens/s  [{engine.info.kind} "
          f"{engine.info.device} {engine.info.precision}]", file=sys.stderr)
    return 0


def _check_threads(threads) -> None:
    from .serve.validation import validate_threads

    validate_threads(threads, "--threads")


def _check_graph_files(artifact, engine: str) -> None:
    """The ONNX graph the engine would load must be there: one line naming the missing file."""
    from .artifact import load_manifest

    manifest = load_manifest(artifact)
    for name, record in manifest.graphs.items():  # typed manifest (granite_deploy/manifest.py)
        path = record.file
        if not (Path(artifact) / path).is_file():
            raise UsageError(f"{artifact}: the artifact's {name} graph {path} is missing "
                             "(copy the whole artifact folder, or re-export)")


def _check_scheduler_args(args, config) -> None:
    """--token-budget (and its deprecated alias --prefill-chunk) and the --speculative options."""
    if args.prefill_chunk is not None:
        if args.token_budget is not None:
            raise UsageError("--prefill-chunk: deprecated alias of --token-budget; give only --token-budget")
        if args.prefill_chunk < 1:
            raise UsageError("--prefill-chunk: must be >= 1")
        print("granite-deploy: --prefill-chunk is deprecated: it now sets --token-budget (tokens per step, "
              "decodes included)", file=sys.stderr)
        config.token_budget = args.prefill_chunk
    if args.token_budget is not None and args.token_budget < 1:
        raise UsageError("--token-budget: must be >= 1")
    given = [name for name in ("speculative_tokens", "speculative_ngram", "speculative_ngram_min")
             if getattr(args, name) is not None]
    if not args.speculative:
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')}: needs --speculative ngram")
        return
    from .serve.server import speculative_config

    try:
        speculative_config(config)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from .artifact import load_manifest

    if any(record.recurrent for record in load_manifest(args.artifact).graphs.values()):
        raise UsageError("--speculative: this model has recurrent (Mamba) state, which cannot be rolled back to an "
                         "earlier position; speculative decoding is offered for dense (attention-only) models")


def _auth_token(args) -> str | None:
    """--auth-token, else --auth-token-file, else $GRANITE_DEPLOY_AUTH_TOKEN (not visible in `ps`)."""
    import os

    if args.auth_token and args.auth_token_file:
        raise UsageError("--auth-token-file: give either --auth-token or --auth-token-file")
    if args.auth_token_file:
        try:
            text = Path(args.auth_token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--auth-token-file: cannot read {args.auth_token_file}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise UsageError(f"--auth-token-file: {args.auth_token_file} is empty")
        return token
    if args.auth_token is not None:
        if not args.auth_token.strip():
            raise UsageError("--auth-token: must not be empty")
        return args.auth_token
    return os.environ.get("GRANITE_DEPLOY_AUTH_TOKEN") or None


def _setup_server_logging() -> None:
    import logging

    from .serve.server import JsonLogFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _adapter_options(values) -> tuple[tuple[str, str], ...]:
    """--adapter NAME=ARTIFACT (repeatable) -> ((name, artifact), ...); bad values exit 2 naming --adapter."""
    from .serve.adapters import parse_adapter_option

    return tuple(parse_adapter_option(v) for v in values or ())


def _cmd_serve(args) -> int:
    import asyncio

    from .artifact import load_manifest
    from .serve.server import ServerConfig, serve_forever

    load_manifest(args.artifact)
    from .serve.validation import validate_port

    validate_port(args.port, "--port")
    validate_port(args.metrics_port, "--metrics-port")
    if args.http_port is not None:
        validate_port(args.http_port, "--http-port")
    _check_threads(args.threads)
    _check_graph_files(args.artifact, args.engine)
    args.auth_token = _auth_token(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert/--tls-key: give both")
    if args.tls_client_ca and not args.tls_cert:
        raise UsageError("--tls-client-ca: needs --tls-cert and --tls-key")
    for name in ("max_batch", "max_queue", "max_message_bytes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1")
    config = ServerConfig(
        artifact=args.artifact, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
        engine=args.engine, threads=args.threads, metrics_port=args.metrics_port or None,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        auth_token=args.auth_token, model_id=args.model_id, max_new_tokens_limit=args.max_new_tokens_limit,
        max_message_bytes=args.max_message_bytes, drain_grace_s=args.grace, token_budget=args.token_budget,
        speculative=args.speculative,
        **{name: value for name, value in (("speculative_tokens", args.speculative_tokens),
                                           ("speculative_ngram", args.speculative_ngram),
                                           ("speculative_ngram_min", args.speculative_ngram_min))
           if value is not None},
        prefix_cache_mb=args.prefix_cache_mb,
        http_port=args.http_port, http_host=args.http_host,
        verify_hashes=not args.skip_verify, manifest_digest=args.manifest_digest,
        strict_model_id=args.strict_model_id, adapters=_adapter_options(args.adapter),
    )
    _check_scheduler_args(args, config)
    if args.prefix_cache_mb is not None and args.prefix_cache_mb < 0:
        raise UsageError(f"--prefix-cache-mb: must be >= 0 (0 turns the prefix cache off), got {args.prefix_cache_mb}")
    _setup_server_logging()

    def ready(server) -> None:
        extra = f", metrics on :{server.metrics_port}" if server.metrics_port else ""
        if server.http_port is not None:
            extra += f", OpenAI-compatible HTTP on {args.http_host or args.host}:{server.http_port}"
        tls = ", mTLS" if args.tls_client_ca else (", TLS" if args.tls_cert else "")
        print(f"serving {args.artifact} on {args.host}:{server.port} (engine {server.engine_description()}"
              f"{tls}{extra})", flush=True)

    asyncio.run(serve_forever(config, on_ready=ready))
    return 0


def _cmd_client(args) -> int:
    import json
    import time

    import grpc

    from .serve.client import GraniteClient
    from .serve.generate import load_list, load_messages

    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    if args.stop:
        params["stop_sequences"] = args.stop
    if args.prompt is not None and (args.tools or args.documents):
        raise UsageError("--tools/--documents need --chat (they are rendered by the chat template)")
    if args.chat is not None:  # checked before connecting, with the server's rules (serve/validation.py)
        from .serve.validation import validate_documents, validate_messages, validate_tools

        messages = validate_messages(load_messages(args.chat), f"--chat: {args.chat}: messages")
        tools = validate_tools(load_list(args.tools, "--tools"), f"--tools: {args.tools}")
        documents = validate_documents(load_list(args.documents, "--documents"), f"--documents: {args.documents}")
    # several --target (replicas) or one dns:/// name: round-robin, health-checked, UNAVAILABLE retried
    client = GraniteClient(args.target, tls_ca=args.tls_ca, client_cert=args.tls_cert, client_key=args.tls_key,
                           token=args.token, timeout=args.timeout, server_name=args.server_name)
    start, first = time.perf_counter(), None
    try:
        if args.prompt is not None:
            if args.stream:
                last, prompt_tokens = None, 0
                for msg in client.generate_stream(args.prompt, correlation_id=args.correlation_id, **params):
                    if msg.text:
                        first = first or time.perf_counter()
                        sys.stdout.write(msg.text)
                        sys.stdout.flush()
                    last = msg if msg.stop_reason else last
                    if msg.input_token_count:
                        prompt_tokens = msg.input_token_count
                stats = (prompt_tokens, last.generated_token_count if last else 0,
                         last.stop_reason if last else 0)
            else:
                resp = client.generate(args.prompt, correlation_id=args.correlation_id, **params)
                sys.stdout.write(resp.text)
                stats = (resp.input_token_count, resp.generated_token_count, resp.stop_reason)
            from .protos import generation_pb2

            reason = generation_pb2.StopReason.Name(stats[2])
            sys.stdout.write("\n")
            print(f"prompt tokens: {stats[0]}, generated tokens: {stats[1]}, stop: {reason}", file=sys.stderr)
        else:
            from .protos import granite_chat_pb2

            if args.stream:
                final = None
                for ev in client.chat(messages, tools=tools, documents=documents, stream=True,
                                      correlation_id=args.correlation_id, **params):
                    kind = ev.WhichOneof("event")
                    if kind == "text_delta":
                        first = first or time.perf_counter()
                        sys.stdout.write(ev.text_delta.text)
                        sys.stdout.flush()
                    elif kind == "tool_call":
                        sys.stdout.write("\n" + json.dumps({"tool_call": {"name": ev.tool_call.name,
                                         "arguments": json.loads(ev.tool_call.arguments_json or "{}")}},
                                         ensure_ascii=False) + "\n")
                        sys.stdout.flush()
                    elif kind == "final":
                        final = ev.final
                stats = (final.prompt_token_count, final.completion_token_count, final.stop_reason) if final else (0, 0, 0)
            else:
                resp = client.chat(messages, tools=tools, documents=documents, correlation_id=args.correlation_id,
                                   **params)
                sys.stdout.write(resp.content)
                for call in resp.tool_calls:
                    sys.stdout.write("\n" + json.dumps({"tool_call": {"name": call.name,
                                     "arguments": json.loads(call.arguments_json or "{}")}}, ensure_ascii=False))
                stats = (resp.prompt_token_count, resp.completion_token_count, resp.stop_reason)
            sys.stdout.write("\n")
            print(f"prompt tokens: {stats[0]}, generated tokens: {stats[1]}, "
                  f"stop: {granite_chat_pb2.StopReason.Name(stats[2])}", file=sys.stderr)
    except grpc.RpcError as exc:
        print(f"granite-deploy client: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if first is not None:
        print(f"time to first text: {first - start:.3f} s", file=sys.stderr)
    return 0


def _cmd_health(args) -> int:
    import os

    import grpc

    from .serve.client import check_health

    if not args.timeout > 0:
        raise UsageError("--timeout: must be > 0")
    target = args.target or f"127.0.0.1:{os.environ.get('GRANITE_DEPLOY_PORT') or 8033}"
    try:
        status = check_health(target, args.service, timeout=args.timeout, tls_ca=args.tls_ca,
                              client_cert=args.tls_cert, client_key=args.tls_key, server_name=args.server_name)
    except grpc.RpcError as exc:
        print(f"granite-deploy health: {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"{target}: {status}")
    return 0 if status == "SERVING" else 1


def _cmd_build(args) -> int:
    import json

    from .engines.tensorrt_build import build, plan, summary

    if args.plan_only:  # no TensorRT, no GPU: the plan `build` would build, as JSON
        print(json.dumps(plan(args.artifact, max_batch=args.max_batch, max_seq=args.max_seq, opt_seq=args.opt_seq),
                         indent=2))
        return 0
    record = build(args.artifact, max_batch=args.max_batch, max_seq=args.max_seq, opt_seq=args.opt_seq,
                   timing_cache=args.timing_cache)
    print(summary(Path(args.artifact), record))
    return 0


def _cmd_check_ops(args) -> int:
    from .export.opcheck import OpCheckError, check_artifact

    try:
        reports = check_artifact(args.artifact)
    except OpCheckError as exc:
        print(f"granite-deploy check-ops: error: {exc}", file=sys.stderr)
        return 2
    for report in reports:
        print("\n".join(report.lines()))
    return 0 if all(r.ok for r in reports) else 1


def _cmd_quantize(args) -> int:
    from .export.quantize import QuantizeError, quantize, summary

    _unwind_on_sigterm()
    # --int8 is the 8-bit form that measured fastest on CPU (bench/bench_peers.py, Xeon AVX-512 and EPYC
    # AVX2 hosts: 1.1-3x MatMulNBits 8-bit in prefill and batch decode, ahead at batch 1); the
    # MatMulNBits form stays as --int8-weight-only.
    method = ("int8-dynamic" if args.int8 or args.int8_dynamic else "int8" if args.int8_weight_only
              else "int4" if args.int4 else "int8-qdq")
    try:
        out = quantize(args.artifact, args.output, method, block_size=args.block_size, calibration=args.calibration,
                       force=args.force, skip_gate=args.skip_gate, accuracy_level=args.accuracy_level,
                       thresholds={"max_ppl_increase": args.max_ppl_increase,
                                   "min_greedy_agreement": args.min_agreement})
    except QuantizeError as exc:
        print(f"granite-deploy quantize: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in _EXPORT_MODULES:
            return _needs_extra(exc, "quantize", "export")
        raise
    print(summary(out))
    return 0




def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="granite-deploy", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export IBM Granite 4.0 checkpoints to verified ONNX artifacts, build and check engines, "
                    "and serve them over gRPC (fmaas + granite.v1.ChatService) and an OpenAI-compatible HTTP API.",
        epilog="exit status: 0 ok, 2 bad input (an option, a file, a missing extra), 3 verification or accuracy "
               "gate failure, 1 internal error (run with --debug for the traceback), 130/143 interrupted.\n"
               "environment: GRANITE_DEPLOY_AUTH_TOKEN (serve: the bearer token, instead of --auth-token).\n"
               "`granite-deploy COMMAND --help` describes a command's options.")
    parser.add_argument("--version", action="version", version=f"granite-deploy {__version__}")
    parser.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                        help="progress on stderr (auto: only on a terminal)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    p = sub.add_parser("export", help="export a Granite checkpoint to a verified ONNX artifact")
    p.add_argument("--model", required=True, help="checkpoint folder or Hugging Face hub id")
    p.add_argument("--output", required=True, help="artifact folder to write")
    p.add_argument("--dtype", default="fp32",
                   help="fp32 (default), fp16 or bf16: half-precision weights, MatMuls and KV cache with "
                        "float32 norms, residual stream and logits, validated against fp32 PyTorch")
    p.add_argument("--opset", type=int, default=24, help="ONNX opset (24 or newer; default 24)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--skip-validation", action="store_true", help="do not compare against PyTorch")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="decode steps checked in validation (default 16 for fp32, 32 for fp16/bf16)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--adapter", metavar="PATH",
                   help="PEFT LoRA adapter folder to merge into the checkpoint before export (an adapter "
                        "artifact, served with `serve BASE --adapter NAME=THIS_ARTIFACT`)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("verify", help="check an artifact's hashes and that its graph loads")
    p.add_argument("artifact")
    p.add_argument("--no-load", action="store_true", help="only check hashes, do not load the graph")
    p.add_argument("--manifest-digest", metavar="SHA256",
                   help="refuse unless manifest.json's sha256 is this (printed by a previous verify)")
    p.add_argument("--signature", help="signature file from `granite-deploy sign` (with --public-key)")
    p.add_argument("--public-key", help="PEM public key of the artifact's producer (with --signature)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("sign", help="sign a verified artifact folder with an elliptic-curve private key "
                                    "(OpenSSF model-signing; extra: sign)")
    p.add_argument("artifact")
    p.add_argument("--key", required=True, help="PEM elliptic-curve private key")
    p.add_argument("--signature", default=None,
                   help="signature file to write (default ARTIFACT.sig, next to the folder)")
    p.set_defaults(func=_cmd_sign)

    p = sub.add_parser("demo", help="end to end on a tiny Granite model made on the spot")
    p.add_argument("--workdir", default=None, help="folder for the checkpoint and artifact (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("generate", help="stream a completion from an artifact to stdout (stats to stderr)")
    p.add_argument("artifact")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw prompt text (no chat template)")
    src.add_argument("--chat", help="JSON file: list of {role, content} messages")
    p.add_argument("--tools", help="JSON file: list of tools (OpenAI function schema)")
    p.add_argument("--documents", help="JSON file: list of documents")
    p.add_argument("--engine", default="auto", help="auto, onnxruntime-cpu, onnxruntime-cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    _add_trust_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("render", help="print the exact prompt the chat template makes (nothing else)")
    p.add_argument("artifact")
    p.add_argument("--chat", required=True, help="JSON file: list of {role, content} messages")
    p.add_argument("--tools", help="JSON file: list of tools")
    p.add_argument("--documents", help="JSON file: list of documents")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("serve", help="serve an artifact over gRPC (fmaas.GenerationService + granite.v1.ChatService)")
    p.add_argument("artifact")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8033, help="gRPC port (default 8033; 0: any free port)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences generated together (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond the batch before RESOURCE_EXHAUSTED (default 64)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics HTTP port (default 0: off)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                        "/v1/models, /health, /ready, /metrics) on this port, same batch as gRPC (0: any free port)")
    p.add_argument("--http-host", default=None, help="address of the HTTP API (default: --host)")
    p.add_argument("--tls-cert", help="PEM server certificate (with --tls-key: TLS)")
    p.add_argument("--tls-key", help="PEM server private key")
    p.add_argument("--tls-client-ca", help="PEM CA for client certificates (mutual TLS: clients must present one)")
    p.add_argument("--auth-token", help="require 'authorization: Bearer <token>' (health checks exempt; "
                                        "visible in `ps`: prefer --auth-token-file or $GRANITE_DEPLOY_AUTH_TOKEN)")
    p.add_argument("--auth-token-file", metavar="PATH",
                   help="read the bearer token from this file (first line)")
    p.add_argument("--engine", default="auto", help="auto, onnxruntime-cpu, onnxruntime-cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--max-new-tokens-limit", type=int, default=None,
                   help="largest max_new_tokens accepted (default: min(1024, context - 1))")
    p.add_argument("--token-budget", type=int, default=None, metavar="N",
                   help="tokens per scheduler step: every decoding stream's token (and speculative draft) first, "
                        "then prompt chunks oldest first; prompts always get at least N/4. Bounds how long streams "
                        "stall behind a new prompt (default: 32 on CPU, chosen by bench/bench_ragged.py, 512 on GPU); "
                        "steps in which nothing decodes prefill up to max(N, 256) tokens")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="deprecated alias of --token-budget")
    p.add_argument("--speculative", choices=["ngram"], default=None,
                   help="speculative decoding: 'ngram' drafts by prompt lookup (the last n tokens matched in the "
                        "prompt and output) and verifies the draft in the step; output distributed exactly as "
                        "without (greedy: identical). Dense models only; constrained requests are not speculated "
                        "(default: off)")
    p.add_argument("--speculative-tokens", type=int, default=None, metavar="K",
                   help="most draft tokens per stream per step (default 4); requests may ask for fewer "
                        "(OpenAI extension field speculative_tokens)")
    p.add_argument("--speculative-ngram", type=int, default=None, metavar="N",
                   help="longest n-gram looked up (default 3; shorter ones down to --speculative-ngram-min)")
    p.add_argument("--speculative-ngram-min", type=int, default=None, metavar="N",
                   help="shortest n-gram looked up (default 1)")
    p.add_argument("--prefix-cache-mb", type=int, default=None, metavar="N",
                   help="automatic prefix caching: MiB of cached prompt/generation state to reuse across requests "
                        "(0: off; default: 20%% of the engine device's free memory at start, at most 8192)")
    p.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024,
                   help="largest gRPC message received or sent (default 16 MiB)")
    p.add_argument("--model-id", default=None, help="model id clients may name (default: the artifact folder name)")
    p.add_argument("--strict-model-id", action="store_true",
                   help="fmaas: answer NOT_FOUND for a model_id other than --model-id (TGIS, the default, ignores "
                        "model_id)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=ARTIFACT",
                   help="serve an adapter artifact (`export --adapter`) for fmaas adapter_id NAME, on its own "
                        "engine (memory: one more model); repeatable")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM/SIGINT (default 30)")
    _add_trust_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("client", help="call a granite-deploy server: print tokens as they arrive")
    p.add_argument("--target", required=True, action="append",
                   help="HOST[:PORT] of a server (port default 8033); repeat for several replicas, or one "
                        "dns:///NAME[:PORT] for all addresses of a name (e.g. a headless Service): calls are "
                        "balanced round-robin over SERVING replicas, retried on UNAVAILABLE before any output")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw prompt text (fmaas GenerationService)")
    src.add_argument("--chat", help="JSON file: list of {role, content} messages (ChatService)")
    p.add_argument("--tools", help="JSON file: list of tools (OpenAI function schema)")
    p.add_argument("--documents", help="JSON file: list of documents")
    p.add_argument("--stream", action="store_true", help="stream the reply")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the server default")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--token", help="bearer token")
    p.add_argument("--tls-ca", help="PEM CA of the server certificate (turns TLS on)")
    p.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="PEM client private key (mutual TLS)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--correlation-id", help="x-correlation-id sent with the request")
    p.add_argument("--server-name", help="TLS: the name the server certificate must carry (default: the target's host)")
    p.set_defaults(func=_cmd_client)

    p = sub.add_parser("health", help="ask a server's grpc.health.v1 status; exit 0 only when SERVING "
                                      "(container health checks)")
    p.add_argument("--target", default=None,
                   help="HOST[:PORT] of one server (default 127.0.0.1:$GRANITE_DEPLOY_PORT, else 127.0.0.1:8033)")
    p.add_argument("--service", default="", help="service name to ask about (default '': the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    p.add_argument("--tls-ca", help="PEM CA of the server certificate (turns TLS on)")
    p.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="PEM client private key (mutual TLS)")
    p.add_argument("--server-name", help="TLS: the name the server certificate must carry")
    p.set_defaults(func=_cmd_health)

    p = sub.add_parser("build", help="build a TensorRT plan for this GPU into an artifact (needs tensorrt + CUDA)")
    p.add_argument("artifact")
    p.add_argument("--max-batch", type=int, default=8, help="sequences per decode step (default 8)")
    p.add_argument("--max-seq", type=int, default=None,
                   help="tokens per sequence = static KV-cache capacity (default min(4096, context length))")
    p.add_argument("--opt-seq", type=int, default=None, help="prompt length to tune for (default 512)")
    p.add_argument("--timing-cache", help="TensorRT timing cache file: reused when present, saved after the build")
    p.add_argument("--plan-only", action="store_true",
                   help="print the plan (optimisation profiles for every graph input) as JSON and stop; "
                        "needs neither TensorRT nor a GPU")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("check-ops", help="list a graph's ops and whether TensorRT's ONNX parser takes them")
    p.add_argument("artifact", help="artifact folder (or one .onnx file)")
    p.set_defaults(func=_cmd_check_ops)

    p = sub.add_parser("quantize", help="quantize an fp32 artifact (INT8 dynamic, INT8/INT4 weight-only, INT8 QDQ), accuracy-gated")
    p.add_argument("artifact", help="fp32 artifact folder (from `export`)")
    p.add_argument("--output", required=True, help="new artifact folder to write")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--int8", action="store_true",
                     help="8-bit integer GEMMs: int8 per-channel weights (7-bit values), activations quantised per token at run "
                          "time (MatMulInteger; the same as --int8-dynamic; ONNX Runtime only). Fastest 8-bit form on "
                          "AVX2-only CPUs, and for prefill everywhere")
    how.add_argument("--int8-weight-only", action="store_true",
                     help="8-bit weight-only MatMulNBits, float activations (ONNX Runtime only). Faster decode than --int8 on "
                          "AVX-512 VNNI CPUs (MLAS has a VNNI kernel for it; README, Benchmarks)")
    how.add_argument("--int4", action="store_true", help="4-bit weight-only MatMulNBits (ONNX Runtime only)")
    how.add_argument("--int8-qdq", action="store_true",
                     help="int8 per-channel weights + DequantizeLinear, standard ops (TensorRT and ONNX Runtime)")
    how.add_argument("--int8-dynamic", action="store_true", help="the same as --int8 (its explicit name)")
    p.add_argument("--block-size", type=int, default=None, help="weights per scale for --int8-weight-only/--int4 and the 8-bit head of --int8 (default 32; "
                        "the 8-bit forms: 128 when every weight's K divides by 128)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 4],
                   help="MatMulNBits compute: 4 = int8 dot products (default, fast), 1 = fp32, 0 = unset")
    p.add_argument("--calibration", help="held-out UTF-8 text file for the perplexity gate (default: built-in sample)")
    p.add_argument("--max-ppl-increase", type=float, default=None,
                   help="gate: largest perplexity increase vs fp32, as a fraction (default 0.02 int8, 0.08 int4)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="gate: least greedy agreement with fp32 over 64 steps (default 0.9 int8, 0.75 int4)")
    p.add_argument("--skip-gate", "--force-gate", dest="skip_gate", action="store_true",
                   help="write the artifact even if the accuracy gate fails (the failure is recorded)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_quantize)

    return parser


def main(argv: list[str] | None = None) -> int:
    from . import progress
    from .artifact import ArtifactError

    parser = build_parser()
    args = parser.parse_args(argv)
    progress.set_enabled({"auto": None, "on": True, "off": False}[args.progress])
    known = [ArtifactError, UsageError, ValueError, FileNotFoundError]
    try:
        from .export.checkpoint import CheckpointError
        from .export.exporter import ExportError

        known += [CheckpointError, ExportError]
    except ImportError:  # export extra not installed
        pass
    def fail(exc: BaseException, line: str, code: int) -> int:
        if args.debug:
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        print(f"granite-deploy {args.command}: {line}", file=sys.stderr)
        return code

    try:
        return args.func(args)
    except GraniteDeployError as exc:  # mapped by class: 2 bad input, 3 verification/gate failure, 1 other
        return fail(exc, f"error: {_one_line(exc)}", exc.exit_code)
    except _Terminated:
        print(f"granite-deploy {args.command}: terminated (SIGTERM); nothing written", file=sys.stderr)
        return 143
    except tuple(known) as exc:
        return fail(exc, f"error: {_one_line(exc)}", 2)
    except KeyboardInterrupt:
        print(f"granite-deploy {args.command}: interrupted", file=sys.stderr)
        return 130
    except ImportError as exc:  # an optional dependency is missing: name the extra that installs it
        module = (exc.name or "").split(".")[0]
        extra = _EXTRA_OF_MODULE.get(module)
        if extra is None:
            return fail(exc, f"internal error: {_one_line(exc)} (run with --debug for the traceback)", 1)
        return fail(exc, f"error: {module} is not installed; `{args.command}` needs the {extra} extra: "
                         f'pip install "granite-deploy[{extra}]"', 2)
    except OSError as exc:  # a file or port the user named
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        return fail(exc, f"error:{where} {exc.strerror or exc}", 2)
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback only with --debug
        return fail(exc, f"internal error: {type(exc).__name__}: {_one_line(exc)} "
                         "(run with --debug for the traceback)", 1)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = text.splitlines()
    if len(lines) <= 1:
        return text or type(exc).__name__
    return lines[0] + " " + " ".join(line.strip() for line in lines[1:6]) + (" ..." if len(lines) > 6 else "")


if __name__ == "__main__":
    sys.exit(main())
