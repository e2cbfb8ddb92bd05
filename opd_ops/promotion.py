"""Promotion: evaluate a registered version against the model at the target alias, then move it.

Models are pulled from the registry (every sha256 verified) before they are loaded.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from opd.config import RunConfig
from opd.storage import make_client


@dataclass(frozen=True)
class PulledModel:
    model: str
    version: int
    path: str


def _s3(cfg: RunConfig):
    return make_client(cfg.registry.endpoint_url, cfg.registry.region)


def pull_version(cfg: RunConfig, ref: str, dest: Path) -> PulledModel:
    from opd_ops.registry.refs import pull

    dest = Path(dest)
    if dest.exists():  # a verified pull from an earlier attempt of this run
        shutil.rmtree(dest)
    model, version, path = pull(_s3(cfg), cfg.registry.bucket, cfg.registry.prefix, ref, dest)
    return PulledModel(model, version, str(path))


def pull_alias(cfg: RunConfig, alias: str | None, dest: Path) -> PulledModel | None:
    """The model currently at `alias`, or None when the alias (or the model) does not exist yet."""
    from opd_ops.registry.aliases import read_alias

    if not alias:
        return None
    st = read_alias(_s3(cfg), cfg.registry.bucket, cfg.registry.prefix, cfg.registry.model_name, alias)
    if st is None:
        return None
    return pull_version(cfg, f"{cfg.registry.model_name}:{st.version}", dest)


def move_alias(cfg: RunConfig, version: int, alias: str, reason: str, by: str | None = None) -> dict:
    from opd_ops.registry.aliases import promote

    st = promote(_s3(cfg), cfg.registry.bucket, cfg.registry.prefix, cfg.registry.model_name, version, alias,
                 reason=reason, by=by)
    return {"alias": alias, "version": st.version, "seq": st.seq, "by": st.by, "reason": st.reason}


def current_alias_version(cfg: RunConfig, alias: str) -> int | None:
    from opd_ops.registry.aliases import read_alias

    st = read_alias(_s3(cfg), cfg.registry.bucket, cfg.registry.prefix, cfg.registry.model_name, alias)
    return st.version if st else None
