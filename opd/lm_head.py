"""The sampled token's log-prob through the LM head in row blocks: [tokens, vocab] logits never exist at once.

An OPD update needs one number per completion token from the vocabulary-wide head: log softmax(h W^T + b)
at the sampled token (and the entropy, a metric). Materialising the logits costs N x V in the compute
dtype, their gradient as much again, and an fp32 block on top (Qwen3's 151,936-token head: 0.6 GB of
bf16 logits per 2,048 tokens, so ~10 GB of logits + gradient for a micro-batch of 8 x 2,048 tokens).
``ChunkedSampledLogprob`` (the idea of Liger-Kernel's fused linear cross-entropy) runs the head over
``block_rows`` rows at a time: forward keeps only each row's fp32 log-sum-exp; backward recomputes each
block's logits and softmax and turns ``g (onehot - softmax)`` straight into the block's hidden-state
gradient and a summed weight gradient. The cost is one extra head matmul (the head's forward again),
a few percent of a step.

``window_logprobs`` runs a Hugging Face causal LM through its own ``forward`` with the head swapped for
this computation for the call (so DDP's and FSDP2's hooks on the top-level module still run), over the
positions ``opd.batching.PackedBatch.logits`` selects, and returns ``(logp, entropy)`` [B, T] like
``opd.losses.sampled_logprobs(batch.logits(model), batch.targets)``. ``window_topk`` does the same for a
teacher's top-k grade (no gradient): the sampled token's log-prob and the k most likely ids with theirs.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from opd.errors import PermanentError

DEFAULT_BLOCK_BYTES = 512 * 2**20  # one block's fp32 [rows, V] logits; the transients are ~2.5x this


def rows_per_block(vocab: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows of one block: its fp32 logits fill ``block_bytes`` (880 rows for Qwen3's 151,936 at 512 MiB)."""
    return max(1, block_bytes // (4 * vocab))


def head_bytes(lm_head: str, tokens: int, vocab: int, mixed_precision: str = "no", block_rows: int | None = None
               ) -> float:
    """Bytes the LM head adds to one micro-batch's update, for planning (``opd plan``,
    ``benchmarks/gpu_update.py``). Full logits: per [token, vocab] entry ~3 B under bf16/fp16 autocast
    (measured on an H200 with Qwen3-1.7B's 151,936 vocabulary at 9k-37k tokens: 2.6-3.0 B) and ~6.5 B
    in fp32 (measured on CPU); chunked: ~2.5 fp32 blocks (the block and its softmax transients)."""
    if lm_head == "full":
        return (3.0 if mixed_precision in ("bf16", "fp16") else 6.5) * tokens * vocab
    return 2.5 * 4 * min(tokens, block_rows or rows_per_block(vocab)) * vocab


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would run the head in here: autocast's (for fp16/bf16/fp32 inputs), else the input's."""
    dev = hidden.device.type
    if hidden.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64), as in opd.losses."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ChunkedSampledLogprob(torch.autograd.Function):
    """(log softmax(z)[target], entropy(softmax(z))) per row with z = transform(h W^T + b), in row blocks.

    ``transform`` is ``z * scale`` then, if ``softcap``, ``softcap * tanh(z / softcap)`` (Cohere's
    ``logit_scale``, Granite's ``1 / logits_scaling``, Gemma's ``final_logit_softcapping``); the
    transform and the softmax run in fp32 (fp64 for fp64 inputs), the matmuls in the compute dtype
    (``compute_dtype``: under autocast its dtype, as ``F.linear`` would). Saved for backward: ``hidden``,
    ``weight``, ``bias``, the targets and the [N] log-sum-exp; nothing vocabulary-wide. The entropy is a
    metric (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, block_rows: int, scale: float, softcap: float | None):
        cd = compute_dtype(hidden)
        n = hidden.shape[0]
        acc = torch.promote_types(cd, torch.float32)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        ent = torch.empty(n, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(cd), None if bias is None else bias.to(cd)
            for i in range(0, n, block_rows):
                z, _ = _block_logits(hidden[i:i + block_rows], w, b, cd, scale, softcap)
                mx = z.amax(-1, keepdim=True)
                e = torch.sub(z, mx).exp_()  # the block's one vocabulary-wide temporary besides z
                total = e.sum(-1)
                lse[i:i + block_rows] = m = mx[:, 0] + total.log()
                logp[i:i + block_rows] = z.gather(-1, targets[i:i + block_rows, None])[:, 0] - m
                # entropy = lse - E_p[z]; nansum: a -inf logit has p = 0 and adds nothing
                ent[i:i + block_rows] = m - e.mul_(z).nansum(-1) / total
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.cfg = (cd, block_rows, scale, softcap)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g, _g_ent):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        cd, block_rows, scale, softcap = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=_f32(weight).dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=_f32(bias).dtype, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(cd), None if bias is None else bias.to(cd)
            for i in range(0, hidden.shape[0], block_rows):
                h, gi = hidden[i:i + block_rows], g[i:i + block_rows, None].to(lse.dtype)
                z, tanh = _block_logits(h, w, b, cd, scale, softcap)
                # d logp / d z = onehot - softmax, built in place in the block's fp32 logits
                dz = z.sub_(lse[i:i + block_rows, None]).exp_().mul_(-gi)
                dz.scatter_add_(-1, targets[i:i + block_rows, None], gi)
                if tanh is not None:  # softcap * tanh(u / softcap): du = dz (1 - tanh^2)
                    dz.mul_(tanh.square_().neg_().add_(1))
                if scale != 1.0:
                    dz.mul_(scale)
                dzc = dz.to(cd)
                if need_h:
                    grad_h[i:i + block_rows] = dzc @ w
                if need_w:
                    _accumulate(grad_w, dzc.T, h.to(cd))
                if need_b:
                    grad_b.add_(dz.sum(0))
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _block_logits(h, w, b, cd, scale, softcap):
    """One block's fp32 (or fp64) logits after the model's transform, and tanh(u / softcap) if capped."""
    z = _f32(torch.nn.functional.linear(h.to(cd), w, b))
    if scale != 1.0:
        z.mul_(scale)
    if softcap is None:
        return z, None
    tanh = z.div_(softcap).tanh_()
    return tanh * softcap, tanh


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc in fp32/fp64: one fused addmm when the dtypes agree, else the product in the
    compute dtype (as autocast's weight gradient would be) added in the accumulator's precision."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


def chunked_sampled_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: torch.Tensor | None = None, *, block_rows: int | None = None,
                             scale: float = 1.0, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of ``targets``, entropy) under softmax(transform(hidden W^T + b)), shapes ``targets.shape``,
    fp32 (fp64 for fp64 inputs); differentiable in the log-prob w.r.t. ``hidden``, ``weight`` and ``bias``.

    ``hidden`` is [..., H] (any leading shape matching ``targets``); ``block_rows`` defaults to
    ``rows_per_block(V)``. Equal to ``opd.losses.sampled_logprobs(F.linear(hidden, weight, bias), targets)``
    when ``scale == 1`` and ``softcap is None``."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)}: one target per row")
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"block_rows={block_rows}: must be >= 1")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap={softcap}: must be > 0 (or None)")
    rows = block_rows or rows_per_block(weight.shape[0])
    logp, ent = ChunkedSampledLogprob.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                            targets.reshape(-1), rows, float(scale), softcap)
    return logp.view(targets.shape), ent.view(targets.shape)


@torch.no_grad()
def chunked_topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, k: int,
                          bias: torch.Tensor | None = None, *, block_rows: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-prob of ``targets``, the k most likely ids, their log-probs) under softmax(hidden W^T + b), shapes
    ``targets.shape``, ``targets.shape + (k,)`` twice; in row blocks, no gradient: the teacher's grade for a
    top-k distillation loss. The logits are the compute dtype's (as the full-logits path's, so the same ids
    win), the log-sum-exp fp32 (fp64 for fp64 inputs)."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)}: one target per row")
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k={k}: must be in 1..{weight.shape[0]} (the vocabulary)")
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = block_rows or rows_per_block(weight.shape[0])
    cd = compute_dtype(hidden)
    acc = torch.promote_types(cd, torch.float32)
    logp = torch.empty(h.shape[0], dtype=acc, device=h.device)
    ids = torch.empty(h.shape[0], k, dtype=torch.long, device=h.device)
    vals = torch.empty(h.shape[0], k, dtype=acc, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        w, b = weight.to(cd), None if bias is None else bias.to(cd)
        for i in range(0, h.shape[0], rows):
            z, _ = _block_logits(h[i:i + rows], w, b, cd, 1.0, None)
            lse = torch.logsumexp(z, -1)
            logp[i:i + rows] = z.gather(-1, t[i:i + rows, None])[:, 0] - lse
            v, ix = z.topk(k, dim=-1)
            vals[i:i + rows], ids[i:i + rows] = v - lse[:, None], ix
    return logp.view(targets.shape), ids.view(*targets.shape, k), vals.view(*targets.shape, k)


# ------------------------------------------------------------------------------------------------------
# Hugging Face causal LMs
# ------------------------------------------------------------------------------------------------------

class UnsupportedHead(PermanentError, ValueError):
    """A model whose LM head the chunked path cannot stand in for (the full-logits path still works)."""


# config attributes by which transformers models post-process the head's output inside forward
# (Gemma 2/3, Cohere, Granite); anything else that changes the output is caught after the call
_NEUTRAL = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


@dataclass
class _Window:
    """What the head sees during one forward: the rows to compute and the output it returned."""
    targets: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # [B, T]; rows where it is 0 are skipped (log-prob and entropy 0)
    block_rows: int | None
    topk: int = 0  # > 0: the top-k grade (no gradient) instead of (log-prob, entropy); its ids and values here
    out: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None  # [B, T, k]
    topk_logprobs: torch.Tensor | None = None  # [B, T, k]


def unwrap(model):
    """The Hugging Face model under DDP (``.module``) and peft (``get_base_model``)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_of(model) -> torch.nn.Linear:
    """The output projection, refused if the chunked path would compute something else than the model."""
    hf = unwrap(model)
    head = hf.get_output_embeddings()
    if type(head).forward is not torch.nn.Linear.forward:  # peft LoRA on the head, a custom head, ...
        raise UnsupportedHead(f"{type(hf).__name__}'s LM head is a {type(head).__name__}, not a plain Linear "
                              "(LoRA on lm_head?): the chunked log-prob covers a plain head only; leave lm_head out "
                              "of lora.target_modules or use the full-logits path")
    cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    for name in _NEUTRAL:
        value = getattr(cfg, name, _NEUTRAL[name])
        if value != _NEUTRAL[name]:
            raise UnsupportedHead(f"{type(hf).__name__} post-processes its logits ({name}={value}) inside forward: "
                                  "the chunked LM head does not reproduce that; use the full-logits path for this "
                                  "model (or call chunked_sampled_logprobs on its hidden states with scale/softcap)")
    return head


@contextmanager
def _head_replaced(head: torch.nn.Linear, window: _Window):
    """Swap ``head.forward`` for the chunked log-prob for one call. Module hooks (FSDP2's unshard) still
    run around it, and the model's own forward still selects the positions (``logits_to_keep``)."""

    def forward(h):  # h: [B, T, H], the window's final hidden states
        mask = window.mask
        if window.topk:
            return _topk_forward(h, head, window)
        if mask is None:
            logp, ent = chunked_sampled_logprobs(h, head.weight, window.targets, head.bias,
                                                 block_rows=window.block_rows)
        else:
            keep = mask.reshape(-1) != 0
            lp, en = chunked_sampled_logprobs(h.reshape(-1, h.shape[-1])[keep], head.weight,
                                              window.targets.reshape(-1)[keep], head.bias,
                                              block_rows=window.block_rows)
            logp = lp.new_zeros(keep.shape).masked_scatter(keep, lp).view(window.targets.shape)
            ent = en.new_zeros(keep.shape).masked_scatter(keep, en).view(window.targets.shape)
        window.out = torch.stack([logp, ent], dim=-1)  # [B, T, 2]: what the model returns as "logits"
        return window.out

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def window_logprobs(model, batch, *, only_completion: bool = True,
                    block_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) [B, S-1-start] of ``batch.targets`` under ``model``: the values and gradients of
    ``opd.losses.sampled_logprobs(batch.logits(model), batch.targets)`` with the LM head run in row blocks.

    ``batch`` is an ``opd.batching.PackedBatch`` (input_ids, attention_mask, start, loss_mask). ``model``
    may be a transformers causal LM, its peft wrapper, DDP or an FSDP2-sharded one: the call goes through
    ``model(...)`` so their hooks run. ``only_completion`` runs the head only where ``loss_mask`` is
    non-zero (padding and the other rows' prompt positions inside the window cost nothing there); the
    values elsewhere are 0."""
    got = _run_window(model, batch, _Window(batch.targets, batch.loss_mask if only_completion else None, block_rows))
    return got[..., 0], got[..., 1].detach()


@torch.no_grad()
def window_topk(model, batch, k: int, *, block_rows: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-prob of ``batch.targets`` [B, T], top-k ids [B, T, k], their log-probs [B, T, k]) under ``model`` at
    the completion positions (0 elsewhere), T = S-1-start as in ``window_logprobs``: the values of the
    full-logits top-k (``logits.topk(k)`` minus the fp32 log-sum-exp) without [B, T, V] logits."""
    if k < 1:
        raise ValueError(f"k={k}: the top-k grade needs k >= 1")
    window = _Window(batch.targets, batch.loss_mask, block_rows, topk=k)
    got = _run_window(model, batch, window)
    return got[..., 0], window.topk_ids, window.topk_logprobs


def _topk_forward(h: torch.Tensor, head: torch.nn.Linear, window: _Window) -> torch.Tensor:
    """The head's stand-in for ``window_topk``: the top-k grade of the masked rows, kept in ``window``."""
    keep = window.mask.reshape(-1) != 0
    lp, ids, vals = chunked_topk_logprobs(h.reshape(-1, h.shape[-1])[keep], head.weight,
                                          window.targets.reshape(-1)[keep], window.topk, head.bias,
                                          block_rows=window.block_rows)
    shape = (*window.targets.shape, window.topk)
    window.topk_ids = ids.new_zeros(keep.shape[0], window.topk).index_put_((keep,), ids).view(shape)
    window.topk_logprobs = vals.new_zeros(keep.shape[0], window.topk).index_put_((keep,), vals).view(shape)
    logp = lp.new_zeros(keep.shape).masked_scatter(keep, lp).view(window.targets.shape)
    window.out = torch.stack([logp, torch.zeros_like(logp)], dim=-1)
    return window.out


def _run_window(model, batch, window: _Window) -> torch.Tensor:
    """``model``'s forward over ``batch`` with its head replaced for ``window``: the [B, T, 2] the stand-in
    returned, refused (``UnsupportedHead``) if the model's forward changed it before returning it."""
    head = lm_head_of(model)
    ids = batch.input_ids
    keep = torch.arange(batch.start, ids.shape[1] - 1, device=ids.device)  # as PackedBatch.logits
    with _head_replaced(head, window):
        out = model(input_ids=ids, attention_mask=batch.attention_mask, logits_to_keep=keep, use_cache=False)
    got = out.logits
    if window.out is None or (got is not window.out and not torch.equal(got, window.out)):
        raise UnsupportedHead(f"{type(unwrap(model)).__name__}.forward changed the LM head's output before returning "
                              "it: the chunked LM head cannot stand in for this model's head; use the full-logits path")
    return got
