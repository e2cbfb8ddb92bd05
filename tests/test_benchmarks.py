"""Smoke test of benchmarks/opd_step.py --quick: it runs both sides and writes a sane JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "opd_step.py"

pytest.importorskip("vllm", reason="the benchmark drives the vLLM sampler")
pytest.importorskip("trl", reason="trl (dev extra) is the other side of the comparison")


def test_opd_step_quick(tmp_path):
    out = tmp_path / "opd_step.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["trl_error"] is None, res["trl_error"]
    for key in ("ours_tokens_per_s", "trl_tokens_per_s", "ratio", "sync_fraction",
                "ours_tokens_per_step", "trl_tokens_per_step"):
        assert isinstance(res[key], (int, float)) and res[key] > 0, (key, res[key])
    assert res["sync_fraction"] < 1
    assert set(res["ours_phase_s"]) == {"sample_s", "score_s", "update_s", "sync_s"}
    assert all(v > 0 for v in res["ours_phase_s"].values()), res["ours_phase_s"]
    s = res["settings"]
    assert res["device"] and s["steps"] >= 1 and s["prompts"] >= 1 and s["samples"] >= 1 and s["max_tokens"] >= 1
    assert s["torch_threads"] >= 1 and s["student"] and s["teacher"]
    assert len(res["ours_step_s"]) == len(res["trl_step_s"]) == s["steps"]
