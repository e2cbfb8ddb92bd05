"""One S3 client for the whole pipeline: adaptive retries, path-style addressing, clear errors.

Credentials come only from the environment / AWS config chain; they are never logged.
"""
from __future__ import annotations

import os

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

LOCAL_ENDPOINT_ENV = "OPD_S3_ENDPOINT"


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed; the message says why and what to check."""


def make_client(endpoint_url: str | None = None, region: str = "us-east-1", *, max_attempts: int = 8,
                connect_timeout: float = 5, read_timeout: float = 60):
    """An S3 client; `max_attempts` (adaptive retries) and the timeouts are lowered by fault tests."""
    endpoint_url = endpoint_url or os.environ.get(LOCAL_ENDPOINT_ENV)
    session = boto3.session.Session()
    if session.get_credentials() is None and endpoint_url and "127.0.0.1" in endpoint_url:
        # The local SeaweedFS runs open; boto3 still signs, so give it throwaway local keys.
        session = boto3.session.Session(aws_access_key_id="opd-local", aws_secret_access_key="opd-local")
    cfg = Config(retries={"max_attempts": max_attempts, "mode": "adaptive"}, s3={"addressing_style": "path"},
                 connect_timeout=connect_timeout, read_timeout=read_timeout)
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)


def ensure_bucket(s3, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except EndpointConnectionError as e:
        raise RegistryError(f"cannot reach S3 endpoint ({e}); is the stack up? run `opd stack up`") from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise RegistryError(f"S3 refused access to bucket {bucket!r} ({code}): check AWS credentials") from None
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise RegistryError(f"S3 error on bucket {bucket!r}: {code}") from None
    try:
        s3.create_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise RegistryError(f"cannot create bucket {bucket!r}: {e.response['Error'].get('Code')}") from None
    except BotoCoreError as e:
        raise RegistryError(f"cannot create bucket {bucket!r}: {e}") from None
