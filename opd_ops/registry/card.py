"""Model card: the README.md published with every version, rendered from its manifest/lineage.

Every lineage key is optional (run_key, flow_run_id, config, dataset_fingerprint, teacher,
teacher_params, student_params, metrics, gates, rounds, cost); only what is present is shown.
"""
from __future__ import annotations

import json
from typing import Any

_METRIC_ROWS = (("teacher", "teacher"), ("sft_student", "student after SFT"), ("opd_student", "student after OPD"))
_COST_KEYS = ("wall_s", "student_train_flops", "sample_flops", "teacher_flops")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.4f}".rstrip("0").rstrip(".")
    if isinstance(v, int):
        return f"{v:,}"
    if v is None:
        return "-"
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out + [""]


def _config_summary(cfg: dict) -> list[list[Any]]:
    def model_shape(section: dict | None) -> str | None:
        m = (section or {}).get("model")
        if isinstance(m, dict):
            return ", ".join(f"{k}={v}" for k, v in m.items())
        return None

    pick = [
        ("name", cfg.get("name")), ("seed", cfg.get("seed")),
        ("data source", (cfg.get("data") or {}).get("source")),
        ("teacher", (cfg.get("teacher") or {}).get("path") or model_shape((cfg.get("teacher") or {}).get("bootstrap"))),
        ("student", model_shape(cfg.get("student"))),
        ("SFT steps", ((cfg.get("sft") or {}).get("train") or {}).get("steps")),
    ]
    opd = cfg.get("opd") or {}
    for k in ("rounds", "steps_per_round", "prompts_per_step", "samples_per_prompt", "temperature", "lr", "sampler", "loss"):
        if k in opd:
            pick.append((f"OPD {k}", opd[k]))
    return [[k, v] for k, v in pick if v is not None]


def render_card(manifest: dict) -> str:
    model, version = manifest.get("model", "?"), manifest.get("version", "?")
    out = [f"# {model} v{version}", ""]
    teacher = manifest.get("teacher")
    out += [f"On-policy distilled student{f' of `{teacher}`' if teacher else ''}, published "
            f"{str(manifest.get('created_at', ''))[:19]} UTC by the opd-pipeline.", ""]

    lineage = [("run key", manifest.get("run_key")), ("flow run", manifest.get("flow_run_id")),
               ("teacher", teacher), ("teacher parameters", manifest.get("teacher_params")),
               ("student parameters", manifest.get("student_params")),
               ("dataset fingerprint", manifest.get("dataset_fingerprint"))]
    lineage = [[k, v] for k, v in lineage if v is not None]
    if lineage:
        out += ["## Lineage", ""] + _table(["", ""], lineage)

    metrics = manifest.get("metrics")
    if isinstance(metrics, dict) and metrics:
        rows = []
        for key, label in _METRIC_ROWS + tuple((k, k) for k in metrics if k not in dict(_METRIC_ROWS)):
            m = metrics.get(key)
            if isinstance(m, dict):
                rows.append([label, m.get("accuracy"), m.get("reverse_kl"), m.get("n")])
        if rows:
            out += ["## Held-out evaluation", ""] + _table(["model", "accuracy", "mean reverse KL / token", "n"], rows)

    gates = manifest.get("gates")
    if isinstance(gates, dict):
        out += ["## Gates", "", f"Overall: **{'passed' if gates.get('passed') else 'failed'}**", ""]
        checks = [c for c in gates.get("checks") or [] if isinstance(c, dict)]
        if checks:
            out += _table(["check", "passed", "detail"], [[c.get("name"), c.get("passed"), c.get("detail")]
                                                         for c in checks])

    rounds = manifest.get("rounds")
    if isinstance(rounds, list) and rounds and all(isinstance(r, dict) for r in rounds):
        cols = list(dict.fromkeys(k for r in rounds for k in r))[:8]
        out += [f"## OPD rounds ({len(rounds)})", ""] + _table(cols, [[r.get(c) for c in cols] for r in rounds])

    cost = manifest.get("cost")
    if isinstance(cost, list) and cost and all(isinstance(c, dict) for c in cost):
        rows = [[c.get("phase", "?")] + [c.get(k) for k in _COST_KEYS] for c in cost]
        totals = ["**total**"] + [sum(float(c.get(k) or 0) for c in cost) for k in _COST_KEYS]
        out += ["## Cost", ""] + _table(["phase", *_COST_KEYS], rows + [totals])

    cfg = manifest.get("config")
    if isinstance(cfg, dict) and cfg:
        rows = _config_summary(cfg)
        if rows:
            out += ["## Configuration (summary)", ""] + _table(["", ""], rows)
        out += ["The full configuration is in `manifest.json` (key `config`).", ""]

    files = [f for f in manifest.get("files") or [] if isinstance(f, dict)]
    if files:
        out += ["## Files", ""] + _table(["path", "size", "sha256"], [[f"`{f.get('path')}`", f.get("size"),
                                                                      f"`{f.get('sha256')}`"] for f in files])
        out += ["Verify with `opd registry verify " + f"{model}:{version}`; download with "
                f"`opd registry pull {model}:{version} DIR` (checks every sha256).", ""]
    return "\n".join(out)
