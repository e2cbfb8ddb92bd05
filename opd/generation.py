"""Batched generation with transformers (eval, the teacher's SFT data, and the `hf` sampler)."""
from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

BATCH_PROMPTS = 256  # prompts decoded at once, each with its n samples: their KV cache grows together
GPU_SHARE = 0.7  # of the free GPU memory one decoding batch may fill (the allocator's slack and transients stay out)


def stop_ids(eos_id: int, generation_eos: int | list[int] | None) -> tuple[int, ...]:
    """The tokens a completion ends at: the tokenizer's EOS, then every EOS id the checkpoint's generation config
    declares (Qwen3 chat: <|im_end|> and <|endoftext|>). vLLM stops at all of them (the sampler, the teacher's
    engine or server); decoding here must too, or a rollout that ends at the other one under vLLM runs on to
    ``max_tokens`` in evaluation and under the hf sampler."""
    extra = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    return tuple(dict.fromkeys([eos_id, *extra]))


def checkpoint_stop_ids(model_dir: str, eos_id: int) -> tuple[int, ...]:
    """``stop_ids`` for a checkpoint directory, read as vLLM and transformers read it: generation_config.json,
    else the model config."""
    from transformers import AutoConfig

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    return stop_ids(eos_id, gen.eos_token_id)


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
    return kv_bytes_per_token(c, dtype_bytes) * width + prefill + (2 * 4 + NOISE_BYTES) * c.vocab_size


def prompts_that_fit(config, dtype_bytes: int, prompt_len: int, width: int, n: int, free_bytes: int,
                     cap: int = BATCH_PROMPTS) -> int:
    """Prompts (each with its ``n`` samples) to decode at once in ``GPU_SHARE`` of ``free_bytes``; at least
    one, at most ``cap``. A real student's evaluation (4 samples of 30 prompts x 6,144 positions at 144 KiB
    per token for Qwen3-8B: 101 GiB of KV cache) would not fit on an 80 GiB card in one batch."""
    rows = int(free_bytes * GPU_SHARE) // bytes_per_row(config, dtype_bytes, prompt_len, width)
    return max(1, min(cap, rows // n))


# ---------------------------------------------------------------- seeded sampling, row by row

M32 = 0xFFFFFFFF
NOISE_BYTES = 32  # per row and vocabulary entry: the hash's int64 temporaries, the float32 uniforms


def _mul32(x, c: int):
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow (the 16-bit halves of ``c``)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def mix32(x):
    """A bijective 32-bit integer hash (Wellons' lowbias32) on Python ints or int64 tensors in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed: int, rows_B: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, vocab] that is a pure function of (seed, row, step, token): a row's draw does not
    depend on the other rows of its batch."""
    key = mix32(mix32(seed & M32) ^ (seed >> 32 & M32))
    h_B = mix32(mix32(mix32(key ^ rows_B) ^ (step & M32)))
    tok_V = torch.arange(vocab, device=rows_B.device)
    h_BV = mix32(h_B[:, None] ^ tok_V[None, :])
    u_BV = ((h_BV >> 8).float() + 0.5) / 2.0**24  # 24 bits, exact in float32; in (0, 1): never log(0)
    return -torch.log(-torch.log(u_BV))


class SeededSampling(LogitsProcessor):
    """Temperature (and top-p) sampling as greedy decoding of Gumbel-perturbed logits (the Gumbel-max trick:
    argmax(logits / T + G) is a draw from softmax(logits / T)), with noise keyed by (seed, row, step).

    ``model.generate``'s own sampling draws from one RNG stream across the batch, so a row's completion changes
    with the rows decoded beside it, i.e. with the batch the free GPU memory allows. Keyed noise gives each row
    its own stream, as vLLM's per-request seed does."""

    def __init__(self, seed: int, rows_B: torch.Tensor, prompt_width: int, temperature: float, top_p: float):
        self.seed, self.rows_B, self.width = seed, rows_B, prompt_width
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        noise = gumbel_noise(self.seed, self.rows_B.to(scores.device), input_ids.shape[1] - self.width,
                             scores.shape[-1])
        return scores + noise.to(scores.dtype)


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
    """Completion ids per (prompt, sample), prompt-major; each ends at and includes the first stop token it
    produced: ``eos_id`` or an EOS id of the model's generation config (``stop_ids``), as vLLM stops.

    On a GPU, ``batch_size`` is lowered to what fits in the free memory (``prompts_that_fit``). The draws do
    not depend on it: sampled row ``r`` (prompt ``r // n``, sample ``r % n``) draws from its own stream keyed
    by (``seed``, ``r``) (``SeededSampling``); ``seed=None`` draws the seed from torch's global RNG. What can
    still differ between two cuts is the kernels' rounding, which varies with the batch's shape (bf16 on a GPU;
    identical on CPU here): it flips a token only where two candidates tie within it, greedy or sampled."""
    param = next(model.parameters())
    device = param.device
    if device.type == "cuda" and prompts:
        longest = max(len(p) for p in prompts)
        batch_size = min(batch_size, prompts_that_fit(model.config, param.element_size(), longest,
                                                      longest + max_tokens, n, torch.cuda.mem_get_info(device)[0]))
    # the checkpoint's generation_config.json fills every setting generate is not given (transformers merges
    # it in): a user model's repetition_penalty or no_repeat_ngram_size would bend our greedy accuracy, the KL
    # samples and the hf sampler's rollouts (whose logprobs are the plain model's). Decode with none of it.
    was_training, checkpoint_defaults = model.training, model.generation_config
    stops = stop_ids(eos_id, checkpoint_defaults.eos_token_id)  # but its EOS ids: the model's own end of turn
    model.eval()
    model.generation_config = GenerationConfig()
    try:
        return _generate(model, prompts, stops, pad_id, max_tokens, temperature, top_p, n, batch_size, seed, device)
    finally:
        model.generation_config = checkpoint_defaults
        model.train(was_training)


def _generate(model, prompts, stops, pad_id, max_tokens, temperature, top_p, n, batch_size, seed, device):
    if temperature > 0 and seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        ids, attn = _left_pad(chunk, pad_id, device)
        ids, attn = ids.repeat_interleave(n, dim=0), attn.repeat_interleave(n, dim=0)  # prompt-major rows
        kw = {}
        if temperature > 0:  # greedy on keyed Gumbel noise; generate's own sampler would share one stream
            rows_B = torch.arange(s * n, s * n + ids.shape[0], device=device)
            sampling = SeededSampling(seed, rows_B, ids.shape[1], temperature, top_p)
            kw["logits_processor"] = LogitsProcessorList([sampling])
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=list(stops), pad_token_id=pad_id, **kw)
        for row in gen[:, ids.shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            out.append(row if end is None else row[: end + 1])
    return out
