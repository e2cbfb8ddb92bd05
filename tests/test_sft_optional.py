"""``sft: null``: OPD starts from student.path as it is (the reference report's setting)."""
from __future__ import annotations

import uuid

import pytest

from opd.config import load_config
from opd.errors import PermanentError


def test_sft_null_needs_a_trained_student(tmp_path):
    with pytest.raises(PermanentError, match="sft: null starts OPD from a trained student: set student.path"):
        load_config("configs/ci.yaml", [f"home={tmp_path}", "sft=null"])


def test_sft_null_starts_opd_from_the_given_student_and_writes_nothing_for_it(opd_home, tmp_path):
    from opd.data.prepare import prepare_data, validate_data
    from opd.engines import Engines
    from opd.models import build_char_tokenizer, build_llama, count_params, save_model
    from opd.records import RunLayout
    from opd.rounds import opd_round
    from opd.warmup import bootstrap_teacher, sft_warmup

    base = load_config("configs/ci.yaml", [f"home={opd_home}"])
    student_dir = save_model(build_llama(base.student.model, build_char_tokenizer(), 64, seed=5),
                             build_char_tokenizer(), tmp_path / "pretrained")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in student_dir.iterdir())
    cfg = load_config("configs/ci.yaml", [f"home={opd_home}", "sft=null", f"student.path={student_dir}",
                                          "student.model=null", "opd.sampler=hf", "opd.steps_per_round=2"])
    layout = RunLayout.of(cfg.home, f"nosft-{uuid.uuid4().hex[:6]}")
    _, data = validate_data(cfg, prepare_data(cfg, layout.data))
    teacher = bootstrap_teacher(cfg, data, log=lambda *_: None)
    lines = []
    start = sft_warmup(cfg, data, teacher, layout.sft, log=lines.append)
    assert start.path == str(student_dir) and start.params == count_params(student_dir)
    assert "SFT warmup skipped (sft: null)" in lines[0] and not layout.sft.exists()
    with Engines(cfg) as engines:
        r = opd_round(cfg, 1, data, teacher, start, layout, engines, log=lambda *_: None)
    assert r.metrics["round"] == 1 and r.metrics["reverse_kl"] > 0 and r.student.path != str(student_dir)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in student_dir.iterdir()) == before  # read, never written


def test_sft_reads_precomputed_teacher_completions(opd_home, tmp_path):
    """sft.completions: the (prompt, completion) rows are the SFT data; the teacher writes none, and a bad row
    is refused by its file line."""
    import json

    from opd.data import task
    from opd.data.dataset import DataError
    from opd.data.prepare import prepare_data, validate_data
    from opd.records import RunLayout
    from opd.warmup import bootstrap_teacher, sft_warmup

    base = load_config("configs/ci.yaml", [f"home={opd_home}"])
    rows = [{"prompt": e.prompt, "completion": e.completion}
            for e in task.generate(300, base.data.synthetic.num_terms, base.data.synthetic.max_digits, seed=99)]
    good = tmp_path / "completions.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("configs/ci.yaml", [f"home={opd_home}", f"sft.completions={good}", "sft.num_prompts=200",
                                          "sft.train.steps=30"])
    layout = RunLayout.of(cfg.home, f"presft-{uuid.uuid4().hex[:6]}")
    _, data = validate_data(cfg, prepare_data(cfg, layout.data))
    teacher = bootstrap_teacher(cfg, data, log=lambda *_: None)
    lines = []
    sft = sft_warmup(cfg, data, teacher, layout.sft, log=lines.append)
    assert f"200 completions read from {good}" in lines[-1] and sft.data_cost["teacher_tokens"] == 0, lines
    assert sft.metrics["final_loss"] > 0 and (layout.sft / "model.safetensors").is_file()

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + json.dumps({"prompt": "1+1="}) + "\n")
    cfg = load_config("configs/ci.yaml", [f"home={opd_home}", f"sft.completions={bad}"])
    with pytest.raises(DataError, match=rf"{bad}:4: 'completion' is <missing>"):
        sft_warmup(cfg, data, teacher, tmp_path / "sft-bad", log=lambda *_: None)
    assert not (tmp_path / "sft-bad").exists()
