"""What can be validated of infra/ without Docker or a cluster."""
import json
from pathlib import Path

import yaml

from opd.config import load_config

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
