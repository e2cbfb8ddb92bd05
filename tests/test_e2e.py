"""The whole distill flow on configs/ci.yaml against a real Prefect server and real SeaweedFS.

It also runs with canary AWS credentials and then greps everything the run left (Prefect logs,
artifacts, the server's database, client-side results, the run directory, every registry
object) for them: zero hits.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import REPO, api_json, opd_bin

pytestmark = pytest.mark.e2e


def test_distill_flow_end_to_end(stack, stack_env, s3, opd_home, tmp_path):
    bucket = f"opd-e2e-{uuid.uuid4().hex[:8]}"
    canary = f"opd-canary-{uuid.uuid4().hex}"
    env = {**os.environ, **stack_env, "AWS_ACCESS_KEY_ID": "opd-canary-key", "AWS_SECRET_ACCESS_KEY": canary,
           "PREFECT_HOME": str(tmp_path / "prefect-client")}
    proc = subprocess.run([opd_bin(), "run", "configs/ci.yaml", "--set", f"home={opd_home}",
                           "--set", f"registry.bucket={bucket}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    api = stack_env["PREFECT_API_URL"]

    # 1. the flow run is Completed in the real Prefect server
    fr_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", proc.stdout).group(1)
    flow_run = api_json(f"{api}/flow_runs/{fr_id}")
    assert flow_run["state"]["type"] == "COMPLETED"
    assert "student after OPD" in proc.stdout and f"s3://{bucket}/models/addition-student-ci/versions/1/" in proc.stdout

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
    assert all(0 <= res[k]["sampled_accuracy"] <= 1 for k in ("sft_student", "opd_student")), res
    # published from a staging copy that is gone once the registry holds the version
    rdir = Path(opd_home) / "runs" / man["run_key"]
    assert (rdir / "registered.json").is_file() and not (rdir / "publish.tmp").exists()
    # the cost ledger is in the registered lineage: every phase, with the work it did
    phases = [c["phase"] for c in man["cost"]]
    assert phases[-1] == "eval" and {"sft_data", "sft", "opd_round_1"} <= set(phases), phases
    by = {c["phase"]: c for c in man["cost"]}
    assert by["sft_data"]["teacher_flops"] > 0 and by["sft_data"]["student_train_flops"] == 0
    assert by["sft"]["student_train_flops"] == 6 * man["student_params"] * by["sft"]["student_train_tokens"] > 0
    r1 = by["opd_round_1"]
    assert r1["sample_flops"] == 2 * man["student_params"] * r1["sample_tokens"] > 0
    assert r1["teacher_flops"] == 2 * man["teacher_params"] * r1["teacher_tokens"] > 0
    assert by["eval"]["teacher_tokens"] > 0 and all(c["wall_s"] > 0 for c in man["cost"]), man["cost"]

    # 3. every file of the version is in S3 with the manifest's sha256 and size
    names = {f["path"] for f in man["files"]}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert "optimizer.pt" not in names
    for f in man["files"]:
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}1/{f['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == f["sha256"] and len(body) == f["size"], f["path"]

    # 4. the CLI lists it
    ls = subprocess.run([opd_bin(), "registry", "ls", "--config", "configs/ci.yaml", "--bucket", bucket],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert ls.returncode == 0 and "addition-student-ci" in ls.stdout, ls.stdout + ls.stderr

    # 5. the canary secret reached nothing the run left behind
    logs = api_json(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [fr_id]}}, "limit": 200})
    assert len(logs) > 10  # the search is real: the run did log
    artifacts = api_json(f"{api}/artifacts/filter", {"flow_runs": {"id": {"any_": [fr_id]}}, "limit": 200})
    assert {a["key"] for a in artifacts} >= {"dataset-validation", "evaluation", "gates", "opd-rounds", "cost-ledger"}
    ledger = next(a for a in artifacts if a["key"] == "cost-ledger")
    assert "sft_data" in json.dumps(ledger["data"]) and "opd_round_1" in json.dumps(ledger["data"])
    blobs = [json.dumps(logs).encode(), json.dumps(artifacts).encode(), proc.stdout.encode(), proc.stderr.encode()]
    for root in (opd_home, tmp_path / "prefect-client", Path(stack.home)):
        blobs += [p.read_bytes() for p in Path(root).rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
    for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        blobs.append(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
    hits = sum(canary.encode() in b for b in blobs)
    assert hits == 0, f"canary secret found in {hits} place(s)"

    # 6. the console shows the run's own lines; the libraries' output is in the run's log file
    lines = out.splitlines()
    assert len(lines) <= 80, f"{len(lines)} console lines:\n" + out[-6000:]
    for noise in ("Failed to load weights", "Calculating Metrics", "Generating train split", "Loading safetensors",
                  "EngineCore"):
        assert noise not in out, noise
    assert not [ln for ln in lines if "Task run" in ln and "Finished in state Completed()" in ln]
    assert sum("Task run 'opd_round-" in ln for ln in lines) == 6 + 1  # a line per round, one for the engine start
    third = (rdir / "logs" / "third_party.log").read_text()
    # vLLM's weight loading (printed on every engine start and reload) is there, not on the console
    assert "Loading safetensors checkpoint shards" in third, third[-3000:]
