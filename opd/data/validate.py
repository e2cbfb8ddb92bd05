"""Dataset validation with Great Expectations (GX Core 1.x, ephemeral context).

Each failed expectation is reported with up to 3 offending rows (ids and trimmed prompts:
prompts may be private, so at most 40 characters of each reach logs and artifacts).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pandas as pd

from opd.data.task import answer_parses

MAX_SHOWN = 3


@dataclass
class Failure:
    expectation: str
    column: str
    detail: str
    rows: list[dict] = field(default_factory=list)

    def line(self) -> str:
        shown = "; ".join(f"row {r['row']} (id={r['id']!r}, prompt={r['prompt']!r})" for r in self.rows)
        return f"- {self.expectation} on '{self.column}': {self.detail}" + (f" — e.g. {shown}" if shown else "")


@dataclass
class ValidationReport:
    success: bool
    failures: list[Failure]
    checked: int
    raw: dict  # GX result summary (trimmed), saved as an artifact

    def message(self) -> str:
        if self.success:
            return f"dataset valid: {self.checked} expectations passed"
        return "dataset validation failed:\n" + "\n".join(f.line() for f in self.failures)


def _trim(s, n=40):
    s = "" if s is None else str(s)
    return s if len(s) <= n else s[:n] + "…"


def build_frame(train: pd.DataFrame, ev: pd.DataFrame, tokenizer) -> pd.DataFrame:
    """One frame with derived columns so every rule is a stock GX expectation."""
    frames = []
    for split, df in (("train", train), ("eval", ev)):
        df = df.copy()
        df["split"] = split
        df["row"] = range(1, len(df) + 1)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    for col in ("id", "prompt"):
        if col not in df.columns:
            df[col] = None
    df["prompt_tokens"] = [len(tokenizer(p).input_ids) if isinstance(p, str) else 0 for p in df["prompt"]]
    eval_prompts = set(ev["prompt"].dropna()) if "prompt" in ev else set()
    train_prompts = set(train["prompt"].dropna()) if "prompt" in train else set()
    shared = eval_prompts & train_prompts
    df["in_both_splits"] = [p in shared for p in df["prompt"]]
    if "answer" in df.columns:
        df["answer_parses"] = [a is None or (isinstance(a, str) and answer_parses(a)) or pd.isna(a) for a in df["answer"]]
    df["split_id"] = df["split"] + "/" + df["id"].astype(str)
    return df


def validate(train: pd.DataFrame, ev: pd.DataFrame, tokenizer, min_tokens: int, max_tokens: int,
             check_answers: bool = True) -> ValidationReport:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe

    df = build_frame(train, ev, tokenizer)
    ctx = gx.get_context(mode="ephemeral")
    batch_def = (ctx.data_sources.add_pandas("opd").add_dataframe_asset("rows")
                 .add_batch_definition_whole_dataframe("all"))
    suite = gx.ExpectationSuite(name="opd_dataset")
    exps = [
        gxe.ExpectColumnValuesToNotBeNull(column="id"),
        gxe.ExpectColumnValuesToNotBeNull(column="prompt"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToBeBetween(column="prompt_tokens", min_value=min_tokens, max_value=max_tokens),
        gxe.ExpectColumnValuesToBeInSet(column="in_both_splits", value_set=[False]),
    ]
    if check_answers and "answer_parses" in df.columns:
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="answer_parses", value_set=[True]))
    for e in exps:
        suite.add_expectation(e)
    suite = ctx.suites.add(suite)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="opd_validation", data=batch_def, suite=suite))
    result = vd.run(batch_parameters={"dataframe": df},
                    result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["split", "row", "id"]})
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        col = cfg.kwargs.get("column")
        res = r.result or {}
        idx = res.get("unexpected_index_list") or []
        rows = []
        for item in idx[:MAX_SHOWN]:
            if isinstance(item, dict):
                hit = df[(df["split"] == item.get("split")) & (df["row"] == item.get("row"))]
            else:
                hit = df.iloc[[item]]
            if len(hit):
                h = hit.iloc[0]
                rows.append({"row": f"{h['split']}:{h['row']}", "id": _trim(h["id"]), "prompt": _trim(h["prompt"])})
        n_bad = res.get("unexpected_count", len(idx))
        detail = {
            "in_both_splits": "prompt appears in both train and eval (leakage); drop it from one split",
            "prompt_tokens": f"prompt token length outside [{min_tokens}, {max_tokens}]; shorten or raise data.max_prompt_tokens",
            "answer_parses": "answer does not parse as an integer",
            "id": "ids must be present and unique",
            "prompt": "prompt must be a non-empty string",
        }.get(col, "")
        failures.append(Failure(cfg.type, col, f"{n_bad} row(s): {detail}", rows))
    raw = {"success": bool(result.success), "statistics": dict(result.statistics),
           "results": [{"expectation": r.expectation_config.type, "column": r.expectation_config.kwargs.get("column"),
                        "success": bool(r.success), "unexpected_count": (r.result or {}).get("unexpected_count")}
                       for r in result.results]}
    return ValidationReport(bool(result.success), failures, len(exps), raw)
