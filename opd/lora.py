"""LoRA for the OPD update (peft), and what the sampler and the checkpoints see of it.

A round wraps its starting weights in fresh adapters, syncs only the adapters to vLLM after each
step (a few MB instead of the model), and merges them into plain weights when it ends: every
checkpoint, resume point and registry version is an ordinary model, whichever way it was trained.
"""
from __future__ import annotations

from pathlib import Path

from opd.config import LoraSpec


def apply_lora(model, spec: LoraSpec):
    """The student with fresh LoRA adapters (B = 0, so it starts as the unwrapped model)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                     target_modules=list(spec.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def save_adapter(model, out: str | Path) -> Path:
    """Adapter weights + adapter_config.json: what vLLM's LoRARequest loads."""
    out = Path(out)
    getattr(model, "module", model).save_pretrained(out)  # DDP wraps the peft model
    return out


def merged(model):
    """The plain model with the adapters folded into its weights (the peft wrapper is consumed)."""
    return getattr(model, "module", model).merge_and_unload()
