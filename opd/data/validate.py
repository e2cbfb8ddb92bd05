"""Dataset validation with Great Expectations (GX Core 1.x, ephemeral context).

Each failed expectation is reported with up to 3 offending rows (ids and trimmed prompts:
prompts may be private, so at most 40 characters of each reach logs and artifacts). A row is named
by its file line (``<file>:<line>``) when the data came from a JSONL, else by its split position.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pandas as pd

from opd.data.dataset import shown
from opd.data.task import answer_parses

MAX_SHOWN = 3


@dataclass
class Failure:
    expectation: str
    column: str
    detail: str
    rows: list[dict] = field(default_factory=list)

    def line(self) -> str:
        eg = "; ".join(f"{r['row']} (id={r['id']}, prompt={r['prompt']})" for r in self.rows)
        return f"- {self.expectation} on '{self.column}': {self.detail}" + (f" — e.g. {eg}" if eg else "")


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


def _prompts(df: pd.DataFrame) -> set[str]:
    return {p for p in df["prompt"] if isinstance(p, str)} if "prompt" in df else set()


def _answer_ok(a, parses=answer_parses) -> bool:
    """A missing answer passes (answers are optional); a given one must parse (the task verifier's
    ``answer_ok``; the addition task's integer rule by default)."""
    if a is None or (isinstance(a, float) and pd.isna(a)):
        return True
    return isinstance(a, str) and parses(a)


def build_frame(train: pd.DataFrame, ev: pd.DataFrame, tokenizer, encode=None, answer_ok=answer_parses
                ) -> pd.DataFrame:
    """One frame with derived columns so every rule is a stock GX expectation.

    ``row`` is the file line when the data carries one (column ``line``), else the 1-based position."""
    frames = []
    for split, df in (("train", train), ("eval", ev)):
        df = df.copy()
        df["split"] = split
        df["row"] = df["line"].astype(int) if "line" in df else range(1, len(df) + 1)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    for col in ("id", "prompt"):
        if col not in df.columns:
            df[col] = None
    encode = encode or (lambda p: tokenizer(p).input_ids)  # the run's prompt format (opd.prompting)
    df["prompt_tokens"] = [len(encode(p)) if isinstance(p, str) else 0 for p in df["prompt"]]
    shared = _prompts(ev) & _prompts(train)
    df["in_both_splits"] = [isinstance(p, str) and p in shared for p in df["prompt"]]
    if "answer" in df.columns:
        df["answer_parses"] = [_answer_ok(a, answer_ok) for a in df["answer"]]
    return df


def _row_label(h, sources: dict[str, str]) -> str:
    src = sources.get(h["split"])
    return f"{src}:{h['row']}" if src else f"row {h['split']}:{h['row']}"


def validate(train: pd.DataFrame, ev: pd.DataFrame, tokenizer, min_tokens: int, max_tokens: int,
             check_answers: bool = True, sources: dict[str, str] | None = None, encode=None,
             answer_ok=answer_parses, answer_rule: str = "an integer") -> ValidationReport:
    """``sources``: the file each split's ``line`` column refers to (opd.data.dataset.source_names);
    ``encode``: prompt text -> the token ids the models will see; ``answer_ok``/``answer_rule``: the
    task verifier's answer check and how to name it."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe

    df = build_frame(train, ev, tokenizer, encode, answer_ok)
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
                rows.append({"row": _row_label(h, sources or {}), "id": shown(h["id"]), "prompt": shown(h["prompt"])})
        n_bad = res.get("unexpected_count", len(idx))
        detail = {
            "in_both_splits": "prompt appears in both train and eval (leakage); drop it from one split",
            "prompt_tokens": f"prompt token length outside [{min_tokens}, {max_tokens}]; shorten or raise data.max_prompt_tokens",
            "answer_parses": f"answer does not parse as {answer_rule}",
            "id": "ids must be present and unique",
            "prompt": "prompt must be a non-empty string",
        }.get(col, "")
        failures.append(Failure(cfg.type, col, f"{n_bad} row(s): {detail}", rows))
    raw = {"success": bool(result.success), "statistics": dict(result.statistics),
           "results": [{"expectation": r.expectation_config.type, "column": r.expectation_config.kwargs.get("column"),
                        "success": bool(r.success), "unexpected_count": (r.result or {}).get("unexpected_count")}
                       for r in result.results]}
    return ValidationReport(bool(result.success), failures, len(exps), raw)
