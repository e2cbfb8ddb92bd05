"""A sparse verifier reward beside the dense reverse-KL one (GRPO-style group baseline).

Each rollout earns 1 if the task's verifier accepts its completion, else 0; its advantage is that reward
minus the mean reward of the rollouts of the same prompt (the group), placed on every token of the
completion. Alone (``opd.loss.kl_coef: 0``) that is plain RL with a verifier; added to the per-token
reverse-KL advantage it is OPD + RL, the teacher acting as the KL reference (tinker-cookbook's setup).
"""
from __future__ import annotations

from typing import Callable

from opd.rollouts import Rollout


def group_baseline(rewards_R: list[float], groups_R: list[int]) -> list[float]:
    """``reward - mean reward of its group`` per rollout: unbiased (the baseline does not depend on the
    rollout's own action beyond its group share) and zero for a group whose samples all agree."""
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for r, g in zip(rewards_R, groups_R):
        total[g] = total.get(g, 0.0) + r
        count[g] = count.get(g, 0) + 1
    return [r - total[g] / count[g] for r, g in zip(rewards_R, groups_R)]


def verifier_rewards(tokenizer, check: Callable[[str, str], bool], answers_P: list[str | None]
                     ) -> Callable[[list[Rollout]], list[float]]:
    """Rollouts -> 0/1 rewards: the completion decoded and checked against its prompt's answer
    (``answers_P[rollout.prompt_index]``); a prompt without an answer earns 0 for every sample (so its
    group advantage is 0: no signal rather than a wrong one)."""

    def rewards(rollouts: list[Rollout]) -> list[float]:
        texts = tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
        return [float(answers_P[r.prompt_index] is not None and check(t, answers_P[r.prompt_index]))
                for r, t in zip(rollouts, texts)]

    return rewards
