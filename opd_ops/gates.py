"""Evaluation gates: thresholds from config and no regression vs the model at an alias.

Pure functions over evaluation results ({name: {"accuracy", "reverse_kl", "n"}}), so the same
rules decide registration after a distill run and every later promotion. Accuracy is None when
the eval split has no answers (``answer`` is optional in user data): the gates that need it are
skipped and say so, never passed silently; a positive ``min_accuracy`` without answers is refused
up front (``require_answers``).
"""
from __future__ import annotations

from dataclasses import dataclass

from opd.config import GateConfig
from opd.data.dataset import AnswersRequired, require_answers  # noqa: F401 (the gates' up-front rule)

NO_ANSWERS = "skipped: no answers in the eval split"


@dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: list[dict]

    def message(self) -> str:
        return "\n".join(f"- {verdict(c)} {c['name']}: {c['detail']}" for c in self.checks)

    def markdown(self, title: str) -> str:
        rows = "\n".join(f"| {c['name']} | {verdict(c)} | {c['detail']} |" for c in self.checks)
        return f"# {title}\n\n| gate | result | detail |\n|---|---|---|\n{rows}\n"


def verdict(c: dict) -> str:
    return "SKIP" if c.get("skipped") else "PASS" if c["passed"] else "FAIL"


def _skipped(name: str) -> dict:
    return {"name": name, "passed": True, "skipped": True, "detail": NO_ANSWERS}


def _min_accuracy(g: GateConfig, acc: float | None) -> dict:
    if acc is None and g.min_accuracy > 0:  # refused up front by require_answers; fail rather than pass
        return {"name": "min_accuracy", "passed": False,
                "detail": f"no answers in the eval split, cannot check accuracy >= {g.min_accuracy}"}
    if acc is None:
        return _skipped("min_accuracy")
    return {"name": "min_accuracy", "passed": acc >= g.min_accuracy,
            "detail": f"accuracy {acc:.3f} (need >= {g.min_accuracy})"}


def check(g: GateConfig, results: dict[str, dict], candidate: str = "opd_student",
          baseline: str | None = "sft_student", incumbent_label: str | None = None) -> GateResult:
    c = results[candidate]
    checks = [_min_accuracy(g, c.get("accuracy"))]
    if g.max_reverse_kl is not None:
        checks.append({"name": "max_reverse_kl", "passed": c["reverse_kl"] <= g.max_reverse_kl,
                       "detail": f"reverse KL {c['reverse_kl']:.4f} (need <= {g.max_reverse_kl})"})
    if g.opd_must_beat_sft_kl and baseline and baseline in results:
        b = results[baseline]
        checks.append({"name": "opd_beats_sft_kl", "passed": c["reverse_kl"] < b["reverse_kl"],
                       "detail": f"reverse KL OPD {c['reverse_kl']:.4f} vs SFT {b['reverse_kl']:.4f}"})
    inc = results.get("incumbent")
    if inc is not None and (c.get("accuracy") is None or inc.get("accuracy") is None):
        checks.append(_skipped("no_regression"))
    elif inc is not None:
        floor = inc["accuracy"] - g.regression_margin
        checks.append({"name": "no_regression", "passed": c["accuracy"] >= floor,
                       "detail": f"accuracy {c['accuracy']:.3f} vs {incumbent_label or g.no_regression_vs} "
                                 f"{inc['accuracy']:.3f} (need >= {floor:.3f})"})
    return GateResult(all(x["passed"] for x in checks), checks)
