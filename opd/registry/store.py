"""Publish and read model versions.

Layout: ``<prefix>/<model>/versions/<n>/<files>`` plus ``manifest.json``. Protocol:
1. claim version n with a conditional put of ``versions/<n>/.claim`` (``If-None-Match: *``);
   a 412 means another publisher holds n: try n+1;
2. upload every file (multipart for large ones);
3. write ``manifest.json`` last, conditionally. Readers list only versions with a manifest,
   so a crash before step 3 leaves nothing half-published in view.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from opd.registry.client import RegistryError, ensure_bucket
from opd.registry.names import validate_model_name

MANIFEST = "manifest.json"
CLAIM = ".claim"
TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024)


@dataclass(frozen=True)
class Published:
    model: str
    version: int
    uri: str
    manifest: dict


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions_prefix(prefix: str, model: str) -> str:
    return f"{prefix.strip('/')}/{model}/versions/"


def _list_keys(s3, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


def _is_precondition_failed(e: ClientError) -> bool:
    return e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412") or \
        e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412


def list_versions(s3, bucket: str, prefix: str, model: str) -> list[int]:
    """Published versions only (those with a manifest)."""
    vp = _versions_prefix(prefix, model)
    out = set()
    for k in _list_keys(s3, bucket, vp):
        rest = k[len(vp):].split("/")
        if len(rest) == 2 and rest[1] == MANIFEST and rest[0].isdigit():
            out.add(int(rest[0]))
    return sorted(out)


def list_models(s3, bucket: str, prefix: str) -> list[str]:
    res = s3.list_objects_v2(Bucket=bucket, Prefix=prefix.strip("/") + "/", Delimiter="/")
    return sorted(p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in res.get("CommonPrefixes", []))


def read_manifest(s3, bucket: str, prefix: str, model: str, version: int) -> dict:
    key = f"{_versions_prefix(prefix, model)}{version}/{MANIFEST}"
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as e:
        raise RegistryError(f"{model}:{version} has no manifest ({e.response['Error'].get('Code')})") from None


def _claim_version(s3, bucket: str, prefix: str, model: str, token: str) -> int:
    vp = _versions_prefix(prefix, model)
    taken = {int(k[len(vp):].split("/")[0]) for k in _list_keys(s3, bucket, vp) if k[len(vp):].split("/")[0].isdigit()}
    n = max(taken, default=0) + 1
    for _ in range(1000):
        try:
            s3.put_object(Bucket=bucket, Key=f"{vp}{n}/{CLAIM}", Body=token.encode(), IfNoneMatch="*")
            return n
        except ClientError as e:
            if not _is_precondition_failed(e):
                raise
            n += 1
    raise RegistryError(f"could not claim a version number for {model}")


def publish(s3, bucket: str, prefix: str, model: str, src_dir: str | Path, lineage: dict) -> Published:
    validate_model_name(model)
    src = Path(src_dir)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        raise RegistryError(f"nothing to publish in {src}")
    ensure_bucket(s3, bucket)
    token = f"{lineage.get('flow_run_id', 'local')}:{time.time_ns()}"
    n = _claim_version(s3, bucket, prefix, model, token)
    base = f"{_versions_prefix(prefix, model)}{n}/"
    entries = []
    for p in files:
        rel = p.relative_to(src).as_posix()
        s3.upload_file(str(p), bucket, base + rel, Config=TRANSFER)
        entries.append({"path": rel, "sha256": sha256_file(p), "size": p.stat().st_size})
    manifest = {
        "model": model, "version": n, "files": entries,
        "created_at": datetime.now(timezone.utc).isoformat(), "claim": token, **lineage,
    }
    try:
        s3.put_object(Bucket=bucket, Key=base + MANIFEST, Body=json.dumps(manifest, indent=2, default=str).encode(),
                      IfNoneMatch="*", ContentType="application/json")
    except ClientError as e:
        if _is_precondition_failed(e):
            raise RegistryError(f"{model}:{n} was published by someone else while we uploaded") from None
        raise
    return Published(model, n, f"s3://{bucket}/{base}", manifest)


def verify(s3, bucket: str, prefix: str, model: str, version: int) -> list[str]:
    """Problems found (empty = every file present with the manifest's sha256 and size)."""
    man = read_manifest(s3, bucket, prefix, model, version)
    base = f"{_versions_prefix(prefix, model)}{version}/"
    problems = []
    for f in man["files"]:
        try:
            body = s3.get_object(Bucket=bucket, Key=base + f["path"])["Body"].read()
        except ClientError:
            problems.append(f"{f['path']}: missing")
            continue
        if hashlib.sha256(body).hexdigest() != f["sha256"] or len(body) != f["size"]:
            problems.append(f"{f['path']}: sha256/size mismatch")
    return problems
