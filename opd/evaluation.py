"""Held-out accuracy with the task's verifier, and mean per-token reverse KL to the teacher.

``answer`` is optional in user data: rows without one are left out of both accuracies, and an eval
split with no answers at all reports accuracy None (the reverse KL needs no answers)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from opd.data.task import is_correct
from opd.prompting import RAW, PromptFormat, prompt_format
from opd.generation import generate
from opd.logprobs import score_completions
from opd.models import count_params, load_model, load_tokenizer, num_params, pick_device, resolve_dtype, set_threads
from opd.records import ModelRef

if TYPE_CHECKING:
    from opd.config import RunConfig
    from opd.data.dataset import DataRef
    from opd.engines import Engines


@dataclass
class EvalResult:
    accuracy: float | None  # None: no eval row has an answer
    reverse_kl: float  # mean over tokens of log q_student - log p_teacher, on the student's samples
    n: int
    # share of correct temperature-1 samples (the KL samples, verified): the policy OPD trains,
    # and the mean-over-samples metric reasoning evals quote; greedy ``accuracy`` can move differently
    sampled_accuracy: float | None = None
    # the work it took, for the cost ledger: tokens the evaluated model processed (greedy answers,
    # KL samples, their re-scoring) and tokens the teacher graded
    model_tokens: int = 0
    teacher_tokens: int = 0
    wall_s: float = 0.0
    n_answered: int = 0  # rows with an answer: both accuracies are over these

    def as_dict(self) -> dict[str, float | None]:
        return {"accuracy": self.accuracy, "reverse_kl": self.reverse_kl, "n": self.n,
                "n_answered": self.n_answered,
                "sampled_accuracy": self.sampled_accuracy,
                "model_tokens": self.model_tokens, "teacher_tokens": self.teacher_tokens, "wall_s": self.wall_s}


Check = Callable[[str, str], bool]  # (completion text, answer) -> correct: a task verifier's is_correct


def _share_correct(tokenizer, comps: list[list[int]], answers: list[str | None], check: Check = is_correct
                   ) -> float | None:
    """The share of completions the task's verifier accepts, over those whose ``answers`` entry (paired
    with ``comps``) is not None; None when no completion has an answer to check."""
    pairs = [(c, a) for c, a in zip(comps, answers) if a is not None]
    if not pairs:
        return None
    texts = tokenizer.batch_decode([c for c, _ in pairs], skip_special_tokens=True)
    return sum(check(t, a) for t, (_, a) in zip(texts, pairs)) / len(pairs)


def has_answers(answers: list[str | None] | None) -> bool:
    return answers is not None and any(a is not None for a in answers)


def _greedy(model, tokenizer, prompts: list[str], answers: list[str | None], max_tokens: int,
            fmt: PromptFormat = RAW, check: Check = is_correct) -> tuple[float | None, int]:
    ids = fmt.encode_all(tokenizer, prompts)
    comps = generate(model, ids, tokenizer.eos_token_id, tokenizer.pad_token_id, max_tokens, temperature=0.0)
    return _share_correct(tokenizer, comps, answers, check), sum(len(p) + len(c) for p, c in zip(ids, comps))


def accuracy(model, tokenizer, prompts: list[str], answers: list[str | None], max_tokens: int,
             fmt: PromptFormat = RAW, check: Check = is_correct) -> float | None:
    """Greedy decoding: the deterministic answer a user would get."""
    return _greedy(model, tokenizer, prompts, answers, max_tokens, fmt, check)[0]


def slice_accuracy(model, tokenizer, ev, n: int, max_tokens: int, fmt: PromptFormat = RAW,
                   check: Check | None = is_correct) -> float | None:
    """Greedy accuracy on the first ``n`` rows of the eval split: each stage's cheap progress line;
    None when the data has no answers or the task no verifier (``check`` None)."""
    if "answer" not in ev.column_names or check is None:
        return None
    n = min(n, len(ev))
    return accuracy(model, tokenizer, ev["prompt"][:n], ev["answer"][:n], max_tokens, fmt, check)


def eval_max_tokens(cfg: RunConfig) -> int:
    """Completion budget of the held-out evaluation: eval.max_tokens, else the training rollouts'."""
    return cfg.eval.max_tokens or cfg.opd.max_tokens


def task_check(cfg: RunConfig) -> Check | None:
    """The run's verifier as a check; None for ``task.verifier: none`` (a KL-only run: no accuracy)."""
    from opd.data.verifiers import verifier

    return None if cfg.task.verifier.kind == "none" else verifier(cfg.task.verifier).is_correct


def _reverse_kl(student, teacher, tokenizer, prompts: list[str], max_tokens: int, seed: int,
                micro_batch: int = 64, samples_per_prompt: int = 4, teacher_scorer=None,
                answers: list[str | None] | None = None, fmt: PromptFormat = RAW,
                check: Check = is_correct) -> tuple[float, int, float | None]:
    """Monte-Carlo reverse KL on the student's own samples (temperature 1), per token; with
    ``answers``, also the share of those samples the verifier accepts.

    Several samples per prompt: the per-token values are heavy-tailed (one wrong digit the
    teacher is sure about costs ~10 nats), so one sample per prompt is too noisy to gate on.
    """
    prompt_ids = fmt.encode_all(tokenizer, prompts)
    comps = generate(student, prompt_ids, tokenizer.eos_token_id, tokenizer.pad_token_id, max_tokens,
                     temperature=1.0, n=samples_per_prompt, seed=seed)
    ids = [p for p in prompt_ids for _ in range(samples_per_prompt)]
    q = score_completions(student, ids, comps, tokenizer.pad_token_id, micro_batch)
    p = (teacher_scorer.score(ids, comps) if teacher_scorer is not None  # opd.teachers.TeacherScorer
         else score_completions(teacher, ids, comps, tokenizer.pad_token_id, micro_batch,
                                device=next(teacher.parameters()).device))
    diffs = [a - b for qs, ps in zip(q, p) for a, b in zip(qs, ps)]
    sampled = (None if answers is None else
               _share_correct(tokenizer, comps, [a for a in answers for _ in range(samples_per_prompt)], check))
    return sum(diffs) / max(1, len(diffs)), sum(len(i) + len(c) for i, c in zip(ids, comps)), sampled


def evaluate(student, teacher, tokenizer, prompts, answers: list[str | None] | None, max_tokens, seed,
             kl_samples: int = 4, teacher_scorer=None, fmt: PromptFormat = RAW,
             check: Check = is_correct) -> EvalResult:
    """Greedy accuracy (skipped, None, without answers), the reverse KL on ``kl_samples`` samples per
    prompt, and the sampled accuracy of those samples."""
    t0 = time.time()
    answered = sum(a is not None for a in answers) if answers is not None else 0
    acc, greedy_tokens = (_greedy(student, tokenizer, prompts, answers, max_tokens, fmt, check) if has_answers(answers)
                          else (None, 0))
    if student is teacher:
        return EvalResult(acc, 0.0, len(prompts), None, greedy_tokens, 0, time.time() - t0, answered)
    kl, kl_tokens, sampled = _reverse_kl(student, teacher, tokenizer, prompts, max_tokens, seed,
                                         samples_per_prompt=kl_samples, teacher_scorer=teacher_scorer,
                                         answers=answers if has_answers(answers) else None, fmt=fmt, check=check)
    # KL samples are generated, then re-scored by the student: each of their tokens is processed twice
    return EvalResult(acc, kl, len(prompts), sampled, greedy_tokens + 2 * kl_tokens, kl_tokens, time.time() - t0,
                      answered)


# ---------------------------------------------------------------- the evaluation stage

def teacher_accuracy(scorer, tokenizer, prompts: list[str], answers: list[str | None] | None, max_tokens: int,
                     fmt: PromptFormat = RAW, check: Check = is_correct) -> EvalResult:
    """The teacher's greedy accuracy, its completions written by the scorer (opd.teachers), wherever the
    teacher runs; its reverse KL to itself is 0."""
    t0 = time.time()
    answered = sum(a is not None for a in answers) if answers is not None else 0
    if not has_answers(answers):
        return EvalResult(None, 0.0, len(prompts), None, 0, 0, time.time() - t0, answered)
    ids = fmt.encode_all(tokenizer, prompts)
    comps = scorer.complete(ids, max_tokens, tokenizer.eos_token_id, temperature=0.0)
    return EvalResult(_share_correct(tokenizer, comps, answers, check), 0.0, len(prompts), None,
                      sum(len(p) + len(c) for p, c in zip(ids, comps)), 0, time.time() - t0, answered)


def evaluate_models(cfg: RunConfig, data: DataRef, teacher: ModelRef, students: dict[str, str],
                    engines: Engines) -> dict[str, dict]:
    """Teacher and each named student on the same eval prompts, answers and sampling seed."""
    set_threads()
    device = pick_device(cfg.device)
    tok = load_tokenizer(teacher.path)
    ev = data.load()["eval"]
    n = min(cfg.eval.max_examples, len(ev))
    # answer is optional in user data: no column (or no values) -> accuracies None, the KL still measured
    check, fmt = task_check(cfg), prompt_format(cfg)
    prompts = ev["prompt"][:n]
    answers = ev["answer"][:n] if "answer" in ev.column_names and check is not None else None
    scorer = engines.teacher(teacher.path, tok.pad_token_id)  # a vllm/remote teacher never loads here
    out = {"teacher": {**teacher_accuracy(scorer, tok, prompts, answers, eval_max_tokens(cfg), fmt,
                                          check or is_correct).as_dict(), "params": count_params(teacher.path)}}
    for name, path in students.items():
        m = load_model(path, device, dtype=resolve_dtype(cfg.student.dtype, path, device))
        out[name] = {**evaluate(m, None, tok, prompts, answers, eval_max_tokens(cfg), cfg.seed,
                                cfg.eval.kl_samples_per_prompt, teacher_scorer=scorer, fmt=fmt,
                                check=check or is_correct).as_dict(),
                     "params": num_params(m)}
    return out


def _dir_identity(path: str) -> list[list]:
    """(name, size, mtime) of a model directory's files: a rewritten checkpoint changes it, and it
    costs no read of the weights (hashing a 16 GB student on every resume would)."""
    return [[f.name, (st := f.stat()).st_size, st.st_mtime_ns] for f in sorted(Path(path).iterdir()) if f.is_file()]


def evaluation_key(cfg: RunConfig, data: DataRef, teacher: ModelRef, students: dict[str, str],
                   incumbent_version: int | None) -> str:
    """What an evaluation measured: the models' files, the eval data and settings. The incumbent is
    named by its registry version (immutable, verified on pull), not its freshly pulled files."""
    spec = {"eval": cfg.eval.model_dump(mode="json", exclude={"gates"}), "max_tokens": eval_max_tokens(cfg),
            "seed": cfg.seed, "scorer": cfg.teacher.scorer, "task": cfg.task.model_dump(mode="json"), "data": [data.fingerprint, data.n_eval],
            "teacher": [teacher.path, _dir_identity(teacher.path)], "incumbent_version": incumbent_version,
            "students": {k: [p, _dir_identity(p)] for k, p in sorted(students.items()) if k != "incumbent"}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _reuse_evaluation(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["results"] if saved.get("key") == key else None


def evaluate_all(cfg: RunConfig, data: DataRef, teacher: ModelRef, sft: ModelRef, final: ModelRef,
                 engines: Engines, incumbent: str | None = None, incumbent_version: int | None = None,
                 store: Path | None = None, log=print) -> dict[str, dict]:
    """Teacher, SFT and OPD students (and the incumbent) on one eval set. With ``store`` (the run's
    ``RunLayout.evaluation``) the results are kept there (written last, renamed into place) under
    ``evaluation_key``, so a resumed run reuses them instead of evaluating the same models again."""
    students = {"sft_student": sft.path, "opd_student": final.path}
    if incumbent:
        students["incumbent"] = incumbent
    key = evaluation_key(cfg, data, teacher, students, incumbent_version if incumbent else None)
    if store is not None and (results := _reuse_evaluation(store, key)) is not None:
        log(f"evaluation reused from {store} (same models, data and eval settings)")
        return results
    results = evaluate_models(cfg, data, teacher, students, engines)
    if incumbent and incumbent_version is not None:
        results["incumbent"]["version"] = incumbent_version
    if store is not None:
        tmp = store.with_name(store.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "results": results}, indent=2))
        os.replace(tmp, store)
    return results
