"""The data stages: build the run's train/eval splits, then validate them with Great Expectations.

Splits are built into ``<out>.unvalidated``; only validation moves them to ``out``, and a refused data set
is deleted, so a refused run leaves nothing behind.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from opd.config import RunConfig
from opd.data import dataset as ds
from opd.data.validate import ValidationReport, validate
from opd.data.verifiers import verifier
from opd.models import tokenizer_for
from opd.prompting import prompt_format

# how the GX answer check names what a task.verifier accepts as a ground-truth answer
ANSWER_RULES = {"integer": "an integer", "exact": "a non-empty string", "math": "a number or a math expression "
                "(task.verifier=math)", "regex": "a non-empty string", "none": "anything"}


UNVALIDATED = ".unvalidated"


def prepare_data(cfg: RunConfig, out: Path, s3=None) -> ds.DataRef:
    """Build the splits into `<out>.unvalidated`; only `validate_data` promotes them to `out`."""
    if cfg.data.source == "synthetic":
        d = ds.synthetic(cfg.data, cfg.seed)
    else:
        d = ds.from_jsonl(cfg.data, cfg.seed, s3)
    ds.require_answers(cfg.eval.gates, "answer" in d["eval"].column_names,  # before anything is written
                       cfg.data.eval_source or cfg.data.source)
    if cfg.opd.reward is not None and "answer" not in d["train"].column_names:
        raise ds.DataError(f"opd.reward checks completions against answers, but {cfg.data.source} has no 'answer' "
                           "values: add them, or remove opd.reward")
    return ds.save(d, out.with_name(out.name + UNVALIDATED))


def validate_data(cfg: RunConfig, data: ds.DataRef) -> tuple[ValidationReport, ds.DataRef | None]:
    """GX checks; valid data moves into place, invalid data is deleted (a refused run leaves nothing)."""
    d = data.load()
    tok, fmt, spec = tokenizer_for(cfg), prompt_format(cfg), cfg.task.verifier
    report = validate(d["train"].to_pandas(), d["eval"].to_pandas(), tok,
                      cfg.data.min_prompt_tokens, cfg.data.max_prompt_tokens, sources=ds.source_names(cfg.data),
                      encode=lambda p: fmt.encode(tok, p), check_answers=spec.kind != "none",
                      answer_ok=verifier(spec).answer_ok, answer_rule=ANSWER_RULES[spec.kind])
    src = Path(data.dir)
    if not report.success:
        shutil.rmtree(src, ignore_errors=True)
        return report, None
    final = src.with_name(src.name.removesuffix(UNVALIDATED)) if src.name.endswith(UNVALIDATED) else src
    if final != src:
        if final.exists():
            shutil.rmtree(final)
        src.rename(final)
    return report, ds.DataRef(str(final), data.fingerprint, data.n_train, data.n_eval)
