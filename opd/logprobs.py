"""Token log-probs under a transformers model: the teacher's grade of each sampled token, and the student's.

Only the sampled token's log-prob is kept. Scoring (no gradient) runs the LM head in row blocks over the
completion positions only (``opd.lm_head.window_logprobs``), so a micro-batch's [rows, tokens, vocab] logits
never exist at once: 7 GiB in bf16 for 4 x 6,144 tokens of a 151,936-token vocabulary, against one 512 MiB block.
A top-k grade (``completion_topk``, for ``reverse_kl_topk``) runs the same way.
"""
from __future__ import annotations

import torch

from opd.batching import PackedBatch, completion_values, pack
from opd.lm_head import UnsupportedHead, window_logprobs, window_topk
from opd.losses import logsumexp_fp32, sampled_logprobs, token_logprobs_from_logits


def token_logprobs(model, batch: PackedBatch) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every t; shape [B, S-1]."""
    logits = batch.logits(model)
    if torch.is_grad_enabled():  # training (SFT): the fused log-prob with the lean backward
        return sampled_logprobs(logits, batch.targets)[0]
    return token_logprobs_from_logits(logits, batch.targets)


def completion_logprobs(model, batch: PackedBatch) -> torch.Tensor:
    """No-grad log-probs at the completion positions (0 elsewhere), by the chunked head; a model whose
    head it cannot stand in for (its forward rewrites the head's output) takes the full logits, and is
    remembered so that only its first micro-batch pays the extra forward."""
    if not getattr(model, "_opd_full_head", False):
        try:
            return window_logprobs(model, batch)[0]
        except UnsupportedHead:
            model._opd_full_head = True
    return token_logprobs(model, batch)


@torch.no_grad()
def completion_topk(model, batch: PackedBatch, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sampled token's log-prob [B, T], top-k ids [B, T, k], their log-probs [B, T, k]) at the completion
    positions, by the chunked head; the full logits for a model the chunked head cannot stand in for."""
    if not getattr(model, "_opd_full_head", False):
        try:
            return window_topk(model, batch, k)
        except UnsupportedHead:
            model._opd_full_head = True
    logits = batch.logits(model)
    norm = logsumexp_fp32(logits)  # one normaliser for the sampled token and the top-k
    vals, ids = logits.topk(k, dim=-1)
    tok = logits.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1).float() - norm
    return tok, ids, vals.float() - norm.unsqueeze(-1)


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
        out.extend(completion_values(completion_logprobs(model, b), b))
    model.train(was_training)
    return out
