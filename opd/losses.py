"""OPD losses: pure functions over per-token tensors aligned to completion positions.

Shapes: every tensor is [B, T] with ``mask`` 1 on completion tokens.
"""
from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def reverse_kl_is(logp_new: torch.Tensor, logp_sampler: torch.Tensor, logp_teacher: torch.Tensor,
                  mask: torch.Tensor, kl_coef: float = 1.0, clip_ratio: float | None = None,
                  baseline: str = "none") -> tuple[torch.Tensor, dict[str, float]]:
    """Importance-sampled policy gradient with per-token reverse-KL reward, discount 0.

    advantage_t = -kl_coef * (log q_sampler(x_t) - log p_teacher(x_t))   (a constant)
    loss        = -mean_t[ exp(log pi_theta(x_t) - log q_sampler(x_t)) * advantage_t ]

    The gradient is an unbiased estimate of grad KL(pi_theta || p_teacher) at the sampler's
    policy; the ratio corrects for the sampler lagging the trainer by a few updates.
    ``baseline="mean"`` subtracts the batch's mean advantage (a constant, so the estimate stays
    unbiased): without it every sampled token is pushed down at once, a high-variance step.
    """
    advantage = (-kl_coef * (logp_sampler - logp_teacher)).detach()
    if baseline == "mean":
        advantage = (advantage - masked_mean(advantage, mask)) * mask
    elif baseline != "none":
        raise ValueError(f"baseline={baseline!r}: choose 'none' or 'mean'")
    ratio = torch.exp(logp_new - logp_sampler.detach())
    if clip_ratio is not None:
        ratio = ratio.clamp(max=clip_ratio)
    loss = -masked_mean(ratio * advantage, mask)
    with torch.no_grad():
        m = mask.bool()
        metrics = {
            "loss": float(loss),
            "reverse_kl": float(masked_mean(logp_sampler - logp_teacher, mask)),
            "ratio_mean": float(ratio[m].mean()) if m.any() else 1.0,
            "ratio_max": float(ratio[m].max()) if m.any() else 1.0,
            "sampler_trainer_absdiff_max": float((logp_new - logp_sampler)[m].abs().max()) if m.any() else 0.0,
        }
    return loss, metrics


def sft_cross_entropy(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the completion tokens (EOS included)."""
    return -masked_mean(logp, mask)
