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
