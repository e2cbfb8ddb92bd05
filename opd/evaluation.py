"""Held-out accuracy with the task's verifier, and mean per-token reverse KL to the teacher."""
from __future__ import annotations

from dataclasses import dataclass

from opd.data.task import is_correct
from opd.generation import generate
from opd.scoring import score_completions


@dataclass
class EvalResult:
    accuracy: float
    reverse_kl: float  # mean over tokens of log q_student - log p_teacher, on the student's samples
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "reverse_kl": self.reverse_kl, "n": self.n}


def accuracy(model, tokenizer, prompts: list[str], answers: list[str], max_tokens: int) -> float:
    """Greedy decoding: the deterministic answer a user would get."""
    ids = [tokenizer(p).input_ids for p in prompts]
    comps = generate(model, ids, tokenizer.eos_token_id, tokenizer.pad_token_id, max_tokens, temperature=0.0)
    texts = tokenizer.batch_decode(comps, skip_special_tokens=True)
    return sum(is_correct(t, a) for t, a in zip(texts, answers)) / max(1, len(answers))


def reverse_kl(student, teacher, tokenizer, prompts: list[str], max_tokens: int, seed: int,
               micro_batch: int = 64, samples_per_prompt: int = 4, teacher_scorer=None) -> float:
    """Monte-Carlo reverse KL on the student's own samples (temperature 1), per token.

    Several samples per prompt: the per-token values are heavy-tailed (one wrong digit the
    teacher is sure about costs ~10 nats), so one sample per prompt is too noisy to gate on.
    """
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    comps = generate(student, prompt_ids, tokenizer.eos_token_id, tokenizer.pad_token_id, max_tokens,
                     temperature=1.0, n=samples_per_prompt, seed=seed)
    ids = [p for p in prompt_ids for _ in range(samples_per_prompt)]
    q = score_completions(student, ids, comps, tokenizer.pad_token_id, micro_batch)
    p = (teacher_scorer.score(ids, comps) if teacher_scorer is not None  # opd.teachers.TeacherScorer
         else score_completions(teacher, ids, comps, tokenizer.pad_token_id, micro_batch,
                                device=next(teacher.parameters()).device))
    diffs = [a - b for qs, ps in zip(q, p) for a, b in zip(qs, ps)]
    return sum(diffs) / max(1, len(diffs))


def evaluate(student, teacher, tokenizer, prompts, answers, max_tokens, seed, kl_samples: int = 4,
             teacher_scorer=None) -> EvalResult:
    acc = accuracy(student, tokenizer, prompts, answers, max_tokens)
    kl = 0.0 if student is teacher else reverse_kl(student, teacher, tokenizer, prompts, max_tokens, seed,
                                                   samples_per_prompt=kl_samples, teacher_scorer=teacher_scorer)
    return EvalResult(acc, kl, len(prompts))
