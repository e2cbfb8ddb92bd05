"""Deployments users trigger over HTTP: a real Prefect server, a real process worker."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, api_json, opd_bin

pytestmark = pytest.mark.e2e


def test_deployment_run_created_over_http_completes_and_registers(stack_env, s3, opd_home, tmp_path):
    pool, bucket = f"opd-test-{uuid.uuid4().hex[:6]}", f"opd-dep-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **stack_env, "PREFECT_HOME": str(tmp_path / "prefect-client")}
    overrides = [f"home={opd_home}", f"registry.bucket={bucket}", f"deployment.work_pool={pool}", "opd.rounds=2",
                 "eval.gates.opd_must_beat_sft_kl=false"]  # speed: 2 rounds are too few to gate on
    dep = subprocess.run([opd_bin(), "deploy", "configs/ci.yaml"] + sum((["--set", o] for o in overrides), []),
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert dep.returncode == 0, dep.stdout + dep.stderr
    api = stack_env["PREFECT_API_URL"]
    d = api_json(f"{api}/deployments/name/distill/ci")
    assert d["work_pool_name"] == pool and d["parameters"]["overrides"] == overrides

    good = api_json(f"{api}/deployments/{d['id']}/create_flow_run", {"parameters": {}})
    bad = api_json(f"{api}/deployments/{d['id']}/create_flow_run",
               {"parameters": {"overrides": overrides + ["opd.rounds=0"]}})
    worker = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", pool,
                               "--type", "process", "--limit", "1"], cwd=REPO, env=env,
                              stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.time() + 900
        states = {}
        while time.time() < deadline:
            states = {k: api_json(f"{api}/flow_runs/{r['id']}")["state"] for k, r in (("good", good), ("bad", bad))}
            if all(s["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states.values()):
                break
            time.sleep(2)
    finally:
        import signal

        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:  # Prefect 3.7's worker can hang on SIGTERM after a failed run;
            os.killpg(worker.pid, signal.SIGKILL)  # the runs' states below are what this test is about
            worker.wait(timeout=30)
    log = (tmp_path / "worker.log").read_text()[-4000:]
    assert states["good"]["type"] == "COMPLETED", (states, log)
    assert states["bad"]["type"] == "FAILED", (states, log)
    assert "opd.rounds" in (states["bad"]["message"] or "") + json.dumps(
        api_json(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [bad["id"]]}}, "limit": 200}))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert "models/addition-student-ci/versions/1/manifest.json" in keys
