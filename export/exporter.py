"""`granite-deploy export`: checkpoint in, verified artifact folder out."""

from __future__ import annotations

import hashlib
import logging
import platform
import shutil
import time
from pathlib import Path

from .. import __version__, progress
from ..errors import GraniteDeployError, VerificationFailed
from ..artifact import ArtifactError, file_records, load_manifest, staging_dir, write_manifest
from ..manifest import DECODER, DECODER_CPU, DECODER_RAGGED, make_graph, make_manifest, tensor_records
from .cpu_graph import cpu_graph_record, derive_cpu_graph
from .ragged_graph import derive_checked, ragged_graph_record
from .checkpoint import CheckpointError, arch_from_config, check_weights, read_config, resolve_model
from .graph import MAX_OPSET, MIN_OPSET, build_decoder_graph
from .io_spec import CACHE_LAYOUT, graph_io, state_records
from .validate import MIN_HALF_DECODE_STEPS

log = logging.getLogger(__name__)
DTYPES = ("fp32", "fp16", "bf16")
SUPPORTED_DTYPES = ("fp32", "fp16", "bf16")
# Export dtype -> the graph's weight/KV-cache dtype (numpy name, as written in the manifest).
WEIGHT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_DECODE_STEPS = {"fp32": 16, "fp16": 32, "bf16": 32}
# Attention softmax precision for half graphs: measured, an fp32 softmax (Attention's softmax_precision)
# buys nothing here. Max |logit diff| vs fp32 PyTorch with half / fp32 softmax on three tiny models (ONNX
# reference evaluator): fp16 0.065/0.060, 0.137/0.148, 0.139/0.157; bf16 0.61/0.52, 0.97/0.93, 1.47/1.52
# (no consistent sign). One Attention op over 1024 / 8192 fp16 keys vs a float64 softmax: max error
# 3.8e-3 / 1.0e-2 (half) vs 4.5e-3 / 1.1e-2 (fp32): QK^T rounding dominates. ONNX Runtime's fp16 CPU
# kernel gives identical output either way and TensorRT's Attention importer does not read the
# attribute. So the graph keeps the softmax in the half type (build_decoder_graph's softmax_fp32 stays
# available).
SOFTMAX_FP32 = False
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


class ExportError(GraniteDeployError):
    """Export was refused (bad options, exit 2) or failed; nothing was written at the output path."""

    exit_code = 2


class ValidationFailed(ExportError, VerificationFailed):
    """The exported graph does not match PyTorch within tolerance (exit 3); nothing was written."""

    exit_code = 3


def check_options(dtype: str, opset: int, decode_steps: int | None = None) -> None:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype not in SUPPORTED_DTYPES:
        raise ExportError(f"--dtype: {dtype} export is not implemented yet; use one of {', '.join(SUPPORTED_DTYPES)}")
    if decode_steps is not None and dtype != "fp32" and decode_steps < MIN_HALF_DECODE_STEPS:
        raise ExportError(f"--decode-steps: {dtype} validation needs at least {MIN_HALF_DECODE_STEPS} decode steps "
                          f"(got {decode_steps})")
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
    decode_steps: int | None = None,
    revision: str | None = None,
    validation_runtime: str = "auto",
    adapter: str | Path | None = None,
) -> Path:
    """Export a Granite checkpoint to an artifact folder; returns its path.

    decode_steps None: 16 for fp32, 32 for fp16/bf16. validation_runtime: "auto" (ONNX Runtime CPU when it
    runs the graph, else the ONNX reference evaluator), "onnxruntime" or "reference".
    adapter: a PEFT LoRA adapter folder merged into the weights first (export/adapter.py).
    """
    check_options(dtype, opset, decode_steps)
    if adapter is not None:  # a bad --adapter fails before the model loads
        from .adapter import read_adapter_config

        read_adapter_config(adapter)
    if decode_steps is None:
        decode_steps = DEFAULT_DECODE_STEPS[dtype]
    weight_dtype = WEIGHT_DTYPES[dtype]
    softmax_fp32 = SOFTMAX_FP32 and dtype != "fp32"
    model, output = str(model), Path(output)
    model_dir, source = resolve_model(model, revision)
    config = read_config(model_dir)
    arch = arch_from_config(config, source=str(model_dir / "config.json"))
    if output.resolve() == model_dir.resolve():
        raise ExportError(f"--output: {output} is the checkpoint folder itself")
    check_weights(model_dir)  # before anything is staged or torch is imported

    started = time.time()
    with staging_dir(output, force) as stage:
        with progress.step(f"loading {model}"):
            import torch
            import transformers
            from transformers import AutoModelForCausalLM

            if not progress.enabled():  # quiet off a terminal, including transformers' own chatter
                transformers.utils.logging.disable_progress_bar()
                transformers.utils.logging.set_verbosity_error()

            try:
                torch_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            except (ImportError, MemoryError):
                raise
            except Exception as exc:  # unreadable weights, shapes that do not match config.json, ...
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise CheckpointError(f"{model_dir}: transformers cannot load the checkpoint: {first}") from exc
            adapter_source = None
            if adapter is not None:  # tgis: merge the LoRA adapter; everything below sees the merged model
                from .adapter import merge_adapter

                torch_model, adapter_source = merge_adapter(torch_model, adapter)
            state = torch_model.state_dict()

        def get_weight(name: str):
            if arch.model_type == "granite":  # Granite 3.x names its MLP like Llama
                name = _granite3_weight_name(name)
                if isinstance(name, tuple):  # [gate; up] stacked as Granite 4's input_linear
                    import numpy as np

                    return np.concatenate([get_weight(n) for n in name], axis=0)
            if name not in state:
                raise CheckpointError(f"{model_dir}: weight {name!r} not found in the checkpoint")
            return state[name].detach().float().numpy()

        with progress.step(f"building ONNX graph ({arch.num_layers} layers, opset {opset})"):
            onnx_path, data_path = build_decoder_graph(arch, get_weight, stage, opset, weight_dtype=weight_dtype,
                                                       softmax_fp32=softmax_fp32)
        with progress.step("checking graph with onnx.checker"):
            import onnx

            onnx.checker.check_model(str(onnx_path), full_check=False)
        cpu_path = None
        if dtype == "fp32":  # half graphs are for GPUs
            with progress.step("deriving the ONNX Runtime CPU flavour (head-dim-major KV cache)"):
                cpu_path = derive_cpu_graph(onnx_path, arch.num_heads)
                onnx.checker.check_model(str(cpu_path), full_check=False)
            with progress.step("deriving the ragged-step flavour and checking it against the CPU flavour"):
                ragged_path, ragged_check = derive_checked(cpu_path, arch)

        copied = []
        for name in COPIED_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, stage / name)
                copied.append(name)

        from .validate import CALIBRATION_PROMPTS, ValidationUnavailable, activation_report, prompt_token_ids

        with progress.step("measuring per-layer max activations (fp32 PyTorch, calibration prompts)"):
            activations = activation_report(
                torch_model, prompt_token_ids(model_dir, arch.vocab_size, CALIBRATION_PROMPTS))
        if dtype == "fp16" and activations["layers_at_risk"]:
            log.warning(f"fp16 overflow risk: layers {activations['layers_at_risk']} have activations above "
                          f"{activations['threshold']:.0f} (0.5 x fp16 max); see activation_report in the manifest")

        validation = cpu_validation = {"skipped": True}
        if validate:
            from .validate import reference_runs
            from .validate import validate as run_validation

            prompts = prompt_token_ids(model_dir, arch.vocab_size)
            with progress.step(f"running the PyTorch reference (transformers, {len(prompts)} prompts batched, "
                               f"{decode_steps} decode steps)"):
                reference = reference_runs(torch_model, prompts, decode_steps)
            for name, path, head_dim_major in ((DECODER, onnx_path, False), (DECODER_CPU, cpu_path, True)):
                if path is None:
                    continue
                with progress.step(f"validating {name} against PyTorch (batch 2, {decode_steps} decode steps)"):
                    try:
                        record = run_validation(torch_model, path, arch, prompts, decode_steps, dtype,
                                                runtime=validation_runtime, head_dim_major=head_dim_major,
                                                reference=reference)
                    except ValidationUnavailable as exc:
                        raise ExportError(f"validation of the {dtype} graph is not possible on this machine: {exc}; "
                                          "nothing written (use --skip-validation to keep an unvalidated artifact)"
                                          ) from exc
                if not record["passed"]:
                    raise ValidationFailed(
                        f"validation failed for {path.name}: max |logit diff| {record['max_abs_logit_diff']:.3g} "
                        f"(tolerance {record['tolerance']['max_abs_diff']}), greedy agreement "
                        f"{record['greedy_agreement']:.1%}; nothing written (use --skip-validation to keep "
                        "an unvalidated artifact)"
                    )
                if name == DECODER:
                    validation = record
                else:
                    cpu_validation = record

        inputs, outputs = graph_io(arch, cache_dtype=weight_dtype)
        decoder = make_graph(
            name=DECODER, file=onnx_path.name, external_data=[data_path.name], opset=opset, precision=dtype,
            inputs=tensor_records(inputs), outputs=tensor_records(outputs), kv_cache=CACHE_LAYOUT,
            state=state_records(arch, weight_dtype),
            extra={
                "mixed_precision": None if dtype == "fp32" else {
                    "weights_and_matmuls": weight_dtype,
                    "kv_cache": weight_dtype,
                    "attention": weight_dtype + (" (softmax float32)" if softmax_fp32 else ""),
                    "rms_norm": "float32",
                    "residual_stream": "float32",
                    "logits": "float32",
                },
                "ops": "standard ONNX only (no com.microsoft)",
                "serves": ["prefill", "decode"],
            })
        graphs = {DECODER: decoder}
        if cpu_path is not None:
            graphs[DECODER_CPU] = cpu_graph_record(decoder, cpu_path, arch, cpu_validation)
            graphs[DECODER_RAGGED] = ragged_graph_record(graphs[DECODER_CPU], ragged_path, arch, ragged_check)
        manifest = make_manifest(
            created_unix=int(started),
            source={
                **source,
                **({"adapter": adapter_source} if adapter_source else {}),
                "model": model,
                "config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
                "architectures": config.get("architectures"),
                "model_type": config.get("model_type"),
            },
            architecture=arch,
            export_options={"dtype": dtype, "opset": opset, "validate": validate, "decode_steps": decode_steps},
            graphs=graphs,
            tokenizer_files=tuple(n for n in copied if n not in ("config.json", "generation_config.json")),
            context_length=arch.max_position_embeddings,
            validation=validation,
            extra={"activation_report": activations, "tools": _tool_versions()},
            files=file_records(stage, [p.name for p in stage.iterdir() if p.is_file()]),
        )
        write_manifest(stage, manifest)
    return output


def _granite3_weight_name(name: str):
    if name.endswith("shared_mlp.input_linear.weight"):
        prefix = name[: -len("shared_mlp.input_linear.weight")]
        return (prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight")
    return name.replace("shared_mlp.output_linear.weight", "mlp.down_proj.weight")


__all__ = ["export", "ExportError", "CheckpointError", "ArtifactError", "DTYPES"]


def summary(artifact: Path) -> str:
    m = load_manifest(artifact)
    v = m.validation
    if v.get("skipped"):
        return f"wrote {artifact} (validation skipped)"
    line = (
        f"wrote {artifact}: max |logit diff| {v['max_abs_logit_diff']:.2e}, "
        f"greedy agreement {v['greedy_agreement']:.0%} over {v['decode_steps']} decode steps"
    )
    cpu = m.graphs.get(DECODER_CPU)
    if cpu is not None and cpu.validation:
        line += (f"; CPU flavour {cpu.file}: {cpu.validation['max_abs_logit_diff']:.2e}, "
                 f"{cpu.validation['greedy_agreement']:.0%}")
    return line
