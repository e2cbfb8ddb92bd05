"""OPD losses: pure functions over per-token tensors aligned to completion positions.

Shapes: every tensor is [B, T] with ``mask`` 1 on completion tokens; the distribution-level losses
(``reverse_kl_full``, ``reverse_kl_topk``, ``gkd_jsd``) also take logits [B, T, V] on the same grid.
"""
from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def reward_to_go(reward: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """sum_{s >= t} discount^(s-t) reward_s over each row's completion positions; [B, T].
    ``discount=0`` returns the per-token reward itself."""
    reward = reward * mask
    if discount == 0:
        return reward
    out = torch.zeros_like(reward)
    acc = torch.zeros_like(reward[:, 0])
    for t in range(reward.shape[1] - 1, -1, -1):  # completions are short; T steps of [B] work
        acc = reward[:, t] + discount * acc
        out[:, t] = acc
    return out * mask


def kl_advantages(logp_sampler: torch.Tensor, logp_teacher: torch.Tensor, mask: torch.Tensor, kl_coef: float = 1.0,
                  baseline: str = "none", discount: float = 0.0) -> torch.Tensor:
    """Per-token advantage from the reverse-KL reward (discount 0 by default), a constant for the update:

        advantage_t = -kl_coef * (log q_sampler(x_t) - log p_teacher(x_t))

    ``baseline="mean"`` subtracts the batch's mean advantage (a constant, so the policy-gradient estimate
    stays unbiased): without it every sampled token is pushed down at once, a high-variance step.
    ``discount > 0`` also credits each token with the discounted reverse KL of the tokens after it
    (reward-to-go), so a step into states the student handles badly is penalised; 0 is the reference
    report's per-token advantage."""
    advantage = reward_to_go((-kl_coef * (logp_sampler - logp_teacher)).detach(), mask, discount)
    if baseline == "mean":
        return (advantage - masked_mean(advantage, mask)) * mask
    if baseline != "none":
        raise ValueError(f"baseline={baseline!r}: choose 'none' or 'mean'")
    return advantage


def importance_sampled_pg(logp_new: torch.Tensor, logp_sampler: torch.Tensor, advantage: torch.Tensor,
                          mask: torch.Tensor, clip_ratio: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The importance-sampled policy-gradient loss on fixed advantages:

        loss = -mean_t[ exp(log pi_theta(x_t) - log q_sampler(x_t)) * advantage_t ]

    With the reverse-KL advantage its gradient is an unbiased estimate of grad KL(pi_theta || p_teacher)
    at the sampler's policy; the ratio corrects for the sampler lagging the trainer by a few updates
    (``clip_ratio`` caps it)."""
    ratio = torch.exp(logp_new - logp_sampler.detach())
    if clip_ratio is not None:
        ratio = ratio.clamp(max=clip_ratio)
    loss = -masked_mean(ratio * advantage, mask)
    with torch.no_grad():
        m = mask.bool()
        metrics = {
            "loss": float(loss),
            "ratio_mean": float(ratio[m].mean()) if m.any() else 1.0,
            "ratio_max": float(ratio[m].max()) if m.any() else 1.0,
            "sampler_trainer_absdiff_max": float((logp_new - logp_sampler)[m].abs().max()) if m.any() else 0.0,
        }
    return loss, metrics


def sft_cross_entropy(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the completion tokens (EOS included)."""
    return -masked_mean(logp, mask)


# --------------------------------------------------------------------------------------------
# Distribution-level losses over logits.
#
# Shapes: logits are [B, T, V] aligned to the same [B, T] grid as ``mask`` (logits[:, t] predicts
# the token at target position t). Callers pass one micro-batch at a time; these functions keep
# only the masked (completion) rows and upcast to fp32 inside, so the fp32 copy is never larger
# than one micro-batch's completion tokens. The teacher side is always treated as a fixed target
# (detached). Every loss is the token-weighted mean over completion tokens, the same reduction as
# ``masked_mean`` (and TRL's ``reduction="batchmean"`` with labels).
# --------------------------------------------------------------------------------------------


class _SampledLogprob(torch.autograd.Function):
    """log softmax(z)[target] per row, and the row's entropy (a no-grad metric), in one fp32 pass per
    row block. Backward recomputes softmax from the saved normaliser: grad_z = g (onehot - softmax),
    written straight into one [N, V] buffer. autograd's version of the same maths keeps a gather's
    zero-filled [N, V] gradient, a logsumexp gradient and their sum: about twice the vocabulary-wide
    memory traffic, which is most of an OPD update's time at LLM vocabulary sizes."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, targets: torch.Tensor):
        n = z.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=z.device)
        ent = torch.empty(n, dtype=torch.float32, device=z.device)
        for i in range(0, n, CHUNK_ROWS):
            zf = _f32(z[i : i + CHUNK_ROWS])
            mx = zf.amax(-1, keepdim=True)
            e = torch.sub(zf, mx).exp_()  # the one vocabulary-wide temporary
            total = e.sum(-1)
            lse[i : i + CHUNK_ROWS] = m = mx[:, 0] + total.log()
            # entropy = lse - E_p[z]; nansum: a -inf logit has p = 0 and contributes 0
            ent[i : i + CHUNK_ROWS] = m - e.mul_(zf).nansum(-1) / total
        logp = _f32(z.gather(-1, targets[:, None])[:, 0]) - lse
        ctx.save_for_backward(z, targets, lse)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g: torch.Tensor, _g_ent):
        z, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(z)
        for i in range(0, z.shape[0], CHUNK_ROWS):
            zi, gi, li = z[i : i + CHUNK_ROWS], g[i : i + CHUNK_ROWS, None], lse[i : i + CHUNK_ROWS, None]
            if z.dtype == torch.float32:  # softmax written in place into the gradient buffer
                torch.sub(zi, li, out=grad[i : i + CHUNK_ROWS]).exp_().mul_(-gi)
            else:  # bf16/fp16 logits: fp32 softmax per block, then cast
                grad[i : i + CHUNK_ROWS] = torch.exp(_f32(zi) - li).mul_(-gi)
        grad.scatter_add_(-1, targets[:, None], g[:, None].to(grad.dtype))
        return grad, None


def sampled_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(logits)[target], entropy of softmax(logits)) per position, both fp32 [B, T];
    differentiable in the log-prob, the entropy is a metric. The same values as
    ``token_logprobs_from_logits`` and ``entropy_from_logits``' per-row entropy."""
    b, t, v = logits.shape
    logp, ent = _SampledLogprob.apply(logits.reshape(b * t, v), targets.reshape(b * t))
    return logp.view(b, t), ent.view(b, t)


def token_logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position; the same arithmetic as ``opd.logprobs.token_logprobs``."""
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    return picked - logsumexp_fp32(logits)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast to at least fp32 (fp64 inputs stay fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rows(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The completion rows of a [B, T, ...] tensor as [N, ...], and their mask weights [N]."""
    keep = mask != 0
    return x[keep], _f32(mask[keep])


def _reduce(per_token: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * weights).sum() / _f32(mask).sum().clamp(min=1.0)


def _check_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: distribution losses need one shared vocabulary")


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a(v) (log a(v) - log b(v)) per row, from log-probs [N, V]."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


CHUNK_ROWS = 2048  # rows upcast to fp32 at a time (bounds the no-grad transients; with grad it changes nothing)


def _by_rows(fn, *rows: torch.Tensor) -> torch.Tensor:
    """fn over [N, V] row blocks of CHUNK_ROWS, concatenated: fn(*rows) with a bounded fp32 working set."""
    n = rows[0].shape[0]
    if n <= CHUNK_ROWS:
        return fn(*rows)
    return torch.cat([fn(*(x[i : i + CHUNK_ROWS] for x in rows)) for i in range(0, n, CHUNK_ROWS)])


def logsumexp_fp32(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim in fp32, upcasting CHUNK_ROWS rows at a time; shape logits.shape[:-1]."""
    flat = logits.reshape(-1, logits.shape[-1])
    return _by_rows(lambda x: torch.logsumexp(_f32(x), dim=-1), flat).reshape(logits.shape[:-1])


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over completion tokens of the entropy -sum_v q(v) log q(v) of softmax(logits)."""
    def ent(x):
        lq = torch.log_softmax(_f32(x), dim=-1)
        return -(lq.exp() * lq).sum(-1)

    rows, w = _rows(logits, mask)
    return _reduce(_by_rows(ent, rows), w, mask)


def _full_kls(student_logits, teacher_logits, mask, reverse_coef: float, forward_coef: float):
    """reverse_coef * KL(q || p) + forward_coef * KL(p || q) per completion row, and the row weights."""
    _check_vocab(student_logits, teacher_logits)
    s, w = _rows(student_logits, mask)
    t, _ = _rows(teacher_logits.detach(), mask)

    def kls(s, t):
        lq, lp = torch.log_softmax(_f32(s), dim=-1), torch.log_softmax(_f32(t), dim=-1)
        out = reverse_coef * _kl_rows(lq, lp) if reverse_coef else 0.0
        return out + forward_coef * _kl_rows(lp, lq) if forward_coef else out

    return _by_rows(kls, s, t), w


def forward_kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact forward KL(p_teacher || q_student) per position, mean over completion tokens (mass-covering)."""
    per_token, w = _full_kls(student_logits, teacher_logits, mask, 0.0, 1.0)
    return _reduce(per_token, w, mask)


def reverse_kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    forward_kl_coef: float = 0.0) -> torch.Tensor:
    """Exact reverse KL(q_student || p_teacher) = sum_v q(v) (log q(v) - log p(v)) per position,
    mean over completion tokens; ``forward_kl_coef > 0`` adds coef * KL(p_teacher || q_student)
    (exact, full vocab) as a mass-covering guard against entropy collapse.

    Unlike ``reverse_kl_is`` (a one-sample estimate at the sampled token), this is the analytic
    per-position KL, so its gradient has no sampling variance given the visited prefixes.
    """
    per_token, w = _full_kls(student_logits, teacher_logits, mask, 1.0, forward_kl_coef)
    return _reduce(per_token, w, mask)


def reverse_kl_topk(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor,
                    teacher_topk_logprobs: torch.Tensor, mask: torch.Tensor, k: int | None = None,
                    forward_kl_coef: float = 0.0) -> torch.Tensor:
    """Reverse KL on the teacher's top-k support K, both distributions renormalised on K:

        q_K(v) = q(v) / sum_{u in K} q(u),   p_K(v) = p(v) / sum_{u in K} p(u)
        loss_t = sum_{v in K} q_K(v) (log q_K(v) - log p_K(v))

    ``teacher_topk_ids`` / ``teacher_topk_logprobs`` are [B, T, K'] (K' >= k; the k most likely
    are kept). Only the k gathered student columns are upcast to fp32 (the student's full-vocab
    normaliser cancels in q_K). With k = vocab size this equals ``reverse_kl_full``.

    Known risk (verl PR #5041, "LLM Distillation: Note on reverse KL"): the *unnormalised*
    truncation sum_{v in K} q(v) log(q(v)/p(v)) is minimised by moving the student's mass off K,
    and training collapsed. Renormalising q removes that incentive, but the loss is still blind to
    how much mass the student keeps outside K (no gradient pulls it back), so watch
    ``student_topk_mass`` in ``opd_update``'s metrics. ``forward_kl_coef > 0`` adds
    coef * sum_{v in K} p_K(v) (log p_K(v) - log q(v)) with the student's *true* (full-vocab)
    log-probs, which does push mass back onto K; it upcasts the full row for the normaliser.
    """
    ids, lpt = teacher_topk_ids, _f32(teacher_topk_logprobs.detach())
    if ids.shape != lpt.shape:
        raise ValueError(f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs {tuple(lpt.shape)} differ")
    if k is not None:
        if not 1 <= k <= ids.shape[-1]:
            raise ValueError(f"k={k}: the teacher gave {ids.shape[-1]} candidates per position")
        if k < ids.shape[-1]:
            sel = lpt.topk(k, dim=-1).indices
            ids, lpt = ids.gather(-1, sel), lpt.gather(-1, sel)
    z = student_logits.gather(-1, ids)  # [B, T, k]: only these columns are upcast
    z, w = _rows(z, mask)
    lpt, _ = _rows(lpt, mask)
    lq_k = torch.log_softmax(_f32(z), dim=-1)
    lp_k = torch.log_softmax(lpt, dim=-1)
    per_token = _kl_rows(lq_k, lp_k)
    if forward_kl_coef:
        s, _ = _rows(student_logits, mask)
        lq_true = _f32(z) - logsumexp_fp32(s).unsqueeze(-1)
        per_token = per_token + forward_kl_coef * (lp_k.exp() * (lp_k - lq_true)).sum(-1)
    return _reduce(per_token, w, mask)


def gkd_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, beta: float = 0.5,
            temperature: float = 1.0, forward_kl_coef: float = 0.0) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2023, Eq. 1), matching TRL's
    ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature)``
    with ``reduction="batchmean"`` (mean over completion tokens):

        M      = beta * P_T + (1 - beta) * P_S
        loss_t = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)

    with TRL's special cases: beta == 0 -> forward KL(P_T || P_S); beta == 1 -> reverse
    KL(P_S || P_T). Note the discontinuity: for 0 < beta << 1 the loss is ~ beta * KL(P_T || P_S)
    (and ~ (1 - beta) * KL(P_S || P_T) near 1), so its scale shrinks towards the endpoints.
    ``forward_kl_coef > 0`` adds coef * KL(P_T || P_S) on the same (tempered) distributions.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta}: must be in [0, 1]")
    _check_vocab(student_logits, teacher_logits)
    s, w = _rows(student_logits, mask)
    t, _ = _rows(teacher_logits.detach(), mask)

    def jsd(s, t):
        lq = torch.log_softmax(_f32(s) / temperature, dim=-1)
        lp = torch.log_softmax(_f32(t) / temperature, dim=-1)
        if beta == 0:
            out = _kl_rows(lp, lq)
        elif beta == 1:
            out = _kl_rows(lq, lp)
        else:
            lm = torch.logsumexp(torch.stack([lq + math.log1p(-beta), lp + math.log(beta)]), dim=0)
            out = beta * _kl_rows(lp, lm) + (1 - beta) * _kl_rows(lq, lm)
        return out + forward_kl_coef * _kl_rows(lp, lq) if forward_kl_coef else out

    return _reduce(_by_rows(jsd, s, t), w, mask)
