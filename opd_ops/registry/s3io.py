"""The registry's S3 layout and the few S3 calls every part of it makes (the bottom layer: it imports
no other registry module)."""
from __future__ import annotations

from botocore.exceptions import ClientError

from opd.names import validate_model_name
from opd_ops.registry.client import RegistryRefusal

MANIFEST = "manifest.json"
CLAIM = ".claim"
CARD = "README.md"


def model_root(prefix: str, model: str) -> str:
    return f"{prefix.strip('/')}/{model}/"


def versions_prefix(prefix: str, model: str) -> str:
    return f"{prefix.strip('/')}/{model}/versions/"


def list_keys(s3, bucket: str, prefix: str) -> list[str]:
    """Keys under prefix; a bucket that does not exist yet holds no keys (publish creates it)."""
    keys = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise
    return keys


def is_precondition_failed(e: ClientError) -> bool:
    """412 PreconditionFailed, or 409 ConditionalRequestConflict (a concurrent conditional write)."""
    return e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict") or \
        e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412)


def get_text(s3, bucket: str, key: str) -> str | None:
    """An object's body as text, or None when it does not exist."""
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise


def moves_prefix(prefix: str, model: str, alias: str) -> str:
    return f"{model_root(prefix, model)}aliases/{alias}/moves/"


def require_model(s3, bucket: str, prefix: str, model: str) -> None:
    """RegistryRefusal unless `model` has at least one object (a version, a claim, an alias or an event)."""
    validate_model_name(model)
    try:
        found = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix.strip('/')}/{model}/", MaxKeys=1).get("Contents")
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise
        found = None
    if not found:
        raise RegistryRefusal(f"no model {model!r} in s3://{bucket}/{prefix.strip('/')}/ "
                              "(`opd registry ls` lists the models there)")
