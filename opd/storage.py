"""S3 for the core: one client factory, and model directories that live on S3 (fetched once into the
run's cache, every file checked against its manifest, then loaded like local ones).

Credentials come only from the environment / AWS config chain; they are never logged.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from opd.errors import PermanentError
from opd.paths import safe_rel, within

LOCAL_ENDPOINT_ENV = "OPD_S3_ENDPOINT"


def make_client(endpoint_url: str | None = None, region: str = "us-east-1", *, max_attempts: int = 8,
                connect_timeout: float = 5, read_timeout: float = 60):
    """An S3 client: adaptive retries, path-style addressing; ``max_attempts`` and the timeouts are
    lowered by fault tests. No endpoint: ``$OPD_S3_ENDPOINT`` (the local stack), else AWS."""
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get(LOCAL_ENDPOINT_ENV)
    session = boto3.session.Session()
    if session.get_credentials() is None and endpoint_url and "127.0.0.1" in endpoint_url:
        # The local SeaweedFS runs open; boto3 still signs, so give it throwaway local keys.
        session = boto3.session.Session(aws_access_key_id="opd-local", aws_secret_access_key="opd-local")
    cfg = Config(retries={"max_attempts": max_attempts, "mode": "adaptive"}, s3={"addressing_style": "path"},
                 connect_timeout=connect_timeout, read_timeout=read_timeout)
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_model_dir(cfg, path: str) -> str:
    """A local directory for a model given as a path or s3:// URI (fetched once into ``<home>/cache``)."""
    if not path.startswith("s3://"):
        return path
    s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
    return str(fetch_dir(path, Path(cfg.home) / "cache" / "models", s3))


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[5:].partition("/")
    return bucket, key.rstrip("/")


def s3_keys(s3, uri: str) -> list[str]:
    bucket, prefix = split_s3(uri)
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


def fetch_dir(uri: str, cache_root: Path, s3) -> Path:
    """Download every object under an s3:// prefix (once; a completed fetch is reused).

    The part of each key below the prefix comes from an S3 listing, i.e. it is input: every one
    passes ``safe_rel`` (the guard `opd registry pull` uses) before anything is created, and each
    file lands through ``within``; a failed fetch leaves nothing behind."""
    import shutil

    dest = Path(cache_root) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dest / ".fetched").is_file():
        return dest
    bucket, prefix = split_s3(uri)
    # a key ending in "/" is a "folder" marker some S3 consoles create: nothing to fetch
    rels = {k: safe_rel(k[len(prefix) + 1:], f"s3://{bucket}/{k}") for k in s3_keys(s3, uri) if not k.endswith("/")}
    if not rels:
        raise PermanentError(f"{uri}: no objects under this prefix; check the model path")
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        for k, rel in rels.items():
            target = within(tmp, rel, field=f"s3://{bucket}/{k}")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, k, str(target))
        _verify_manifest(tmp, uri)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / ".fetched").write_text(uri)
    tmp.rename(dest)
    return dest


def _verify_manifest(local: Path, uri: str) -> None:
    """A registry version carries manifest.json: refuse to load a file whose sha256 differs."""
    import json

    man = local / "manifest.json"
    if not man.is_file():
        return
    for f in json.loads(man.read_text()).get("files", []):
        p = within(local, safe_rel(f["path"], f"{uri} manifest path"), field=f"{uri} manifest path")
        if not p.is_file() or sha256_file(p) != f["sha256"] or p.stat().st_size != f["size"]:
            raise PermanentError(f"{uri}: {f['path']} does not match the manifest's sha256/size; refusing to load it")
