"""`export --adapter`: a PEFT LoRA adapter merged into the Granite checkpoint at export time. The
adapter artifact's greedy output (ONNX Runtime engine + scheduler) equals PEFT's merged model in
transformers, and differs from the base model's; bad adapters are refused naming --adapter."""

from __future__ import annotations

import json

import pytest
import torch

from granite_deploy.artifact import load_manifest
from granite_deploy.cli import main as cli_main
from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
from granite_deploy.errors import InvalidField
from granite_deploy.export.exporter import export
from granite_deploy.serve.scheduler import Request
from granite_deploy.serve.stopping import StoppingParams
from granite_deploy.serve.tokenizer import GraniteTokenizer
from harness import run_concurrently
from lora_adapters import make_lora_adapter

PROMPTS = ["Hello world", "The capital of France is", "def add(a, b):"]
N = 12


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint, tmp_path_factory):
    return make_lora_adapter(tiny_checkpoint, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def adapter_artifact(tiny_checkpoint, adapter_dir, tmp_path_factory):
    # validation on: the ONNX graph is checked against the merged PyTorch model at export
    return export(str(tiny_checkpoint), tmp_path_factory.mktemp("adapter-art") / "art", adapter=adapter_dir)


def _peft_merged(checkpoint, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def _hf_greedy(model, ids, n, eos):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids)))[0, len(ids):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def _engine_greedy(artifact, tokenizer):
    requests = [Request(tuple(tokenizer.encode(p)), stopping=StoppingParams(max_new_tokens=N)) for p in PROMPTS]
    engine = OnnxRuntimeEngine(artifact, max_batch=len(PROMPTS), threads=1)
    return [tokens for tokens, _, _ in run_concurrently(engine, tokenizer, requests)]


def test_adapter_artifact_greedy_equals_peft_merged_model(tiny_checkpoint, adapter_dir, adapter_artifact):
    tokenizer = GraniteTokenizer.from_dir(adapter_artifact)
    merged = _peft_merged(tiny_checkpoint, adapter_dir)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ours = _engine_greedy(adapter_artifact, tokenizer)
    eos = tokenizer.eos_token_id
    expected = [_hf_greedy(merged, list(tokenizer.encode(p)), N, eos) for p in PROMPTS]
    base_tokens = [_hf_greedy(base, list(tokenizer.encode(p)), N, eos) for p in PROMPTS]
    assert ours == expected
    assert ours != base_tokens  # the adapter really changed the model


def test_manifest_records_the_adapter(adapter_dir, adapter_artifact):
    import hashlib

    m = load_manifest(adapter_artifact)
    source = m["source"] if isinstance(m, dict) else m.source
    rec = source["adapter"]
    assert rec["peft_type"] == "LORA" and rec["r"] == 4 and rec["lora_alpha"] == 32
    assert rec["config_sha256"] == hashlib.sha256((adapter_dir / "adapter_config.json").read_bytes()).hexdigest()
    assert "q_proj" in rec["target_modules"]
    validation = m["validation"] if isinstance(m, dict) else m.validation
    assert validation["greedy_agreement"] == 1.0  # graph vs the merged PyTorch model


@pytest.mark.parametrize("make,message", [
    (lambda d: d, "no adapter_config.json"),
    (lambda d: (d / "adapter_config.json").write_text("{not json") and d, "not valid JSON"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"})) and d,
     "peft_type 'PROMPT_TUNING' is not supported"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"})) and d,
     "has no adapter_model.safetensors"),
    (lambda d: d / "missing", "is not a folder"),
], ids=["no-config", "bad-json", "not-lora", "no-weights", "missing"])
def test_bad_adapter_is_refused_naming_the_option(tiny_checkpoint, tmp_path, capsys, make, message):
    folder = make(tmp_path)
    with pytest.raises(InvalidField, match=message) as exc:
        export(str(tiny_checkpoint), tmp_path / "out", adapter=folder, validate=False)
    assert exc.value.field == "--adapter"
    assert not (tmp_path / "out").exists()
    rc = cli_main(["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "out2"),
                   "--adapter", str(folder), "--skip-validation"])
    err = capsys.readouterr().err
    assert rc == 2 and "--adapter" in err and message in err and "Traceback" not in err


def test_adapter_for_another_base_is_refused(tiny_checkpoint, tmp_path):
    from granite_deploy.export.tiny import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", seed=3, shared_intermediate_size=128)
    adapter = make_lora_adapter(other, tmp_path / "other-adapter")
    with pytest.raises(InvalidField, match="cannot be applied to this checkpoint"):
        export(str(tiny_checkpoint), tmp_path / "out", adapter=adapter, validate=False)
    assert not (tmp_path / "out").exists()
