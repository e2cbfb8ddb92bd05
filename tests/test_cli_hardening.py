"""Hardening of the CLI against hostile input (issue 13: classes 1, 2, 6 and the CLI half of 7).

Every case runs the real `opd` command in a subprocess against the session's real stack
(Prefect server + SeaweedFS) and asserts the exit code, one clear line naming the field and
the value, that nothing was created or removed outside the OPD home (the sandbox tree is
compared before/after), and that the registry bucket did not change. Refusals happen before
any flow run, so no case trains anything and nothing can be retried.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from conftest import REPO, api_json, opd_bin
from opd_ops.registry.aliases import promote, read_alias
from opd_ops.registry.audit import audit
from opd_ops.registry.store import list_versions, publish

CI = "configs/ci.yaml"
PREFIX = "models"
MARKUP = ["[/x]", "[bold red]boom[/bold red]", "[/]", "[link=file:///etc/passwd]x"]


# ------------------------------------------------------------------------------ helpers

@pytest.fixture
def sandbox(tmp_path):
    """<tmp>/home (the OPD home), <tmp>/victim (an existing directory with data) and <tmp>/outside."""
    for d in ("home", "victim/data", "outside"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "victim" / "data" / "keep.txt").write_text("must survive")
    (tmp_path / "outside" / "keep.txt").write_text("must survive")
    return tmp_path


def _tree(root: Path, skip: Path | None = None) -> dict[str, int]:
    """Every path under root (size for files, -1 for dirs), optionally leaving one subtree out."""
    out = {}
    for p in root.rglob("*"):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[p.relative_to(root).as_posix()] = p.stat().st_size if p.is_file() else -1
    return out


def _keys(s3, bucket: str) -> list[str]:
    try:
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
    except ClientError as e:
        if e.response["Error"]["Code"] == "NoSuchBucket":
            return []
        raise


def _env(stack_env: dict, tmp_path_factory, **extra) -> dict:
    env = {**os.environ, **stack_env, **extra}
    env["PREFECT_HOME"] = str(tmp_path_factory.getbasetemp() / "prefect-client")  # never ~/.prefect
    return env


def _opd(env: dict, *args: str, timeout: int = 120) -> tuple[int, str]:
    p = subprocess.run([opd_bin(), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _one_line(out: str, *needles: str) -> str:
    """The output is exactly one line, holding every needle; no traceback, no markup error."""
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, out
    assert "Traceback" not in out and "MarkupError" not in out, out
    for n in needles:
        assert n in lines[0], (n, out)
    return lines[0]


def _src(root: Path, files: dict[str, bytes] | None = None) -> Path:
    src = root / f"src-{uuid.uuid4().hex[:6]}"
    src.mkdir()
    for name, data in (files or {"model.safetensors": os.urandom(1000), "config.json": b"{}"}).items():
        (src / name).write_bytes(data)
    return src


def _flow_runs(api: str, name: str) -> int:
    return api_json(f"{api}/flow_runs/count", {"flows": {"name": {"any_": [name]}}})


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A tiny trained-teacher stand-in: user data needs teacher.path (the bootstrap knows only the demo task)."""
    from opd.config import ModelSpec
    from opd.models import build_char_tokenizer, build_llama, save_model

    tok = build_char_tokenizer()
    spec = ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=64)
    return str(save_model(build_llama(spec, tok, 32, 0), tok, tmp_path_factory.mktemp("teacher") / "t"))


def _markup_data(root: Path, teacher: str) -> list[str]:
    """Overrides for a train JSONL that fails validation on rows whose prompts carry markup (a clean
    eval JSONL, and a teacher given by path as user data requires)."""
    train = [{"id": f"r{i}", "prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1)} for i in range(20)]
    train += [{"id": "m1", "prompt": "[/x]7+7=", "answer": "fourteen"},
              {"id": "r1", "prompt": "[bold red]9+9=", "answer": "18"}]
    ev = [{"id": f"e{i}", "prompt": f"{i}+{i + 2}=", "answer": str(2 * i + 2)} for i in range(100, 110)]
    return [f"data.source={_jsonl(root / 'train.jsonl', train)}",
            f"data.eval_source={_jsonl(root / 'eval.jsonl', ev)}", f"teacher.path={teacher}"]


# ------------------------------------------------------------------------------ class 1: paths

BAD_KEYS = ["../victim", "a/../../victim", "..", ".hidden", "-rf", "x" * 200, "a b", "[/x]", "run\nkey"]


def test_bad_run_key_is_refused_before_anything(stack_env, s3, sandbox, tmp_path_factory):
    env, bucket = _env(stack_env, tmp_path_factory), f"opd-h-{uuid.uuid4().hex[:8]}"
    api = stack_env["PREFECT_API_URL"]
    runs_before, tree = _flow_runs(api, "distill"), _tree(sandbox)
    for key in BAD_KEYS + [str(sandbox / "victim")]:  # an absolute path to an existing directory
        t0 = time.monotonic()
        rc, out = _opd(env, "run", CI, "--set", f"home={sandbox / 'home'}", "--set", f"registry.bucket={bucket}",
                       "--run-key", key)
        assert rc == 2, (key, out)
        _one_line(out, "--run-key", repr(key) if len(key) <= 80 else key[:80], "not a safe name")
        assert time.monotonic() - t0 < 30, key
    assert _tree(sandbox) == tree
    assert (sandbox / "victim" / "data" / "keep.txt").read_text() == "must survive"
    assert _flow_runs(api, "distill") == runs_before  # no flow run, so nothing to retry
    assert _keys(s3, bucket) == []


BAD_ALIASES = ["x/../../../y", "../production", "/abs", "a..b", "", " ", "prod\n", "a/b", "[bold red]x"]


def test_bad_alias_is_refused_before_anything(stack_env, s3, sandbox, tmp_path, tmp_path_factory):
    env, bucket = _env(stack_env, tmp_path_factory), f"opd-h-{uuid.uuid4().hex[:8]}"
    publish(s3, bucket, PREFIX, "m1", _src(tmp_path), {"run_key": "r"})
    keys, api = _keys(s3, bucket), stack_env["PREFECT_API_URL"]
    runs_before, tree = _flow_runs(api, "promote"), _tree(sandbox)
    home = ["--set", f"home={sandbox / 'home'}", "--set", f"registry.bucket={bucket}"]
    for alias in BAD_ALIASES:
        rc, out = _opd(env, "promote", CI, "m1:1", "--to", alias, "--reason", "r", *home)
        assert rc == 2, (alias, out)
        _one_line(out, "--to", f"alias name {alias!r} is invalid")
        rc, out = _opd(env, "registry", "promote", "m1:1", "--to", alias, "--reason", "r", "--config", CI,
                       "--bucket", bucket)
        assert rc == 1, (alias, out)
        _one_line(out, "--to", f"alias name {alias!r} is invalid")
    assert _tree(sandbox) == tree and _keys(s3, bucket) == keys
    assert _flow_runs(api, "promote") == runs_before


def test_report_target_goes_through_the_path_guard(stack_env, sandbox, tmp_path_factory):
    """A report TARGET never reaches a directory outside <home>/runs, even through a symlink."""
    env, home = _env(stack_env, tmp_path_factory), sandbox / "home"
    (sandbox / "outside" / "evil-run").mkdir()
    (home / "runs").mkdir()
    os.symlink(sandbox / "outside" / "evil-run", home / "runs" / "linked")
    tree = _tree(sandbox)
    for target in ["../../outside/evil-run", str(sandbox / "outside" / "evil-run"), "..", "runs/../x", "[/x]"]:
        rc, out = _opd(env, "report", target, "--config", CI, "--set", f"home={home}")
        assert rc == 1, (target, out)
        _one_line(out, "model name", repr(target))
    rc, out = _opd(env, "report", "linked", "--config", CI, "--set", f"home={home}", "--set",
                   f"registry.bucket=opd-h-{uuid.uuid4().hex[:8]}")
    assert rc == 1, out  # not read as a run directory: looked up (and not found) in the registry instead
    _one_line(out, "linked", "no published version")
    assert _tree(sandbox) == tree


@pytest.mark.parametrize("bad", ["../escape", "a/../../escape", "/abs", "./x", "a//b", "a\\b", ".."])
def test_pull_refuses_unsafe_manifest_paths(stack_env, s3, sandbox, tmp_path, tmp_path_factory, bad):
    """A manifest is S3 data: its paths pass opd.paths.safe_rel before anything is written."""
    env, bucket = _env(stack_env, tmp_path_factory), f"opd-h-{uuid.uuid4().hex[:8]}"
    publish(s3, bucket, PREFIX, "m1", _src(tmp_path), {"run_key": "r"})
    key = f"{PREFIX}/m1/versions/1/manifest.json"
    man = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    man["files"].insert(0, {"path": bad, "sha256": "0" * 64, "size": 1})
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(man).encode())
    keys, tree, dest = _keys(s3, bucket), _tree(sandbox), sandbox / "home" / "pulled"
    rc, out = _opd(env, "registry", "pull", "m1:1", str(dest), "--config", CI, "--bucket", bucket)
    assert rc == 1, out
    _one_line(out, "manifest path", "unsafe path", repr(bad))
    assert _tree(sandbox) == tree and _keys(s3, bucket) == keys


def test_fetch_dir_refuses_unsafe_keys_from_a_listing(s3, sandbox, tmp_path):
    """SeaweedFS itself refuses keys with '..' (AWS S3 stores them): the listing of a real bucket is
    extended with such keys through a botocore hook on the real client, as another server would return."""
    from opd.paths import UnsafePathError
    from opd.storage import fetch_dir

    bucket = f"opd-h-{uuid.uuid4().hex[:8]}"
    uri = publish(s3, bucket, PREFIX, "m1", _src(tmp_path), {"run_key": "r"}).uri.rstrip("/")
    prefix = uri.split("/", 3)[3]
    for bad in ["../../../outside/pwned", "x/../../../../outside/pwned", "/abs", "./x", "a\\..\\b"]:
        def inject(parsed, **_):
            parsed.setdefault("Contents", []).append({"Key": f"{prefix}/{bad}", "Size": 1})

        s3.meta.events.register("after-call.s3.ListObjectsV2", inject)
        try:
            tree = _tree(sandbox)
            with pytest.raises(UnsafePathError, match=re.escape(repr(bad))):
                fetch_dir(uri, sandbox / "home" / "cache", s3)
            assert _tree(sandbox) == tree, bad  # not even the cache's temp dir
        finally:
            s3.meta.events.unregister("after-call.s3.ListObjectsV2", inject)
    assert (fetch_dir(uri, sandbox / "home" / "cache", s3) / "config.json").read_bytes() == b"{}"


# ------------------------------------------------------------------------------ class 2: markup

def test_markup_in_names_keys_and_errors_prints_literally(stack_env, s3, sandbox, tmp_path, tmp_path_factory):
    env, bucket = _env(stack_env, tmp_path_factory), f"opd-h-{uuid.uuid4().hex[:8]}"
    files = {f"{m}.bin".replace("/", "_"): b"x" for m in MARKUP}
    publish(s3, bucket, PREFIX, "m1", _src(tmp_path, {**files, "config.json": b"{}"}), {"run_key": "[/x]run"})
    promote(s3, bucket, PREFIX, "m1", 1, "staging", reason="because [/x] and [bold red]red[/bold red]")
    keys, tree = _keys(s3, bucket), _tree(sandbox)
    reg = ["--config", CI, "--bucket", bucket]
    for m in MARKUP:  # a model name, a ref, an alias, a bucket, a config key: refused, printed as given
        key = m.split("=")[0]  # --set KEY=VALUE splits at the first '='
        for args, code, needle in [
            (["registry", "show", f"m{m}", *reg], 1, f"m{m}"),
            (["registry", "audit", f"{m}m", *reg], 1, f"model name {m + 'm'!r} is invalid"),
            (["registry", "ls", f"m{m}", *reg], 1, f"m{m}"),
            (["registry", "verify", f"m1@{m}", *reg], 1, f"alias name {m!r} is invalid"),
            (["registry", "ls", "--config", CI, "--bucket", m], 2, f"registry.bucket: {m!r}"),
            (["run", CI, "--set", f"opd.{key}=1", "--set", f"home={sandbox / 'home'}"], 2, f"opd.{key}: unknown key"),
            (["report", f"m1@{m}", "--config", CI, "--set", f"home={sandbox / 'home'}"], 1,
             f"alias name {m!r} is invalid"),
        ]:
            rc, out = _opd(env, *args)
            assert rc == code, (args, out)
            assert needle in out and "Traceback" not in out and "MarkupError" not in out, (args, needle, out)
    # data read back from S3 (file keys, the audit reason, the run key) is shown as stored
    rc, out = _opd(env, "registry", "show", "m1@staging", *reg)
    assert rc == 0 and all(name in out for name in files) and "[/x]run" in out, out
    rc, out = _opd(env, "registry", "audit", "m1", *reg)
    assert rc == 0 and "because [/x] and [bold red]red[/bold red]" in out, out
    rc, out = _opd(env, "registry", "ls", "m1", *reg)
    assert rc == 0 and "staging" in out, out
    assert _tree(sandbox) == tree and _keys(s3, bucket) == keys


def test_run_prints_a_validation_report_with_markup_not_a_traceback(stack_env, s3, sandbox, teacher,
                                                                     tmp_path_factory):
    """The flow fails on prompts with markup; the CLI shows the report as written, once (no retry)."""
    env, bucket, home = _env(stack_env, tmp_path_factory), f"opd-h-{uuid.uuid4().hex[:8]}", sandbox / "home"
    data = _markup_data(sandbox / "outside", teacher)
    tree = _tree(sandbox, skip=home)
    p = subprocess.run([opd_bin(), "run", CI, "--set", f"home={home}", "--set", f"registry.bucket={bucket}",
                        *sum((["--set", d] for d in data), []), "--run-key", "markup-1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr
    # stdout is the CLI's own output (Prefect's log lines, tracebacks of failed tasks included, go to stderr)
    tail = p.stdout[p.stdout.rindex("Flow run: "):]
    assert "dataset validation failed" in tail and "[/x]7+7=" in tail and "[bold red]9+9=" in tail, tail
    assert "Traceback" not in p.stdout and "MarkupError" not in p.stdout + p.stderr, p.stdout
    fr_id = re.search(r"flow-run/([0-9a-f-]{36})", tail).group(1)
    api = stack_env["PREFECT_API_URL"]
    task_runs = api_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [fr_id]}}})
    assert task_runs and all(t["run_count"] <= 1 for t in task_runs), [(t["name"], t["run_count"]) for t in task_runs]
    assert "validate_dataset" in " ".join(t["name"] for t in task_runs)
    assert _tree(sandbox, skip=home) == tree and _keys(s3, bucket) == []
    assert not list((home / "runs" / "markup-1").rglob("*.safetensors"))


# ------------------------------------------------------------------------------ class 6: registry

def test_registry_promote_verifies_first_and_missing_things_are_refused(stack_env, s3, sandbox, tmp_path,
                                                                        tmp_path_factory):
    env, bucket = _env(stack_env, tmp_path_factory), f"opd-h-{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        publish(s3, bucket, PREFIX, "m1", _src(tmp_path), {"run_key": "r"})
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/m1/versions/1/model.safetensors", Body=b"tampered")
    s3.delete_object(Bucket=bucket, Key=f"{PREFIX}/m1/versions/2/config.json")
    reg = ["--config", CI, "--bucket", bucket]
    keys, tree, api = _keys(s3, bucket), _tree(sandbox), stack_env["PREFECT_API_URL"]
    runs_before = _flow_runs(api, "promote")
    for ref, problem in (("m1:1", "model.safetensors: sha256/size mismatch"), ("m1:2", "config.json: missing")):
        for alias in ("production", "staging"):
            rc, out = _opd(env, "registry", "promote", ref, "--to", alias, "--reason", "ship", *reg)
            assert rc == 1, out
            _one_line(out, f"{ref} failed verification", problem, f"m1@{alias} not moved", "--no-verify")
            assert read_alias(s3, bucket, PREFIX, "m1", alias) is None
    assert _keys(s3, bucket) == keys and all(e["action"] == "publish" for e in audit(s3, bucket, PREFIX, "m1"))
    missing = [
        (["registry", "promote", "m1:9", "--to", "production", "--reason", "x", *reg], "m1:9 is not published"),
        (["registry", "promote", "nosuch:1", "--to", "production", "--reason", "x", *reg], "nosuch:1 is not published"),
        (["registry", "audit", "nosuch", *reg], "no model 'nosuch'"),
        (["registry", "audit", "m1", "--config", CI, "--bucket", f"opd-none-{uuid.uuid4().hex[:8]}"], "no model 'm1'"),
        (["registry", "ls", "nosuch", *reg], "no model 'nosuch'"),
        (["registry", "gc", "nosuch", *reg], "no model 'nosuch'"),
        (["registry", "show", "m1:7", *reg], "m1:7 is not published"),
        (["registry", "verify", "m1@production", *reg], "no alias 'production'"),
        (["promote", CI, "m1:9", "--to", "production", "--reason", "x", "--set", f"registry.bucket={bucket}",
          "--set", f"home={sandbox / 'home'}"], "m1:9 is not published"),
        (["promote", CI, "nosuch:1", "--to", "production", "--reason", "x", "--set", f"registry.bucket={bucket}",
          "--set", f"home={sandbox / 'home'}"], "nosuch:1 is not published"),
    ]
    for args, needle in missing:
        rc, out = _opd(env, *args)
        assert rc == 1, (args, out)
        _one_line(out, needle)
    assert _flow_runs(api, "promote") == runs_before  # refused before a flow run: nothing to retry
    assert _tree(sandbox) == tree and _keys(s3, bucket) == keys
    # the escape hatch still works, and is recorded like any move
    rc, out = _opd(env, "registry", "promote", "m1:1", "--to", "production", "--reason", "known", "--no-verify", *reg)
    assert rc == 0 and "m1@production: unset -> v1" in out, out
    assert read_alias(s3, bucket, PREFIX, "m1", "production").version == 1


# ------------------------------------------------------------------------------ class 7: leftovers, endpoints

def test_registry_gc_deletes_aborted_publishes_only(stack_env, s3, tmp_path, tmp_path_factory):
    env, bucket = _env(stack_env, tmp_path_factory), f"opd-h-{uuid.uuid4().hex[:8]}"
    publish(s3, bucket, PREFIX, "m1", _src(tmp_path), {"run_key": "r"})
    vp = f"{PREFIX}/m1/versions/"
    for n in (2, 3):  # aborted publishes: a claim and a partial file, never a manifest
        s3.put_object(Bucket=bucket, Key=f"{vp}{n}/.claim", Body=b"crashed-run")
        s3.put_object(Bucket=bucket, Key=f"{vp}{n}/model.safetensors", Body=b"partial")
    reg = ["--config", CI, "--bucket", bucket]
    rc, out = _opd(env, "registry", "gc", "m1", *reg)  # default: only versions idle for a day
    assert rc == 0 and "nothing deleted" in out and f"{vp}2/.claim" in _keys(s3, bucket), out
    rc, out = _opd(env, "registry", "gc", "m1", "--older-than", "0", *reg)
    assert rc == 0 and "deleted unpublished versions 2, 3" in out, out
    assert all(k.startswith(f"{vp}1/") for k in _keys(s3, bucket) if k.startswith(vp))
    assert list_versions(s3, bucket, PREFIX, "m1") == [1]
    rc, out = _opd(env, "registry", "verify", "m1:1", *reg)
    assert rc == 0, out
    rc, out = _opd(env, "registry", "gc", "m1", "--older-than", "-1", *reg)
    assert rc == 2 and "--older-than" in out, out


def test_registry_errors_name_the_endpoint_and_blame_the_stack_only_when_local(tmp_path_factory):
    base = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.getbasetemp() / "prefect-client"),
            "AWS_ACCESS_KEY_ID": "opd-test", "AWS_SECRET_ACCESS_KEY": "opd-test"}
    for endpoint, local in (("http://opd-no-such-host.invalid:9000", False), ("http://127.0.0.1:9", True)):
        rc, out = _opd({**base, "OPD_S3_ENDPOINT": endpoint}, "registry", "audit", "m1", "--config", CI)
        assert rc == 1, out
        _one_line(out, f"cannot reach S3 endpoint {endpoint}")
        assert ("opd stack up" in out) == local, out


def test_publish_outage_is_retryable_and_names_the_endpoint(tmp_path, monkeypatch):
    from opd.errors import PermanentError
    from opd.storage import make_client
    from opd_ops.registry.client import RegistryUnavailable

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "opd-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "opd-test")
    for endpoint in ("http://opd-no-such-host.invalid:9000", "http://127.0.0.1:9"):
        s3 = make_client(endpoint, max_attempts=1, connect_timeout=1)
        with pytest.raises(RegistryUnavailable) as e:
            publish(s3, "opd-b", PREFIX, "m1", _src(tmp_path), {"run_key": "r"}, claim_token="r")
        assert not isinstance(e.value, PermanentError) and endpoint in str(e.value)


def _environ_once_exec(pid: int, marker: str, timeout: float = 120) -> dict[str, str]:
    """The environment of process `pid` once it has exec'd a command line containing `marker`."""
    proc, deadline = Path(f"/proc/{pid}"), time.time() + timeout
    while marker not in (proc / "cmdline").read_text().replace("\0", " "):
        assert time.time() < deadline, (proc / "cmdline").read_text()
        time.sleep(0.2)
    return dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _curl_json(line: str, attempts: int = 4) -> dict:
    """Run a printed curl line; a busy test server's SQLite can answer 503 ("database is locked"), which
    Prefect's own clients retry, so retry it too (the body of the last answer is in the failure)."""
    for i in range(attempts):
        body = json.loads(subprocess.run(line, shell=True, capture_output=True, text=True, check=True).stdout)
        if "id" in body:
            return body
        time.sleep(2 * (i + 1))
    raise AssertionError(f"{line} answered {body}")


@pytest.mark.slow  # ~90 s (three CLI runs in a plain shell); `make test-all`
def test_deploy_hints_run_as_printed_in_a_plain_shell(stack, stack_env, s3, sandbox, teacher, tmp_path_factory):
    """`opd deploy`'s worker and curl lines work from a shell with no Prefect/S3 variables set: the
    worker finds the local stack, its run reaches S3 (no NoCredentialsError) and fails only on the data."""
    pool, bucket, home = f"opd-h-{uuid.uuid4().hex[:6]}", f"opd-h-{uuid.uuid4().hex[:8]}", sandbox / "home"
    plain = {k: v for k, v in _env(stack_env, tmp_path_factory).items()
             if k not in ("PREFECT_API_URL", "PREFECT_UI_URL", "OPD_S3_ENDPOINT")}
    plain["PREFECT_WORKER_QUERY_SECONDS"] = "2"
    sets = [f"stack.prefect_port={stack.prefect_port}", f"stack.s3_port={stack.s3_port}", f"home={home}",
            f"registry.bucket={bucket}", f"deployment.work_pool={pool}", *_markup_data(sandbox / "outside", teacher)]
    rc, out = _opd(plain, "deploy", CI, *sum((["--set", s] for s in sets), []), timeout=300)
    assert rc == 0, out
    worker_cmd = next(ln for ln in out.splitlines() if ln.startswith("start a worker:")).split(":", 1)[1].strip()
    curls = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("curl ")]
    assert worker_cmd.startswith("opd worker --config configs/ci.yaml") and len(curls) == 2, out
    api = stack_env["PREFECT_API_URL"]
    dep = _curl_json(curls[0])
    assert dep["name"] == "ci" and dep["work_pool_name"] == pool and dep["id"] in curls[1], (dep, curls)
    argv = [opd_bin(), *shlex.split(worker_cmd)[1:]]
    worker = subprocess.Popen(argv, cwd=REPO, env=plain, stdout=open(sandbox / "worker.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        run = _curl_json(curls[1])
        environ = _environ_once_exec(worker.pid, "-m prefect worker start")
        assert environ["OPD_S3_ENDPOINT"] == stack_env["OPD_S3_ENDPOINT"]
        assert environ["PREFECT_API_URL"] == stack_env["PREFECT_API_URL"]
        deadline, state = time.time() + 420, {}
        while time.time() < deadline:
            state = api_json(f"{api}/flow_runs/{run['id']}")["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(2)
    finally:
        _stop(worker)
    log = (sandbox / "worker.log").read_text()[-3000:]
    assert state.get("type") == "FAILED", (state, log)
    assert "dataset validation failed" in state["message"] and "[/x]7+7=" in state["message"], (state, log)
    assert "NoCredentials" not in state["message"] and "cannot reach S3" not in state["message"]
    task_runs = api_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert task_runs and all(t["run_count"] <= 1 for t in task_runs)
    assert _keys(s3, bucket) == []


@pytest.mark.parametrize("markup", MARKUP)
def test_report_prints_lineage_text_literally_on_any_console(markup):
    """print_report gets a console from its caller: even one with markup on prints lineage text as stored."""
    import io

    from rich.console import Console

    from opd_ops import report as R
    from test_report import GATES, _lineage

    gates = {**GATES, "checks": [{**c, "name": c["name"] + markup, "detail": markup} for c in GATES["checks"]]}
    lin = {**_lineage(), "run_key": f"run{markup}", "teacher": f"/t/{markup}", "gates": gates,
           "metrics": {**_lineage()["metrics"], f"x{markup}": {"accuracy": 0.5, "reverse_kl": 0.1, "n": 1}}}
    out = io.StringIO()
    R.print_report(lin, Console(file=out, width=400, markup=True))
    text = out.getvalue()
    assert f"run{markup}" in text and f"/t/{markup}" in text and f"min_accuracy{markup}" in text, text
    assert "PASS" in text and "FAIL" in text


def test_the_results_table_prints_a_dash_for_data_without_answers():
    """An eval split without answers has accuracy None: the closing table says '-', it does not crash."""
    from rich.console import Console

    from opd_ops.cli import results_table

    con = Console(record=True, width=120)
    con.print(results_table({"teacher": {"accuracy": None, "sampled_accuracy": None, "reverse_kl": 0.0},
                             "opd_student": {"accuracy": None, "reverse_kl": 0.81234}}))
    text = con.export_text()
    assert "student after OPD" in text and "0.8123" in text, text
    assert text.count(" - ") >= 4, text  # two accuracy cells for each model


def test_a_skipped_gate_reads_skip_in_the_report_not_pass(tmp_path):
    from opd_ops.gates import NO_ANSWERS
    from opd_ops.report import build_report

    lineage = {"run_key": "k", "gates": {"passed": True, "checks": [
        {"name": "min_accuracy", "passed": True, "skipped": True, "detail": NO_ANSWERS},
        {"name": "opd_beats_sft_kl", "passed": True, "detail": "0.81 < 0.93"}]}}
    rep = build_report(lineage, tmp_path / "report")
    md = Path(rep.markdown).read_text()
    assert "| min_accuracy | SKIP |" in md and "| opd_beats_sft_kl | PASS |" in md, md
    assert "class='skip'>SKIP<" in Path(rep.html).read_text()
