"""Smoke tests of the benchmarks' --quick modes: they run every side and write sane outputs."""
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


def test_sample_efficiency_quick(tmp_path, opd_home):
    """On the CI config (its teacher is cached in the session home): both branches run from one
    warmup checkpoint, and the JSON, table and plot have the documented shape. Not the ratio."""
    out = tmp_path / "se.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sample_efficiency.py"), "--quick",
                           "--config", str(REPO / "configs" / "ci.yaml"), "--set", f"home={opd_home}",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert (tmp_path / "se.png").stat().st_size > 10_000
    assert "SFT student FLOPs" in (tmp_path / "se.txt").read_text()
    assert res["seeds"] == [0] and res["quick"] is True
    for branch in ("sft", "opd"):  # where each branch ended, greedy and sampled, over seeds
        assert 0 <= res["end"][branch]["sampled_accuracy"]["mean"] <= 1
    for key in ("ratio_sft_over_opd", "ratio_is_lower_bound", "target_accuracy", "curves", "lr_search"):
        assert key in res, key
    assert 0 < res["target_accuracy"] <= res["teacher"]["accuracy"]
    assert len(res["lr_search"]["sft"]["grid"]) == len(res["lr_search"]["opd"]["grid"])
    for branch in ("sft", "opd"):
        curve = res["curves"][branch]["0"]
        assert len(curve) == 3  # the branch point + --quick's 2 eval points
        assert curve[0]["student_flops"] == 0 and curve[0]["accuracy"] == res["warmup"]["accuracy"]
        for a, b in zip(curve, curve[1:]):  # compute only grows, and every point was really evaluated
            assert b["student_flops"] > a["student_flops"] and b["teacher_flops"] > a["teacher_flops"]
            assert b["wall_s"] > a["wall_s"] and 0 <= b["accuracy"] <= 1 and b["reverse_kl"] == b["reverse_kl"]
    # OPD pays for sampling and grading; SFT for the teacher writing its data: both are charged
    assert res["curves"]["opd"]["0"][-1]["teacher_flops"] > 0 and res["curves"]["sft"]["0"][-1]["teacher_flops"] > 0
    row = res["per_seed"]["0"]
    assert isinstance(row["sft_reached"], bool) and isinstance(row["opd_reached"], bool)
    assert "ratio SFT/OPD, student FLOPs" in proc.stdout


@pytest.mark.slow  # ~100 s: four arms of 20 steps on the CI config (plus the CI teacher and warmup if not cached)
def test_opd_vs_rl_quick(tmp_path, opd_home):
    """Every arm runs the product's round from one warmup checkpoint and the JSON has the pre-registered
    shape; OPD lowers the reverse KL, RL's reward is a real share, and rl_distilled is graded by the
    rl arm's (student-sized) checkpoint, not the demo teacher."""
    import math

    out = tmp_path / "ovr.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "opd_vs_rl.py"), "--quick",
                           "--config", str(REPO / "configs" / "ci.yaml"), "--set", f"home={opd_home}",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("steps_ratio_rl_over_opd", "flops_ratio_rl_over_opd", "seeds", "target_accuracy", "curves",
                "lr_search", "protocol_commit", "verdict", "threshold"):
        assert key in res, key
    assert res["protocol_commit"] == "f59a3c1" and res["threshold"]["value"] == 5 and res["seeds"] == [0]
    assert res["verdict"].startswith(("confirmed", "refuted", "undetermined")), res["verdict"]
    assert (tmp_path / "ovr.png").stat().st_size > 10_000
    assert "steps RL/OPD to (a)" in (tmp_path / "ovr.txt").read_text()
    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
    assert set(res["curves"]) == {"opd", "rl", "opd_rl", "rl_distilled"}
    curves = {arm: by_seed["0"] for arm, by_seed in res["curves"].items()}
    for arm, curve in curves.items():
        assert [p["step"] for p in curve] == [0, 10, 20], arm  # the branch point + --quick's 2 eval points
        assert curve[0] == res["start"], arm  # one shared starting checkpoint
        assert res["lr_search"][arm]["grid"] == [1e-4] and res["lr_search"][arm]["chosen"] == 1e-4
        for p in curve:
            assert 0 <= p["accuracy"] <= 1 and 0 <= p["sampled_accuracy"] <= 1 and finite(p["reverse_kl"]), (arm, p)
        for a, b in zip(curve, curve[1:]):
            assert b["student_flops"] > a["student_flops"] and b["teacher_flops"] > a["teacher_flops"], arm
    # the reward is the verifier's share of correct rollouts where an arm has one, and absent where not
    for arm in ("rl", "opd_rl"):
        assert all(finite(p["train_reward_mean"]) and 0 <= p["train_reward_mean"] <= 1 for p in curves[arm][1:])
    assert all(p["train_reward_mean"] is None for p in curves["opd"][1:])
    assert finite(res["target_accuracy"]["a"]) and 0 < res["target_accuracy"]["b"] < 1
    # OPD moves the student toward the teacher: the held-out reverse KL falls
    assert curves["opd"][-1]["reverse_kl"] < curves["opd"][0]["reverse_kl"]
    # teacher FLOPs / student train FLOPs = N_teacher / (3 N_student) on the same tokens: the demo
    # teacher grades opd and (as counted: opd_round grades at kl_coef 0 too) rl; the rl checkpoint grades rl_distilled
    n_t, n_s = res["teacher"]["params"], res["student"]["params"]
    for arm, graders in (("opd", n_t), ("rl", n_t), ("rl_distilled", n_s)):
        p = curves[arm][-1]
        assert p["teacher_flops"] / p["student_train_flops"] == pytest.approx(graders / (3 * n_s)), arm


def test_reversal_task():
    """Task B of benchmarks/forgetting.py: the completion fits the demo's max_tokens, the check is exact, and
    the train stream never yields an eval prompt."""
    from benchmarks.forgetting import reversal_correct, reversal_digits, reversal_problems

    assert reversal_digits(16) == (4, 7) and reversal_digits(12) == (2, 5)
    ev = reversal_problems(200, 1, 4, 7)
    assert len({p for p, _ in ev}) == 200
    for p, c in ev:
        digits = p[:-1]
        assert p.endswith("=") and digits.isdigit() and 4 <= len(digits) <= 7
        assert c == digits[::-1] + "#" + digits[::-1] and len(c) + 1 <= 16
        assert reversal_correct(c, c) and not reversal_correct(c + "1", c) and not reversal_correct(c[:-1], c)
    train = reversal_problems(5000, 2, 4, 7, exclude=frozenset(p for p, _ in ev), distinct=False)
    assert not {p for p, _ in train} & {p for p, _ in ev}


@pytest.mark.slow  # ~3-5 min: mid-training and the three arms (1 LR, 1 seed) on the shipped demo teacher
def test_forgetting_quick(tmp_path, opd_home):
    """Mid-training on task B really drops task A (or the JSON says it did not), every arm runs from the right
    checkpoint with the pre-registered shape, the sft arm is FLOP-matched to opd with T0's generation counted,
    and the headline numbers follow from the curves."""
    import math

    out = tmp_path / "fg.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "forgetting.py"), "--quick",
                           "--set", f"home={opd_home}", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("recovered_fraction", "b_drop_points", "opd_steps", "seeds", "curves", "lr_search", "mid_training",
                "verdict", "threshold", "protocol_commit", "t0", "by_metric"):
        assert key in res, key
    assert res["protocol_commit"] == "d68be9d" and res["seeds"] == [0] and res["quick"] is True
    assert res["threshold"]["recovered_fraction"] == 0.9 and res["threshold"]["b_drop_points"] == 5
    assert res["verdict"].startswith(("confirmed", "refuted", "undetermined")), res["verdict"]
    assert (tmp_path / "fg.png").stat().st_size > 10_000
    assert "pre-registered threshold" in (tmp_path / "fg.txt").read_text()
    assert set(res["curves"]) == {"opd", "sft", "replay"}
    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
    t0, mid = res["t0"], res["mid_training"]["per_seed"]["0"]
    m = mid["curve"][-1]
    assert t0["a_accuracy"] > 0.9 and t0["b_accuracy"] == 0  # good at A, never saw B
    # mid-training stops at the first check 20 points below T0 on A (greedy), else at the cap, and says which
    assert mid["dropped"] == (m["a_accuracy"] <= t0["a_accuracy"] - 0.2 + 1e-9)
    assert mid["dropped"] or res["verdict"].startswith("undetermined")
    assert mid["steps"] == m["optimizer_steps"] == m["step"] and mid["steps"] in (10, 20, 30, 40, 50)
    assert all(p["a_accuracy"] > t0["a_accuracy"] - 0.2 for p in mid["curve"][1:-1])  # no earlier check dropped
    curves = {arm: by_seed["0"] for arm, by_seed in res["curves"].items()}
    for arm, curve in curves.items():
        for p in curve:
            for k in ("a_accuracy", "a_sampled_accuracy", "b_accuracy", "b_sampled_accuracy"):
                assert finite(p[k]) and 0 <= p[k] <= 1, (arm, k, p[k])
            assert finite(p["a_reverse_kl"]) and finite(p["total_flops"]) and finite(p["flops_since_t0"])
        for a, b in zip(curve, curve[1:]):  # compute only grows; every point was evaluated
            assert b["student_train_flops"] > a["student_train_flops"] and b["flops_since_t0"] > a["flops_since_t0"]
        assert res["lr_search"][arm]["grid"] == [3e-4] and res["lr_search"][arm]["chosen"] == 3e-4
    for arm in ("opd", "sft"):  # both recover from M, on the same eval points
        c = curves[arm]
        assert [p["step"] for p in c] == [0, 10, 20], arm
        assert (c[0]["a_accuracy"], c[0]["b_accuracy"]) == (m["a_accuracy"], m["b_accuracy"]), arm
        assert c[0]["total_flops"] == 0 and c[0]["flops_since_t0"] == m["total_flops"] > 0, arm
    assert [p["step"] for p in curves["replay"]] == [0, round(mid["steps"] / 2), mid["steps"]]
    assert curves["replay"][0]["a_accuracy"] == t0["a_accuracy"]  # replay starts from T0
    # FLOP-matched: sft spends opd's FLOPs at every point, plus less than one of its steps; T0's generation is
    # counted (teacher FLOPs), and sft samples nothing from the student; opd pays sampling and grading
    for po, ps in zip(curves["opd"][1:], curves["sft"][1:]):
        assert ps["flops_budget"] == po["total_flops"] <= ps["total_flops"]
        assert ps["total_flops"] - po["total_flops"] < 1.5 * ps["total_flops"] / ps["optimizer_steps"]  # < 1 step
        assert ps["teacher_flops"] > 0 and ps["sample_flops"] == 0 and po["sample_flops"] > 0
    # OPD with T0 as teacher moves the student toward T0 on A
    opd = curves["opd"]
    assert opd[-1]["a_reverse_kl"] < opd[0]["a_reverse_kl"]
    # the headline numbers are the curves' (T=1, end of budget)
    if mid["dropped"]:
        want = (opd[-1]["a_sampled_accuracy"] - m["a_sampled_accuracy"]) / (t0["a_sampled_accuracy"]
                                                                            - m["a_sampled_accuracy"])
        assert res["recovered_fraction"] == pytest.approx(want)
    assert res["b_drop_points"] == pytest.approx(100 * (m["b_sampled_accuracy"] - opd[-1]["b_sampled_accuracy"]))
    assert set(res["opd_steps"]["per_seed"]) == {"0"} and res["opd_steps"]["per_seed"]["0"] in (None, 10, 20)
