"""Datasets as `datasets.DatasetDict` with `train`/`eval` splits, from the synthetic task or a user JSONL.

A user JSONL has one object per line with `id`, `prompt` and optional `answer`; it may sit on
local disk or at an ``s3://bucket/key`` URI. Each row keeps its file line (column ``line``) so every
later refusal names the line a person can open, not a position after the train/eval shuffle.
Without answers in a file, its split has no ``answer`` column.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict

from opd.config import DataConfig, GateConfig
from opd.errors import PermanentError
from opd.data import task, word_problems


class DataError(PermanentError, ValueError):
    """Bad input data; the message names the row/field and the fix."""


MISSING = "<missing>"
MAX_SHOWN_ROWS = 5  # rows named in one refusal; the count says how many more


class AnswersRequired(PermanentError):
    """A gate that needs accuracy on an eval split without answers."""


def require_answers(g: GateConfig, has_answers: bool, source: str = "the eval split") -> None:
    """Before any work: ``eval.gates.min_accuracy > 0`` cannot be checked without answers."""
    if g.min_accuracy > 0 and not has_answers:
        raise AnswersRequired(
            f"eval.gates.min_accuracy: {g.min_accuracy} needs answers, but {source} has no 'answer' values; "
            "add an 'answer' to the eval rows, or set eval.gates.min_accuracy: 0 (the reverse-KL gates still apply)")


def shown(value: object, n: int = 40) -> str:
    """A value from the data as it may appear in a message: trimmed (prompts may be private) and a
    missing one (None, or the NaN pandas turns it into) as ``<missing>``, never as 'nan'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    r = repr(value)
    return r if len(r) <= n else r[:n] + "…"


def source_names(cfg: DataConfig) -> dict[str, str]:
    """The file each split's ``line`` column refers to (nothing for the synthetic task)."""
    if cfg.source == "synthetic":
        return {}
    return {"train": cfg.source, "eval": cfg.eval_source or cfg.source}


@dataclass(frozen=True)
class DataRef:
    """What crosses task boundaries: where the splits are and a content fingerprint."""

    dir: str
    fingerprint: str
    n_train: int
    n_eval: int

    def load(self) -> DatasetDict:
        d = Path(self.dir)
        return DatasetDict({s: Dataset.from_parquet(str(d / f"{s}.parquet")) for s in ("train", "eval")})


def synthetic(cfg: DataConfig, seed: int) -> DatasetDict:
    """The synthetic task's splits (addition, or word problems): eval never shares a problem with train."""
    s = cfg.synthetic
    try:
        if s.kind == "word_problems":
            knobs = dict(min_steps=s.min_steps, max_steps=s.max_steps, max_operand=s.max_operand,
                         max_value=s.max_value, context_sentences=s.context_sentences)
            train = word_problems.generate(s.n_train, seed, prefix="train", **knobs)
            ev = word_problems.generate(s.n_eval, seed + 1, exclude={e.prompt for e in train}, prefix="eval", **knobs)
        else:
            any_order = s.term_order == "any"
            train = task.generate(s.n_train, s.num_terms, s.max_digits, seed=seed, prefix="train", any_order=any_order)
            ev = task.generate(s.n_eval, s.num_terms, s.max_digits, seed=seed + 1,
                               exclude={e.prompt for e in train}, prefix="eval", any_order=any_order)
    except ValueError as e:
        fix = "raise max_operand/max_value" if s.kind == "word_problems" else "raise max_digits"
        raise DataError(f"data.synthetic: {e}: lower data.synthetic.n_train/n_eval or {fix}") from None
    as_rows = lambda xs: {k: [getattr(e, k) for e in xs] for k in ("id", "prompt", "answer", "completion")}  # noqa: E731
    return DatasetDict({"train": Dataset.from_dict(as_rows(train)), "eval": Dataset.from_dict(as_rows(ev))})


# S3 answers that no retry changes: the object or bucket is not there, or we may not read it
_S3_PERMANENT = {"NoSuchKey", "NoSuchBucket", "AccessDenied", "404", "403", "InvalidBucketName", "InvalidObjectState"}


def _read_bytes(uri: str, s3_client=None) -> bytes:
    if uri.startswith("s3://"):
        from botocore.exceptions import ClientError

        from opd.storage import split_s3

        bucket, key = split_s3(uri)
        if s3_client is None:
            raise DataError(f"{uri}: an s3:// source needs an S3 client (registry endpoint)")
        try:
            return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in _S3_PERMANENT:
                raise DataError(f"cannot read {uri} ({code}): check data.source / data.eval_source, the bucket, "
                                "the key and the credentials") from None
            raise
    p = Path(uri)
    if not p.is_file():
        raise DataError(f"data file not found: {uri} (check data.source)")
    return p.read_bytes()


def _no_constant(c: str):
    raise ValueError(f"{c} is not JSON")


def parse_jsonl(raw: bytes, name: str) -> list[tuple[int, dict]]:
    """Strict JSONL: every line a JSON object; returns (file line, object) pairs, errors give the line."""
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is not part of the first row
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not valid UTF-8 (byte offset {e.start}); re-encode the file as UTF-8") from None
    rows = []
    # split on "\n" only: str.splitlines() would also break at U+2028 and friends inside JSON strings
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=_no_constant)
        except ValueError as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise DataError(f"{name}:{i}: malformed JSON ({msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}:{i}: expected a JSON object with 'id' and 'prompt', got {shown(obj)}")
        rows.append((i, obj))
    if not rows:
        raise DataError(f"{name}: no rows; each line must be a JSON object with 'id' and 'prompt'")
    return rows


def _string_problem(obj: dict, key: str) -> str | None:
    """Why ``obj[key]`` is not a usable non-null string, or None."""
    v = obj.get(key)
    if v is None:
        return f"'{key}' is {MISSING}"
    if not isinstance(v, str):
        return f"'{key}' must be a string, got {type(v).__name__} {shown(v)}"
    return None


def _id_problem(obj: dict) -> str | None:
    """Ids may be integers (many public datasets number their rows); they are kept as strings."""
    v = obj.get("id")
    if isinstance(v, int) and not isinstance(v, bool):
        return None
    why = _string_problem(obj, "id")
    return why and why.replace("must be a string,", "must be a string or an integer,")


def _answer_problem(obj: dict) -> str | None:
    v = obj.get("answer")
    if v is None or isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)):
        return None
    return f"'answer' must be a string or an integer, got {type(v).__name__} {shown(v)}"


def _refuse(name: str, problems: list[tuple[int, str]], fix: str) -> None:
    if not problems:
        return
    lines = [f"  {name}:{line}: {why}" for line, why in problems[:MAX_SHOWN_ROWS]]
    more = f"\n  ... and {len(problems) - MAX_SHOWN_ROWS} more row(s)" if len(problems) > MAX_SHOWN_ROWS else ""
    raise DataError(f"{name}: {len(problems)} bad row(s): {fix}\n" + "\n".join(lines) + more)


def sft_pairs(uri: str, limit: int, s3_client=None) -> list[tuple[str, str]]:
    """(prompt, completion) rows of a precomputed SFT file (sft.completions), the first ``limit``; a bad
    row is refused by file line, like a data source's."""
    name = uri if uri.startswith("s3://") else str(uri)
    rows = parse_jsonl(_read_bytes(uri, s3_client), name)
    bad = [(i, why) for i, obj in rows for why in (_string_problem(obj, "prompt"), _string_problem(obj, "completion"))
           if why]
    _refuse(name, bad, "every row of sft.completions needs a string 'prompt' and a string 'completion'")
    if not rows:
        raise DataError(f"{name}: no rows; sft.completions needs (prompt, completion) rows")
    return [(obj["prompt"], obj["completion"]) for _, obj in rows[:limit]]


def rows_to_dataset(rows: list[tuple[int, dict]], name: str) -> Dataset:
    """Checked rows as a Dataset with columns id, prompt, line[, answer].

    Every row needs a string ``id`` and ``prompt``; ``answer`` (a string or an integer) is
    optional, but a file gives it on every row or on none."""
    bad = [(i, why) for i, obj in rows
           for why in (_id_problem(obj), _string_problem(obj, "prompt"), _answer_problem(obj)) if why]
    _refuse(name, bad, "every row needs an 'id' (a string or an integer) and a string 'prompt' (and 'answer', "
                       "if any, a string or an integer)")
    with_answer = [i for i, obj in rows if obj.get("answer") is not None]
    if with_answer and len(with_answer) < len(rows):
        lacking = [(i, f"'answer' is {MISSING}") for i, obj in rows if obj.get("answer") is None]
        _refuse(name, lacking, f"{len(with_answer)} row(s) have an 'answer' and these lack one: give every row "
                               "an answer, or none (then accuracy is not measured)")
    cols = {"id": [str(obj["id"]) for _, obj in rows], "prompt": [obj["prompt"] for _, obj in rows],
            "line": [i for i, _ in rows]}
    if with_answer:
        cols["answer"] = [str(obj["answer"]) for _, obj in rows]
    return Dataset.from_dict(cols)


def _load_jsonl(uri: str, s3_client) -> Dataset:
    return rows_to_dataset(parse_jsonl(_read_bytes(uri, s3_client), uri), uri)


def from_jsonl(cfg: DataConfig, seed: int, s3_client=None) -> DatasetDict:
    train = _load_jsonl(cfg.source, s3_client)
    if cfg.eval_source:
        return DatasetDict({"train": train, "eval": _load_jsonl(cfg.eval_source, s3_client)})
    n_eval = math.ceil(cfg.eval_fraction * len(train))
    if len(train) - n_eval < 1:
        raise DataError(f"{cfg.source}: {len(train)} row(s) cannot be split into train and eval with "
                        f"data.eval_fraction={cfg.eval_fraction}: add rows, lower data.eval_fraction or set "
                        "data.eval_source")
    split = train.train_test_split(test_size=n_eval, seed=seed)
    return DatasetDict({"train": split["train"], "eval": split["test"]})


def fingerprint(ds: DatasetDict) -> str:
    h = hashlib.sha256()
    for split in ("train", "eval"):
        for row in ds[split]:
            h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()[:16]


def save(ds: DatasetDict, out: Path) -> DataRef:
    """Parquet for the pipeline, JSONL for people; written to a temp dir then renamed (all or nothing)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        ds[split].to_parquet(str(tmp / f"{split}.parquet"))
        ds[split].to_json(str(tmp / f"{split}.jsonl"), lines=True)
    fp = fingerprint(ds)
    (tmp / "fingerprint").write_text(fp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return DataRef(str(out), fp, len(ds["train"]), len(ds["eval"]))
