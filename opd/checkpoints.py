"""Checkpoints of the student: plain HF weights (+ full optimizer state), what the sampler reloads after a
step, and the check that no checkpoint with NaN/inf weights is ever published.

Every function works on a student trained in one process, under DDP or sharded by FSDP: under torchrun
every rank calls it (FSDP gathers) and rank 0 writes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from opd.errors import PermanentError


def save_optimizer(model, optimizer, path: str | Path) -> None:
    """Full, parameter-name-keyed optimizer state: the same file whether the student was trained in
    one process, under DDP or sharded by FSDP, so a resumed round may use any of them.
    Under torchrun every rank must call this (FSDP gathers); only rank 0 writes."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(state, path)


def save_student(model, tok, out: str | Path, rank: int = 0) -> None:
    """An ordinary HF checkpoint of the (possibly DDP/FSDP-wrapped) student. Under torchrun every
    rank calls it (FSDP gathers the full state dict); rank 0 writes."""
    import torch.distributed as dist

    from opd.models import save_model

    if not dist.is_initialized():
        save_model(model, tok, out)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_model(getattr(model, "module", model), tok, out, state_dict=sd)


def write_sync(trainer, tok, out: str | Path, lora: bool) -> str:
    """What the sampler reloads after a step: the adapters under LoRA, else the full weights."""
    model, rank = trainer.model, trainer.rank
    if lora:
        if rank == 0:  # DDP keeps the adapters identical on every rank
            from opd.lora import save_adapter

            save_adapter(model, out)
    else:
        save_student(model, tok, out, rank)
    return str(out)


def write_checkpoint(trainer, tok, out: str | Path, lora: bool):
    """A round's end: plain weights + optimizer state, or under LoRA the merged weights and no Adam
    state (the next round starts fresh adapters). Returns the plain model (rank 0)."""
    model, rank = trainer.model, trainer.rank
    if lora:
        if rank != 0:
            return None
        from opd.lora import merged
        from opd.models import save_model

        model = merged(model)  # a plain, unwrapped module on this rank alone: no gather
        save_model(model, tok, out)
        return model
    save_student(model, tok, out, rank)
    save_optimizer(model, trainer.torch_optimizer, Path(out) / "optimizer.pt")
    return model


class NonFiniteWeights(PermanentError):
    """A checkpoint holding NaN/inf weights: publishing it would let a resume or the registry reuse it."""


def check_finite_weights(model_dir: str | Path, stage: str) -> None:
    """Refuse a checkpoint with any non-finite floating-point weight, naming the first tensor.

    Reads one tensor at a time (safetensors is memory-mapped), so a large checkpoint is scanned
    without holding a second copy of the model."""
    from safetensors import safe_open

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                t = sf.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise NonFiniteWeights(
                        f"{stage}: weight {name!r} in {f.name} has {bad} non-finite value(s) (NaN/inf); the checkpoint "
                        "is not published. Lower the stage's learning rate, or check the starting model's weights")


def load_optimizer(model, optimizer, path: str | Path) -> None:
    """Inverse of ``save_optimizer``; also reads the index-keyed files of single-process runs."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    if all(isinstance(k, int) for k in state["state"]):
        optimizer.load_state_dict(state)
        return
    optimizer.zero_grad(set_to_none=True)  # torch initialises empty Adam state only on grad-free params
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
