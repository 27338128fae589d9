"""Tiny random PEFT LoRA adapters made at test time (export --adapter, serve --adapter)."""

from __future__ import annotations


def make_lora_adapter(checkpoint, out, seed=1, r=4, alpha=32):
    """A random (non-zero) LoRA adapter for the tiny checkpoint on every linear layer, saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "input_linear", "output_linear"])
    get_peft_model(base, config).save_pretrained(out)
    return out
