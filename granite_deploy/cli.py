"""The `granite-deploy` command line. Each subcommand imports only what it needs,
so `serve` and `generate` run without torch installed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(Exception):
    """Bad command-line input; the message names the option or file."""


def _cmd_export(args) -> int:
    from .export.exporter import export, summary

    out = export(
        args.model,
        args.output,
        dtype=args.dtype,
        opset=args.opset,
        force=args.force,
        validate=not args.skip_validation,
        decode_steps=args.decode_steps,
        revision=args.revision,
    )
    print(summary(out))
    return 0


def _cmd_verify(args) -> int:
    from .artifact import verify

    manifest = verify(args.artifact, load_graph=not args.no_load)
    n = len(manifest["files"])
    print(f"{args.artifact}: OK ({n} files match their sha256" + ("" if args.no_load else ", graph loads in ONNX Runtime") + ")")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, keep=args.keep)


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

    tokenizer = GraniteTokenizer.from_dir(args.artifact)
    sys.stdout.write(render_prompt(tokenizer, chat=args.chat, tools=args.tools, documents=args.documents))
    sys.stdout.flush()
    return 0


def _cmd_generate(args) -> int:
    import time

    from .artifact import load_manifest
    from .engines import load_engine
    from .serve.generate import render_prompt, stream
    from .serve.scheduler import Request, Scheduler
    from .serve.tokenizer import GraniteTokenizer

    load_manifest(args.artifact)
    tokenizer = GraniteTokenizer.from_dir(args.artifact)
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


COMMANDS = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granite-deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                        help="progress on stderr (auto: only on a terminal)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a Granite checkpoint to a verified ONNX artifact")
    p.add_argument("--model", required=True, help="checkpoint folder or Hugging Face hub id")
    p.add_argument("--output", required=True, help="artifact folder to write")
    p.add_argument("--dtype", default="fp32", help="fp32 (fp16, bf16: planned)")
    p.add_argument("--opset", type=int, default=24, help="ONNX opset (24 or newer; default 24)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--skip-validation", action="store_true", help="do not compare against PyTorch")
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps checked in validation (default 16)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("verify", help="check an artifact's hashes and that its graph loads")
    p.add_argument("artifact")
    p.add_argument("--no-load", action="store_true", help="only check hashes, do not load the graph")
    p.set_defaults(func=_cmd_verify)

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
    _add_sampling_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("render", help="print the exact prompt the chat template makes (nothing else)")
    p.add_argument("artifact")
    p.add_argument("--chat", required=True, help="JSON file: list of {role, content} messages")
    p.add_argument("--tools", help="JSON file: list of tools")
    p.add_argument("--documents", help="JSON file: list of documents")
    p.set_defaults(func=_cmd_render)

    for name, (register, _) in COMMANDS.items():
        register(sub)
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
    try:
        return args.func(args)
    except tuple(known) as exc:
        print(f"granite-deploy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"granite-deploy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
