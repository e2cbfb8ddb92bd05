"""Aliases (``MODEL@production``), the audit log, and ref resolution.

Aliases move; versions never change.  Layout under ``<prefix>/<model>/``:

* ``aliases/<alias>/moves/<seq>.json`` - the authoritative, append-only move log.  A move from
  state ``seq`` claims ``seq+1`` with a conditional put (``If-None-Match: *``): of two movers that
  read the same state exactly one wins; the other gets 412 and raises AliasConflict.
  The alias's value is the highest ``seq``.
* ``aliases/<alias>.json`` - ``{"version", "updated_at", "by", "reason", "seq"}``, a mirror of the
  log head for stock S3 clients, rewritten after each move.  Readers here use the log.

Why a log rather than compare-and-swap of ``aliases/<alias>.json`` with ``If-Match: <etag>``:
SeaweedFS 4.48 honours If-Match for sequential writes (a stale ETag gets 412), but it is not
atomic: of 8 concurrent puts carrying the same ETag, two succeeded in 8 of 40 trials.
``If-None-Match: *`` held in every trial (one winner out of 8, 45 trials), and version claims
already rely on it.

* ``audit/<timestamp>-<uuid>.json`` - one object per event (publish, promote, gc):
  ``{"at", "by", "action", "reason", "from", "to", ...}``; ``by`` is $OPD_USER or the login name.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from botocore.exceptions import ClientError

from opd_ops.registry.client import RegistryError, RegistryRefusal
from opd.names import validate_alias_name, validate_model_name
from opd_ops.registry.audit import current_user, record_event
from opd_ops.registry.s3io import (MANIFEST, get_text, is_precondition_failed, list_keys, model_root, moves_prefix,
                                   versions_prefix)

_SEQ_DIGITS = 10


class AliasConflict(RegistryError):
    """Someone else moved the alias after we read it: re-read and retry."""


@dataclass(frozen=True)
class AliasState:
    alias: str
    version: int
    seq: int
    updated_at: str
    by: str
    reason: str


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ------------------------------------------------------------------------------------ aliases

def _seq_of(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    stem = name.removesuffix(".json")
    return int(stem) if name.endswith(".json") and stem.isdigit() else None


def read_alias(s3, bucket: str, prefix: str, model: str, alias: str) -> AliasState | None:
    """The alias's current state (head of its move log), or None if it was never set."""
    validate_model_name(model)
    validate_alias_name(alias)
    mp = moves_prefix(prefix, model, alias)
    seqs = sorted(s for k in list_keys(s3, bucket, mp) if (s := _seq_of(k)) is not None)
    for seq in reversed(seqs):
        body = get_text(s3, bucket, f"{mp}{seq:0{_SEQ_DIGITS}d}.json")
        if body is not None:
            d = json.loads(body)
            return AliasState(alias, int(d["version"]), seq, d.get("updated_at", ""), d.get("by", ""),
                              d.get("reason", ""))
    return None


def list_aliases(s3, bucket: str, prefix: str, model: str) -> dict[str, AliasState]:
    validate_model_name(model)
    root = f"{model_root(prefix, model)}aliases/"
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root, Delimiter="/"):
        for p in page.get("CommonPrefixes", []):
            name = p["Prefix"][len(root):].rstrip("/")
            try:
                st = read_alias(s3, bucket, prefix, model, name)
            except ValueError:
                continue
            if st is not None:
                out[name] = st
    return dict(sorted(out.items()))


_CURRENT = object()


def promote(s3, bucket: str, prefix: str, model: str, version: int, alias: str, *, reason: str,
            expected=_CURRENT, by: str | None = None) -> AliasState:
    """Point `alias` at `model:version` (which must be published) and record it in the audit log.

    `expected` is the AliasState (or None for "not set yet") the caller based its decision on;
    by default the state is read just before the move.  If the alias moved since, AliasConflict
    is raised and nothing changes.
    """
    validate_model_name(model)
    validate_alias_name(alias)
    if not reason or not reason.strip():
        raise RegistryRefusal("a reason is required to move an alias")
    version = int(version)
    manifest_key = f"{versions_prefix(prefix, model)}{version}/{MANIFEST}"
    try:
        s3.head_object(Bucket=bucket, Key=manifest_key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            raise RegistryRefusal(f"refusing to point {model}@{alias} at {model}:{version}: that version is not "
                                f"published (no manifest)") from None
        raise
    current = read_alias(s3, bucket, prefix, model, alias) if expected is _CURRENT else expected
    seq = (current.seq if current else 0) + 1
    who = by or current_user()
    state = AliasState(alias, version, seq, _now().isoformat(), who, reason)
    body = {k: v for k, v in asdict(state).items() if k != "alias"}
    mp = moves_prefix(prefix, model, alias)
    try:
        s3.put_object(Bucket=bucket, Key=f"{mp}{seq:0{_SEQ_DIGITS}d}.json", Body=json.dumps(body).encode(),
                      IfNoneMatch="*", ContentType="application/json")
    except ClientError as e:
        if not is_precondition_failed(e):
            raise
        now = read_alias(s3, bucket, prefix, model, alias)
        if now is not None and now.seq == seq and now.updated_at == state.updated_at and now.by == who \
                and now.version == version:
            pass  # our own write landed and a retry of it got the 412
        else:
            was = f"from {current.version}" if current else "from unset"
            to = f"to {now.version} by someone else ({now.by})" if now else "by someone else"
            raise AliasConflict(f"alias {alias} of {model} moved {was} {to}; re-read and retry") from None
    _write_mirror(s3, bucket, prefix, model, alias)
    record_event(s3, bucket, prefix, model, "promote", frm=current.version if current else None, to=version,
                 reason=reason, by=who, alias=alias, seq=seq)
    return state


def _write_mirror(s3, bucket: str, prefix: str, model: str, alias: str) -> None:
    """Best effort: copy the log head to aliases/<alias>.json; re-check so a late writer re-syncs it."""
    key = f"{model_root(prefix, model)}aliases/{alias}.json"
    written = None
    for _ in range(3):
        head = read_alias(s3, bucket, prefix, model, alias)
        if head is None or head == written:
            return
        body = {"version": head.version, "updated_at": head.updated_at, "by": head.by, "reason": head.reason,
                "seq": head.seq}
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(body).encode(), ContentType="application/json")
        written = head


