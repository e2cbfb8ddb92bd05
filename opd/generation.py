"""Batched generation with transformers (eval, the teacher's SFT data, and the `hf` sampler)."""
from __future__ import annotations

import torch

BATCH_PROMPTS = 256  # prompts decoded at once, each with its n samples: their KV cache grows together
GPU_SHARE = 0.7  # of the free GPU memory one decoding batch may fill (the allocator's slack and transients stay out)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Every layer's K and V for one position (grouped-query heads counted once per KV head)."""
    c = _text_config(config)
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def bytes_per_row(config, dtype_bytes: int, prompt_len: int, width: int) -> int:
    """Device bytes one sequence costs ``model.generate``: its KV cache over ``width`` positions, one layer's
    prefill activations over ``prompt_len`` tokens (no_grad: the layers run one at a time) and a step's fp32
    logits with their softmax."""
    c = _text_config(config)
    prefill = prompt_len * (3 * c.intermediate_size + 4 * c.hidden_size) * dtype_bytes
    return kv_bytes_per_token(c, dtype_bytes) * width + prefill + 2 * 4 * c.vocab_size


def prompts_that_fit(config, dtype_bytes: int, prompt_len: int, width: int, n: int, free_bytes: int,
                     cap: int = BATCH_PROMPTS) -> int:
    """Prompts (each with its ``n`` samples) to decode at once in ``GPU_SHARE`` of ``free_bytes``; at least
    one, at most ``cap``. A real student's evaluation (4 samples of 30 prompts x 6,144 positions at 144 KiB
    per token for Qwen3-8B: 101 GiB of KV cache) would not fit on an 80 GiB card in one batch."""
    rows = int(free_bytes * GPU_SHARE) // bytes_per_row(config, dtype_bytes, prompt_len, width)
    return max(1, min(cap, rows // n))


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
    """Completion ids per (prompt, sample), prompt-major; each ends at and includes EOS if produced.

    On a GPU, ``batch_size`` is lowered to what fits in the free memory (``prompts_that_fit``): greedy
    completions do not depend on it, sampled ones (one RNG stream over the batches) do."""
    param = next(model.parameters())
    device = param.device
    if device.type == "cuda" and prompts:
        longest = max(len(p) for p in prompts)
        batch_size = min(batch_size, prompts_that_fit(model.config, param.element_size(), longest,
                                                      longest + max_tokens, n, torch.cuda.mem_get_info(device)[0]))
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
