"""`granite-deploy export --adapter PATH`: merge a PEFT LoRA adapter into the Granite checkpoint
before export, so the artifact is an ordinary (merged) model.

The merge is PEFT's own (`PeftModel.from_pretrained(base, PATH).merge_and_unload()`: W += B·A ·
alpha/r per target module), done on the fp32 transformers model the exporter loaded; the
graph, the activation report and the parity validation are then all of the merged model.
The artifact's manifest records the adapter (path, PEFT type, rank, alpha, target modules, the
base model it was trained on, sha256 of its config and weights) under ``source.adapter``.

Serving an adapter is then `granite-deploy serve BASE --adapter NAME=ADAPTER_ARTIFACT`: the
server loads the adapter artifact as its own engine and routes `adapter_id == NAME` there.
Only LoRA (and its PEFT variants that merge into the base weights) is supported.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import InvalidField

FIELD = "--adapter"
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MERGEABLE = {"LORA"}


def read_adapter_config(path: str | Path) -> tuple[Path, dict]:
    """(adapter folder, its adapter_config.json), or InvalidField naming --adapter."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InvalidField(FIELD, f"{folder} is not a folder (give a PEFT adapter folder with adapter_config.json)")
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise InvalidField(FIELD, f"{folder} has no adapter_config.json (not a PEFT adapter folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidField(FIELD, f"{config_path}: not valid JSON ({exc})") from exc
    kind = str(config.get("peft_type", "")).upper()
    if kind not in MERGEABLE:
        raise InvalidField(FIELD, f"{config_path}: peft_type {config.get('peft_type')!r} is not supported "
                                  f"(only {', '.join(sorted(MERGEABLE))} adapters merge into the weights)")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise InvalidField(FIELD, f"{folder} has no {' or '.join(_WEIGHT_FILES)}")
    return folder, config


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def adapter_record(folder: Path, config: dict) -> dict:
    """What the manifest says about a merged adapter."""
    weights = next(folder / n for n in _WEIGHT_FILES if (folder / n).is_file())
    targets = config.get("target_modules")
    return {
        "path": str(folder.resolve()),
        "peft_type": str(config.get("peft_type")).upper(),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "config_sha256": _sha256(folder / "adapter_config.json"),
        "weights_file": weights.name,
        "weights_sha256": _sha256(weights),
        "merged_with": "peft merge_and_unload",
    }


def merge_adapter(torch_model, path: str | Path):
    """The transformers model with the LoRA adapter at ``path`` merged in, and its manifest record."""
    folder, config = read_adapter_config(path)
    try:
        import peft
        from peft import PeftModel
    except ImportError as exc:  # the export extra brings peft
        raise InvalidField(FIELD, "merging an adapter needs peft (pip install 'granite-deploy[export]')") from exc
    base_keys = set(torch_model.state_dict())
    try:
        merged = PeftModel.from_pretrained(torch_model, str(folder), is_trainable=False).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as exc:  # wrong base (shapes), unknown target modules
        raise InvalidField(FIELD, f"{folder}: cannot be applied to this checkpoint ({exc})") from exc
    merged.eval()
    left = set(merged.state_dict()) ^ base_keys
    if left:
        raise InvalidField(FIELD, f"{folder}: merging left weights the base model does not have: "
                                  f"{sorted(left)[:5]} (only LoRA on existing Linear layers can be exported)")
    return merged, {**adapter_record(folder, config), "peft_version": peft.__version__}
