"""Pack (prompt, completion) token lists into padded tensors for teacher/student forwards."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, S], right-padded
    attention_mask: torch.Tensor  # [B, S]
    loss_mask: torch.Tensor  # [B, S-1], 1 where the target input_ids[:, t+1] is a completion token

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> PackedBatch:
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        attn[i, :n] = 1
        loss[i, len(p) - 1 : n - 1] = 1.0
    return PackedBatch(ids, attn, loss)


def completion_values(values: torch.Tensor, batch: PackedBatch) -> list[list[float]]:
    """Per-sequence lists of the values at completion positions (inverse of `scatter_completion`)."""
    out = []
    for row, m in zip(values.detach().cpu(), batch.loss_mask.cpu()):
        out.append(row[m.bool()].tolist())
    return out


def scatter_completion(per_seq: list[list], batch: PackedBatch, dtype=torch.float32) -> torch.Tensor:
    """Place per-sequence completion values onto the [B, S-1] target grid (zeros elsewhere).

    A value per token may also be a k-list (the teacher's top-k ids or logprobs): then [B, S-1, k]."""
    first = next((vals[0] for vals in per_seq if vals), None)
    tail = (len(first),) if isinstance(first, (list, tuple)) else ()
    out = torch.zeros((*batch.loss_mask.shape, *tail), dtype=dtype, device=batch.loss_mask.device)
    for i, vals in enumerate(per_seq):
        if vals:
            idx = batch.loss_mask[i].nonzero(as_tuple=True)[0]
            out[i, idx] = torch.tensor(vals, dtype=dtype, device=out.device)
    return out
