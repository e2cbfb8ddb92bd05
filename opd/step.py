"""One OPD step: sample -> score (teacher signal, advantages) -> update -> publish.

The round (``opd.rounds.opd_round``), the benchmarks and the tests all call ``step``; nothing else
strings the three roles together. Each role is behind a small interface: a ``Sampler``
(``opd.sampling``), a ``Teacher`` (``opd.teachers``) and a ``Learner`` (``opd.learner``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from opd.learner import Learner
from opd.objectives import score
from opd.rollouts import Rollout
from opd.sampling.base import Sampler


@dataclass
class StepResult:
    metrics: dict[str, float]  # the learner's (token-weighted over the batch) and the scorer's
    rollouts: list[Rollout]
    seconds: dict[str, float]  # sample_s, score_s, update_s, sync_s

    @property
    def sampled_tokens(self) -> int:
        """Completion tokens: each sampled once, graded once, trained on once."""
        return sum(len(r.completion_ids) for r in self.rollouts)

    @property
    def sequence_tokens(self) -> int:
        """Prompt + completion tokens: what the teacher and the learner each run a forward over."""
        return sum(len(r.prompt_ids) + len(r.completion_ids) for r in self.rollouts)


def step(sampler: Sampler, teacher, learner: Learner, spec, prompts_P: list[list[int]], *, samples_per_prompt: int,
         max_tokens: int, seed: int, lr: float, signal: str | None = None, publish: bool = True,
         reward_fn=None, reward_weight: float = 0.0) -> StepResult:
    """``samples_per_prompt`` completions per prompt at temperature 1 (importance ratios need the
    student's own distribution), graded by ``teacher`` with ``signal`` (default: the one ``spec`` asks for;
    ``opd.objectives.signal_for``), one optimizer step, and (``publish``) the new weights handed to the
    sampler for the next step."""
    t0 = time.time()
    rollouts = sampler.sample(prompts_P, n=samples_per_prompt, max_tokens=max_tokens, seed=seed)
    t1 = time.time()
    rewards = reward_fn(rollouts) if reward_fn is not None else None  # opd.rewards: the verifier's 0/1
    batch, score_metrics = score(spec, teacher, rollouts, signal, rewards, reward_weight)
    t2 = time.time()
    metrics = {**learner.update(batch, lr), **score_metrics}
    t3 = time.time()
    if publish:
        sampler.publish(learner.weights())
    t4 = time.time()
    return StepResult(metrics, rollouts, {"sample_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2,
                                          "sync_s": t4 - t3})
