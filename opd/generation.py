"""Batched generation with transformers (eval, the teacher's SFT data, and the `hf` sampler)."""
from __future__ import annotations

import torch

BATCH_PROMPTS = 256  # prompts decoded at once, each with its n samples: their KV cache grows together


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    return ids.to(device), attn.to(device)


@torch.no_grad()
def generate(model, prompts: list[list[int]], eos_id: int, pad_id: int, max_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, n: int = 1, batch_size: int = BATCH_PROMPTS,
             seed: int | None = None) -> list[list[int]]:
    """Completion ids per (prompt, sample), prompt-major; each ends at and includes EOS if produced."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        ids, attn = _left_pad(chunk, pad_id, device)
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_tokens,
                             num_return_sequences=n, eos_token_id=eos_id, pad_token_id=pad_id, **kw)
        for row in gen[:, ids.shape[1]:].tolist():
            if eos_id in row:
                row = row[: row.index(eos_id) + 1]
            out.append(row)
    model.train(was_training)
    return out
