"""Smoke tests of the benchmarks' --quick modes: they run every side and write sane outputs."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "opd_step.py"

pytest.importorskip("vllm", reason="the benchmark drives the vLLM sampler")
pytest.importorskip("trl", reason="trl (dev extra) is the other side of the comparison")


def test_library_output_keeps_the_terminal_for_the_benchmarks_own_lines(tmp_path):
    """Inside ``library_output`` the benchmark's prints reach the terminal; a library logger, a Python
    warning, a C-level write to fd 1/2 and a child process's output go to the file instead."""
    script = tmp_path / "bench.py"
    script.write_text(f"""
import logging, os, subprocess, sys, types, warnings
sys.path.insert(0, {str(REPO)!r})
from benchmarks.common import library_output
with library_output(types.SimpleNamespace(home={str(tmp_path)!r}), "probe") as path:
    print("result line")
    logging.getLogger("vllm").warning("engine noise")
    warnings.warn("library warning")
    os.write(1, b"fd-level noise\\n")
    os.write(2, b"stderr noise\\n")
    subprocess.run([sys.executable, "-c", "print('worker noise')"], check=True)
    print("after the noise")
print("after the block")
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / "bench" / "probe" / "logs" / "third_party.log"
    assert proc.stdout.splitlines() == [f"library output (vLLM, progress bars, warnings): {log}", "result line",
                                        "after the noise", "after the block"], proc.stdout
    assert proc.stderr == ""
    text = log.read_text()
    for noise in ("engine noise", "library warning", "fd-level noise", "stderr noise", "worker noise"):
        assert noise in text, (noise, text)
    assert "result line" not in text


@pytest.mark.slow  # ~40 s; the benchmarks' smoke runs are in `make test-all`
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


@pytest.mark.slow  # ~80 s
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
    # vLLM's engine and workers, progress bars and warnings went to the file, not the terminal
    assert "WARNING" not in proc.stdout and "Loading safetensors" not in proc.stdout + proc.stderr, proc.stdout[-3000:]
    assert "RotaryEmbedding" in (opd_home / "bench" / "sample_efficiency" / "logs" / "third_party.log").read_text()


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
    assert res["protocol_commit"] == "0a48a4e" and res["seeds"] == [0] and res["quick"] is True
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


def test_loglinear_rule():
    """The pre-registered rule of sample_efficiency.py --regime plateau (commit 6bed30a) on synthetic trajectories:
    a least-squares fit of acc = a + b log10 N on the last 3 points, log-linear at the first k >= 3 whose residuals
    are all <= 1.5 points and whose last doubling gained <= half the first; else C = the last N_k, not log-linear."""
    import math

    from benchmarks.plateau import LOGLINEAR_RULE, loglinear_fit

    assert LOGLINEAR_RULE == {"first_k": 3, "fit_points": 3, "max_residual": 0.015, "gain_ratio": 0.5}
    ns = [76_800 * 2 ** k for k in range(6)]
    fit = lambda accs: loglinear_fit(ns, accs, **LOGLINEAR_RULE)  # noqa: E731

    # steep first doubling, then +4 points per doubling: log-linear from k = 3, fit on k = 1..3, exact
    r = fit([0.40, 0.50, 0.54, 0.58, 0.62, 0.66])
    assert r["loglinear"] and r["k"] == 3 and r["n"] == ns[3] and r["window_k"] == [1, 2, 3]
    assert r["b"] == pytest.approx(0.04 / math.log10(2)) and r["a"] == pytest.approx(0.50 - r["b"] * math.log10(ns[1]))
    assert max(abs(x) for x in r["residuals"]) < 1e-12
    assert [p["accuracy"] for p in r["points"]] == [0.40, 0.50, 0.54, 0.58, 0.62, 0.66]

    # a steep (accelerating) curve is not log-linear: C falls back to N_5 and the fit is on k = 3..5
    r = fit([0.30, 0.34, 0.42, 0.58, 0.80, 0.95])
    assert not r["loglinear"] and r["k"] == 5 and r["window_k"] == [3, 4, 5]
    assert all(not c["residual_ok"] and not c["gain_ok"] for c in r["checks"])

    # log-linear from the very start (no flattening: each doubling gains as much as the first): the half-slope
    # condition fails although every residual is 0
    r = fit([0.40, 0.45, 0.50, 0.55, 0.60, 0.65])
    assert not r["loglinear"] and all(c["residual_ok"] and not c["gain_ok"] for c in r["checks"])

    # the residual condition alone decides: gains are small from k = 3 on, but the points bend until k = 5
    r = fit([0.30, 0.50, 0.52, 0.60, 0.61, 0.62])
    assert [(c["k"], c["residual_ok"], c["gain_ok"]) for c in r["checks"]] == [(3, False, True), (4, False, True),
                                                                              (5, True, True)]
    assert r["loglinear"] and r["k"] == 5

    # the residual bound is inclusive: 3 equally spaced points bending by d have residuals (d/6, -d/3, d/6)
    r = fit([0.30, 0.50, 0.50, 0.545, 0.55, 0.56])
    assert r["loglinear"] and r["k"] == 3 and max(abs(x) for x in r["residuals"]) == pytest.approx(0.015)
    assert not fit([0.30, 0.50, 0.50, 0.546, 0.62, 0.70])["checks"][0]["residual_ok"]
    # and so is the gain bound: the last doubling may gain exactly half the first
    assert fit([0.40, 0.50, 0.55, 0.60, 0.65, 0.70])["checks"][0]["gain_ok"]

    with pytest.raises(ValueError):
        loglinear_fit(ns[:3], [0.1, 0.2, 0.3], **LOGLINEAR_RULE)  # no k >= 3 to test


def test_plateau_ratios_and_verdict():
    """FLOPs to target per seed (first eval point at or above it on T=1 accuracy), SFT/OPD in both accountings,
    null where OPD misses, a lower bound where SFT misses, and the verdict against 9."""
    from benchmarks.plateau import plateau_compare

    def curve(accs, student, total):
        return [{"step": i, "examples": i * 64, "accuracy": a, "sampled_accuracy": a, "reverse_kl": 0.5,
                 "student_flops": student * i, "total_flops": total * i, "wall_s": float(i)}
                for i, a in enumerate(accs)]

    target = 0.55
    curves = {"sft_continue": {"0": curve([0.5, 0.52, 0.54, 0.56], 10.0, 40.0),
                               "1": curve([0.5, 0.56, 0.57, 0.58], 10.0, 40.0)},
              "opd": {"0": curve([0.5, 0.6, 0.6], 1.0, 3.0), "1": curve([0.5, 0.54, 0.55], 2.0, 4.0)}}
    r = plateau_compare(curves, ["0", "1"], target, loglinear=True)
    s0, s1 = r["per_seed"]["0"], r["per_seed"]["1"]
    assert (s0["ratio_student"], s0["ratio_with_generation"]) == (30.0 / 1.0, 120.0 / 3.0)
    assert (s1["ratio_student"], s1["ratio_with_generation"]) == (10.0 / 4.0, 40.0 / 8.0)
    assert r["ratio_sft_over_opd"] == pytest.approx((30 + 2.5) / 2) and r["verdict"] == "confirmed"
    assert r["ratio_with_generation"] == pytest.approx((40 + 5) / 2) and not r["ratio_is_lower_bound"]
    assert plateau_compare(curves, ["1"], target, loglinear=True)["verdict"] == "refuted"  # 2.5 < 9
    assert plateau_compare(curves, ["0"], target, loglinear=False)["verdict"] == "inconclusive"

    # SFT misses in seed 0: its whole budget stands in and the ratio is a lower bound
    curves["sft_continue"]["0"] = curve([0.5, 0.52, 0.53, 0.54], 10.0, 40.0)
    r = plateau_compare(curves, ["0"], target, loglinear=True)
    assert not r["per_seed"]["0"]["sft_continue"]["reached"] and r["ratio_is_lower_bound"]
    assert r["ratio_sft_over_opd"] == 30.0 and r["sft_missed_target"] == ["0"]

    # OPD misses in one seed: that seed's ratios and the means are null, the verdict is refuted
    curves["opd"]["1"] = curve([0.5, 0.51, 0.52], 2.0, 4.0)
    r = plateau_compare(curves, ["0", "1"], target, loglinear=True)
    assert r["per_seed"]["1"]["ratio_student"] is None and r["ratio_sft_over_opd"] is None
    assert r["ratio_with_generation"] is None and r["verdict"] == "refuted" and r["opd_missed_target"] == ["1"]


def test_plateau_result_is_its_record():
    """The committed plateau result is what benchmarks/plateau_record.py computes from the recorded numbers: the
    rule's fit (residuals 4.1, 5.4 and 5.6 points, as the run's README reported), C = N_5, the 0.990 target, the
    verdict, and the deviations that say it comes from the record; a hand edit of either file fails here."""
    from benchmarks.plateau import PLATEAU_OUT
    from benchmarks.plateau_record import build

    res, committed = build(), json.loads(PLATEAU_OUT.read_text())
    assert committed["source"] == res["source"] == "record" and committed["record"] == json.loads(
        json.dumps(res["record"]))
    for key in ("verdict", "ratio_sft_over_opd", "ratio_with_generation", "loglinear", "target_accuracy",
                "per_seed", "deviations", "end"):
        assert committed[key] == json.loads(json.dumps(res[key])), key
    fit = res["loglinear_fit"]
    assert [round(100 * ch["max_abs_residual"], 1) for ch in fit["checks"]] == [4.1, 5.4, 5.6]
    assert (fit["loglinear"], fit["k"], res["verdict"]) == (False, 5, "inconclusive")
    assert res["target_accuracy"] == pytest.approx(0.990) and res["ratio_sft_over_opd"] is None
    assert res["record"]["opd"]["best_point"] < res["target_accuracy"]
    assert {s: row["sft_continue"]["steps_run"] for s, row in res["per_seed"].items()} == {
        "0": 115_200, "1": 110_400, "2": 91_200}


@pytest.mark.slow  # 1-4 min: three processes, one CI teacher + warmup; in `make test-all` with the benchmarks
def test_warm_start_shared_by_parallel_invocations(opd_home):
    """Benchmark processes started together (one per arm, as the plateau's --arms invites) build the shared start
    once and all get it: before the lock, they rebuilt the data in one temp dir at once and all but one crashed
    (FileNotFoundError on data.unvalidated.tmp)."""
    code = ("import sys, json; from benchmarks.common import warm_start; from opd.config import load_config; "
            f"cfg = load_config({str(REPO / 'configs' / 'ci.yaml')!r}, ['home={opd_home}']); "
            "bench, data, teacher, warm = warm_start(cfg, log=lambda m: None); "
            "print(json.dumps([str(bench), data.fingerprint, teacher.path, warm.path]))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert got[0] == got[1] == got[2] and Path(got[0][3]).is_dir()


def test_plateau_arms_split():
    """--arms runs a subset of the plateau's runs (one LR grid alone is then fine); it is a plateau option, and a
    full invocation still needs grids of equal length (the protocol's fairness rule)."""
    from benchmarks.sample_efficiency import parse_args

    a = parse_args(["--regime", "plateau", "--arms", "sft_continue", "--sft-lrs", "3e-4", "--seeds", "0"])
    assert (a.arms, a.sft_lrs, a.opd_lrs, a.seeds) == (["sft_continue"], [3e-4], [1e-5, 3e-5, 1e-4], [0])
    with pytest.raises(SystemExit):
        parse_args(["--regime", "plateau", "--sft-lrs", "3e-4"])
    with pytest.raises(SystemExit):
        parse_args(["--arms", "opd"])  # steep has no arms to split


def test_fresh_data_blocks_made_once(tmp_path):
    """The plateau's SFT data blocks are kept and shared: two readers of one stream (two LRs of a seed, in threads
    here as in two processes) make each block once under the lock and get the same rows; another seed is another
    stream."""
    import threading
    import types

    from benchmarks.plateau import BLOCK_STEPS, FreshData

    made: list[tuple[str, int, int]] = []

    class Counted(FreshData):
        def _make(self, block):
            made.append((self.stream, self.seed, block))
            time.sleep(0.2)  # long enough for the other reader to wait on the lock
            return [([self.seed, block, i], [i % 7, 2]) for i in range(BLOCK_STEPS * self.b.batch)]

    b = types.SimpleNamespace(root=tmp_path, batch=4)
    got: dict[int, list] = {}

    def read(i):
        d = Counted(b, "sft_continue", 0)
        got[i] = [d.batch(step) for step in (0, 1, BLOCK_STEPS)]

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(made) == [("sft_continue", 0, 0), ("sft_continue", 0, 1)]
    assert got[0] == got[1]
    rows, tokens = got[0][1]
    assert rows == [([0, 0, i], [i % 7, 2]) for i in range(4, 8)] and tokens == 4 * 5
    assert Counted(b, "sft_continue", 1).batch(0)[0][0] == ([1, 0, 0], [0, 2]) and len(made) == 3


@pytest.mark.slow  # a few minutes: a 32-step CI warmup, a trajectory to k = 3, both arms from C (1 LR, 1 seed)
def test_sample_efficiency_plateau_quick(tmp_path, opd_home):
    """--regime plateau --quick on the CI config: the trajectory has its N_k points, the log-linear fit and C come
    from them, both arms run from C, and the ratios, their null/bound flags and the verdict follow from the curves."""
    import math

    from benchmarks.common import first_reach
    from benchmarks.plateau import LOGLINEAR_RULE, loglinear_fit

    out = tmp_path / "plateau.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sample_efficiency.py"), "--regime", "plateau",
                           "--quick", "--config", str(REPO / "configs" / "ci.yaml"), "--set", f"home={opd_home}",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("ratio_sft_over_opd", "ratio_with_generation", "regime", "loglinear", "loglinear_fit", "trajectory",
                "lr_search", "curves", "protocol_commit", "verdict", "threshold", "target_accuracy", "per_seed",
                "branch_point", "deviations"):
        assert key in res, key
    assert res["regime"] == "plateau" and res["protocol_commit"] == "6bed30a" and res["quick"] is True
    assert res["threshold"]["value"] == 9 and res["seeds"] == [0]
    assert res["verdict"] in ("confirmed", "refuted", "inconclusive")
    assert (tmp_path / "plateau.png").stat().st_size > 10_000
    assert "pre-registered threshold" in (tmp_path / "plateau.txt").read_text()
    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731

    # the trajectory: N_k = N_0 x 2^k for k = 0..3 (N_0 = the 32-step CI warmup x 64), every example trained once
    traj = res["trajectory"]
    pts, n0 = traj["points"], traj["n0"]
    assert n0 == 32 * 64 and not traj["n0_matches_protocol"]
    assert [p["k"] for p in pts] == [0, 1, 2, 3]
    assert [p["n_examples"] for p in pts] == [n0 * 2 ** k for k in range(4)]
    assert [p["steps"] for p in pts] == [(n0 * 2 ** k - n0) // 64 for k in range(4)]
    for p in pts:
        assert 0 <= p["accuracy"] <= 1 and 0 <= p["sampled_accuracy"] <= 1 and finite(p["reverse_kl"])
    for a, b in zip(pts, pts[1:]):  # SFT on fresh teacher data: student training and teacher generation grow
        assert b["student_train_flops"] > a["student_train_flops"] and b["teacher_flops"] > a["teacher_flops"]
        assert b["sample_flops"] == 0

    # the fit is the rule applied to those points; C and the target follow from it
    fit = res["loglinear_fit"]
    again = loglinear_fit([p["n_examples"] for p in pts], [p["sampled_accuracy"] for p in pts], **LOGLINEAR_RULE)
    assert [q["accuracy"] for q in fit["points"]] == [p["sampled_accuracy"] for p in pts]
    for key in ("loglinear", "k", "a", "b", "window_k", "residuals"):
        assert fit[key] == pytest.approx(again[key]), key
    for k, r in zip(fit["window_k"], fit["residuals"]):
        assert r == pytest.approx(pts[k]["sampled_accuracy"] - fit["a"] - fit["b"] * math.log10(pts[k]["n_examples"]))
    assert res["loglinear"] == fit["loglinear"] and fit["k"] == 3 and fit["window_k"] == [1, 2, 3]  # k <= 3 here
    c = res["branch_point"]
    assert c["k"] == fit["k"] and c["sampled_accuracy"] == pts[fit["k"]]["sampled_accuracy"]
    assert res["target_accuracy"] == pytest.approx(c["sampled_accuracy"] + 0.05)

    # both arms start from C's eval; SFT-continue: one more doubling, an eval point every N_C / 4; OPD: 2 rounds of 10
    curves = {arm: by_seed["0"] for arm, by_seed in res["curves"].items()}
    assert set(curves) == {"sft_continue", "opd"}
    n_c = c["n_examples"]
    assert [p["examples"] for p in curves["sft_continue"]] == [n_c * j // 4 for j in range(5)]
    assert [p["step"] for p in curves["opd"]] == [0, 10, 20]
    for arm, curve in curves.items():
        assert curve[0]["sampled_accuracy"] == c["sampled_accuracy"] and curve[0]["total_flops"] == 0, arm
        for a, b in zip(curve, curve[1:]):
            assert b["student_flops"] > a["student_flops"] and b["teacher_flops"] > a["teacher_flops"], arm
            assert 0 <= b["sampled_accuracy"] <= 1 and finite(b["reverse_kl"]), arm
        assert len(res["lr_search"][arm]["grid"]) == 1
    sft_end, opd_end = curves["sft_continue"][-1], curves["opd"][-1]
    assert sft_end["sample_flops"] == 0 and opd_end["sample_flops"] > 0
    # the teacher generates exactly the tokens SFT trains on: teacher / student-train FLOPs = N_teacher / (3 N_student)
    n_t, n_s = res["teacher"]["params"], res["student"]["params"]
    assert sft_end["teacher_flops"] / sft_end["student_train_flops"] == pytest.approx(n_t / (3 * n_s))

    # FLOPs to target and the ratios, as the curves say
    row, target = res["per_seed"]["0"], res["target_accuracy"]
    got = {arm: first_reach(curve, target, "sampled_accuracy") for arm, curve in curves.items()}
    for arm, (p, ok) in got.items():
        assert row[arm]["reached"] == ok and row[arm]["student_flops"] == p["student_flops"], arm
    if got["opd"][1]:
        want = got["sft_continue"][0]["student_flops"] / got["opd"][0]["student_flops"]
        assert finite(res["ratio_sft_over_opd"]) and res["ratio_sft_over_opd"] == pytest.approx(want)
        assert res["ratio_with_generation"] == pytest.approx(
            got["sft_continue"][0]["total_flops"] / got["opd"][0]["total_flops"])
        assert res["ratio_is_lower_bound"] == (not got["sft_continue"][1])
    else:
        assert res["ratio_sft_over_opd"] is None and res["ratio_with_generation"] is None
    ratio = res["ratio_sft_over_opd"]
    want_verdict = ("inconclusive" if not res["loglinear"] else
                    "confirmed" if ratio is not None and ratio >= 9 else "refuted")
    assert res["verdict"] == want_verdict


def test_walk_task_checker_and_splits():
    """recoverable.py's task: the checker accepts a walk that errs and comes back, refuses a jump, an early pass
    through the goal, a walk off the line or one that never ends; the oracle is the shortest walk; eval and train
    pairs are disjoint, 1,024 eval pairs, every distance 1..12; a detour never reaches the goal."""
    import random

    from benchmarks.recoverable import check_walk, detour, oracle_walk, split_pairs

    assert oracle_walk(7, 10) == "08;09;10#" and oracle_walk(10, 7) == "09;08;07#"
    assert check_walk("07+10=", "08;09;10#") == (True, 0)
    assert check_walk("07+10=", "06;07;08;09;10#") == (True, 1)  # a wrong move, undone
    assert check_walk("07+10=", "08;09;10#junk") == (True, 0)  # after the first # is ignored
    assert check_walk("07+10=", "08;10#")[0] is False  # a jump
    assert check_walk("07+10=", "08;09;10;11;10#")[0] is False  # the goal before the end
    assert check_walk("07+10=", "08;09;10")[0] is False  # no end
    assert check_walk("00+02=", "99;00;01;02#")[0] is False and check_walk("00+02=", "#")[0] is False
    assert check_walk("07+10=", "8;9;10#")[0] is False  # one-digit positions
    train, ev = split_pairs()
    assert len(ev) == 1024 and not set(train) & set(ev) and len(train) + len(ev) == len(set(train) | set(ev))
    assert {abs(g - s) for s, g in train + ev} == set(range(1, 13))
    rng = random.Random(0)
    for s, g in ev[:200]:
        text, pos = detour(rng, s, g, 3)
        assert f"{g:02d}" not in text.split(";") and check_walk(f"{s:02d}+{g:02d}=", text + oracle_walk(pos, g))[0]


@pytest.mark.slow  # ~2-4 min: a 200-step teacher, a 100-step warmup, 10 OPD steps (a vLLM engine), the sft arm
def test_recoverable_quick(tmp_path, opd_home):
    out = tmp_path / "recoverable.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "recoverable.py"), "--quick", "--set",
                           f"home={opd_home}", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["protocol_commit"] == "2c52277" and res["quick"] and list(res["sizes"]) == ["S"]
    s = res["sizes"]["S"]
    opd, sft = s["curves"]["opd"]["0"], s["curves"]["sft"]["0"]
    assert [p["step"] for p in opd] == [p["step"] for p in sft] == [0, 5, 10]
    for o, f in zip(opd[1:], sft[1:]):  # FLOP-matched: SFT stops at the first step at or past OPD's student FLOPs
        assert f["student_flops"] >= o["student_flops"] > 0
    assert res["verdict"] in ("confirmed", "refuted") and (tmp_path / "recoverable.png").stat().st_size > 10_000
