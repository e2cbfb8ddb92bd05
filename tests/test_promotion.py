"""Gated promotion against a real Prefect server: a paused approval resumed with "reject" leaves
aliases unchanged; resumed with "approve" moves the alias."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO, api_json, opd_bin
from opd import warmup
from opd.data.prepare import prepare_data, validate_data
from opd.records import RunLayout
from opd.config import load_config
from opd_ops.registry.aliases import read_alias
from opd_ops.registry.audit import audit
from opd_ops.registry.store import publish

pytestmark = pytest.mark.e2e


def _wait_paused(api: str, bucket: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = api_json(f"{api}/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}, "limit": 50})
        for r in runs:
            if any(bucket in str(o) for o in r["parameters"].get("overrides", [])):
                return r["id"]
        time.sleep(1)
    raise AssertionError("the promotion never paused for approval")


@pytest.fixture(scope="module")
def candidate(stack_env, opd_home):
    """A registered version to promote: the CI teacher itself (bootstrapped once, cached)."""
    os.environ.update(stack_env)
    bucket = f"opd-promo-{uuid.uuid4().hex[:8]}"
    cfg = load_config("configs/ci.yaml", [f"home={opd_home}"])
    layout = RunLayout.of(cfg.home, f"promo-{uuid.uuid4().hex[:6]}")
    _, ref = validate_data(cfg, prepare_data(cfg, layout.data))
    teacher = warmup.bootstrap_teacher(cfg, ref)
    from opd.storage import make_client

    s3 = make_client(stack_env["OPD_S3_ENDPOINT"])
    pub = publish(s3, bucket, "models", "promo-model", teacher.path, {"teacher": teacher.path})
    return bucket, pub.version, s3


def _promote(bucket: str, version: int, opd_home, env, alias: str = "production"):
    return subprocess.Popen(
        [opd_bin(), "promote", "configs/ci.yaml", f"promo-model:{version}", "--to", alias, "--reason", "test",
         "--set", f"home={opd_home}", "--set", f"registry.bucket={bucket}",
         "--set", "eval.gates.require_approval=true", "--set", "eval.gates.approval_timeout_s=600"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_rejected_approval_leaves_aliases_unchanged_and_approval_moves_it(candidate, stack_env, opd_home):
    bucket, version, s3 = candidate
    env = {**os.environ, **stack_env}
    api = stack_env["PREFECT_API_URL"]

    proc = _promote(bucket, version, opd_home, env)
    fr = _wait_paused(api, bucket)
    api_json(f"{api}/flow_runs/{fr}/resume", {"run_input": {"approve": False, "reason": "numbers too close"}})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    assert "rejected by reviewer: numbers too close" in out
    assert read_alias(s3, bucket, "models", "promo-model", "production") is None
    assert not [e for e in audit(s3, bucket, "models", "promo-model") if e.get("action") == "promote"]
    assert api_json(f"{api}/flow_runs/{fr}")["state"]["type"] == "FAILED"

    proc = _promote(bucket, version, opd_home, env)
    fr = _wait_paused(api, bucket)
    api_json(f"{api}/flow_runs/{fr}/resume", {"run_input": {"approve": True, "reason": "lgtm"}})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    st = read_alias(s3, bucket, "models", "promo-model", "production")
    assert st is not None and st.version == version and "approved: lgtm" in st.reason
    events = [e for e in audit(s3, bucket, "models", "promo-model") if e.get("action") == "promote"]
    assert len(events) == 1 and events[0]["to"] == version


def test_the_promote_flow_refuses_a_missing_version_before_any_data_work(candidate, stack_env, opd_home, tmp_path):
    """Triggered from the UI or the API (no CLI check in front): the flow asks the registry right after
    preflight, fails permanently (no retry), and has built no data set."""
    bucket, version, _ = candidate
    env = {**os.environ, **stack_env}
    code = ("from flows.promote import promote\n"
            f"s = promote({'configs/ci.yaml'!r}, {version + 40}, 'production', 'test', "
            f"[{f'home={tmp_path}'!r}, {f'registry.bucket={bucket}'!r}, 'registry.model_name=promo-model', "
            "'tasks.retries=2'], return_state=True)\n"
            "print('STATE', s.type.value, s.message)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "STATE FAILED" in out and f"promo-model:{version + 40} is not published" in out, out[-4000:]
    runs = api_json(f"{stack_env['PREFECT_API_URL']}/task_runs/filter",
                    {"task_runs": {"name": {"like_": "check_candidate"}}, "sort": "EXPECTED_START_TIME_DESC",
                     "limit": 1})
    assert runs and runs[0]["run_count"] == 1 and runs[0]["state"]["type"] == "FAILED", runs
    assert not list(tmp_path.rglob("*.parquet")), "data was prepared for a version that does not exist"
