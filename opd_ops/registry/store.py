"""Publish and read model versions.

Layout: ``<prefix>/<model>/versions/<n>/<files>`` plus ``manifest.json``. Protocol:
1. claim version n with a conditional put of ``versions/<n>/.claim`` (``If-None-Match: *``);
   a 412 means another publisher holds n: try n+1;
2. upload every file (multipart for large ones);
3. write ``manifest.json`` last, conditionally. Readers list only versions with a manifest,
   so a crash before step 3 leaves nothing half-published in view.

Faults: a publish that dies midway leaves ``.claim`` (and maybe some files) without a manifest:
invisible to readers.  A retry that passes the same ``claim_token`` (e.g. the run key) finds and
reuses its own claimed version instead of leaking a number; if that version was in fact
published already (the reply was lost), the retry returns it.  ``gc_orphans`` deletes versions
that never got a manifest once they are older than a threshold.

Besides ``versions/``, a model has ``aliases/`` (see aliases.py) and ``audit/`` (one object per
event).  Every published version carries a ``README.md`` model card (card.py).
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from opd.storage import sha256_file
from opd_ops.registry.audit import record_event
from opd_ops.registry.client import RegistryError, RegistryRefusal, ensure_bucket, named_s3_errors
from opd_ops.registry.s3io import (CARD, CLAIM, MANIFEST, get_text, is_precondition_failed, list_keys,
                                   versions_prefix)
from opd.names import validate_model_name

TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024)


@dataclass(frozen=True)
class Published:
    model: str
    version: int
    uri: str
    manifest: dict


def _version_objects(s3, bucket: str, prefix: str, model: str) -> dict[int, dict[str, dict]]:
    """version -> {relative path -> list_objects entry}, for every version key (claimed or published)."""
    vp = versions_prefix(prefix, model)
    out: dict[int, dict[str, dict]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=vp):
        for o in page.get("Contents", []):
            head, _, rel = o["Key"][len(vp):].partition("/")
            if head.isdigit() and rel:
                out.setdefault(int(head), {})[rel] = o
    return out


def list_versions(s3, bucket: str, prefix: str, model: str) -> list[int]:
    """Published versions only (those with a manifest)."""
    vp = versions_prefix(prefix, model)
    out = set()
    for k in list_keys(s3, bucket, vp):
        rest = k[len(vp):].split("/")
        if len(rest) == 2 and rest[1] == MANIFEST and rest[0].isdigit():
            out.add(int(rest[0]))
    return sorted(out)


def list_models(s3, bucket: str, prefix: str) -> list[str]:
    res = s3.list_objects_v2(Bucket=bucket, Prefix=prefix.strip("/") + "/", Delimiter="/")
    return sorted(p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in res.get("CommonPrefixes", []))


def read_manifest(s3, bucket: str, prefix: str, model: str, version: int) -> dict:
    key = f"{versions_prefix(prefix, model)}{version}/{MANIFEST}"
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as e:
        code = e.response["Error"].get("Code")
        cls = RegistryRefusal if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket") else RegistryError
        raise cls(f"{model}:{version} has no manifest ({code})") from None


def _claim_version(s3, bucket: str, prefix: str, model: str, token: str, taken: set[int] | None = None) -> int:
    vp = versions_prefix(prefix, model)
    if taken is None:
        taken = set(_version_objects(s3, bucket, prefix, model))
    n = max(taken, default=0) + 1
    for _ in range(1000):
        try:
            s3.put_object(Bucket=bucket, Key=f"{vp}{n}/{CLAIM}", Body=token.encode(), IfNoneMatch="*")
            return n
        except ClientError as e:
            if not is_precondition_failed(e):
                raise
            # A retried request whose first attempt did land reads as a 412 on our own claim.
            if get_text(s3, bucket, f"{vp}{n}/{CLAIM}") == token:
                return n
            n += 1
    raise RegistryError(f"could not claim a version number for {model}")


def _find_own_claim(s3, bucket: str, prefix: str, model: str, token: str,
                    objs: dict[int, dict[str, dict]]) -> int | None:
    """The newest version whose .claim holds `token` (a previous attempt of this publisher)."""
    vp = versions_prefix(prefix, model)
    for n in sorted(objs, reverse=True):
        if CLAIM in objs[n] and get_text(s3, bucket, f"{vp}{n}/{CLAIM}") == token:
            return n
    return None


def _local_entries(src: Path, files: list[Path]) -> list[dict]:
    return [{"path": p.relative_to(src).as_posix(), "sha256": sha256_file(p), "size": p.stat().st_size}
            for p in files]


def _same_files(manifest: dict, entries: list[dict]) -> bool:
    theirs = {(f["path"], f["sha256"], f["size"]) for f in manifest.get("files", []) if f["path"] != CARD}
    return theirs == {(f["path"], f["sha256"], f["size"]) for f in entries if f["path"] != CARD}


def publish(s3, bucket: str, prefix: str, model: str, src_dir: str | Path, lineage: dict,
            claim_token: str | None = None) -> Published:
    """Publish every file under `src_dir` as the next version of `model`.

    `claim_token` identifies the publisher across retries (e.g. the run key).  With it, a retry
    after a crash reuses the version its earlier attempt claimed, and a retry after a success
    whose reply was lost returns that version (if the files are the same; different files under
    the same token are refused).  Without it every call claims a fresh version.
    A ``README.md`` model card is generated unless `src_dir` has one.
    An endpoint that stops answering midway raises RegistryUnavailable naming it: retry with the
    same `claim_token` and the claimed version is reused.
    """
    validate_model_name(model)
    with named_s3_errors(s3, f"publish {model}"):
        return _publish(s3, bucket, prefix, model, Path(src_dir), lineage, claim_token)


def _publish(s3, bucket: str, prefix: str, model: str, src: Path, lineage: dict,
             claim_token: str | None) -> Published:
    from opd_ops.registry.card import render_card

    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        raise RegistryRefusal(f"nothing to publish in {src}")
    entries = _local_entries(src, files)
    ensure_bucket(s3, bucket)
    vp = versions_prefix(prefix, model)
    objs = _version_objects(s3, bucket, prefix, model)
    n = None
    if claim_token:
        token = claim_token
        n = _find_own_claim(s3, bucket, prefix, model, token, objs)
        if n is not None and MANIFEST in objs[n]:
            man = read_manifest(s3, bucket, prefix, model, n)
            if not _same_files(man, entries):
                raise RegistryRefusal(f"claim token {token!r} already published {model}:{n} with different "
                                      "files; use a new token for a new version")
            return Published(model, n, f"s3://{bucket}/{vp}{n}/", man)
    else:
        token = f"{lineage.get('flow_run_id', 'local')}:{time.time_ns()}:{uuid.uuid4().hex[:8]}"
    if n is None:
        n = _claim_version(s3, bucket, prefix, model, token, set(objs))
    base = f"{vp}{n}/"
    for p, e in zip(files, entries):
        s3.upload_file(str(p), bucket, base + e["path"], Config=TRANSFER)
    manifest = {
        "model": model, "version": n, "files": entries,
        "created_at": datetime.now(timezone.utc).isoformat(), "claim": token, **lineage,
    }
    if not any(e["path"] == CARD for e in entries):
        card = render_card(manifest).encode()
        s3.put_object(Bucket=bucket, Key=base + CARD, Body=card, ContentType="text/markdown; charset=utf-8")
        entries.append({"path": CARD, "sha256": hashlib.sha256(card).hexdigest(), "size": len(card)})
    if get_text(s3, bucket, base + CLAIM) != token:
        raise RegistryError(f"{model}:{n}: our claim disappeared while we uploaded (garbage-collected as an "
                            "orphan?); publish again")
    try:
        s3.put_object(Bucket=bucket, Key=base + MANIFEST, Body=json.dumps(manifest, indent=2, default=str).encode(),
                      IfNoneMatch="*", ContentType="application/json")
    except ClientError as e:
        if not is_precondition_failed(e):
            raise
        existing = read_manifest(s3, bucket, prefix, model, n)
        if existing.get("claim") != token:
            raise RegistryError(f"{model}:{n} was published by someone else while we uploaded") from None
        manifest = existing  # our own write landed; a retry of it got the 412
    _audit_publish(s3, bucket, prefix, model, n, lineage)
    return Published(model, n, f"s3://{bucket}/{base}", manifest)


def _audit_publish(s3, bucket: str, prefix: str, model: str, n: int, lineage: dict) -> None:
    try:
        record_event(s3, bucket, prefix, model, "publish", frm=None, to=n,
                     reason=f"run {lineage.get('run_key', '?')}", run_key=lineage.get("run_key"))
    except Exception:  # noqa: BLE001 - the version is published; a lost audit entry must not fail it
        pass


def _hash_object(s3, bucket: str, key: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    for chunk in s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def verify(s3, bucket: str, prefix: str, model: str, version: int) -> list[str]:
    """Problems found (empty = every file present with the manifest's sha256 and size)."""
    man = read_manifest(s3, bucket, prefix, model, version)
    base = f"{versions_prefix(prefix, model)}{version}/"
    problems = []
    for f in man["files"]:
        try:
            digest, size = _hash_object(s3, bucket, base + f["path"])
        except ClientError:
            problems.append(f"{f['path']}: missing")
            continue
        if digest != f["sha256"] or size != f["size"]:
            problems.append(f"{f['path']}: sha256/size mismatch")
    return problems


def gc_orphans(s3, bucket: str, prefix: str, model: str, older_than_s: float) -> list[int]:
    """Delete versions that have no manifest and saw no write for `older_than_s` seconds.

    Such versions are failed publishes (claimed, maybe partly uploaded, never made visible).
    Pick a threshold well above the longest publish: a live publisher whose claim is collected
    finds out before it writes its manifest and fails instead of publishing a hole.
    Returns the deleted version numbers.
    """
    validate_model_name(model)
    vp = versions_prefix(prefix, model)
    now = datetime.now(timezone.utc)
    deleted = []
    for n, objs in sorted(_version_objects(s3, bucket, prefix, model).items()):
        if MANIFEST in objs:
            continue
        newest = max(o["LastModified"] for o in objs.values())
        if (now - newest).total_seconds() < older_than_s:
            continue
        try:  # unfinished multipart uploads hold parts that listing does not show
            for u in s3.list_multipart_uploads(Bucket=bucket, Prefix=f"{vp}{n}/").get("Uploads", []):
                s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        except ClientError:
            pass
        for rel in sorted(objs, key=lambda r: r == CLAIM):  # the claim goes last
            s3.delete_object(Bucket=bucket, Key=f"{vp}{n}/{rel}")
        deleted.append(n)
    if deleted:
            record_event(s3, bucket, prefix, model, "gc_orphans", frm=None, to=None,
                     reason=f"no manifest, idle > {older_than_s:g} s", versions=deleted)
    return deleted
