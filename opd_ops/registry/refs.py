"""Refs (``MODEL``, ``MODEL:N``, ``MODEL@alias``): parsing, resolving to a published version, and pulling
one into a local directory with every file verified (the top layer: it reads versions and aliases)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from botocore.exceptions import ClientError

from opd.names import BadRef, split_ref  # noqa: F401 (BadRef: what parse_ref raises, re-exported)
from opd.paths import safe_rel, within
from opd.storage import sha256_file
from opd_ops.registry.aliases import read_alias
from opd_ops.registry.client import RegistryRefusal
from opd_ops.registry.s3io import versions_prefix
from opd_ops.registry.store import TRANSFER, list_versions, read_manifest


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """'MODEL' | 'MODEL@alias' | 'MODEL:version' -> (model, alias, version)."""
    return split_ref(ref)


def resolve(s3, bucket: str, prefix: str, ref: str) -> tuple[str, int]:
    """(model, published version) for a ref; a bare MODEL means its latest published version."""
    model, alias, version = parse_ref(ref)
    if alias is not None:
        st = read_alias(s3, bucket, prefix, model, alias)
        if st is None:
            raise RegistryRefusal(f"{model} has no alias {alias!r}")
        version = st.version
    published = list_versions(s3, bucket, prefix, model)
    if version is None:
        if not published:
            raise RegistryRefusal(f"{model} has no published version in s3://{bucket}/{prefix.strip('/')}")
        return model, published[-1]
    if version not in published:
        raise RegistryRefusal(f"{model}:{version} is not published")
    return model, version


def pull(s3, bucket: str, prefix: str, ref: str, dest_dir: str | Path) -> tuple[str, int, Path]:
    """Download REF (MODEL, MODEL@alias, MODEL:version) into `dest_dir`, all or nothing.

    Files land in a temp dir beside the destination; each is checked against the manifest's
    sha256 and size, and only a fully verified copy is renamed into place.  A mismatch raises
    RegistryError naming the file and leaves nothing at `dest_dir`.  `dest_dir` must not exist
    (an empty directory is accepted).  Returns (model, version, dest).
    """
    model, version = resolve(s3, bucket, prefix, ref)
    dest = Path(dest_dir).absolute()
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise RegistryRefusal(f"{dest} already exists and is not an empty directory; choose a new one")
    man = read_manifest(s3, bucket, prefix, model, version)
    base = f"{versions_prefix(prefix, model)}{version}/"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.pull-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for f in man["files"]:
            rel = safe_rel(f["path"], f"{model}:{version} manifest path").as_posix()
            local = within(tmp, rel, field=f"{model}:{version} manifest path")
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                s3.download_file(bucket, base + rel, str(local), Config=TRANSFER)
            except ClientError as e:
                raise RegistryRefusal(f"{model}:{version}: {rel} is missing in S3 "
                                    f"({e.response.get('Error', {}).get('Code')})") from None
            size = local.stat().st_size
            if size != f["size"] or sha256_file(local) != f["sha256"]:
                raise RegistryRefusal(f"{model}:{version}: {rel} does not match the manifest (sha256/size); "
                                    "the stored copy is corrupt or was tampered with; nothing was written")
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model, version, dest
