"""Token log-probs under a transformers model: the teacher's grade of each sampled token, and the student's.

Only the sampled token's log-prob is kept: logits are upcast per micro-batch, never for the
whole batch at once.
"""
from __future__ import annotations

import torch

from opd.batching import PackedBatch, completion_values, pack
from opd.losses import sampled_logprobs, token_logprobs_from_logits


def token_logprobs(model, batch: PackedBatch) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every t; shape [B, S-1]."""
    logits = batch.logits(model)
    if torch.is_grad_enabled():  # training (SFT): the fused log-prob with the lean backward
        return sampled_logprobs(logits, batch.targets)[0]
    return token_logprobs_from_logits(logits, batch.targets)


@torch.no_grad()
def score_completions(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                      micro_batch: int = 64, device: torch.device | None = None) -> list[list[float]]:
    """Log-prob of every completion token, one list per sequence (empty completions give [])."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    for s in range(0, len(prompts), micro_batch):
        b = pack(prompts[s : s + micro_batch], completions[s : s + micro_batch], pad_id).to(device)
        out.extend(completion_values(token_logprobs(model, b), b))
    model.train(was_training)
    return out
