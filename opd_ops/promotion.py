"""Promotion: evaluate a registered version against the model at the target alias, then move it.

Models are pulled from the registry (every sha256 verified) before they are loaded.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from opd.config import RunConfig
from opd.storage import make_client
from opd_ops.registry.client import named_s3_errors, user_endpoint_advice


@dataclass(frozen=True)
class PulledModel:
    model: str
    version: int
    path: str


def _s3(cfg: RunConfig):
    return make_client(cfg.registry.endpoint_url, cfg.registry.region)


@contextlib.contextmanager
def _registry(cfg: RunConfig, what: str):
    """A client whose connection failures name the endpoint and the fix (retryable RegistryUnavailable)."""
    s3 = _s3(cfg)
    with user_endpoint_advice(cfg.registry.endpoint_url, what), named_s3_errors(s3, what):
        yield s3


def require_published(cfg: RunConfig, version: int) -> None:
    """Before any data or evaluation work: the candidate must be a published version (a permanent
    RegistryRefusal naming it otherwise)."""
    from opd_ops.registry.refs import resolve

    with _registry(cfg, "promote") as s3:
        resolve(s3, cfg.registry.bucket, cfg.registry.prefix, f"{cfg.registry.model_name}:{int(version)}")


def resolve_teacher(cfg: RunConfig, log=print) -> RunConfig:
    """``teacher.ref`` (a registry version, e.g. an earlier student) as a local ``teacher.path``: pulled once
    per version into ``<home>/cache/registry/<model>/<version>`` (versions never change; every file's
    sha256 checked on the pull), then the run proceeds as with any local teacher."""
    if cfg.teacher.ref is None:
        return cfg
    from opd.records import DONE, read_done
    from opd_ops.registry.refs import pull, resolve

    with _registry(cfg, f"teacher.ref {cfg.teacher.ref}") as s3:
        model, version = resolve(s3, cfg.registry.bucket, cfg.registry.prefix, cfg.teacher.ref)
        dest = Path(cfg.home) / "cache" / "registry" / model / str(version)
        if read_done(dest) is None:
            if dest.exists():
                shutil.rmtree(dest)  # an interrupted pull
            pull(s3, cfg.registry.bucket, cfg.registry.prefix, f"{model}:{version}", dest)
            (dest / DONE).write_text(json.dumps({"ref": cfg.teacher.ref, "model": model, "version": version}))
    log(f"teacher: {cfg.teacher.ref} is {model}:{version} (sha256 verified), at {dest}")
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"path": str(dest), "ref": None})})


def version_uri(cfg: RunConfig, ref: str) -> str:
    """The s3:// prefix of a registry version (an alias or ``MODEL`` resolved to its number), for reading
    one of its files (e.g. ``opd plan`` reading config.json) without pulling the weights."""
    from opd_ops.registry.refs import resolve
    from opd_ops.registry.s3io import versions_prefix

    with _registry(cfg, f"teacher.ref {ref}") as s3:
        model, version = resolve(s3, cfg.registry.bucket, cfg.registry.prefix, ref)
    return f"s3://{cfg.registry.bucket}/{versions_prefix(cfg.registry.prefix, model)}{version}"


def pull_version(cfg: RunConfig, ref: str, dest: Path) -> PulledModel:
    from opd_ops.registry.refs import pull

    dest = Path(dest)
    if dest.exists():  # a verified pull from an earlier attempt of this run
        shutil.rmtree(dest)
    with _registry(cfg, f"pull {ref}") as s3:
        model, version, path = pull(s3, cfg.registry.bucket, cfg.registry.prefix, ref, dest)
    return PulledModel(model, version, str(path))


def pull_alias(cfg: RunConfig, alias: str | None, dest: Path) -> PulledModel | None:
    """The model currently at `alias`, or None when the alias (or the model) does not exist yet."""
    from opd_ops.registry.aliases import read_alias

    if not alias:
        return None
    with _registry(cfg, f"read alias {alias!r}") as s3:
        st = read_alias(s3, cfg.registry.bucket, cfg.registry.prefix, cfg.registry.model_name, alias)
    if st is None:
        return None
    return pull_version(cfg, f"{cfg.registry.model_name}:{st.version}", dest)


def move_alias(cfg: RunConfig, version: int, alias: str, reason: str, by: str | None = None) -> dict:
    from opd_ops.registry.aliases import promote

    with _registry(cfg, f"set alias {alias!r}") as s3:
        st = promote(s3, cfg.registry.bucket, cfg.registry.prefix, cfg.registry.model_name, version, alias,
                     reason=reason, by=by)
    return {"alias": alias, "version": st.version, "seq": st.seq, "by": st.by, "reason": st.reason}


def current_alias_version(cfg: RunConfig, alias: str) -> int | None:
    from opd_ops.registry.aliases import read_alias

    with _registry(cfg, f"read alias {alias!r}") as s3:
        st = read_alias(s3, cfg.registry.bucket, cfg.registry.prefix, cfg.registry.model_name, alias)
    return st.version if st else None
