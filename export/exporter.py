"""`granite-deploy export`: checkpoint in, verified artifact folder out."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from pathlib import Path

from .. import __version__, progress
from ..artifact import FORMAT, FORMAT_VERSION, ArtifactError, file_records, staging_dir, write_manifest
from .checkpoint import CheckpointError, arch_from_config, read_config, resolve_model
from .graph import MAX_OPSET, MIN_OPSET, build_decoder_graph
from .io_spec import CACHE_LAYOUT, graph_io

DTYPES = ("fp32", "fp16", "bf16")
SUPPORTED_DTYPES = ("fp32",)
# Checkpoint files copied unchanged: config, generation config, tokenizer and chat template.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)


class ExportError(Exception):
    """Export failed; nothing was written at the output path."""


def check_options(dtype: str, opset: int) -> None:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype not in SUPPORTED_DTYPES:
        raise ExportError(
            f"--dtype: {dtype} export is not implemented yet (planned with the FP16/INT8 TensorRT work); "
            "use --dtype fp32"
        )
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"--opset: {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET} "
            "(the in-place KV cache needs TensorScatter from opset 24; the installed onnx knows up to "
            f"{MAX_OPSET})"
        )


def _tool_versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "granite-deploy": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def export(
    model: str,
    output: str | Path,
    dtype: str = "fp32",
    opset: int = 24,
    force: bool = False,
    validate: bool = True,
    decode_steps: int = 16,
    revision: str | None = None,
) -> Path:
    """Export a Granite checkpoint to an artifact folder; returns its path."""
    check_options(dtype, opset)
    output = Path(output)
    model_dir, source = resolve_model(model, revision)
    config = read_config(model_dir)
    arch = arch_from_config(config, source=str(model_dir / "config.json"))
    if output.resolve() == model_dir.resolve():
        raise ExportError(f"--output: {output} is the checkpoint folder itself")

    started = time.time()
    with staging_dir(output, force) as stage:
        with progress.step(f"loading {model}"):
            import torch
            import transformers
            from transformers import AutoModelForCausalLM

            if not progress.enabled():
                transformers.utils.logging.disable_progress_bar()

            torch_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            state = torch_model.state_dict()

        def get_weight(name: str):
            if name not in state:
                raise CheckpointError(f"{model_dir}: weight {name!r} not found in the checkpoint")
            return state[name].detach().float().numpy()

        with progress.step(f"building ONNX graph ({arch.num_layers} layers, opset {opset})"):
            onnx_path, data_path = build_decoder_graph(arch, get_weight, stage, opset)
        with progress.step("checking graph with onnx.checker"):
            import onnx

            onnx.checker.check_model(str(onnx_path), full_check=False)

        copied = []
        for name in COPIED_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, stage / name)
                copied.append(name)

        validation = {"skipped": True}
        if validate:
            from .validate import prompt_token_ids
            from .validate import validate as run_validation

            with progress.step(f"validating against PyTorch (batch 2, {decode_steps} decode steps)"):
                prompts = prompt_token_ids(model_dir, arch.vocab_size)
                validation = run_validation(torch_model, onnx_path, arch, prompts, decode_steps, dtype)
            if not validation["passed"]:
                raise ExportError(
                    f"validation failed: max |logit diff| {validation['max_abs_logit_diff']:.3g} "
                    f"(tolerance {validation['tolerance']['max_abs_diff']}), greedy agreement "
                    f"{validation['greedy_agreement']:.1%}; nothing written (use --skip-validation to keep "
                    "an unvalidated artifact)"
                )

        inputs, outputs = graph_io(arch)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_unix": int(started),
            "source": {
                **source,
                "model": model,
                "config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
                "architectures": config.get("architectures"),
                "model_type": config.get("model_type"),
            },
            "architecture": arch.to_dict(),
            "export_options": {"dtype": dtype, "opset": opset, "validate": validate, "decode_steps": decode_steps},
            "graphs": {
                "decoder": {
                    "file": onnx_path.name,
                    "external_data": [data_path.name],
                    "opset": opset,
                    "precision": dtype,
                    "ops": "standard ONNX only (no com.microsoft)",
                    "serves": ["prefill", "decode"],
                    "inputs": [s.to_dict() for s in inputs],
                    "outputs": [s.to_dict() for s in outputs],
                    "kv_cache": CACHE_LAYOUT,
                }
            },
            "tokenizer": {"files": [n for n in copied if n not in ("config.json", "generation_config.json")]},
            "context_length": arch.max_position_embeddings,
            "validation": validation,
            "tools": _tool_versions(),
        }
        manifest["files"] = file_records(stage, [p.name for p in stage.iterdir() if p.is_file()])
        write_manifest(stage, manifest)
    return output


__all__ = ["export", "ExportError", "CheckpointError", "ArtifactError", "DTYPES"]


def summary(artifact: Path) -> str:
    m = json.loads((artifact / "manifest.json").read_text())
    v = m["validation"]
    if v.get("skipped"):
        return f"wrote {artifact} (validation skipped)"
    return (
        f"wrote {artifact}: max |logit diff| {v['max_abs_logit_diff']:.2e}, "
        f"greedy agreement {v['greedy_agreement']:.0%} over {v['decode_steps']} decode steps"
    )
