"""The registry's S3 errors: refusals (permanent) vs an unreachable endpoint (retryable), each naming the
endpoint and what to check. The client itself is ``opd.storage.make_client``."""
from __future__ import annotations

import contextlib
from urllib.parse import urlsplit

from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as S3ConnectionError

from opd.errors import PermanentError
from opd.storage import LOCAL_ENDPOINT_ENV

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed; the message says why and what to check."""


class RegistryRefusal(RegistryError, PermanentError):
    """Retrying cannot help (a missing version or alias, a tampered file, a bad request): fail at once."""


class RegistryUnavailable(RegistryError):
    """The S3 endpoint did not answer (after the client's own retries); a later retry may succeed."""


def is_loopback(url: str) -> bool:
    """Whether ``url`` points at this machine, where `opd stack up` would be the fix for no answer."""
    return urlsplit(url).hostname in _LOOPBACK


def unreachable(s3, error: Exception) -> str:
    """Names ``s3``'s endpoint and what to check: the local stack only when the endpoint is loopback."""
    url = s3.meta.endpoint_url
    advice = ("is the local stack up? run `opd stack up`" if is_loopback(url) else
              f"check registry.endpoint_url / {LOCAL_ENDPOINT_ENV} and that the endpoint is up")
    return f"cannot reach S3 endpoint {url} ({type(error).__name__}); {advice}"


@contextlib.contextmanager
def user_endpoint_advice(endpoint_url: str | None, what: str):
    """For a configured ``registry.endpoint_url`` (loopback or not), an unreachable endpoint is the
    user's to bring back: reword the local stack's `opd stack up` advice. Still retryable."""
    try:
        yield
    except RegistryUnavailable as e:
        if endpoint_url is None:  # the local stack's: its message says how to start it
            raise
        raise RegistryUnavailable(f"{what}: cannot reach S3 endpoint {endpoint_url} "
                                  f"({type(e.__cause__ or e).__name__}); check registry.endpoint_url and that the "
                                  "endpoint is up (the task retries with backoff, tasks.registry_retries)") from e


@contextlib.contextmanager
def named_s3_errors(s3, what: str):
    """Connection failures in the block -> RegistryUnavailable (retryable), missing credentials ->
    RegistryRefusal; both messages name the endpoint and what to check."""
    try:
        yield
    except (S3ConnectionError, HTTPClientError) as e:
        raise RegistryUnavailable(f"{what}: {unreachable(s3, e)}") from e
    except NoCredentialsError:
        raise RegistryRefusal(f"{what}: no AWS credentials for S3 endpoint {s3.meta.endpoint_url}; set "
                              "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None


def ensure_bucket(s3, bucket: str) -> None:
    """Create ``bucket`` unless it exists; an unreachable endpoint or refused access is named."""
    with named_s3_errors(s3, f"bucket {bucket!r}"):
        try:
            s3.head_bucket(Bucket=bucket)
            return
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise RegistryRefusal(f"S3 refused access to bucket {bucket!r} ({code}): check AWS credentials") \
                    from None
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise RegistryError(f"S3 error on bucket {bucket!r}: {code}") from None
        try:
            s3.create_bucket(Bucket=bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise RegistryError(f"cannot create bucket {bucket!r}: {e.response['Error'].get('Code')}") from None
