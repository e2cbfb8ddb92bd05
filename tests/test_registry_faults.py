"""S3 faults: SeaweedFS dies in the middle of a publish, comes back, and the publish is retried.

This test runs its OWN SeaweedFS (own home and ports) so it can kill it without disturbing the
session stack; it reuses the session's Prefect server, which `opd_ops.stack.up` then leaves alone
("external") and `down` never stops.  The kill is synchronised with the upload through a real
botocore event hook on the publishing client: the request for the 30 MB file waits until the
server is gone, then goes out against a dead endpoint.
"""
from __future__ import annotations

import os
import threading
import time
import uuid

from conftest import _free_block
from opd_ops import stack as st
from opd.errors import PermanentError
from opd_ops.registry.client import RegistryUnavailable
from opd.storage import make_client
from opd_ops.registry.refs import pull
from opd_ops.registry.store import gc_orphans, list_versions, publish, verify

PREFIX = "models"
BIG = 30 * 1024 * 1024


def test_publish_survives_seaweedfs_dying_mid_upload(stack, tmp_path):
    settings = st.StackSettings(home=tmp_path / "faulty-home", prefect_port=stack.prefect_port,
                                s3_port=_free_block(8370, 10))
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"layers": 2}')
    (src / "model.bin").write_bytes(os.urandom(BIG))
    bucket, token = f"opd-fault-{uuid.uuid4().hex[:8]}", f"run-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    info = st.up(settings, timeout=120)
    assert info[st.SEAWEEDFS]["action"] == "started" and info[st.PREFECT]["action"] == "external"
    try:
        fragile = make_client(settings.s3_endpoint, max_attempts=2, connect_timeout=1, read_timeout=10)
        reached, killed = threading.Event(), threading.Event()

        def hold_big_upload(request, **_):
            if "model.bin" in request.url and not reached.is_set():
                reached.set()
                killed.wait(60)

        fragile.meta.events.register("before-send.s3.*", hold_big_upload)
        outcome: dict = {}

        def attempt():
            try:
                outcome["published"] = publish(fragile, bucket, PREFIX, "m1", src, {"run_key": token},
                                               claim_token=token)
            except Exception as e:  # noqa: BLE001 - asserted below
                outcome["error"] = e

        th = threading.Thread(target=attempt)
        th.start()
        assert reached.wait(60), outcome
        assert st.down(settings) == [st.SEAWEEDFS]  # SeaweedFS is gone mid-publish
        killed.set()
        th.join(60)
        assert "error" in outcome and "published" not in outcome, outcome
        err = outcome["error"]  # retryable (not permanent), and it names the endpoint that went away
        assert isinstance(err, RegistryUnavailable) and not isinstance(err, PermanentError), repr(err)
        assert settings.s3_endpoint in str(err) and "opd stack up" in str(err), str(err)

        st.up(settings, timeout=120)  # same home: what was written persists
        s3 = make_client(settings.s3_endpoint)
        vp = f"{PREFIX}/m1/versions/"
        left = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=vp).get("Contents", []))
        assert f"{vp}1/.claim" in left and f"{vp}1/manifest.json" not in left, left
        assert f"{vp}1/config.json" in left  # a partial upload: claimed, one file in, no manifest
        assert list_versions(s3, bucket, PREFIX, "m1") == []  # the failed attempt is invisible

        pub = publish(s3, bucket, PREFIX, "m1", src, {"run_key": token}, claim_token=token)
        assert pub.version == 1  # its own claim reused: no version number leaked
        assert list_versions(s3, bucket, PREFIX, "m1") == [1]
        assert verify(s3, bucket, PREFIX, "m1", 1) == []
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=vp).get("Contents", [])}
        assert all(k.startswith(f"{vp}1/") for k in keys), keys
        assert gc_orphans(s3, bucket, PREFIX, "m1", older_than_s=0) == []
        _, _, dest = pull(s3, bucket, PREFIX, "m1", tmp_path / "pulled")
        assert (dest / "model.bin").stat().st_size == BIG
    finally:
        st.down(settings)
    assert time.monotonic() - t0 < 120
