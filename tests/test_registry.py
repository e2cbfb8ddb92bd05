"""The S3 model registry against the real SeaweedFS of the test stack: versions, aliases, audit, pull.

Every test uses its own bucket.  No mocks: concurrency is real threads with their own clients.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from conftest import REPO, opd_bin
from opd_ops.registry.aliases import AliasConflict, promote, read_alias
from opd_ops.registry.audit import audit
from opd_ops.registry.refs import parse_ref, pull, resolve
from opd_ops.registry.client import RegistryError
from opd.storage import make_client
from opd_ops.registry.store import gc_orphans, list_versions, publish, read_manifest, verify

PREFIX = "models"
LINEAGE = {
    "run_key": "run-1", "flow_run_id": "fr-1", "teacher": "/teachers/t1", "teacher_params": 400_000,
    "student_params": 100_000, "dataset_fingerprint": "abc123",
    "metrics": {"teacher": {"accuracy": 0.99, "reverse_kl": 0.0, "n": 256},
                "sft_student": {"accuracy": 0.6, "reverse_kl": 0.3, "n": 256},
                "opd_student": {"accuracy": 0.8, "reverse_kl": 0.1, "n": 256}},
    "gates": {"passed": True, "checks": [{"name": "min_accuracy", "passed": True, "detail": "0.8 >= 0.5"}]},
    "cost": [{"phase": "sft", "wall_s": 10.0, "student_train_flops": 1e12, "sample_flops": 0, "teacher_flops": 2e11},
             {"phase": "opd_round_1", "wall_s": 5.0, "student_train_flops": 1e11, "sample_flops": 3e10,
              "teacher_flops": 4e10}],
}


def _bucket() -> str:
    return f"opd-reg-{uuid.uuid4().hex[:12]}"


def _src(root: Path, tag: str = "a") -> Path:
    src = root / f"src-{tag}-{uuid.uuid4().hex[:6]}"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(os.urandom(200_000))
    (src / "config.json").write_text(json.dumps({"tag": tag}))
    (src / "sub" / "tokenizer.json").write_text("{}")
    return src


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_concurrent_publishers_get_distinct_versions(s3, stack_env, tmp_path):
    bucket = _bucket()
    srcs = [_src(tmp_path, "a"), _src(tmp_path, "b")]
    barrier, results, errors = threading.Barrier(2), [], []

    def worker(src):
        client = make_client(stack_env["OPD_S3_ENDPOINT"])
        barrier.wait()
        try:
            results.append(publish(client, bucket, PREFIX, "m1", src, LINEAGE))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in srcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(p.version for p in results) == [1, 2]
    assert list_versions(s3, bucket, PREFIX, "m1") == [1, 2]
    for p in results:
        assert verify(s3, bucket, PREFIX, "m1", p.version) == []
        names = {f["path"] for f in p.manifest["files"]}
        assert names == {"model.safetensors", "config.json", "sub/tokenizer.json", "README.md"}


def test_model_card_and_pull_roundtrip(s3, tmp_path):
    bucket = _bucket()
    src = _src(tmp_path)
    pub = publish(s3, bucket, PREFIX, "m1", src, LINEAGE)
    card = s3.get_object(Bucket=bucket, Key=f"{PREFIX}/m1/versions/1/README.md")["Body"].read().decode()
    for needle in ("# m1 v1", "/teachers/t1", "abc123", "student after OPD", "min_accuracy", "**total**",
                   "model.safetensors"):
        assert needle in card, needle
    model, version, dest = pull(s3, bucket, PREFIX, "m1", tmp_path / "out" / "m1")
    assert (model, version) == ("m1", 1)
    got = _tree(dest)
    assert {k: v for k, v in got.items() if k != "README.md"} == _tree(src)
    assert got["README.md"].decode() == card
    assert pub.manifest["files"][-1]["path"] == "README.md"
    # an existing non-empty destination is refused, untouched
    with pytest.raises(RegistryError, match="already exists"):
        pull(s3, bucket, PREFIX, "m1:1", dest)
    assert _tree(dest) == got


def test_tampered_file_fails_pull_and_leaves_nothing(s3, tmp_path):
    bucket = _bucket()
    publish(s3, bucket, PREFIX, "m1", _src(tmp_path), LINEAGE)
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/m1/versions/1/sub/tokenizer.json", Body=b'{"evil": 1}')
    dest = tmp_path / "pulled"
    with pytest.raises(RegistryError, match="sub/tokenizer.json"):
        pull(s3, bucket, PREFIX, "m1:1", dest)
    assert not dest.exists()
    assert list(tmp_path.glob(".pulled*")) == []  # no temp dir left beside it
    assert verify(s3, bucket, PREFIX, "m1", 1) == ["sub/tokenizer.json: sha256/size mismatch"]


def test_concurrent_alias_moves_exactly_one_wins(s3, stack_env, tmp_path):
    bucket = _bucket()
    for tag in "abc":
        publish(s3, bucket, PREFIX, "m1", _src(tmp_path, tag), LINEAGE)
    promote(s3, bucket, PREFIX, "m1", 1, "production", reason="first")
    for rnd in range(3):
        before = read_alias(s3, bucket, PREFIX, "m1", "production")
        barrier, wins, conflicts, other = threading.Barrier(4), [], [], []

        def mover(i):
            client = make_client(stack_env["OPD_S3_ENDPOINT"])
            target = 2 + i % 2
            barrier.wait()
            try:
                wins.append((i, promote(client, bucket, PREFIX, "m1", target, "production", reason=f"r{rnd}-{i}",
                                        expected=before)))
            except AliasConflict as e:
                conflicts.append(str(e))
            except Exception as e:  # noqa: BLE001
                other.append(e)

        threads = [threading.Thread(target=mover, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not other, other
        assert len(wins) == 1 and len(conflicts) == 3, (wins, conflicts)
        assert all("re-read and retry" in c and "production" in c for c in conflicts)
        now = read_alias(s3, bucket, PREFIX, "m1", "production")
        assert now.version == wins[0][1].version and now.seq == before.seq + 1
        assert now.reason == f"r{rnd}-{wins[0][0]}"
    # the mirror object for stock S3 clients follows the log head
    mirror = json.loads(s3.get_object(Bucket=bucket, Key=f"{PREFIX}/m1/aliases/production.json")["Body"].read())
    assert mirror["version"] == now.version and mirror["seq"] == now.seq
    # a stale expectation is a conflict, and the message says from / to
    with pytest.raises(AliasConflict, match=f"moved from 1 to {now.version}"):
        promote(s3, bucket, PREFIX, "m1", 1, "production", reason="stale", expected=_state_v1(s3, bucket))


def _state_v1(s3, bucket):
    from opd_ops.registry.aliases import AliasState

    return AliasState("production", 1, 1, "", "", "")


def test_promote_refuses_unpublished_versions(s3, tmp_path):
    bucket = _bucket()
    publish(s3, bucket, PREFIX, "m1", _src(tmp_path), LINEAGE)
    with pytest.raises(RegistryError, match="not published"):
        promote(s3, bucket, PREFIX, "m1", 7, "production", reason="nope")
    # a claimed but never finished version (no manifest) is refused too
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/m1/versions/2/.claim", Body=b"someone")
    with pytest.raises(RegistryError, match="not published"):
        promote(s3, bucket, PREFIX, "m1", 2, "production", reason="nope")
    with pytest.raises(RegistryError, match="reason"):
        promote(s3, bucket, PREFIX, "m1", 1, "production", reason=" ")
    assert read_alias(s3, bucket, PREFIX, "m1", "production") is None


def test_audit_records_who_why_from_to(s3, tmp_path, monkeypatch):
    bucket = _bucket()
    monkeypatch.setenv("OPD_USER", "alice")
    publish(s3, bucket, PREFIX, "m1", _src(tmp_path, "a"), LINEAGE)
    publish(s3, bucket, PREFIX, "m1", _src(tmp_path, "b"), LINEAGE)
    promote(s3, bucket, PREFIX, "m1", 1, "production", reason="passed canary")
    monkeypatch.setenv("OPD_USER", "bob")
    promote(s3, bucket, PREFIX, "m1", 2, "production", reason="better KL")
    events = audit(s3, bucket, PREFIX, "m1")
    assert [e["action"] for e in events] == ["publish", "publish", "promote", "promote"]
    assert [e["to"] for e in events] == [1, 2, 1, 2]
    p1, p2 = events[2], events[3]
    assert (p1["by"], p1["reason"], p1["from"], p1["to"], p1["alias"]) == ("alice", "passed canary", None, 1,
                                                                          "production")
    assert (p2["by"], p2["reason"], p2["from"], p2["to"]) == ("bob", "better KL", 1, 2)
    assert p1["at"] < p2["at"]


def test_resolve_refs(s3, tmp_path):
    bucket = _bucket()
    for tag in "ab":
        publish(s3, bucket, PREFIX, "m1", _src(tmp_path, tag), LINEAGE)
    promote(s3, bucket, PREFIX, "m1", 1, "staging", reason="try")
    assert resolve(s3, bucket, PREFIX, "m1") == ("m1", 2)
    assert resolve(s3, bucket, PREFIX, "m1:1") == ("m1", 1)
    assert resolve(s3, bucket, PREFIX, "m1@staging") == ("m1", 1)
    with pytest.raises(RegistryError, match="no alias"):
        resolve(s3, bucket, PREFIX, "m1@production")
    with pytest.raises(RegistryError, match="not published"):
        resolve(s3, bucket, PREFIX, "m1:9")
    with pytest.raises(RegistryError, match="no published version"):
        resolve(s3, bucket, PREFIX, "other")


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a..b", "..", "", "-x"])
def test_bad_model_and_alias_names_refused(s3, tmp_path, bad):
    bucket = _bucket()
    with pytest.raises(ValueError, match="invalid"):
        publish(s3, bucket, PREFIX, bad, _src(tmp_path), LINEAGE)
    with pytest.raises(ValueError):
        parse_ref(f"{bad}:1")
    if bad:
        with pytest.raises(ValueError, match="alias name"):
            parse_ref(f"m1@{bad}")


def test_claim_token_makes_publish_idempotent(s3, tmp_path):
    bucket = _bucket()
    src = _src(tmp_path)
    a = publish(s3, bucket, PREFIX, "m1", src, LINEAGE, claim_token="run-42")
    b = publish(s3, bucket, PREFIX, "m1", src, LINEAGE, claim_token="run-42")
    assert a.version == b.version == 1 and list_versions(s3, bucket, PREFIX, "m1") == [1]
    with pytest.raises(RegistryError, match="different files"):
        publish(s3, bucket, PREFIX, "m1", _src(tmp_path, "other"), LINEAGE, claim_token="run-42")
    assert publish(s3, bucket, PREFIX, "m1", src, LINEAGE, claim_token="run-43").version == 2


def test_gc_orphans_deletes_only_old_unpublished_versions(s3, tmp_path):
    bucket = _bucket()
    publish(s3, bucket, PREFIX, "m1", _src(tmp_path), LINEAGE)
    vp = f"{PREFIX}/m1/versions/"
    s3.put_object(Bucket=bucket, Key=f"{vp}2/.claim", Body=b"crashed-run")
    s3.put_object(Bucket=bucket, Key=f"{vp}2/model.safetensors", Body=b"partial")
    assert list_versions(s3, bucket, PREFIX, "m1") == [1]
    assert gc_orphans(s3, bucket, PREFIX, "m1", older_than_s=3600) == []  # too young
    assert gc_orphans(s3, bucket, PREFIX, "m1", older_than_s=0) == [2]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=vp).get("Contents", [])]
    assert keys and all(k.startswith(f"{vp}1/") for k in keys)
    assert verify(s3, bucket, PREFIX, "m1", 1) == []
    assert audit(s3, bucket, PREFIX, "m1")[-1]["action"] == "gc_orphans"


def _cli(stack_env, *args):
    env = {**os.environ, **stack_env}
    p = subprocess.run([opd_bin(), "registry", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout + p.stderr


def test_cli_promote_pull_verify_exit_codes(s3, stack_env, tmp_path):
    bucket = _bucket()
    for tag in "ab":
        publish(s3, bucket, PREFIX, "m1", _src(tmp_path, tag), LINEAGE)
    common = ["--config", "configs/ci.yaml", "--bucket", bucket]

    rc, out = _cli(stack_env, "promote", "m1:2", "--to", "production", "--reason", "ship it", *common)
    assert rc == 0 and "production" in out, out
    assert read_alias(s3, bucket, PREFIX, "m1", "production").version == 2

    rc, out = _cli(stack_env, "promote", "m1:9", "--to", "production", "--reason", "x", *common)
    assert rc == 1 and "not published" in out and "Traceback" not in out and len(out.strip().splitlines()) == 1, out

    rc, out = _cli(stack_env, "promote", "../evil:1", "--to", "production", "--reason", "x", *common)
    assert rc == 1 and "invalid" in out and "Traceback" not in out, out

    rc, out = _cli(stack_env, "pull", "m1@production", str(tmp_path / "ok"), *common)
    assert rc == 0 and (tmp_path / "ok" / "model.safetensors").is_file(), out
    assert json.loads((tmp_path / "ok" / "config.json").read_text()) == {"tag": "b"}

    rc, out = _cli(stack_env, "verify", "m1:1", *common)
    assert rc == 0, out
    rc, out = _cli(stack_env, "show", "m1@production", *common)
    assert rc == 0 and "production" in out and "model.safetensors" in out, out
    rc, out = _cli(stack_env, "audit", "m1", *common)
    assert rc == 0 and "ship it" in out and "promote" in out, out
    rc, out = _cli(stack_env, "ls", "m1", *common)
    assert rc == 0 and "production" in out, out

    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/m1/versions/1/model.safetensors", Body=b"tampered")
    rc, out = _cli(stack_env, "pull", "m1:1", str(tmp_path / "bad"), *common)
    assert rc == 1 and "model.safetensors" in out and "Traceback" not in out, out
    assert not (tmp_path / "bad").exists()
    rc, out = _cli(stack_env, "verify", "m1:1", *common)
    assert rc == 1 and "model.safetensors" in out, out
    assert read_manifest(s3, bucket, PREFIX, "m1", 1)["version"] == 1


def test_model_dir_from_s3_is_verified_before_loading(s3, tmp_path):
    """teacher.path / student.path on S3: a registry version is sha256-checked on fetch."""
    import uuid as _uuid

    from opd.errors import PermanentError
    from opd_ops.registry.store import publish as _publish
    from opd.storage import fetch_dir

    bucket = f"opd-fetch-{_uuid.uuid4().hex[:8]}"
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights" * 100)
    pub = _publish(s3, bucket, "models", "fetchme", src, {})
    uri = pub.uri.rstrip("/")
    assert (fetch_dir(uri, tmp_path / "cache", s3) / "model.safetensors").read_bytes() == b"weights" * 100
    s3.put_object(Bucket=bucket, Key=uri[len(f"s3://{bucket}/"):] + "/model.safetensors", Body=b"tampered")
    with pytest.raises(PermanentError, match="model.safetensors does not match the manifest"):
        fetch_dir(uri, tmp_path / "cache2", s3)
    assert not list((tmp_path / "cache2").glob("*"))
