"""Read a Granite checkpoint's config and decide whether we can export it.

Everything the graph builder needs about the architecture is gathered into one
frozen `GraniteArch`, read from `config.json` alone, so the unsupported cases
are refused before any weight is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import GraniteDeployError
from ..manifest import Architecture

SUPPORTED_MODEL_TYPES = ("granitemoehybrid", "granite")
SUPPORTED_TEXT = (
    "GraniteMoeHybridForCausalLM checkpoints without experts: all-attention (granite-4.0-1b, "
    "granite-4.0-350m) and hybrid Mamba2 + attention (granite-4.0-h-1b, granite-4.0-h-350m), "
    "and Granite 3.x GraniteForCausalLM"
)
ATTENTION_LAYER_NAMES = ("attention", "full_attention")
MAMBA_LAYER_NAMES = ("mamba", "linear_attention")


class CheckpointError(GraniteDeployError, ValueError):
    """The checkpoint cannot be exported; the message says what was found and what is supported (exit 2)."""

    exit_code = 2


# The architecture record is one type from checkpoint to manifest to engine (granite_deploy/manifest.py).
GraniteArch = Architecture


def _read_json_lenient(path: Path) -> dict:
    # transformers 5.x writes `time_step_limit` with a bare Infinity, which
    # Python's json module accepts; other non-standard spellings are refused.
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def read_config(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not model_dir.exists():
        raise CheckpointError(f"{model_dir}: no such folder (expected a Hugging Face checkpoint folder or hub id)")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: is a file, expected a checkpoint folder containing config.json")
    if not config_path.is_file():
        found = sorted(p.name for p in model_dir.iterdir())[:12]
        raise CheckpointError(
            f"{config_path}: missing; {model_dir} holds {found or 'nothing'}. "
            f"Supported: {SUPPORTED_TEXT}."
        )
    return _read_json_lenient(config_path)


def check_weights(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, checked without loading them: present, and every safetensors file
    complete (its header parses and the tensors it declares fit in the file). CheckpointError otherwise."""
    model_dir = Path(model_dir)
    shards = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
        missing = [n for n in wanted if not (model_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists weight files that are missing: {', '.join(missing[:5])}")
    if not shards:
        bins = sorted(model_dir.glob("pytorch_model*.bin"))
        if bins:
            return bins
        found = sorted(p.name for p in model_dir.iterdir())[:12]
        raise CheckpointError(f"{model_dir}: no weights (no *.safetensors or pytorch_model*.bin; the folder holds "
                              f"{found})")
    for path in shards:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes; its header "
                                      f"says {n} header bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as exc:
                raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from exc
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"
                   and isinstance(t, dict) and "data_offsets" in t), default=0)
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: truncated ({size} bytes; its tensors need {8 + n + end})")
    return shards


def layer_kinds(config: dict) -> list[str]:
    """Per-layer 'attention' or 'mamba', reading both spellings transformers writes."""
    n = int(config.get("num_hidden_layers", 0))
    types = config.get("layer_types") or config.get("layers_block_type")
    if types is None:
        return ["attention"] * n
    kinds = []
    for i, t in enumerate(types):
        if t in ATTENTION_LAYER_NAMES:
            kinds.append("attention")
        elif t in MAMBA_LAYER_NAMES:
            kinds.append("mamba")
        else:
            raise CheckpointError(f"config.json: layer_types[{i}] = {t!r} is not a known layer type")
    return kinds


def arch_from_config(config: dict, source: str = "config.json") -> GraniteArch:
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} (architectures {archs}) is not a Granite model. "
            f"Supported: {SUPPORTED_TEXT}."
        )
    kinds = layer_kinds(config) if model_type == "granitemoehybrid" else ["attention"] * config["num_hidden_layers"]
    if "attention" not in kinds:
        raise CheckpointError(f"{source}: no attention layer; Granite models have at least one")
    if int(config.get("num_local_experts", 0) or 0) > 0:
        raise CheckpointError(
            f"{source}: mixture-of-experts checkpoint (num_local_experts={config['num_local_experts']}): "
            f"not yet supported. Supported: {SUPPORTED_TEXT}."
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CheckpointError(f"{source}: attention_bias/mlp_bias = true is not supported (no Granite release uses it)")
    pos_type = config.get("position_embedding_type", "rope") if model_type == "granitemoehybrid" else "rope"
    if pos_type not in ("rope", "nope", None):
        raise CheckpointError(f"{source}: position_embedding_type {pos_type!r} is not supported (rope or nope)")
    rope_scaling = config.get("rope_scaling")
    rope_params = config.get("rope_parameters") or {}
    rope_type = (rope_scaling or {}).get("rope_type") or (rope_scaling or {}).get("type") or rope_params.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise CheckpointError(f"{source}: rope scaling {rope_type!r} is not supported (only plain RoPE)")
    rope_theta = config.get("rope_theta", rope_params.get("rope_theta", 10000.0))

    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    intermediate = config.get("shared_intermediate_size") if model_type == "granitemoehybrid" else None
    intermediate = int(intermediate or config["intermediate_size"])
    return GraniteArch(
        model_type=model_type,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=len(kinds),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads", heads)),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate_size=intermediate,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        embedding_multiplier=float(config.get("embedding_multiplier", 1.0)),
        attention_multiplier=float(config.get("attention_multiplier", 1.0 / math.sqrt(hidden // heads))),
        residual_multiplier=float(config.get("residual_multiplier", 1.0)),
        logits_scaling=float(config.get("logits_scaling", 1.0)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        layer_types=tuple(kinds),
        rope=pos_type == "rope",
        mamba=_mamba(config, source) if "mamba" in kinds else None,
    )


def _mamba(config: dict, source: str) -> dict:
    dims = mamba_dims(config)
    dims["eps"] = float(config.get("rms_norm_eps", 1e-6))
    return dims


def mamba_dims(config: dict) -> dict:
    """The Mamba2 dimensions of a hybrid config (the graph builder in mamba.py reads them)."""
    hidden = int(config["hidden_size"])
    intermediate = int(config.get("mamba_expand", 2) * hidden)
    groups = int(config.get("mamba_n_groups", 1))
    d_state = int(config.get("mamba_d_state", 128))
    heads = int(config.get("mamba_n_heads", 128))
    head_dim = int(config.get("mamba_d_head") or intermediate // heads)
    if groups != 1:
        raise CheckpointError(f"config.json: mamba_n_groups = {groups} is not supported (every Granite 4.0 H model uses 1)")
    if heads * head_dim != intermediate:
        raise CheckpointError(f"config.json: mamba_n_heads * mamba_d_head = {heads * head_dim} != mamba_expand * hidden_size = {intermediate}")
    limit = [_json_float(v) for v in (config.get("time_step_limit") or (0.0, float("inf")))]
    return {
        "intermediate": intermediate,
        "groups": groups,
        "d_state": d_state,
        "heads": heads,
        "head_dim": head_dim,
        "d_conv": int(config.get("mamba_d_conv", 4)),
        "conv_dim": intermediate + 2 * groups * d_state,
        "time_step_limit": [float(limit[0]), float(limit[1])],
        "conv_bias": bool(config.get("mamba_conv_bias", True)),
        "proj_bias": bool(config.get("mamba_proj_bias", False)),
    }


def _json_float(value) -> float:
    """transformers 5.x writes infinity as {"__float__": "Infinity"}; others write Infinity or a string."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def resolve_model(model: str, revision: str | None = None) -> tuple[Path, dict]:
    """A local folder, or a hub id fetched with huggingface_hub. Returns (folder, source record)."""
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        return path, {"path": str(path.resolve()), "revision": revision}
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            model,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"],
        )
    except Exception as exc:  # network or auth: say what we tried
        raise CheckpointError(
            f"{model}: not a local folder, and fetching it from the Hugging Face hub failed: {exc}"
        ) from exc
    commit = Path(local).name  # snapshot folders are named by commit hash
    return Path(local), {"hub_id": model, "revision": revision or "main", "commit": commit, "path": local}
