"""Student updates: SFT on (prompt, completion) pairs and the OPD policy-gradient step, both one
``StudentTrainer.step`` each (opd.trainer: accelerate, micro-batches, mixed precision); and the
checkpoints they write."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable

import torch

from opd.batching import pack, scatter_completion
from opd.config import TrainSpec
from opd.errors import PermanentError
from opd.losses import (gkd_jsd, logsumexp_fp32, masked_mean, reverse_kl_full, reverse_kl_is, reverse_kl_topk,
                        sampled_logprobs, sft_cross_entropy)
from opd.sampling.base import Rollout
from opd.scoring import token_logprobs
from opd.trainer import StudentTrainer


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


def write_sync(trainer: StudentTrainer, tok, out: str | Path, lora: bool) -> str:
    """What the sampler reloads after a step: the adapters under LoRA, else the full weights."""
    model, rank = trainer.model, trainer.rank
    if lora:
        if rank == 0:  # DDP keeps the adapters identical on every rank
            from opd.lora import save_adapter

            save_adapter(model, out)
    else:
        save_student(model, tok, out, rank)
    return str(out)


def write_checkpoint(trainer: StudentTrainer, tok, out: str | Path, lora: bool):
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


def _lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warmup then cosine decay to 10%: the usual small-model schedule."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def sft_step(trainer: StudentTrainer, batch: list[tuple[list[int], list[int]]], pad_id: int,
             micro_batch: int | None = None, lr: float | None = None) -> float:
    """One SFT step: cross-entropy on the completion tokens of the global ``batch`` (token-weighted
    mean, accumulated over micro-batches); returns the loss."""
    total = sum(len(c) for _, c in batch)

    def loss_fn(model, s: int, e: int):
        b = pack([p for p, _ in batch[s:e]], [c for _, c in batch[s:e]], pad_id).to(trainer.device)
        loss = sft_cross_entropy(token_logprobs(model, b), b.loss_mask)
        return loss, int(b.loss_mask.sum()), {"loss": float(loss.detach())}

    return trainer.step(batch, micro_batch or len(batch), loss_fn, total, lr)["loss"]


def sft_train(trainer: StudentTrainer, pairs: list[tuple[list[int], list[int]]], spec: TrainSpec, pad_id: int,
              seed: int, steps: int | None = None, start_step: int = 0,
              on_step: Callable[[int, float], None] | None = None, one_pass: bool = False) -> StudentTrainer:
    """Cross-entropy on completion tokens; `steps` lets a caller train in chunks (eval in between).

    Batches are drawn at random with replacement; ``one_pass`` walks ``pairs`` in order instead, so
    freshly generated data is trained on exactly once (each generated token is paid for once)."""
    rng = random.Random(seed + start_step)
    for step in range(start_step, start_step + (steps or spec.steps)):
        if one_pass:
            i = (step - start_step) * spec.batch_size
            batch = [pairs[(i + j) % len(pairs)] for j in range(spec.batch_size)]
        else:
            batch = [pairs[rng.randrange(len(pairs))] for _ in range(spec.batch_size)]
        loss = sft_step(trainer, batch, pad_id, spec.micro_batch, _lr_at(step, spec))
        if on_step:
            on_step(step, loss)
    return trainer


LOGIT_LOSSES = ("reverse_kl_full", "reverse_kl_topk", "gkd_jsd")


def opd_update(trainer: StudentTrainer, rollouts: list[Rollout], teacher_logprobs: list[list[float]] | None,
               pad_id: int, micro_batch: int, kl_coef: float = 1.0, clip_ratio: float | None = None,
               baseline: str = "none", *, loss: str = "reverse_kl_is", teacher_model=None, topk: int = 20,
               gkd_beta: float = 0.5, forward_kl_coef: float = 0.0, teacher_topk=None,
               lr: float | None = None, discount: float = 0.0) -> dict[str, float]:
    """One optimizer step over all rollouts (``trainer.step``: micro-batches, and under torchrun each
    rank its shard of the same global rollouts; metrics are token-weighted over the global batch).

    ``loss="reverse_kl_is"`` (default) uses ``teacher_logprobs`` (the teacher's logprob of each
    sampled token); ``kl_coef``, ``clip_ratio``, ``baseline`` and ``discount`` apply only to it. The logit losses
    (``reverse_kl_full``, ``reverse_kl_topk``, ``gkd_jsd``) run ``teacher_model`` (no grad) on the
    same packed micro-batch and ignore ``teacher_logprobs`` (may be None); their ``reverse_kl``
    metric is the exact mean reverse KL and the ratios compare the trainer's logprobs with the
    sampler's. Every loss reports ``student_entropy`` (mean over completion tokens).
    """
    if loss != "reverse_kl_is" and loss not in LOGIT_LOSSES:
        raise ValueError(f"loss={loss!r}: choose 'reverse_kl_is' or one of {LOGIT_LOSSES}")
    if teacher_topk is not None and loss != "reverse_kl_topk":
        raise ValueError(f"teacher_topk is for loss='reverse_kl_topk', not {loss!r}")
    if loss in LOGIT_LOSSES and teacher_model is None and teacher_topk is None:
        raise ValueError(f"loss={loss!r} needs teacher_model (its logits on the same batch)"
                         + (" or teacher_topk (a scorer's top-k)" if loss == "reverse_kl_topk" else ""))
    if loss == "reverse_kl_is" and teacher_logprobs is None:
        raise ValueError("loss='reverse_kl_is' needs teacher_logprobs")

    def loss_fn(model, s: int, e: int):
        chunk = rollouts[s:e]
        b = pack([r.prompt_ids for r in chunk], [r.completion_ids for r in chunk], pad_id).to(trainer.device)
        logp_sampler = scatter_completion([r.sampler_logprobs for r in chunk], b)
        logits = b.logits(model)
        logp_new, entropy = sampled_logprobs(logits, b.targets)  # logp_new == token_logprobs(model, b)
        if loss == "reverse_kl_is":
            logp_teacher = scatter_completion(teacher_logprobs[s:e], b)
            loss_t, m = reverse_kl_is(logp_new, logp_sampler, logp_teacher, b.loss_mask, kl_coef, clip_ratio,
                                      baseline, discount)
        elif teacher_topk is not None:  # the scorer's top-k (vLLM prompt_logprobs): no teacher forward here
            loss_t, m = _topk_loss(logits, logp_new, logp_sampler, b, teacher_topk, s, e, topk, forward_kl_coef)
        else:
            loss_t, m = _logit_loss(loss, logits, logp_new, logp_sampler, b, teacher_model, topk, gkd_beta,
                                    forward_kl_coef)
        m["student_entropy"] = float(masked_mean(entropy, b.loss_mask))
        return loss_t, int(b.loss_mask.sum()), m

    total_tokens = sum(len(r.completion_ids) for r in rollouts)  # global: every rank sees all rollouts
    return trainer.step(rollouts, micro_batch, loss_fn, total_tokens, lr)


def _sampler_metrics(logp_new, logp_sampler, mask) -> dict[str, float]:
    """Importance ratios and the sampler/trainer log-prob gap on the completion tokens."""
    m = mask.bool()
    diff = logp_new.detach() - logp_sampler
    ratio = torch.exp(diff)
    return {"ratio_mean": float(ratio[m].mean()) if m.any() else 1.0,
            "ratio_max": float(ratio[m].max()) if m.any() else 1.0,
            "sampler_trainer_absdiff_max": float(diff[m].abs().max()) if m.any() else 0.0}


def _student_topk_mass(logits, top_ids, mask) -> float:
    """Mass the student keeps on the teacher's top-k (verl PR #5041's collapse signal)."""
    z = logits.detach().gather(-1, top_ids).float()
    mass = torch.logsumexp(z, dim=-1) - logsumexp_fp32(logits.detach())
    return float(masked_mean(mass.exp(), mask))


def _topk_loss(logits, logp_new, logp_sampler, b, teacher_topk, s: int, e: int, topk: int,
               forward_kl_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``reverse_kl_topk`` from a scorer's top-k; the reverse-KL metric is the sampled-token estimate
    (the full teacher distribution is not here)."""
    mask = b.loss_mask
    ids = scatter_completion(teacher_topk.ids[s:e], b, torch.long)
    lps = scatter_completion(teacher_topk.logprobs[s:e], b)
    loss_t = reverse_kl_topk(logits, ids, lps, mask, min(topk, ids.shape[-1]), forward_kl_coef)
    with torch.no_grad():
        logp_teacher = scatter_completion(teacher_topk.token_logprobs[s:e], b)
        metrics = {
            "loss": float(loss_t),
            "reverse_kl": float(masked_mean(logp_new.detach() - logp_teacher, mask)),
            **_sampler_metrics(logp_new, logp_sampler, mask),
            "student_topk_mass": _student_topk_mass(logits, ids, mask),
        }
    return loss_t, metrics


def _logit_loss(loss: str, logits, logp_new, logp_sampler, b, teacher_model, topk: int, gkd_beta: float,
                forward_kl_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """A distribution-level loss on one micro-batch, with the same metric keys as ``reverse_kl_is``."""
    mask = b.loss_mask
    was_training = teacher_model.training
    teacher_model.eval()
    with torch.no_grad():
        t_logits = b.logits(teacher_model)
    teacher_model.train(was_training)
    extra: dict[str, float] = {}
    if loss == "reverse_kl_full":
        loss_t = reverse_kl_full(logits, t_logits, mask, forward_kl_coef)
    elif loss == "gkd_jsd":
        loss_t = gkd_jsd(logits, t_logits, mask, gkd_beta, forward_kl_coef=forward_kl_coef)
    else:
        with torch.no_grad():  # only the k columns and the teacher's normaliser leave this block
            k = min(topk, t_logits.shape[-1])
            top_vals, top_ids = t_logits.topk(k, dim=-1)
            top_lp = top_vals.float() - logsumexp_fp32(t_logits).unsqueeze(-1)
        loss_t = reverse_kl_topk(logits, top_ids, top_lp, mask, k, forward_kl_coef)
        with torch.no_grad():
            extra["student_topk_mass"] = _student_topk_mass(logits, top_ids, mask)
    with torch.no_grad():
        metrics = {
            "loss": float(loss_t),
            "reverse_kl": float(loss_t) if loss == "reverse_kl_full" and not forward_kl_coef
            else float(reverse_kl_full(logits.detach(), t_logits, mask)),
            **_sampler_metrics(logp_new, logp_sampler, mask),
            **extra,
        }
    return loss_t, metrics
