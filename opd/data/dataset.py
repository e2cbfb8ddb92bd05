"""Datasets as `datasets.DatasetDict` with `train`/`eval` splits, from the synthetic task or a user JSONL.

A user JSONL has one object per line with `id`, `prompt` and optional `answer`; it may sit on
local disk or at an ``s3://bucket/key`` URI.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict

from opd.config import DataConfig
from opd.errors import PermanentError
from opd.data import task


class DataError(PermanentError, ValueError):
    """Bad input data; the message names the row/field and the fix."""


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
    s = cfg.synthetic
    any_order = s.term_order == "any"
    train = task.generate(s.n_train, s.num_terms, s.max_digits, seed=seed, prefix="train", any_order=any_order)
    ev = task.generate(s.n_eval, s.num_terms, s.max_digits, seed=seed + 1,
                       exclude={e.prompt for e in train}, prefix="eval", any_order=any_order)
    as_rows = lambda xs: {k: [getattr(e, k) for e in xs] for k in ("id", "prompt", "answer", "completion")}  # noqa: E731
    return DatasetDict({"train": Dataset.from_dict(as_rows(train)), "eval": Dataset.from_dict(as_rows(ev))})


def _read_bytes(uri: str, s3_client=None) -> bytes:
    if uri.startswith("s3://"):
        from opd.storage import split_s3

        bucket, key = split_s3(uri)
        if s3_client is None:
            raise DataError(f"{uri}: an s3:// source needs an S3 client (registry endpoint)")
        return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    p = Path(uri)
    if not p.is_file():
        raise DataError(f"data file not found: {uri} (check data.source)")
    return p.read_bytes()


def parse_jsonl(raw: bytes, name: str) -> list[dict]:
    """Strict JSONL: every line a JSON object; errors give the line number."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not valid UTF-8 (byte offset {e.start}); re-encode the file as UTF-8") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{i}: malformed JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}:{i}: expected a JSON object with 'id' and 'prompt'")
        rows.append(obj)
    if not rows:
        raise DataError(f"{name}: no rows")
    return rows


def _rows_to_dataset(rows: list[dict]) -> Dataset:
    cols = {"id": [], "prompt": [], "answer": []}
    for r in rows:
        cols["id"].append(None if r.get("id") is None else str(r.get("id")))
        cols["prompt"].append(r.get("prompt"))
        cols["answer"].append(None if r.get("answer") is None else str(r.get("answer")))
    if not any("prompt" in r for r in rows):
        raise DataError("required column 'prompt' is missing: every row needs 'id' and 'prompt'")
    if not any("id" in r for r in rows):
        raise DataError("required column 'id' is missing: every row needs 'id' and 'prompt'")
    if all(a is None for a in cols["answer"]):
        del cols["answer"]
    return Dataset.from_dict(cols)


def from_jsonl(cfg: DataConfig, seed: int, s3_client=None) -> DatasetDict:
    train = _rows_to_dataset(parse_jsonl(_read_bytes(cfg.source, s3_client), cfg.source))
    if cfg.eval_source:
        ev = _rows_to_dataset(parse_jsonl(_read_bytes(cfg.eval_source, s3_client), cfg.eval_source))
        return DatasetDict({"train": train, "eval": ev})
    split = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
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
