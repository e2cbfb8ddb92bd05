"""What crosses role boundaries in one OPD step: rollouts, the teacher's top-k, and a train batch."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Rollout:
    """One sampled completion: token ids after the prompt and the sampler's logprob of each."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]
    finished: bool  # ended with a stop token (EOS or the model's own; not cut at max_tokens)


@dataclass
class TopKScores:
    """The teacher's k most likely next tokens at every completion position (for ``reverse_kl_topk``),
    with the sampled token's own logprob (for the reverse-KL metric). Per rollout, per token."""

    token_logprobs: list[list[float]]
    ids: list[list[list[int]]]  # [rollout][t][k], most likely first
    logprobs: list[list[list[float]]]  # full-vocabulary log-probs of those ids


@dataclass
class TrainBatch:
    """Everything a learner needs for one step: the rollouts and the teacher signal their loss asked for
    (per-token advantages for the sampled-token loss, or the teacher's top-k); the logit losses carry
    neither (the teacher runs beside the learner)."""

    rollouts: list[Rollout]
    advantages: list[list[float]] | None = None
    teacher_topk: TopKScores | None = None

    def reordered(self, order: list[int]) -> "TrainBatch":
        """The same batch with its rows (rollouts and their teacher signal) in ``order``."""
        if order == list(range(len(self.rollouts))):
            return self
        pick = lambda xs: [xs[i] for i in order]  # noqa: E731
        topk = self.teacher_topk
        return TrainBatch(pick(self.rollouts), None if self.advantages is None else pick(self.advantages),
                          None if topk is None else TopKScores(pick(topk.token_logprobs), pick(topk.ids),
                                                               pick(topk.logprobs)))

    def to_message(self) -> dict:
        """Plain lists and dicts (what torch.save(weights_only=True) accepts) for a learner group."""
        return {"rollouts": [asdict(r) for r in self.rollouts], "advantages": self.advantages,
                "teacher_topk": None if self.teacher_topk is None else asdict(self.teacher_topk)}

    @classmethod
    def from_message(cls, msg: dict) -> "TrainBatch":
        topk = msg["teacher_topk"]
        return cls([Rollout(**r) for r in msg["rollouts"]], msg["advantages"],
                   None if topk is None else TopKScores(**topk))

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.completion_ids) for r in self.rollouts)
