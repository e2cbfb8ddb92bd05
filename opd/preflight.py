"""Checks that run before any work: every problem a run would hit later, named now.

Nothing here writes: model paths, data sources, the registry bucket and credentials are only
read, so a refused run leaves no trace.
"""
from __future__ import annotations

import json
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from opd.config import VLLM_CPU_HEAD_DIMS, RunConfig
from opd.errors import PermanentError


class PreflightFailed(PermanentError):
    pass


def _model_problems(field: str, path: str, s3) -> list[str]:
    if path.startswith("s3://"):
        from opd.storage import s3_keys

        try:
            keys = s3_keys(s3, path)
        except (ClientError, BotoCoreError) as e:
            return [f"{field}: cannot list {path} ({_code(e)}); check the bucket and credentials"]
        if not any(k.endswith("config.json") for k in keys):
            return [f"{field}: no model at {path} (config.json missing); check the path"]
        return []
    p = Path(path)
    if not (p / "config.json").is_file():
        return [f"{field}: no model at {path} (config.json missing); check the path"]
    if not list(p.glob("*.safetensors")):
        return [f"{field}: {path} holds no .safetensors weights; only safetensors are loaded"]
    return []


def _code(e: Exception) -> str:
    if isinstance(e, ClientError):
        return e.response.get("Error", {}).get("Code", "error")
    return type(e).__name__


def _head_dim(path: str) -> int | None:
    f = Path(path) / "config.json"
    if not f.is_file():
        return None
    c = json.loads(f.read_text())
    if c.get("head_dim"):
        return int(c["head_dim"])
    if c.get("hidden_size") and c.get("num_attention_heads"):
        return c["hidden_size"] // c["num_attention_heads"]
    return None


def check(cfg: RunConfig, s3) -> list[str]:
    problems: list[str] = []
    if cfg.teacher.path:
        problems += _model_problems("teacher.path", cfg.teacher.path, s3)
    if cfg.student.path:
        problems += _model_problems("student.path", cfg.student.path, s3)
        hd = _head_dim(cfg.student.path)
        if cfg.opd.sampler == "vllm" and cfg.device != "cuda" and hd is not None and hd not in VLLM_CPU_HEAD_DIMS:
            problems.append(f"student.path: head_dim {hd}; vLLM's CPU attention accepts only {VLLM_CPU_HEAD_DIMS}: "
                            "use opd.sampler=hf or a GPU")
    if cfg.teacher.path and cfg.student.path and not problems and not cfg.teacher.path.startswith("s3://") \
            and not cfg.student.path.startswith("s3://"):
        from opd.models import load_tokenizer
        from opd.pipeline import check_vocab

        try:
            check_vocab(load_tokenizer(cfg.teacher.path), load_tokenizer(cfg.student.path))
        except ValueError as e:
            problems.append(f"student.path: {e}")
    for field, src in (("data.source", cfg.data.source), ("data.eval_source", cfg.data.eval_source)):
        if not src or src == "synthetic":
            continue
        if src.startswith("s3://"):
            bucket, _, key = src[5:].partition("/")
            try:
                s3.head_object(Bucket=bucket, Key=key)
            except (ClientError, BotoCoreError) as e:
                problems.append(f"{field}: cannot read {src} ({_code(e)}); check the bucket, key and credentials")
        elif not Path(src).is_file():
            problems.append(f"{field}: file not found: {src}")
    try:
        s3.head_bucket(Bucket=cfg.registry.bucket)
    except ClientError as e:
        code = _code(e)
        if code not in ("404", "NoSuchBucket", "NotFound"):  # a missing bucket is created at publish time
            problems.append(f"registry.bucket: S3 refused {cfg.registry.bucket!r} ({code}); check AWS credentials")
    except BotoCoreError as e:
        problems.append(f"registry: cannot reach S3 ({type(e).__name__}); is the endpoint up? (`opd stack up`)")
    return problems


def run(cfg: RunConfig, s3) -> None:
    problems = check(cfg, s3)
    if problems:
        raise PreflightFailed("refusing to start:\n" + "\n".join(f"- {p}" for p in problems))
