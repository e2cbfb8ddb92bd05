"""kill -9 during round 2, rerun with the same run key: rounds 1..N each done once, one version.

The run updates the student on a 2-process torchrun group (training.num_processes=2), so this also
proves the group dies with its driver and that a resumed round restores the group's optimizer state.
The killed run's flow run, left RUNNING by its dead process, is marked CRASHED by the resume; a third
run of the finished key reuses the stored evaluation and leaves the completed run alone.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import pytest

from conftest import REPO, api_json, opd_bin

pytestmark = pytest.mark.e2e


def _runs_of(api: str, key: str) -> list[dict]:
    """The key's flow runs (tagged run_key:<key>), oldest first."""
    runs = api_json(f"{api}/flow_runs/filter", {"flow_runs": {"tags": {"all_": [f"run_key:{key}"]}}})
    return sorted(runs, key=lambda r: r["created"])


@pytest.mark.timeout(3600)  # three runs; the first bootstraps the ci teacher if the session has none (~25 min busy)
def test_kill9_in_round_2_then_resume(stack_env, s3, opd_home, tmp_path):
    bucket = f"opd-resume-{uuid.uuid4().hex[:8]}"
    key = f"resume-{uuid.uuid4().hex[:8]}"
    args = [opd_bin(), "run", "configs/ci.yaml", "--set", f"home={opd_home}", "--set", f"registry.bucket={bucket}",
            "--set", "opd.rounds=3", "--set", "training.num_processes=2", "--run-key", key]
    env = {**os.environ, **stack_env}
    run = opd_home / "runs" / key
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 1800  # the session's first run bootstraps the ci teacher (slow on a busy machine)
        try:
            while not (run / "round_002.sync").exists():  # exists only while round 2 is mid-way
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
                assert time.time() < deadline, "round 2 never started"
                time.sleep(0.05)
        finally:  # on success, and on a failed wait too: no run outlives the test
            os.killpg(first.pid, signal.SIGKILL)  # the flow process, its vLLM engine and update group, no cleanup
            first.wait()
    group = f"opd.learner_group --workdir {run / 'round_002.group'}"
    for _ in range(100):  # no orphaned rank keeps a stale student in memory
        if subprocess.run(["pgrep", "-f", group], capture_output=True).returncode == 1:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"update-group processes outlived the killed run: {group}")
    assert (run / "round_001" / "done.json").is_file()
    assert not (run / "round_002" / "done.json").exists()
    round1 = json.loads((run / "round_001" / "done.json").read_text())

    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-6000:]

    done = [json.loads((run / f"round_{k:03d}" / "done.json").read_text()) for k in (1, 2, 3)]
    assert done[0] == round1  # round 1 was not redone
    assert done[0]["pid"] == first.pid and done[1]["pid"] != first.pid and done[2]["pid"] == done[1]["pid"]
    assert [d["metrics"]["round"] for d in done] == [1, 2, 3]
    assert [d["metrics"]["update_processes"] for d in done] == [2, 2, 2]
    assert not (run / "round_004").exists()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert [k for k in keys if k.endswith("manifest.json")] == ["models/addition-student-ci/versions/1/manifest.json"]

    # the killed run does not stay RUNNING: the resume marked it CRASHED, naming itself, and its task runs too
    api = stack_env["PREFECT_API_URL"]
    killed, resumed = _runs_of(api, key)
    assert resumed["state"]["type"] == "COMPLETED", resumed["state"]
    assert killed["state"]["type"] == "CRASHED", killed["state"]
    assert f"superseded by flow run {resumed['name']} ({resumed['id']})" in killed["state"]["message"]
    tasks = api_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [killed["id"]]}}})
    assert tasks and not [t["name"] for t in tasks if t["state"]["type"] in ("RUNNING", "PENDING")], tasks
    assert f"marked flow run {killed['name']} ({killed['id']}) of run key {key} Crashed" in second.stdout + second.stderr

    # the killed run never reached evaluation; the resume evaluated once and stored it; a third run of the
    # finished key reuses it (evaluation.json untouched) and leaves the completed run COMPLETED
    stored = (run / "evaluation.json").stat().st_mtime_ns
    third = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, (third.stdout + third.stderr)[-6000:]
    assert "evaluation reused from" in third.stdout + third.stderr
    assert (run / "evaluation.json").stat().st_mtime_ns == stored
    states = [r["state"]["type"] for r in _runs_of(api, key)]
    assert states == ["CRASHED", "COMPLETED", "COMPLETED"], states
