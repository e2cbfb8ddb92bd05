"""The one place that maps a loss spec to its teacher signal and its loss.

A spec (``opd.config``: ``ReverseKLIS``, ``ReverseKLFull``, ``ReverseKLTopK``, ``GKDJSD``) carries its
settings and the teacher ``signal`` it needs:

- ``"logprobs"``: the teacher's log-prob of each sampled token (any teacher). The reverse KL becomes a
  per-token *advantage* at scoring time (``score``, tinker-cookbook's ``incorporate_kl_penalty``), and
  the learner runs a generic importance-sampled policy-gradient step on rollouts + advantages.
- ``"topk"``: the teacher's k most likely tokens at every completion position (any teacher).
- ``"logits"``: the teacher's full distribution on the same micro-batch, so the teacher's weights must
  live where the learner runs.

Adding a loss = one spec class in ``opd.config`` + one function in ``LOSSES`` here + its test. This
module needs only torch (specs are read by attribute), so the update path runs without pydantic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from opd.batching import PackedBatch, scatter_completion
from opd.losses import (gkd_jsd, importance_sampled_pg, kl_advantages, logsumexp_fp32, masked_mean,
                        reverse_kl_full, reverse_kl_topk)
from opd.rollouts import Rollout, TrainBatch


# ---------------------------------------------------------------- scoring time

def _grid(rows_P: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-rollout values as a right-padded fp32 [P, T] tensor and its mask."""
    width = max((len(r) for r in rows_P), default=0)
    values, mask = torch.zeros(len(rows_P), width), torch.zeros(len(rows_P), width)
    for i, r in enumerate(rows_P):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        mask[i, : len(r)] = 1.0
    return values, mask


def advantages(spec, sampler_logprobs_P: list[list[float]], teacher_logprobs_P: list[list[float]]
               ) -> tuple[list[list[float]], float]:
    """``reverse_kl_is``'s per-token advantages (one list per rollout) and the batch's mean reverse KL
    per token, both over the global batch: a mean baseline is the batch's whatever the micro-batch or
    the number of learner processes."""
    q_PT, mask_PT = _grid(sampler_logprobs_P)
    p_PT, _ = _grid(teacher_logprobs_P)
    adv_PT = kl_advantages(q_PT, p_PT, mask_PT, spec.kl_coef, spec.baseline, spec.discount)
    adv_P = [adv_PT[i, : len(q)].tolist() for i, q in enumerate(sampler_logprobs_P)]
    return adv_P, float(masked_mean(q_PT - p_PT, mask_PT))


def signal_for(spec, scorer: str) -> str:
    """What the teacher hands the learner for ``spec`` under ``teacher.scorer``. The top-k loss takes the
    teacher's logits when the teacher runs in this process anyway (hf: one teacher forward beside the
    update instead of a second scoring pass, and the exact reverse KL as its metric), and the top-k from a
    served teacher, whose weights then never load here."""
    return "logits" if spec.signal == "topk" and scorer == "hf" else spec.signal


def score(spec, teacher, rollouts: list[Rollout], signal: str | None = None, rewards: list[float] | None = None,
          reward_weight: float = 0.0) -> tuple[TrainBatch, dict[str, float]]:
    """Ask ``teacher`` for the ``signal`` (default: the spec's own) and turn it into a train batch
    (+ scoring metrics). ``rewards`` (one per rollout, opd.rewards) add ``reward_weight`` x their group
    advantage to every token of the sampled-token loss's advantages."""
    prompts_P, completions_P = [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts]
    signal = signal or spec.signal
    if signal == "logprobs":
        adv_P, reverse_kl = advantages(spec, [r.sampler_logprobs for r in rollouts],
                                       teacher.score(prompts_P, completions_P))
        metrics = {"reverse_kl": reverse_kl}
        if rewards is not None:
            from opd.rewards import group_baseline

            group_P = group_baseline(rewards, [r.prompt_index for r in rollouts])
            adv_P = [[a + reward_weight * g for a in row] for row, g in zip(adv_P, group_P)]
            metrics["reward_mean"] = sum(rewards) / max(1, len(rewards))
        return TrainBatch(rollouts, advantages=adv_P), metrics
    if signal == "topk":
        return TrainBatch(rollouts, teacher_topk=teacher.score_topk(prompts_P, completions_P, spec.topk)), {}
    return TrainBatch(rollouts), {}  # "logits": the teacher runs beside the learner, on each micro-batch


# ---------------------------------------------------------------- one micro-batch

@dataclass
class MicroBatch:
    """What a loss sees of one micro-batch, every tensor on the packed [B, T] target grid."""

    batch: PackedBatch
    logits_BTV: torch.Tensor | None  # None under training.lm_head=chunked (sampled-token losses only)
    logp_new_BT: torch.Tensor  # the trainer's log-prob of each sampled token (differentiable)
    logp_sampler_BT: torch.Tensor
    advantages_BT: torch.Tensor | None = None  # "logprobs" signal
    topk: dict | None = None  # "topk" signal: ids_BTK, logprobs_BTK, token_logprobs_BT
    teacher_model: torch.nn.Module | None = None  # "logits" signal: the teacher beside the update

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.loss_mask

    def teacher_logits(self) -> torch.Tensor:
        was_training = self.teacher_model.training
        self.teacher_model.eval()
        with torch.no_grad():
            t_logits = self.batch.logits(self.teacher_model)
        self.teacher_model.train(was_training)
        return t_logits


def sampler_metrics(logp_new_BT, logp_sampler_BT, mask_BT) -> dict[str, float]:
    """Importance ratios and the sampler/trainer log-prob gap on the completion tokens."""
    m = mask_BT.bool()
    diff = logp_new_BT.detach() - logp_sampler_BT
    ratio = torch.exp(diff)
    return {"ratio_mean": float(ratio[m].mean()) if m.any() else 1.0,
            "ratio_max": float(ratio[m].max()) if m.any() else 1.0,
            "sampler_trainer_absdiff_max": float(diff[m].abs().max()) if m.any() else 0.0}


def _is_loss(spec, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """The generic importance-sampled policy gradient on advantages fixed at scoring time."""
    return importance_sampled_pg(mb.logp_new_BT, mb.logp_sampler_BT, mb.advantages_BT, mb.mask, spec.clip_ratio)


def _student_topk_mass(logits_BTV, top_ids_BTK, mask_BT) -> float:
    """Mass the student keeps on the teacher's top-k (verl PR #5041's collapse signal)."""
    z = logits_BTV.detach().gather(-1, top_ids_BTK).float()
    mass = torch.logsumexp(z, dim=-1) - logsumexp_fp32(logits_BTV.detach())
    return float(masked_mean(mass.exp(), mask_BT))


def _topk_loss(spec, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """From a served teacher's top-k (the reverse-KL metric is then the sampled-token estimate: the full
    teacher distribution is not here), or from the teacher's logits beside the update (exact metric)."""
    if mb.teacher_model is not None:
        t_logits = mb.teacher_logits()
        with torch.no_grad():  # only the k columns and the teacher's normaliser leave this block
            vals, ids = t_logits.topk(min(spec.topk, t_logits.shape[-1]), dim=-1)
            lps = vals.float() - logsumexp_fp32(t_logits).unsqueeze(-1)
    else:
        t_logits, ids, lps = None, mb.topk["ids_BTK"], mb.topk["logprobs_BTK"]
    loss = reverse_kl_topk(mb.logits_BTV, ids, lps, mb.mask, min(spec.topk, ids.shape[-1]), spec.forward_kl_coef)
    with torch.no_grad():
        reverse_kl = (reverse_kl_full(mb.logits_BTV.detach(), t_logits, mb.mask) if t_logits is not None
                      else masked_mean(mb.logp_new_BT.detach() - mb.topk["token_logprobs_BT"], mb.mask))
        metrics = {"loss": float(loss), "reverse_kl": float(reverse_kl),
                   **sampler_metrics(mb.logp_new_BT, mb.logp_sampler_BT, mb.mask),
                   "student_topk_mass": _student_topk_mass(mb.logits_BTV, ids, mb.mask)}
    return loss, metrics


def _logit_metrics(loss, mb: MicroBatch, t_logits, exact_reverse_kl: bool) -> dict[str, float]:
    with torch.no_grad():
        return {"loss": float(loss),
                "reverse_kl": float(loss) if exact_reverse_kl
                else float(reverse_kl_full(mb.logits_BTV.detach(), t_logits, mb.mask)),
                **sampler_metrics(mb.logp_new_BT, mb.logp_sampler_BT, mb.mask)}


def _full_loss(spec, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    t_logits = mb.teacher_logits()
    loss = reverse_kl_full(mb.logits_BTV, t_logits, mb.mask, spec.forward_kl_coef)
    return loss, _logit_metrics(loss, mb, t_logits, exact_reverse_kl=not spec.forward_kl_coef)


def _gkd_loss(spec, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    t_logits = mb.teacher_logits()
    loss = gkd_jsd(mb.logits_BTV, t_logits, mb.mask, spec.beta, forward_kl_coef=spec.forward_kl_coef)
    return loss, _logit_metrics(loss, mb, t_logits, exact_reverse_kl=False)


LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, float]]]] = {
    "reverse_kl_is": _is_loss, "reverse_kl_full": _full_loss, "reverse_kl_topk": _topk_loss, "gkd_jsd": _gkd_loss}


def micro_batch_loss(spec, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """The one place a spec becomes a loss on one micro-batch."""
    return LOSSES[spec.kind](spec, mb)


def topk_grid(topk_scores, s: int, e: int, batch: PackedBatch) -> dict:
    """Rows ``s:e`` of a scorer's top-k placed on the micro-batch's target grid."""
    return {"ids_BTK": scatter_completion(topk_scores.ids[s:e], batch, torch.long),
            "logprobs_BTK": scatter_completion(topk_scores.logprobs[s:e], batch),
            "token_logprobs_BT": scatter_completion(topk_scores.token_logprobs[s:e], batch)}
