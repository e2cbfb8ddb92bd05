"""The whole distill flow on configs/ci.yaml against a real Prefect server and real SeaweedFS."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.e2e


def _opd_bin() -> str:
    return str(Path(sys.executable).with_name("opd"))


def test_distill_flow_end_to_end(stack_env, s3, tmp_path):
    bucket = f"opd-e2e-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **stack_env}
    proc = subprocess.run([_opd_bin(), "run", "configs/ci.yaml", "--set", f"home={tmp_path}",
                           "--set", f"registry.bucket={bucket}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    # 1. the flow run is Completed in the real Prefect server
    fr_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", proc.stdout).group(1)
    with urllib.request.urlopen(f"{stack_env['PREFECT_API_URL']}/flow_runs/{fr_id}") as r:
        flow_run = json.load(r)
    assert flow_run["state"]["type"] == "COMPLETED"
    assert flow_run["name"] and flow_run["flow_id"]

    # 2. one version registered; its manifest records the evaluation
    prefix = "models/addition-student-ci/versions/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    manifests = [k for k in keys if k.endswith("/manifest.json")]
    assert manifests == [prefix + "1/manifest.json"]
    man = json.loads(s3.get_object(Bucket=bucket, Key=manifests[0])["Body"].read())
    assert man["flow_run_id"] == fr_id
    res = man["metrics"]
    assert res["opd_student"]["reverse_kl"] < res["sft_student"]["reverse_kl"], res
    assert res["teacher"]["accuracy"] >= 0.8

    # 3. every file of the version is in S3 with the manifest's sha256 and size
    names = {f["path"] for f in man["files"]}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    for f in man["files"]:
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}1/{f['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == f["sha256"] and len(body) == f["size"], f["path"]
    assert "optimizer.pt" not in names

    # 4. the CLI lists it
    ls = subprocess.run([_opd_bin(), "registry", "ls", "--config", "configs/ci.yaml", "--bucket", bucket],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert ls.returncode == 0 and "addition-student-ci" in ls.stdout, ls.stdout + ls.stderr
