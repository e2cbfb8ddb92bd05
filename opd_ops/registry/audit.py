"""The registry's audit log: one object per event (publish, promote, gc) under ``<model>/audit/``, so
concurrent writers never collide; ``by`` is $OPD_USER or the login name."""
from __future__ import annotations

import getpass
import json
import os
import uuid
from datetime import datetime, timezone

from opd.names import validate_model_name
from opd_ops.registry.s3io import get_text, list_keys, model_root, require_model


def current_user() -> str:
    user = os.environ.get("OPD_USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (containers): still record something
        return "unknown"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def record_event(s3, bucket: str, prefix: str, model: str, action: str, *, frm=None, to=None,
                 reason: str = "", by: str | None = None, **extra) -> dict:
    """Write one audit event (its own object, so concurrent writers never collide)."""
    at = _now()
    event = {"at": at.isoformat(), "by": by or current_user(), "action": action, "reason": reason,
             "from": frm, "to": to, **extra}
    key = f"{model_root(prefix, model)}audit/{at.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex}.json"
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(event, default=str).encode(),
                  ContentType="application/json")
    return event


def audit(s3, bucket: str, prefix: str, model: str) -> list[dict]:
    """Every audit event of `model`, oldest first; RegistryRefusal if the model does not exist at all."""
    validate_model_name(model)
    out = []
    for key in sorted(list_keys(s3, bucket, f"{model_root(prefix, model)}audit/")):
        body = get_text(s3, bucket, key)
        if body is not None:
            out.append(json.loads(body))
    if not out:
        require_model(s3, bucket, prefix, model)
    return out
