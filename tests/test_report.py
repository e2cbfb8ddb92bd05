"""Run reports (opd_ops.report and `opd report`): from a hand-written lineage, from a run directory in the
format the stages write (opd.records), and from a registry manifest; the plots must be real pictures."""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, opd_bin
from opd.records import DONE, RoundMetrics, RunLayout
from opd_ops import report as R

STUDENT_PARAMS, TEACHER_PARAMS = 1_234_567, 9_876_543


def _round_metrics(k: int) -> dict:
    """A round's record (opd.records.RoundMetrics): KL falls, accuracy rises, sampling dominates."""
    return RoundMetrics(
        round=k, reverse_kl=0.42 / k, loss=0.3 / k, ratio_max=1.2, sampler_trainer_absdiff_max=0.01, grad_norm=1.5 / k,
        student_entropy=0.8 - 0.1 * k, mean_completion_tokens=6.5, eos_fraction=0.97, eval_slice_accuracy=0.55 + 0.1 * k,
        sample_tokens_per_s=900.0, score_tokens_per_s=3000.0, update_tokens_per_s=1500.0, update_processes=1,
        sample_s=4.0 + k, score_s=1.3, update_s=2.6, sync_s=0.4 * k).as_dict()


def _cost(phase: str, wall_s: float, train_tok: int = 0, sample_tok: int = 0, teacher_tok: int = 0) -> dict:
    """Shaped like opd.ledger.PhaseCost.as_dict()."""
    return {"phase": phase, "wall_s": wall_s, "student_train_tokens": train_tok,
            "student_train_flops": 6.0 * STUDENT_PARAMS * train_tok, "sample_tokens": sample_tok,
            "sample_flops": 2.0 * STUDENT_PARAMS * sample_tok, "teacher_tokens": teacher_tok,
            "teacher_flops": 2.0 * TEACHER_PARAMS * teacher_tok}


ROUND_COSTS = [_cost(f"opd_round_{k}", 4.0 + k + 1.3 + 2.6 + 0.4 * k, 30_000, 8_000, 30_000) for k in (1, 2, 3)]
SFT_COST = _cost("sft", 41.5, 120_000, 0, 20_000)
TEACHER_COST = _cost("teacher_bootstrap", 310.0, 900_000)
GATES = {"passed": True, "checks": [
    {"name": "min_accuracy", "passed": True, "detail": "accuracy 0.840 (need >= 0.5)"},
    {"name": "opd_beats_sft_kl", "passed": True, "detail": "reverse KL OPD 0.1400 vs SFT 0.4100"},
    {"name": "no_regression", "passed": False, "detail": "accuracy 0.840 vs candidate 0.900 (need >= 0.880)"}]}
METRICS = {"teacher": {"accuracy": 0.97, "reverse_kl": 0.0, "n": 200},
           "sft_student": {"accuracy": 0.61, "reverse_kl": 0.41, "n": 200},
           "opd_student": {"accuracy": 0.84, "reverse_kl": 0.14, "n": 200}}


def _lineage() -> dict:
    return {"run_key": "ci-20250101-120000-abcdef12", "flow_run_id": "abcdef12-0000-0000-0000-000000000000",
            "teacher": "/x/teacher", "teacher_params": TEACHER_PARAMS, "student_params": STUDENT_PARAMS,
            "dataset_fingerprint": "f00d", "metrics": METRICS, "gates": GATES,
            "rounds": [_round_metrics(k) for k in (1, 2, 3)], "cost": [TEACHER_COST, SFT_COST, *ROUND_COSTS]}


def _write_run_dir(home: Path, run_key: str) -> Path:
    """A run directory as the stages leave it (opd.records.RunLayout): sft/ and round_NNN/ with done.json,
    plus leftovers of a round in progress (.tmp, .sync) that the report must ignore."""
    run = RunLayout.of(home, run_key)
    rd = run.root
    run.sft.mkdir(parents=True)
    (run.sft / DONE).write_text(json.dumps(
        {"params": STUDENT_PARAMS, "metrics": {"final_loss": 0.21, "eval_slice_accuracy": 0.6}, "cost": SFT_COST}))
    for k in (1, 2, 3):
        d = run.round(k)
        d.mkdir()
        (d / DONE).write_text(json.dumps(
            {"params": STUDENT_PARAMS, "metrics": _round_metrics(k), "cost": ROUND_COSTS[k - 1],
             "completed_at": 1.7e9 + k, "pid": 4242, "rng": {"seed": 0, "scheme": "(seed*1000+round)*1000+step"}}))
    run.round(4).with_name("round_004.tmp").mkdir()  # crashed mid-publish: no done.json in a final dir
    run.round_sync(4).mkdir()
    (rd / "data").mkdir()
    return rd


def _check_png(data: bytes) -> None:
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    assert img.width > 100 and img.height > 100
    lo, hi = img.convert("L").getextrema()
    assert hi - lo > 50, "a blank (single-colour) image"
    assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 10


def _embedded_pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


def _check_report(rep: R.Report, lineage: dict) -> str:
    assert set(rep.plots) == {"metrics", "timings"}
    for p in rep.plots.values():
        assert p.is_file() and p.stat().st_size > 0
        _check_png(p.read_bytes())
    md = rep.markdown.read_text()
    for c in lineage["cost"]:
        assert c["phase"] in md
    for g in lineage.get("gates", {}).get("checks", []):
        assert g["name"] in md
    assert "metrics.png" in md and "timings.png" in md
    page = rep.html.read_text()
    imgs = _embedded_pngs(page)
    assert len(imgs) == 2 and page.count("<img") == 2
    for data in imgs:
        _check_png(data)
    assert "<table>" in page and "|---|" not in page
    return md


def test_report_from_lineage(tmp_path):
    lin = _lineage()
    rep = R.build_report(lin, tmp_path / "out")
    md = _check_report(rep, lin)
    # stages with durations, evaluation, FLOPs ratio
    assert "| teacher_bootstrap | 5m 10s |" in md and "| sft | 41.5 s |" in md
    for label in ("teacher", "student after SFT", "student after OPD"):
        assert f"| {label} |" in md
    ratio = sum(c["student_train_flops"] + c["sample_flops"] for c in ROUND_COSTS) / SFT_COST["student_train_flops"]
    assert R.flops_ratio(lin["cost"]) == pytest.approx(ratio)
    assert f"OPD student FLOPs vs SFT student FLOPs: **{ratio:.2f}x**" in md
    assert "| no_regression | FAIL |" in md
    page = rep.html.read_text()
    assert "class='fail'>FAIL" in page and "class='pass'>PASS" in page
    assert json.loads(rep.lineage.read_text())["run_key"] == lin["run_key"]
    # the artifact flavour: one markdown string, small plots inlined as data URIs
    art = R.artifact_markdown(lin)
    pngs = _embedded_pngs(art)
    assert len(pngs) == 2 and art.count("](data:image/png;base64,") == 2
    for data in pngs:
        _check_png(data)
    assert len(art) < 200_000


def test_report_degrades_without_rounds_or_evaluation(tmp_path):
    lin = {"run_key": "half", "cost": [TEACHER_COST], "rounds": [], "metrics": {}, "gates": {}}
    rep = R.build_report(lin, tmp_path / "out")
    assert rep.plots == {} and "<img" not in rep.html.read_text()
    md = rep.markdown.read_text()
    assert "teacher_bootstrap" in md and "No completed OPD round" in md and "No gate results" in md
    # eval-slice accuracy never measured (a data set without answers): the plot still renders
    rounds = [{**_round_metrics(k), "eval_slice_accuracy": None} for k in (1, 2)]
    _check_png(R.plot_metrics({"rounds": rounds}))


def test_lineage_from_run_dir(tmp_path):
    rd = _write_run_dir(tmp_path / "home", "ci-run-1")
    lin = R.lineage_from_run_dir(rd)
    assert lin["run_key"] == "ci-run-1"
    assert [r["round"] for r in lin["rounds"]] == [1, 2, 3]
    assert [c["phase"] for c in lin["cost"]] == ["sft", "opd_round_1", "opd_round_2", "opd_round_3"]
    assert lin["sft"]["eval_slice_accuracy"] == 0.6 and lin["metrics"] == {} and "registered" not in lin
    rep = R.build_report(lin, RunLayout(rd).report)
    _check_report(rep, lin)
    assert "No held-out evaluation recorded" in rep.markdown.read_text()
    # once the flow has written its report (with evaluation and gates), the run dir yields them too
    (rd / "registered.json").write_text(json.dumps({"model": "m", "version": 3, "uri": "s3://b/p/m/versions/3/"}))
    R.build_report({**_lineage(), "run_key": "ci-run-1"}, RunLayout(rd).report)
    again = R.lineage_from_run_dir(rd)
    assert again["metrics"] == METRICS and again["gates"] == GATES and again["registered"]["version"] == 3
    assert "teacher_bootstrap" in [c["phase"] for c in again["cost"]]
    with pytest.raises(FileNotFoundError):
        R.lineage_from_run_dir(tmp_path / "home" / "runs" / "nope")


def test_lineage_from_registry(s3, tmp_path):
    """Against the real local S3: publish a version with this lineage, resolve it by alias."""
    import uuid

    from opd_ops.registry.aliases import promote
    from opd_ops.registry.store import publish

    bucket = f"opd-report-{uuid.uuid4().hex[:8]}"
    src = tmp_path / "model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"w" * 64)
    pub = publish(s3, bucket, "models", "addition-student", src, _lineage())
    promote(s3, bucket, "models", "addition-student", pub.version, "candidate", reason="test")
    lin = R.lineage_from_registry(s3, bucket, "models", "addition-student@candidate")
    assert "files" not in lin and lin["registered"]["version"] == pub.version
    assert lin["registered"]["uri"] == f"s3://{bucket}/models/addition-student/versions/{pub.version}/"
    md = _check_report(R.build_report(lin, tmp_path / "out"), lin)
    assert f"addition-student:{pub.version}" in md


def test_cli_report_on_a_run_dir(tmp_path):
    home = tmp_path / "home"
    _write_run_dir(home, "ci-run-2")
    out = tmp_path / "rep"
    proc = subprocess.run([opd_bin(), "report", "ci-run-2", "--config", "configs/ci.yaml", "--set", f"home={home}",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("report.html", "report.md", "metrics.png", "timings.png"):
        assert (out / name).is_file()
        assert f"wrote {out / name}" in proc.stdout
    for phrase in ("Stages", "OPD rounds", "Cost ledger", "opd_round_3", "OPD student FLOPs vs SFT student FLOPs"):
        assert phrase in proc.stdout
    assert len(_embedded_pngs((out / "report.html").read_text())) == 2
    # default output dir: <home>/reports/<run key>/
    proc = subprocess.run([opd_bin(), "report", "ci-run-2", "--config", "configs/ci.yaml", "--set", f"home={home}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (home / "reports" / "ci-run-2" / "report.html").is_file()
