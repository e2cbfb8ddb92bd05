"""Student updates: SFT on (prompt, completion) pairs and the OPD policy-gradient step."""
from __future__ import annotations

import math
import random
from typing import Callable

import torch

from opd.batching import pack, scatter_completion
from opd.config import TrainSpec
from opd.losses import reverse_kl_is, sft_cross_entropy
from opd.sampling.base import Rollout
from opd.scoring import token_logprobs


def make_optimizer(model, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))


def _lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warmup then cosine decay to 10%: the usual small-model schedule."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def sft_train(model, pairs: list[tuple[list[int], list[int]]], spec: TrainSpec, pad_id: int, seed: int,
              steps: int | None = None, start_step: int = 0, optimizer=None,
              on_step: Callable[[int, float], None] | None = None) -> torch.optim.Optimizer:
    """Cross-entropy on completion tokens; `steps` lets a caller train in chunks (eval in between)."""
    device = next(model.parameters()).device
    opt = optimizer or make_optimizer(model, spec.lr, spec.weight_decay)
    rng = random.Random(seed + start_step)
    model.train()
    for step in range(start_step, start_step + (steps or spec.steps)):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(spec.batch_size)]
        b = pack([p for p, _ in batch], [c for _, c in batch], pad_id).to(device)
        loss = sft_cross_entropy(token_logprobs(model, b), b.loss_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if on_step:
            on_step(step, float(loss.detach()))
    return opt


def opd_update(model, optimizer, rollouts: list[Rollout], teacher_logprobs: list[list[float]], pad_id: int,
               micro_batch: int, kl_coef: float = 1.0, clip_ratio: float | None = None,
               baseline: str = "none") -> dict[str, float]:
    """One optimizer step over all rollouts (gradient accumulated over micro-batches)."""
    device = next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total_tokens = sum(len(r.completion_ids) for r in rollouts)
    agg: dict[str, float] = {}
    for s in range(0, len(rollouts), micro_batch):
        chunk = rollouts[s : s + micro_batch]
        b = pack([r.prompt_ids for r in chunk], [r.completion_ids for r in chunk], pad_id).to(device)
        logp_sampler = scatter_completion([r.sampler_logprobs for r in chunk], b)
        logp_teacher = scatter_completion(teacher_logprobs[s : s + micro_batch], b)
        logp_new = token_logprobs(model, b)
        loss, m = reverse_kl_is(logp_new, logp_sampler, logp_teacher, b.loss_mask, kl_coef, clip_ratio, baseline)
        weight = float(b.loss_mask.sum()) / max(1, total_tokens)  # token-weighted mean over the batch
        (loss * weight).backward()
        for k, v in m.items():
            if k.endswith("_max"):
                agg[k] = max(agg.get(k, v), v)
            else:
                agg[k] = agg.get(k, 0.0) + v * weight
    agg["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    optimizer.step()
    return agg
