"""teacher.ref: any registry version as the teacher (e.g. an earlier student), pulled with every sha256
checked into the home's cache once, then used as a local teacher.path."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import REPO
from opd.config import ModelSpec, load_config
from opd.errors import PermanentError
from opd.models import build_char_tokenizer, build_llama, count_params, load_model, save_model


def test_a_registry_reference_resolves_as_the_teacher(stack_env, s3, tmp_path):
    from opd_ops.promotion import resolve_teacher
    from opd_ops.registry.aliases import promote
    from opd_ops.registry.client import RegistryRefusal
    from opd_ops.registry.store import publish

    os.environ.update(stack_env)
    bucket = f"opd-tref-{uuid.uuid4().hex[:8]}"
    tok = build_char_tokenizer()
    src = save_model(build_llama(ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=64), tok,
                                 32, 7), tok, tmp_path / "earlier-student")
    pub = publish(s3, bucket, "models", "old-student", src, {"note": "an earlier student"})
    promote(s3, bucket, "models", "old-student", pub.version, "production", reason="test")
    lines: list[str] = []
    for ref in ("old-student@production", f"old-student:{pub.version}", "old-student"):
        cfg = load_config("configs/ci.yaml", [f"home={tmp_path / 'home'}", f"registry.bucket={bucket}",
                                              f"teacher.ref={ref}"])
        got = resolve_teacher(cfg, log=lines.append)
        assert got.teacher.ref is None and got.teacher.path.endswith(f"cache/registry/old-student/{pub.version}")
        assert count_params(got.teacher.path) == count_params(src) and load_model(got.teacher.path) is not None
    assert "(sha256 verified)" in lines[0] and len({ln.split(", at ")[1] for ln in lines}) == 1  # pulled once
    first = sorted((p.name, p.stat().st_mtime_ns) for p in Path(got.teacher.path).iterdir())
    resolve_teacher(cfg, log=lines.append)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in Path(got.teacher.path).iterdir()) == first
    cfg = load_config("configs/ci.yaml", [f"home={tmp_path / 'home'}", f"registry.bucket={bucket}",
                                          "teacher.ref=old-student:9"])
    with pytest.raises(RegistryRefusal, match="old-student:9 is not published"):
        resolve_teacher(cfg)

    # `opd plan` sizes a registry teacher from its config.json in S3 (nothing pulled), and names a missing one
    plan = [sys.executable, "-m", "opd_ops.cli", "plan", "configs/ci.yaml", "--set", f"home={tmp_path / 'plan'}",
            "--set", f"registry.bucket={bucket}", "--set", f"student.path={src}", "--set", "student.model=null",
            "--set", "device=cpu", "--host-gib", "24"]
    env = {**os.environ, "COLUMNS": "250"}
    ok = subprocess.run([*plan, "--set", "teacher.ref=old-student@production"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("fits"), ok.stdout + ok.stderr
    assert not (tmp_path / "plan").exists()  # nothing pulled or written
    bad = subprocess.run([*plan, "--set", "teacher.ref=old-student:9"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "old-student:9 is not published" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def test_teacher_ref_is_checked_up_front():
    for bad, why in ((["teacher.ref=m@../x"], "teacher.ref: alias name"), (["teacher.ref=m:0"], "bad version"),
                     (["teacher.ref=m:1", "teacher.path=/tmp"], "set one of teacher.path and teacher.ref")):
        with pytest.raises(PermanentError, match=why):
            load_config("configs/ci.yaml", bad)
    assert load_config("configs/ci.yaml", ["teacher.ref=m@production"]).teacher.trained
