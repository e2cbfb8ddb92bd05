"""Evaluation gates: thresholds from config and no regression vs the model at an alias.

Pure functions over evaluation results ({name: {"accuracy", "reverse_kl", "n"}}), so the same
rules decide registration after a distill run and every later promotion.
"""
from __future__ import annotations

from dataclasses import dataclass

from opd.config import GateConfig


@dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: list[dict]

    def message(self) -> str:
        return "\n".join(f"- {'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}" for c in self.checks)

    def markdown(self, title: str) -> str:
        rows = "\n".join(f"| {c['name']} | {'PASS' if c['passed'] else 'FAIL'} | {c['detail']} |" for c in self.checks)
        return f"# {title}\n\n| gate | result | detail |\n|---|---|---|\n{rows}\n"


def check(g: GateConfig, results: dict[str, dict], candidate: str = "opd_student",
          baseline: str | None = "sft_student", incumbent_label: str | None = None) -> GateResult:
    c = results[candidate]
    checks = [{"name": "min_accuracy", "passed": c["accuracy"] >= g.min_accuracy,
               "detail": f"accuracy {c['accuracy']:.3f} (need >= {g.min_accuracy})"}]
    if g.max_reverse_kl is not None:
        checks.append({"name": "max_reverse_kl", "passed": c["reverse_kl"] <= g.max_reverse_kl,
                       "detail": f"reverse KL {c['reverse_kl']:.4f} (need <= {g.max_reverse_kl})"})
    if g.opd_must_beat_sft_kl and baseline and baseline in results:
        b = results[baseline]
        checks.append({"name": "opd_beats_sft_kl", "passed": c["reverse_kl"] < b["reverse_kl"],
                       "detail": f"reverse KL OPD {c['reverse_kl']:.4f} vs SFT {b['reverse_kl']:.4f}"})
    inc = results.get("incumbent")
    if inc is not None:
        floor = inc["accuracy"] - g.regression_margin
        checks.append({"name": "no_regression", "passed": c["accuracy"] >= floor,
                       "detail": f"accuracy {c['accuracy']:.3f} vs {incumbent_label or g.no_regression_vs} "
                                 f"{inc['accuracy']:.3f} (need >= {floor:.3f})"})
    return GateResult(all(x["passed"] for x in checks), checks)
