"""Bad input: a clear error that names the problem, and nothing written or trained.

Each case runs what the flow runs before any training (config validation, preflight,
prepare_data, GX validation) against the real local S3 and asserts: a PermanentError (the
Prefect tasks never retry it), the line naming field / file line / value, nothing left in the
run directory, no bucket or registry object created, and a refusal within seconds.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from opd.data.prepare import prepare_data, validate_data
from opd_ops import preflight
from opd.config import ModelSpec, load_config
from opd.errors import PermanentError
from opd.models import build_char_tokenizer, build_llama, save_model

BASE = "configs/ci.yaml"
MODELS_BUCKET = "opd-bad-input-models"
REFUSAL_S = 30  # every case is refused before any training: seconds, not minutes


def _rows(n=20, start=0, prefix="r"):
    return [{"id": f"{prefix}{i}", "prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1)} for i in range(start, start + n)]


def _jsonl(path: Path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def _pre_training(overrides: list[str], s3, run_dir: Path) -> None:
    """Everything the flow does before training; raises on the first refusal."""
    cfg = load_config(BASE, overrides)
    preflight.run(cfg, s3)
    ref = prepare_data(cfg, run_dir / "data", s3)
    report, _ = validate_data(cfg, ref)
    if not report.success:
        raise PermanentError(report.message())


def _permuted_char_tokenizer():
    """The char tokenizer's tokens with two ids swapped: same size, different vocabulary."""
    tok = build_char_tokenizer()
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", padding_side="left")


def _upload(s3, local: Path, prefix: str, skip=(), replace: dict | None = None) -> str:
    for f in sorted(local.iterdir()):
        if f.name not in skip:
            body = (replace or {}).get(f.name, f.read_bytes())
            s3.put_object(Bucket=MODELS_BUCKET, Key=f"{prefix}/{f.name}", Body=body)
    return f"s3://{MODELS_BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def models(tmp_path_factory, stack_env):
    """Small local and S3 models, each broken in one way (or fine, as the teacher)."""
    from opd.storage import make_client

    d = tmp_path_factory.mktemp("models")
    spec = ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=64)
    tok = build_char_tokenizer()
    teacher = save_model(build_llama(spec, tok, 32, 0), tok, d / "teacher")
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    student_other_vocab = save_model(build_llama(spec, other, 32, 0), other, d / "s_vocab")
    perm = _permuted_char_tokenizer()
    student_perm = save_model(build_llama(spec, perm, 32, 0), perm, d / "s_perm")
    hd16 = build_llama(spec, tok, 32, 0)
    hd16.config.num_attention_heads = 4  # head_dim 16, as a foreign checkpoint would declare it
    hd16.config.num_key_value_heads = 4
    hd16.config.head_dim = 16
    student_hd16 = save_model(hd16, tok, d / "s_hd16")
    fake = save_model(build_llama(spec, tok, 32, 0), tok, d / "fake_weights")
    (fake / "model.safetensors").write_text("these are not weights\n")
    remote_code = save_model(build_llama(spec, tok, 32, 0), tok, d / "remote_code")
    conf = json.loads((remote_code / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (remote_code / "config.json").write_text(json.dumps(conf))

    s3 = make_client(stack_env["OPD_S3_ENDPOINT"])
    s3.create_bucket(Bucket=MODELS_BUCKET)
    huge_header = (2**40).to_bytes(8, "little") + b"{}"
    return {"teacher": str(teacher), "student_vocab": str(student_other_vocab), "student_perm": str(student_perm),
            "student_hd16": str(student_hd16), "fake_weights": str(fake), "remote_code": str(remote_code),
            "s3_no_weights": _upload(s3, teacher, "no-weights", skip={"model.safetensors"}),
            "s3_bad_header": _upload(s3, teacher, "bad-header", replace={"model.safetensors": huge_header}),
            "s3_vocab19": _upload(s3, student_other_vocab, "vocab19"),
            "s3_empty": f"s3://{MODELS_BUCKET}/nothing-here"}


def _data_cases(tmp: Path, teacher: list[str]) -> list[tuple]:
    """JSONL problems: each names the file, the file line and the value."""
    good_eval = _jsonl(tmp / "eval.jsonl", _rows(10, 100, "e"))
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"id": "a", "prompt": "1+2="}\n{"id": "b", "prompt": "2+3="}\n{"id": "c", "prompt": \n')
    latin1 = tmp / "latin1.jsonl"
    latin1.write_bytes(b'{"id": "a", "prompt": "1+2="}\n{"id": "b", "prompt": "caf\xe9"}\n')

    def src(name, rows):
        return teacher + ["data.source=" + _jsonl(tmp / name, rows), "data.eval_source=" + good_eval]

    def one_bad(name, row):  # five good rows, then the bad one on line 6
        return src(name, _rows(5) + [row])

    no_answers = [{"id": f"n{i}", "prompt": f"{i}+1="} for i in range(8)]
    return [
        ("malformed JSONL line", teacher + ["data.source=" + str(bad_json), "data.eval_source=" + good_eval],
         "bad.jsonl:3: malformed JSON"),
        ("non-UTF-8 bytes", teacher + ["data.source=" + str(latin1), "data.eval_source=" + good_eval],
         "latin1.jsonl:2: not valid UTF-8"),
        ("missing prompt column", src("noprompt.jsonl", [{"id": f"x{i}", "text": "1+1="} for i in range(5)]),
         "noprompt.jsonl:1: 'prompt' is <missing>"),
        ("null prompt", one_bad("null.jsonl", {"id": "nul", "prompt": None}), "null.jsonl:6: 'prompt' is <missing>"),
        ("prompt key absent on one row", one_bad("absent.jsonl", {"id": "abs", "question": "1+1="}),
         "absent.jsonl:6: 'prompt' is <missing>"),
        ("empty prompt", one_bad("empty.jsonl", {"id": "emp", "prompt": "", "answer": "0"}),
         "expect_column_value_lengths_to_be_between on 'prompt'"),
        ("prompt is a number", one_bad("num.jsonl", {"id": "n", "prompt": 42}),
         "num.jsonl:6: 'prompt' must be a string, got int 42"),
        ("prompt is a list", one_bad("list.jsonl", {"id": "l", "prompt": [1, 2]}),
         "list.jsonl:6: 'prompt' must be a string, got list [1, 2]"),
        ("prompt is an object", one_bad("obj.jsonl", {"id": "o", "prompt": {"text": "1+1="}}),
         "obj.jsonl:6: 'prompt' must be a string, got dict {'text': '1+1='}"),
        ("prompt is a boolean", one_bad("bool.jsonl", {"id": "b", "prompt": True}),
         "bool.jsonl:6: 'prompt' must be a string, got bool True"),
        ("huge non-string prompt is trimmed", one_bad("huge.jsonl", {"id": "h", "prompt": list(range(5000))}),
         "huge.jsonl:6: 'prompt' must be a string, got list [0, 1, 2, 3", "4999"),
        ("id is a float", one_bad("floatid.jsonl", {"id": 7.5, "prompt": "3+3=", "answer": "6"}),
         "floatid.jsonl:6: 'id' must be a string or an integer, got float 7.5"),
        ("id is a boolean", one_bad("boolid.jsonl", {"id": True, "prompt": "3+3=", "answer": "6"}),
         "boolid.jsonl:6: 'id' must be a string or an integer, got bool True"),
        ("an accuracy gate on eval rows without answers",
         teacher + ["data.source=" + _jsonl(tmp / "noans.jsonl", no_answers * 3),
                    "data.eval_source=" + _jsonl(tmp / "noans_eval.jsonl", no_answers), "eval.gates.min_accuracy=0.5"],
         f"eval.gates.min_accuracy: 0.5 needs answers, but {tmp / 'noans_eval.jsonl'} has no 'answer' values"),
        ("id is missing", one_bad("noid.jsonl", {"prompt": "3+3=", "answer": "6"}), "noid.jsonl:6: 'id' is <missing>"),
        ("answer is a list", one_bad("ans_list.jsonl", {"id": "a", "prompt": "3+3=", "answer": [6]}),
         "ans_list.jsonl:6: 'answer' must be a string or an integer, got list [6]"),
        ("answers given on some rows only", src("partial.jsonl", _rows(3) + no_answers[:2] + _rows(3, 50)),
         "partial.jsonl:4: 'answer' is <missing>"),
        ("a line that is a JSON array", one_bad("array.jsonl", '["x", "1+1="]'),
         "array.jsonl:6: expected a JSON object with 'id' and 'prompt', got ['x', '1+1=']"),
        ("NaN is not JSON", one_bad("constant.jsonl", '{"id": "z", "prompt": NaN}'),
         "constant.jsonl:6: malformed JSON (NaN"),
        ("file with no rows", teacher + ["data.source=" + _jsonl(tmp / "blank.jsonl", ["", "  "])],
         "blank.jsonl: no rows"),
        ("one row cannot be split", teacher + ["data.source=" + _jsonl(tmp / "one.jsonl", _rows(1))],
         "1 row(s) cannot be split into train and eval with data.eval_fraction=0.1"),
        ("duplicate ids, named by file line", one_bad("dup.jsonl", {"id": "r1", "prompt": "9+9=", "answer": "18"}),
         f"{tmp / 'dup.jsonl'}:2 (id='r1', prompt='1+2=')"),
        ("prompt over the token limit", one_bad("long.jsonl", {"id": "long", "prompt": "1" * 40 + "=", "answer": "1"}),
         f"{tmp / 'long.jsonl'}:6 (id='long'"),
        ("train/eval overlap", one_bad("overlap.jsonl", {"id": "leak", "prompt": "100+101=", "answer": "201"}),
         "leakage"),
        ("answer does not parse", one_bad("answer.jsonl", {"id": "ans", "prompt": "7+7=", "answer": "fourteen"}),
         f"answer does not parse as an integer — e.g. {tmp / 'answer.jsonl'}:6 (id='ans'"),
        ("data file missing", teacher + ["data.source=" + str(tmp / "nope.jsonl")], "data.source: file not found"),
        ("data on a missing S3 bucket", teacher + ["data.source=s3://no-such-bucket-opd/x.jsonl"],
         "data.source: cannot read s3://no-such-bucket-opd/x.jsonl"),
        ("data on an invalid S3 bucket", teacher + ["data.source=s3://Bad_Bucket/x.jsonl"],
         "data.source (bucket of 's3://Bad_Bucket/x.jsonl'): 'Bad_Bucket' is not a valid S3 bucket name"),
        ("own data with the demo teacher bootstrap", ["data.source=" + good_eval],
         "teacher.bootstrap trains the demo teacher on the synthetic task's ground truth"),
        ("eval_source beside the synthetic task", ["data.eval_source=" + good_eval],
         "data.eval_source applies to a JSONL data.source"),
    ]


def _config_cases() -> list[tuple]:
    """Values the schema refuses: bucket/prefix/URL rules, non-finite floats, sizes past any sane run."""
    return [
        ("unknown config key", ["opd.learning_rate=1e-4"], "opd.learning_rate: unknown key"),
        ("negative learning rate", ["opd.lr=-0.001"], "opd.lr: Input should be greater than 0"),
        ("rounds = 0", ["opd.rounds=0"], "opd.rounds: Input should be greater than or equal to 1"),
        ("model name with ..", ["registry.model_name=a..b"], "model name 'a..b' is invalid"),
        ("model name with /", ["registry.model_name=a/b"], "model name 'a/b' is invalid"),
        ("head_dim 16 for the built student", ["student.model.num_heads=4"],
         "head_dim = hidden_size/num_heads = 16; vLLM's CPU attention accepts only (32, 64, 128)"),
        ("bucket in upper case", ["registry.bucket=ADV1-UPPER"],
         "registry.bucket: 'ADV1-UPPER' is not a valid S3 bucket name"),
        ("bucket with ../", ["registry.bucket=../x"], "registry.bucket: '../x' is not a valid S3 bucket name"),
        ("blank bucket", ["registry.bucket='   '"], "registry.bucket: '   ' is not a valid S3 bucket name"),
        ("300-character bucket", ["registry.bucket=" + "a" * 300], "it is 300 characters; a bucket name has 3-63"),
        ("bucket formatted as an IP address", ["registry.bucket=192.168.5.4"], "must not be formatted as an IP"),
        ("bucket with a reserved prefix", ["registry.bucket=xn--opd"], "must not start with xn--"),
        ("bucket with a reserved suffix", ["registry.bucket=opd-s3alias"], "must not end with -s3alias"),
        ("prefix ../..", ["registry.prefix=../.."], "registry.prefix: unsafe path '../..'"),
        ("absolute prefix", ["registry.prefix=/models"], "registry.prefix: unsafe path '/models'"),
        ("prefix with an empty part", ["registry.prefix=a//b"], "registry.prefix: unsafe path 'a//b'"),
        ("prefix with odd characters", ["registry.prefix='a/$(rm)'"], "registry.prefix: '$(rm)' is not a safe name"),
        ("region with capitals and spaces", ["registry.region='US East'"], "registry.region: 'US East' is not a region"),
        ("registry endpoint file://", ["registry.endpoint_url=file:///etc/passwd"],
         "registry.endpoint_url: file:// URLs are not allowed"),
        ("registry endpoint without a host", ["registry.endpoint_url=http://:9000"], "has no host"),
        ("registry endpoint on the metadata address", ["registry.endpoint_url=http://169.254.169.254/latest"],
         "registry.endpoint_url: 'http://169.254.169.254/latest' is a link-local address"),
        ("registry endpoint on a decimal link-local address", ["registry.endpoint_url=http://2852039166:80"],
         "is a link-local address"),
        ("registry endpoint with credentials", ["registry.endpoint_url=http://admin:s3cr3t-canary@127.0.0.1:9000"],
         "registry.endpoint_url: the URL carries credentials", "s3cr3t-canary"),
        ("teacher endpoint link-local IPv6", ["teacher.scorer=remote", "teacher.endpoint=http://[fe80::1]:8000"],
         "teacher.endpoint: 'http://[fe80::1]:8000' is a link-local address"),
        ("teacher endpoint ftp", ["teacher.scorer=remote", "teacher.endpoint=ftp://teacher:21"],
         "teacher.endpoint: ftp:// URLs are not allowed"),
        ("learning rate .inf", ["opd.lr=.inf"], "opd.lr: Input should be a finite number"),
        ("kl_coef .nan", ["opd.loss.kl_coef=.nan"], "opd.loss.kl_coef: Input should be a finite number"),
        ("SFT weight decay .inf", ["sft.train.weight_decay=.inf"], "sft.train.weight_decay: Input should be a finite"),
        ("retry delay .inf", ["tasks.retry_delay_seconds=.inf"], "tasks.retry_delay_seconds: Input should be a finite"),
        ("a task timeout .nan", ["tasks.timeout_seconds={sft_warmup: .nan}"],
         "tasks.timeout_seconds.sft_warmup: Input should be a finite number"),
        ("max_tokens 10,000,000", ["opd.max_tokens=10000000"], "opd.max_tokens: Input should be less than or equal to"),
        ("rounds 1,000,000,000", ["opd.rounds=1000000000"], "opd.rounds: Input should be less than or equal to"),
        ("1,000 retries", ["tasks.retries=1000"], "tasks.retries: Input should be less than or equal to 20"),
        ("10^8 SFT steps", ["sft.train.steps=100000000"], "sft.train.steps: Input should be less than or equal to"),
        ("prompt + completion past a built model's positions", ["opd.max_tokens=9000"],
         "data.max_prompt_tokens + opd.max_tokens = 9016 tokens, but student.model and teacher.bootstrap build "
         "models of at most 8192 positions"),
        ("more synthetic problems than exist", ["data.synthetic.max_digits=1"],
         "n_train + n_eval = 3128 distinct problems, but num_terms=2 with max_digits=1 has only 100"),
        ("min prompt tokens above max", ["data.min_prompt_tokens=20"],
         "data.min_prompt_tokens=20 > data.max_prompt_tokens=16"),
        ("negative GPU index", ["training.devices=[-1]"], "training.devices.0: Input should be greater than or equal"),
        ("alias with ..", ["eval.gates.no_regression_vs=../prod"], "eval.gates.no_regression_vs: '../prod' is not a safe"),
        ("unknown time zone", ["deployment.timezone=Mars/Olympus"], "deployment.timezone: 'Mars/Olympus' is not an IANA"),
        ("negative seed", ["seed=-1"], "seed: Input should be greater than or equal to 0"),
        ("override that is not YAML", ["tasks.timeout_seconds={sft_warmup:"], "--set tasks.timeout_seconds: the value"),
    ]


def _model_cases(tmp: Path, models: dict) -> list[tuple]:
    """Model files preflight reads (local and s3://) before anything loads them."""
    teacher = ["teacher.path=" + models["teacher"]]

    def student(key):
        return ["student.model=null", "student.path=" + models[key]]

    return [
        ("head_dim 16 for a student checkpoint", teacher + student("student_hd16"),
         "student.path: head_dim 16; vLLM's CPU attention accepts only"),
        ("head_dim 16 for a vLLM teacher on CPU", ["teacher.path=" + models["student_hd16"], "teacher.scorer=vllm"],
         "teacher.path: head_dim 16; vLLM's CPU attention accepts only (32, 64, 128): use teacher.scorer=hf"),
        ("missing teacher path", ["teacher.path=" + str(tmp / "no-teacher")], "teacher.path: no model at"),
        ("missing student path", ["student.model=null", "student.path=" + str(tmp / "no-student")],
         "student.path: no model at"),
        ("teacher/student vocab_size mismatch", teacher + student("student_vocab"),
         "student.path: vocab_size 19 but teacher.path has 18"),
        ("teacher/student tokenizers differ at one size", teacher + student("student_perm"),
         "teacher and student tokenizers differ"),
        ("student vocab_size vs the bootstrapped teacher", student("student_vocab"),
         "student.path: vocab_size 19 but the bootstrapped teacher (teacher.bootstrap) has 18"),
        ("a text file named model.safetensors", ["teacher.path=" + models["fake_weights"]],
         "teacher.path: model.safetensors is not a safetensors file"),
        ("auto_map without trust_remote_code", ["teacher.path=" + models["remote_code"]],
         "teacher.path: config.json declares custom code (auto_map) but teacher.trust_remote_code is false"),
        ("auto_map in a student", teacher + ["student.model=null", "student.path=" + models["remote_code"]],
         "student.path: config.json declares custom code (auto_map) but the student never runs remote code"),
        ("prompt + completion past the teacher's context", teacher + ["opd.max_tokens=40"],
         "teacher.path: data.max_prompt_tokens + opd.max_tokens = 56 tokens do not fit the model's context "
         "(max_position_embeddings=32)"),
        ("a remote teacher needs one position more", teacher + ["opd.max_tokens=16", "teacher.scorer=remote",
                                                                "teacher.endpoint=http://127.0.0.1:9"],
         "= 32 + 1 (the remote teacher generates one token after the sequence) tokens do not fit"),
        ("top-k past the vocabulary", teacher + ["opd.loss={kind: reverse_kl_topk, topk: 100}"],
         "opd.loss.topk: 100 is more than the vocabulary (18 tokens)"),
        ("s3 student without weights", teacher + student("s3_no_weights"),
         f"student.path: {models['s3_no_weights']} holds no .safetensors weights"),
        ("s3 teacher with a bogus safetensors header", ["teacher.path=" + models["s3_bad_header"]],
         "teacher.path: model.safetensors is not a safetensors file (its first 8 bytes declare a 1099511627776-byte"),
        ("s3 student with another vocab_size", teacher + student("s3_vocab19"),
         "student.path: vocab_size 19 but teacher.path has 18"),
        ("s3 prefix with no model", ["teacher.path=" + models["s3_empty"]], "teacher.path: no model at s3://"),
    ]


def _s3_state(s3) -> tuple:
    """Buckets and registry objects: a refused run must create neither."""
    buckets = sorted(b["Name"] for b in s3.list_buckets().get("Buckets", []))
    reg = load_config(BASE).registry
    objs = []
    if reg.bucket in buckets:
        objs = [o["Key"] for o in s3.list_objects_v2(Bucket=reg.bucket).get("Contents", [])]
    return buckets, objs


def _refusal_problem(case: tuple, tmp: Path, s3, s3_before: tuple) -> str | None:
    """What is wrong with how one bad input was refused, or None."""
    name, overrides, needle, *absent = case
    run_dir = tmp / "runs" / name.replace(" ", "_").replace("/", "_")
    t0 = time.monotonic()
    try:
        _pre_training(overrides, s3, run_dir)
        return f"{name}: accepted"
    except PermanentError as e:
        msg = str(e)
    except Exception as e:  # noqa: BLE001 -- a retryable error is the defect this test looks for
        return f"{name}: {type(e).__name__} is not a PermanentError (it would be retried): {e}"
    took = time.monotonic() - t0
    left = [p for p in run_dir.rglob("*") if p.is_file()] if run_dir.exists() else []
    problems = [f"message lacks {needle!r}" if needle not in msg else "",
                f"the message shows {absent}" if any(a in msg for a in absent) else "",
                "a missing value shown as 'nan'" if "'nan'" in msg else "",
                f"refused after {took:.1f} s" if took > REFUSAL_S else "",
                f"left files behind: {left}" if left else "",
                "S3 changed" if _s3_state(s3) != s3_before else ""]
    problems = [p for p in problems if p]
    return f"{name}: {'; '.join(problems)}\n  {msg}" if problems else None


def test_bad_inputs_are_refused_with_a_clear_error(tmp_path, models, s3):
    teacher = ["teacher.path=" + models["teacher"]]
    cases = _data_cases(tmp_path, teacher) + _config_cases() + _model_cases(tmp_path, models)
    assert len(cases) >= 40 and len({c[0] for c in cases}) == len(cases)
    before = _s3_state(s3)
    failures = [f for case in cases if (f := _refusal_problem(case, tmp_path, s3, before))]
    assert not failures, "\n\n".join(failures)


def test_clean_jsonl_without_answers_passes_and_keeps_file_lines(tmp_path, models, s3):
    """Answers are optional: rows without them pass, the split has no 'answer' column, and each row
    keeps its file line through the train/eval shuffle."""
    rows = ["", *[json.dumps({"id": f"q{i}", "prompt": f"{i}+{i}="}) for i in range(30)]]  # line 1 is blank
    src = _jsonl(tmp_path / "noanswers.jsonl", rows)
    cfg = load_config(BASE, ["teacher.path=" + models["teacher"], "data.source=" + src])
    preflight.run(cfg, s3)
    report, ref = validate_data(cfg, prepare_data(cfg, tmp_path / "run" / "data", s3))
    assert report.success, report.message()
    d = ref.load()
    assert "answer" not in d["train"].column_names and "answer" not in d["eval"].column_names
    for split in ("train", "eval"):
        for r in d[split]:
            assert r["id"] == f"q{r['line'] - 2}", r  # line 2 holds q0
    assert sorted([*d["train"]["line"], *d["eval"]["line"]]) == list(range(2, 32))


def test_cli_refuses_bad_config_before_any_work(tmp_path):
    import subprocess
    import sys

    opd = str(Path(sys.executable).with_name("opd"))
    r = subprocess.run([opd, "run", BASE, "--set", "opd.rounds=0", "--set", f"home={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "opd.rounds: Input should be greater than or equal to 1" in r.stdout + r.stderr
    assert not any(tmp_path.iterdir())
