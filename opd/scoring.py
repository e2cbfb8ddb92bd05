"""Token log-probs under a model: the teacher's grade of each sampled token, and the student's.

Only the sampled token's log-prob is kept: logits are upcast per micro-batch, never for the
whole batch at once.
"""
from __future__ import annotations

import torch

from opd.batching import PackedBatch, completion_values, pack


def token_logprobs(model, batch: PackedBatch) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every t; shape [B, S-1]."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.input_ids[:, 1:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


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
