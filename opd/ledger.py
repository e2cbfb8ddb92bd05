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
