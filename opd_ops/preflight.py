"""Checks that run before any work: every problem a run would hit later, named now.

Nothing here writes: model paths, data sources, the registry bucket and credentials are only
read, so a refused run leaves no trace. A model on ``s3://`` is checked from its listing and
small ranged reads (config.json, the safetensors headers), never downloaded.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from opd.config import VLLM_CPU_HEAD_DIMS, RunConfig
from opd.errors import PermanentError

# a safetensors header is JSON describing the tensors; real ones are KBs to a few MBs
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
CONFIG_MAX_BYTES = 10 * 1024 * 1024
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class PreflightFailed(PermanentError):
    pass


class _Unreadable(Exception):
    """A model file that could not be read; the message says why."""


def _code(e: Exception) -> str:
    if isinstance(e, ClientError):
        return e.response.get("Error", {}).get("Code", "error")
    return type(e).__name__


# ---------------------------------------------------------------- model files, local or on S3

class _LocalDir:
    def __init__(self, path: str):
        self.root = Path(path)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file()) if self.root.is_dir() else []

    def read(self, name: str, start: int, length: int) -> tuple[bytes, int]:
        """``length`` bytes from ``start`` of file ``name``, and the file's size."""
        f = self.root / name
        try:
            with f.open("rb") as fh:
                fh.seek(start)
                return fh.read(length), f.stat().st_size
        except OSError as e:
            raise _Unreadable(f"cannot read {name} ({e.strerror or type(e).__name__})") from None


class _S3Dir:
    def __init__(self, uri: str, s3):
        from opd.storage import split_s3

        self.bucket, self.prefix = split_s3(uri)
        self.s3 = s3

    def names(self) -> list[str]:
        """Top-level object names under the prefix (what fetch_dir would put in the model dir)."""
        from opd.storage import s3_keys

        keys = s3_keys(self.s3, f"s3://{self.bucket}/{self.prefix}")
        return sorted({k[len(self.prefix) + 1:] for k in keys} - {""})

    def read(self, name: str, start: int, length: int) -> tuple[bytes, int]:
        if length <= 0:
            return b"", 0
        try:
            r = self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}",
                                   Range=f"bytes={start}-{start + length - 1}")
        except ClientError as e:
            if _code(e) == "InvalidRange":  # past the end (an empty or too short object)
                return b"", 0
            raise _Unreadable(f"cannot read {name} ({_code(e)})") from None
        except BotoCoreError as e:
            raise _Unreadable(f"cannot read {name} ({_code(e)})") from None
        body = r["Body"].read()
        total = r.get("ContentRange", "").rpartition("/")[2]
        return body, int(total) if total.isdigit() else r.get("ContentLength", len(body))


def _model_dir(path: str, s3):
    return _S3Dir(path, s3) if path.startswith("s3://") else _LocalDir(path)


# ---------------------------------------------------------------- one model

@dataclass
class _Model:
    """What preflight learned about one model from its files."""

    field: str
    config: dict | None = None

    def int_field(self, *keys: str) -> int | None:
        """The first of ``keys`` in config.json (or its text_config, for multimodal wrappers)."""
        for src in (self.config or {}, (self.config or {}).get("text_config") or {}):
            for k in keys:
                v = src.get(k)
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
        return None

    def head_dim(self) -> int | None:
        if hd := self.int_field("head_dim"):
            return hd
        hidden, heads = self.int_field("hidden_size"), self.int_field("num_attention_heads")
        return hidden // heads if hidden and heads else None


def safetensors_problem(head: bytes, size: int, read_header) -> str | None:
    """Why a file is not safetensors, or None. ``head``: its first 8 bytes; ``read_header(n)``: the n
    bytes after them. Checks the header length, that the header is a JSON object of tensors, and that
    every tensor's data lies inside the file."""
    if len(head) < 8:
        return f"{size} bytes, shorter than a safetensors header"
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > SAFETENSORS_MAX_HEADER or 8 + n > size:
        return f"its first 8 bytes declare a {n}-byte header in a {size}-byte file"
    try:
        header = json.loads(read_header(n))
    except (UnicodeDecodeError, ValueError):
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data = size - 8 - n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offs = t.get("data_offsets") if isinstance(t, dict) else None
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data or not isinstance(t.get("dtype"), str)):
            return f"tensor {name[:60]!r} has no valid dtype/data_offsets inside the file"
    return None


def _check_weights(m: _Model, files, names: list[str], path: str) -> list[str]:
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights:
        return [f"{m.field}: {path} holds no .safetensors weights; only safetensors are loaded: re-save the "
                "model with save_pretrained(..., safe_serialization=True)"]
    problems = []
    for name in weights:
        try:
            head, size = files.read(name, 0, 8)
            why = safetensors_problem(head, size, lambda n, name=name: files.read(name, 8, n)[0])
        except _Unreadable as e:
            why = str(e)
        if why:
            problems.append(f"{m.field}: {name} is not a safetensors file ({why}): re-save the weights with "
                            "safetensors (save_pretrained(..., safe_serialization=True))")
    return problems


def _read_json(files, name: str) -> dict:
    body, size = files.read(name, 0, CONFIG_MAX_BYTES + 1)
    if size > CONFIG_MAX_BYTES:
        raise _Unreadable(f"{name} is {size} bytes, larger than any model config")
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise _Unreadable(f"{name} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _Unreadable(f"{name} is not a JSON object")
    return obj


def _remote_code_problems(m: _Model, files, names: list[str], trusted: bool) -> list[str]:
    """auto_map names Python files transformers would import and run: only with explicit trust."""
    if trusted:
        return []
    why, fix = (("teacher.trust_remote_code is false", "set teacher.trust_remote_code=true only if you trust "
                 "that code, or use a checkpoint of a built-in transformers architecture")
                if m.field == "teacher.path" else
                ("the student never runs remote code", "use a checkpoint of a built-in transformers architecture"))
    problems = []
    for name in ("config.json", "tokenizer_config.json"):
        if name not in names:
            continue
        try:
            obj = m.config if name == "config.json" else _read_json(files, name)
        except _Unreadable:
            continue  # a bad tokenizer_config.json is the tokenizer loader's to report
        if obj and obj.get("auto_map"):
            problems.append(f"{m.field}: {name} declares custom code (auto_map) but {why}: {fix}")
    return problems


def inspect_model(field: str, path: str, s3, trusted: bool) -> tuple[_Model, list[str]]:
    """Read what a model's files say (read-only) and every problem they show."""
    m = _Model(field)
    files = _model_dir(path, s3)
    try:
        names = files.names()
    except (ClientError, BotoCoreError) as e:
        return m, [f"{field}: cannot list {path} ({_code(e)}); check the bucket, the key and the credentials"]
    if "config.json" not in names:
        return m, [f"{field}: no model at {path} (config.json missing); check the path"]
    try:
        m.config = _read_json(files, "config.json")
    except _Unreadable as e:
        return m, [f"{field}: {e}; check the model files"]
    return m, _check_weights(m, files, names, path) + _remote_code_problems(m, files, names, trusted)


# ---------------------------------------------------------------- teacher and student together

def _on_cpu(cfg: RunConfig) -> bool:
    if cfg.device == "auto":
        import torch

        return not torch.cuda.is_available()
    return cfg.device == "cpu"


def _head_dim_problems(cfg: RunConfig, teacher: _Model | None, student: _Model | None) -> list[str]:
    """vLLM's CPU attention runs only some head sizes: the student sampler and a vllm teacher use it."""
    if not _on_cpu(cfg):
        return []
    out = []
    for m, uses, fix in ((student, cfg.opd.sampler == "vllm", "use opd.sampler=hf or a GPU"),
                         (teacher, cfg.teacher.scorer == "vllm", "use teacher.scorer=hf or a GPU")):
        hd = m.head_dim() if m else None
        if uses and hd is not None and hd not in VLLM_CPU_HEAD_DIMS:
            out.append(f"{m.field}: head_dim {hd}; vLLM's CPU attention accepts only {VLLM_CPU_HEAD_DIMS}: {fix}")
    return out


def _context_problems(cfg: RunConfig, teacher: _Model | None, student: _Model | None) -> list[str]:
    """Prompt + completion must fit each model's positions. A remote (vLLM server) teacher scores
    with one generated token after the sequence, so it needs one position more; the in-process vLLM
    teacher is given that position (opd.teachers.VLLMTeacher)."""
    out = []
    need = cfg.data.max_prompt_tokens + cfg.opd.max_tokens
    for m, extra in ((student, 0), (teacher, 1 if cfg.teacher.scorer == "remote" else 0)):
        ctx = m.int_field(*CONTEXT_KEYS) if m else None
        if ctx is not None and need + extra > ctx:
            plus = " + 1 (the remote teacher generates one token after the sequence)" if extra else ""
            out.append(f"{m.field}: data.max_prompt_tokens + opd.max_tokens = {need}{plus} tokens do not fit the "
                       f"model's context (max_position_embeddings={ctx}): lower opd.max_tokens or "
                       "data.max_prompt_tokens")
    return out


def _teacher_vocab(cfg: RunConfig, teacher: _Model | None) -> int | None:
    if teacher is not None:
        return teacher.int_field("vocab_size")
    from opd.models import tokenizer_for  # the bootstrapped teacher's tokenizer

    return len(tokenizer_for(cfg))


def _vocab_problems(cfg: RunConfig, teacher: _Model | None, student: _Model | None) -> list[str]:
    tv = _teacher_vocab(cfg, teacher)
    sv = student.int_field("vocab_size") if student else None
    out = []
    if tv is not None and sv is not None and tv != sv:
        who = "teacher.path" if teacher else "the bootstrapped teacher (teacher.bootstrap)"
        out.append(f"student.path: vocab_size {sv} but {who} has {tv}; OPD grades the student's tokens with the "
                   "teacher, so both need one vocabulary: pick a student from the teacher's family (same tokenizer)")
    vocab = min(v for v in (tv, sv, 1 << 62) if v is not None)
    if cfg.opd.loss.kind == "reverse_kl_topk" and cfg.opd.loss.topk > vocab:
        out.append(f"opd.loss.topk: {cfg.opd.loss.topk} is more than the vocabulary ({vocab} tokens): lower it")
    return out


def _tokenizer_problems(cfg: RunConfig) -> list[str]:
    """Local teacher and student: their tokenizers must map every token to the same id."""
    from opd.models import check_vocab, load_tokenizer

    try:
        check_vocab(load_tokenizer(cfg.teacher.path, cfg.teacher.trust_remote_code), load_tokenizer(cfg.student.path))
    except ValueError as e:
        return [f"student.path: {e}"]
    except (OSError, KeyError) as e:
        return [f"teacher.path/student.path: cannot load a tokenizer ({type(e).__name__}: {str(e)[:200]}); "
                "save the tokenizer beside the weights"]
    return []


def model_problems(cfg: RunConfig, s3) -> list[str]:
    problems: list[str] = []
    teacher = student = None
    if cfg.teacher.path:
        teacher, p = inspect_model("teacher.path", cfg.teacher.path, s3, cfg.teacher.trust_remote_code)
        problems += p
    if cfg.student.path:
        student, p = inspect_model("student.path", cfg.student.path, s3, False)
        problems += p
    if problems:
        return problems
    problems += _head_dim_problems(cfg, teacher, student)
    problems += _context_problems(cfg, teacher, student)
    problems += _vocab_problems(cfg, teacher, student)
    local = [p for p in (cfg.teacher.path, cfg.student.path) if p and not p.startswith("s3://")]
    if not problems and len(local) == 2:
        problems += _tokenizer_problems(cfg)
    return problems


# ---------------------------------------------------------------- data and registry

def _data_problems(cfg: RunConfig, s3) -> list[str]:
    problems = []
    for field, src in (("data.source", cfg.data.source), ("data.eval_source", cfg.data.eval_source)):
        if not src or src == "synthetic":
            continue
        if src.startswith("s3://"):
            from opd.storage import split_s3

            bucket, key = split_s3(src)
            try:
                s3.head_object(Bucket=bucket, Key=key)
            except (ClientError, BotoCoreError) as e:
                problems.append(f"{field}: cannot read {src} ({_code(e)}); check the bucket, key and credentials")
        elif not Path(src).is_file():
            problems.append(f"{field}: file not found: {src}")
    return problems


def _registry_problems(cfg: RunConfig, s3) -> list[str]:
    from botocore.exceptions import NoCredentialsError

    try:
        s3.head_bucket(Bucket=cfg.registry.bucket)
    except ClientError as e:
        code = _code(e)
        if code not in ("404", "NoSuchBucket", "NotFound"):  # a missing bucket is created at publish time
            return [f"registry.bucket: S3 refused {cfg.registry.bucket!r} ({code}); check AWS credentials"]
    except NoCredentialsError:
        return ["registry: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS "
                "profile) where the flow runs"]
    except BotoCoreError as e:
        where = (f"registry.endpoint_url={cfg.registry.endpoint_url}: check the URL and that the server is up"
                 if cfg.registry.endpoint_url else
                 "OPD_S3_ENDPOINT, else the local stack: check it is up (`opd stack up`)")
        return [f"registry: cannot reach S3 ({type(e).__name__}); endpoint from {where}"]
    return []


def check(cfg: RunConfig, s3) -> list[str]:
    return model_problems(cfg, s3) + _data_problems(cfg, s3) + _registry_problems(cfg, s3)


def run(cfg: RunConfig, s3) -> None:
    problems = check(cfg, s3)
    if problems:
        raise PreflightFailed("refusing to start:\n" + "\n".join(f"- {p}" for p in problems))
