"""The register task rides out minutes of S3 outage with its own retry budget (tasks.registry_*).

A real SeaweedFS of its own (own home and ports) is stopped before register starts and brought back
40 s later, well past the ~12 s the ci settings used to survive; the task, run by Prefect with the
policy the flow gives it, publishes version 1 once S3 is back. An unreachable user-configured
endpoint fails with a message that names it and does not send the user to `opd stack up`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO, _free_block
from opd_ops import stack as st

OUTAGE_S = 40

REGISTER = """
import json, sys
from pathlib import Path
from opd.config import load_config
from opd.records import ModelRef, RunLayout
from tasks import stages as T
from tasks.policy import configured

home, endpoint, bucket = sys.argv[1:4]
cfg = load_config("configs/ci.yaml", [f"home={home}", f"registry.endpoint_url={endpoint}", f"registry.bucket={bucket}"])
final = Path(home) / "final"
final.mkdir(parents=True)
(final / "config.json").write_text("{}")
(final / "model.safetensors").write_bytes(b"w" * 4096)
layout = RunLayout.of(home, "outage")
layout.root.mkdir(parents=True)
print(json.dumps(configured(T.register, cfg)(cfg, ModelRef(str(final), 1), layout, {"run_key": "outage"})))
"""


def test_register_survives_a_40s_s3_outage_with_ci_retry_settings(stack, stack_env, tmp_path):
    from opd.storage import make_client

    settings = st.StackSettings(home=tmp_path / "s3-home", prefect_port=stack.prefect_port,
                                s3_port=_free_block(8390, 10))
    bucket = f"opd-outage-{uuid.uuid4().hex[:8]}"
    st.up(settings, timeout=120)
    try:
        assert st.down(settings) == [st.SEAWEEDFS]  # S3 is gone before register starts
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", REGISTER, str(tmp_path / "home"), settings.s3_endpoint, bucket],
                                cwd=REPO, env={**os.environ, **stack_env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(OUTAGE_S)
            assert proc.poll() is None, f"register gave up during the outage:\n{proc.stdout.read()[-4000:]}"
            st.up(settings, timeout=120)
            out, _ = proc.communicate(timeout=420)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out[-4000:]
        assert "Retry" in out or "retry" in out, out[-4000:]  # Prefect logged the task's retries
        reg = json.loads(out.strip().splitlines()[-1])
        assert reg["version"] == 1 and reg["uri"] == f"s3://{bucket}/models/addition-student-ci/versions/1/"
        s3 = make_client(settings.s3_endpoint)
        man = json.loads(s3.get_object(Bucket=bucket, Key="models/addition-student-ci/versions/1/manifest.json")
                         ["Body"].read())
        assert man["run_key"] == "outage" and time.monotonic() - t0 > OUTAGE_S
        # the attempts that failed named the user's endpoint, and not the local stack (it is not one)
        assert f"cannot reach S3 endpoint {settings.s3_endpoint}" in out and "opd stack up" not in out, out[-4000:]
    finally:
        st.down(settings)


def test_unreachable_user_endpoint_is_named_without_the_local_stack_hint(tmp_path):
    """A non-loopback-looking address with nothing listening (127.0.0.2 refuses at once)."""
    from opd.config import load_config
    from opd.records import ModelRef, RunLayout
    from opd_ops.publishing import register
    from opd_ops.registry.client import RegistryError

    endpoint = f"http://127.0.0.2:{_free_block(8450, 1)}"  # a user's endpoint, nothing listening
    cfg = load_config("configs/ci.yaml", [f"home={tmp_path}", f"registry.endpoint_url={endpoint}"])
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("{}")
    with pytest.raises(RegistryError) as e:
        register(cfg, ModelRef(str(final), 1), RunLayout(tmp_path / "run"), {"run_key": "k"})
    assert endpoint in str(e.value) and "opd stack up" not in str(e.value), str(e.value)
    assert not RunLayout(tmp_path / "run").registered.exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_configured_loopback_endpoint_gets_no_local_stack_hint_from_any_registry_call(tmp_path, host, monkeypatch):
    """A user's own S3 on this machine (a MinIO on loopback): `opd stack up` would not bring it back, so
    neither register nor the alias reads and moves of promotion may suggest it."""
    from opd.config import load_config
    from opd.records import ModelRef, RunLayout
    from opd_ops import promotion
    from opd_ops.publishing import register
    from opd_ops.registry.client import RegistryError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "user-key")  # a user's endpoint comes with the user's keys
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "user-secret")
    endpoint = f"http://{host}:{_free_block(8470, 1)}"
    cfg = load_config("configs/ci.yaml", [f"home={tmp_path}", f"registry.endpoint_url={endpoint}"])
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("{}")
    calls = {"register": lambda: register(cfg, ModelRef(str(final), 1), RunLayout(tmp_path / "run"), {"run_key": "k"}),
             "move_alias": lambda: promotion.move_alias(cfg, 1, "staging", "test"),
             "current_alias_version": lambda: promotion.current_alias_version(cfg, "staging")}
    for name, call in calls.items():
        with pytest.raises(RegistryError) as e:
            call()
        msg = str(e.value)
        assert endpoint in msg and "check registry.endpoint_url" in msg and "opd stack up" not in msg, (name, msg)
