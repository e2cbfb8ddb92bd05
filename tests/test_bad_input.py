"""Bad input: a clear error that names the problem, and nothing written or trained.

Each case runs what the flow runs before any training (config validation, preflight,
prepare_data, GX validation) against the real local S3 and asserts the message and that the
run directory holds no data, model or checkpoint afterwards.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd import pipeline as P
from opd import preflight
from opd.config import ConfigError, load_config
from opd.errors import PermanentError
from opd.models import build_char_tokenizer, build_llama, save_model
from opd.config import ModelSpec

BASE = "configs/ci.yaml"


def _rows(n=20, start=0, prefix="r"):
    return [{"id": f"{prefix}{i}", "prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1)} for i in range(start, start + n)]


def _jsonl(path: Path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _pre_training(overrides: list[str], s3, run_dir: Path) -> None:
    """Everything the flow does before training; raises on the first refusal."""
    cfg = load_config(BASE, overrides)
    preflight.run(cfg, s3)
    ref = P.prepare_data(cfg, run_dir / "data", s3)
    report, _ = P.validate_data(cfg, ref)
    if not report.success:
        raise PermanentError(report.message())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A student whose tokenizer differs from the teacher's, and one with head_dim 16."""
    d = tmp_path_factory.mktemp("models")
    tok = build_char_tokenizer()
    teacher = save_model(build_llama(ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=64),
                                     tok, 32, 0), tok, d / "teacher")
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    student_other_vocab = save_model(build_llama(ModelSpec(num_layers=1, hidden_size=64, num_heads=2,
                                                           intermediate_size=64), other, 32, 0), other, d / "s_vocab")
    hd16 = build_llama(ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=64), tok, 32, 0)
    hd16.config.num_attention_heads = 4  # head_dim 16, as a foreign checkpoint would declare it
    hd16.config.num_key_value_heads = 4
    hd16.config.head_dim = 16
    student_hd16 = save_model(hd16, tok, d / "s_hd16")
    return {"teacher": str(teacher), "student_vocab": str(student_other_vocab), "student_hd16": str(student_hd16)}


def _cases(tmp: Path, models: dict) -> list[tuple[str, list[str], str]]:
    good_eval = _jsonl(tmp / "eval.jsonl", _rows(10, 100, "e"))
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"id": "a", "prompt": "1+2="}\n{"id": "b", "prompt": "2+3="}\n{"id": "c", "prompt": \n')
    latin1 = tmp / "latin1.jsonl"
    latin1.write_bytes(b'{"id": "a", "prompt": "1+2="}\n{"id": "b", "prompt": "caf\xe9"}\n')
    src = lambda name, rows: ["data.source=" + _jsonl(tmp / name, rows), "data.eval_source=" + good_eval]  # noqa: E731
    no_prompt = [{"id": f"x{i}", "text": "1+1="} for i in range(5)]
    null_prompt = _rows(5) + [{"id": "nul", "prompt": None}]
    empty_prompt = _rows(5) + [{"id": "emp", "prompt": ""}]
    dup = _rows(5) + [{"id": "r1", "prompt": "9+9=", "answer": "18"}]
    too_long = _rows(5) + [{"id": "long", "prompt": "1" * 40 + "=", "answer": "1"}]
    overlap = _rows(5) + [{"id": "leak", "prompt": "100+101=", "answer": "201"}]
    bad_answer = _rows(5) + [{"id": "ans", "prompt": "7+7=", "answer": "fourteen"}]
    teacher = ["teacher.path=" + models["teacher"]]
    return [
        ("malformed JSONL line", ["data.source=" + str(bad_json), "data.eval_source=" + good_eval],
         "bad.jsonl:3: malformed JSON"),
        ("non-UTF-8 bytes", ["data.source=" + str(latin1), "data.eval_source=" + good_eval],
         "latin1.jsonl:2: not valid UTF-8"),
        ("missing prompt column", src("noprompt.jsonl", no_prompt), "required column 'prompt' is missing"),
        ("null prompt", src("null.jsonl", null_prompt), "expect_column_values_to_not_be_null on 'prompt'"),
        ("empty prompt", src("empty.jsonl", empty_prompt), "expect_column_value_lengths_to_be_between on 'prompt'"),
        ("duplicate ids", src("dup.jsonl", dup), "expect_column_values_to_be_unique on 'id'"),
        ("prompt over the token limit", src("long.jsonl", too_long), "id='long'"),
        ("train/eval overlap", src("overlap.jsonl", overlap), "leakage"),
        ("answer does not parse", src("answer.jsonl", bad_answer), "answer does not parse as an integer"),
        ("data file missing", ["data.source=" + str(tmp / "nope.jsonl")], "data.source: file not found"),
        ("data on a missing S3 bucket", ["data.source=s3://no-such-bucket-opd/x.jsonl"],
         "data.source: cannot read s3://no-such-bucket-opd/x.jsonl"),
        ("unknown config key", ["opd.learning_rate=1e-4"], "opd.learning_rate: unknown key"),
        ("negative learning rate", ["opd.lr=-0.001"], "opd.lr: Input should be greater than 0"),
        ("rounds = 0", ["opd.rounds=0"], "opd.rounds: Input should be greater than or equal to 1"),
        ("model name with ..", ["registry.model_name=a..b"], "model name 'a..b' is invalid"),
        ("model name with /", ["registry.model_name=a/b"], "model name 'a/b' is invalid"),
        ("head_dim 16 for the built student", ["student.model.num_heads=4"],
         "head_dim = hidden_size/num_heads = 16; vLLM's CPU attention accepts only (32, 64, 128)"),
        ("head_dim 16 for a student checkpoint", teacher + ["student.model=null",
                                                           "student.path=" + models["student_hd16"]],
         "student.path: head_dim 16; vLLM's CPU attention accepts only"),
        ("missing teacher path", ["teacher.path=" + str(tmp / "no-teacher")],
         "teacher.path: no model at"),
        ("missing student path", ["student.model=null", "student.path=" + str(tmp / "no-student")],
         "student.path: no model at"),
        ("teacher/student vocabulary mismatch", teacher + ["student.model=null",
                                                          "student.path=" + models["student_vocab"]],
         "teacher and student tokenizers differ"),
    ]


def test_bad_inputs_are_refused_with_a_clear_error(tmp_path, models, s3):
    cases = _cases(tmp_path, models)
    assert len(cases) >= 15
    for name, overrides, needle in cases:
        run_dir = tmp_path / "runs" / name.replace(" ", "_").replace("/", "_")
        with pytest.raises((ConfigError, PermanentError)) as e:
            _pre_training(overrides, s3, run_dir)
        assert needle in str(e.value), f"{name}: {e.value}"
        left = [p for p in run_dir.rglob("*") if p.is_file()] if run_dir.exists() else []
        assert not left, f"{name}: left files behind: {left}"


def test_cli_refuses_bad_config_before_any_work(tmp_path):
    import subprocess
    import sys

    opd = str(Path(sys.executable).with_name("opd"))
    r = subprocess.run([opd, "run", BASE, "--set", "opd.rounds=0", "--set", f"home={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "opd.rounds: Input should be greater than or equal to 1" in r.stdout + r.stderr
    assert not any(tmp_path.iterdir())
