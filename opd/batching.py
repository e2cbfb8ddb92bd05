"""Pack (prompt, completion) token lists into padded tensors for teacher/student forwards.

Only completion tokens are graded and trained on, so a batch keeps a *window* of target
positions: from the first position any row's completion starts at (``start``) to the end. Models
run with ``logits_to_keep`` so the LM head (vocabulary-wide: the largest activation of an LLM)
never runs on the prompt positions before the window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, S], right-padded
    attention_mask: torch.Tensor  # [B, S]
    loss_mask: torch.Tensor  # [B, S-1-start], 1 where the target input_ids[:, start+t+1] is a completion token
    start: int = 0  # first target position in the window (the earliest completion start in the batch, minus 1)

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device),
                           self.start)

    @property
    def targets(self) -> torch.Tensor:
        """The tokens predicted at the window's positions; [B, S-1-start]."""
        return self.input_ids[:, self.start + 1:]

    def logits(self, model) -> torch.Tensor:
        """The model's logits at the window's positions, [B, S-1-start, V]: the LM head runs there only."""
        # the positions as indices (not a count + [:, :-1], whose backward zero-fills a full-vocab gradient)
        keep = torch.arange(self.start, self.input_ids.shape[1] - 1, device=self.input_ids.device)
        # use_cache=False: a scoring forward would otherwise keep every layer's K/V (config.use_cache is
        # True in released configs): 13 GB for a 64-layer, 8-KV-head teacher over 49k tokens in bf16
        return model(input_ids=self.input_ids, attention_mask=self.attention_mask, logits_to_keep=keep,
                     use_cache=False).logits


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> PackedBatch:
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    start = max(0, min(len(p) for p in prompts) - 1)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width - 1 - start), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        attn[i, :n] = 1
        loss[i, len(p) - 1 - start : n - 1 - start] = 1.0
    return PackedBatch(ids, attn, loss, start)


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


def length_buckets(lengths: list[int], shards: int, micro_batch: int) -> list[int]:
    """A row order for the update: each shard (rank) gets every ``shards``-th row of the length-sorted
    list (the same mix of lengths on every rank, so no rank waits on another), in length order, so each
    micro-batch is cut from rows of similar length and pads little (rollouts of 1..2,048 tokens pad a
    random micro-batch to its longest). The identity when a shard is one micro-batch: nothing to gain,
    and the arithmetic stays exactly as it was."""
    n = len(lengths)
    if shards < 1 or n % shards or n // shards <= micro_batch:
        return list(range(n))
    by_length = sorted(range(n), key=lambda i: (lengths[i], i))
    return [i for r in range(shards) for i in by_length[r::shards]]


def padded_tokens(lengths: list[int], order: list[int], micro_batch: int) -> int:
    """Positions a forward over ``order``'s micro-batches computes (each padded to its longest row)."""
    rows = [lengths[i] for i in order]
    return sum(max(rows[s:s + micro_batch]) * len(rows[s:s + micro_batch]) for s in range(0, len(rows), micro_batch))
