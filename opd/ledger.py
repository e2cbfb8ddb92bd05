"""Cost ledger: the work each phase did, counted the way the reference report counts it.

FLOPs: training 6*N*tokens, sampling and scoring 2*N*tokens (N = parameters of the model doing it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class PhaseCost:
    phase: str
    wall_s: float = 0.0
    student_train_tokens: int = 0
    student_train_flops: float = 0.0
    sample_tokens: int = 0
    sample_flops: float = 0.0
    teacher_tokens: int = 0
    teacher_flops: float = 0.0

    def train(self, params: int, tokens: int) -> None:
        self.student_train_tokens += tokens
        self.student_train_flops += 6.0 * params * tokens

    def sample(self, params: int, tokens: int) -> None:
        self.sample_tokens += tokens
        self.sample_flops += 2.0 * params * tokens

    def teacher(self, params: int, tokens: int) -> None:
        self.teacher_tokens += tokens
        self.teacher_flops += 2.0 * params * tokens

    def as_dict(self) -> dict:
        return asdict(self)


def eval_phase(results: dict[str, dict]) -> dict:
    """The evaluation stage's ledger row from its results ({model: {..., params, model_tokens,
    teacher_tokens, wall_s}}): the teacher's own greedy pass and its grading of every student's
    KL samples are charged to the teacher, the students' passes to sampling."""
    cost = PhaseCost("eval")
    teacher_params = int(results.get("teacher", {}).get("params", 0))
    for name, r in results.items():
        if name == "teacher":
            cost.teacher(teacher_params, int(r.get("model_tokens", 0)))
        else:
            cost.sample(int(r.get("params", 0)), int(r.get("model_tokens", 0)))
        cost.teacher(teacher_params, int(r.get("teacher_tokens", 0)))
        cost.wall_s += float(r.get("wall_s", 0.0))
    return cost.as_dict()
