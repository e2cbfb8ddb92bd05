"""The demo teacher's bootstrap: what its cache key covers (a user dataset never reuses the synthetic
teacher, the same inputs do), and resume from its checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd import bootstrap as B
from opd import warmup
from opd.data.prepare import prepare_data
from opd.records import DONE
from opd.config import load_config
from opd.errors import PermanentError

TINY = ["data.synthetic.num_terms=2", "data.synthetic.max_digits=2", "data.synthetic.n_train=200",
        "data.synthetic.n_eval=16",
        "teacher.bootstrap.model={num_layers: 1, hidden_size: 32, num_heads: 1, intermediate_size: 64}",
        "teacher.bootstrap.train={steps: 40, batch_size: 8, lr: 1.0e-3, warmup_steps: 5}",
        "teacher.bootstrap.eval_every=10", "teacher.bootstrap.max_steps=40", "teacher.bootstrap.min_accuracy=1.0"]


def tiny(home: Path, *more: str):
    return load_config("configs/ci.yaml", [*TINY, f"home={home}", *more])


def data_for(cfg):
    return prepare_data(cfg, Path(cfg.home) / "data")


def teacher_files(home: Path) -> set[str]:
    root = home / "cache" / "teachers"
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


# ---------------------------------------------------------------- the cache key

def test_key_covers_data_recipe_model_and_precision(tmp_path):
    cfg = tiny(tmp_path)
    key = B.cache_key(cfg, "fp-a")
    assert B.cache_key(cfg, "fp-a") == key  # same inputs, same teacher
    assert B.cache_key(cfg, "fp-b") != key  # other data: another teacher
    for change in ("seed=1", "data.max_prompt_tokens=20", "opd.max_tokens=10", "teacher.bootstrap.train.lr=2.0e-3",
                   "teacher.bootstrap.model.intermediate_size=128", "teacher.bootstrap.min_accuracy=0.5",
                   "teacher.bootstrap.max_steps=80", "teacher.bootstrap.eval_every=20",
                   "data.synthetic.n_train=300", "training.mixed_precision=bf16",
                   "teacher.bootstrap.model.architecture=qwen3", "task.prompt_format=chat"):
        assert B.cache_key(tiny(tmp_path, change), "fp-a") != key, change
    # what does not shape the teacher does not change the key
    for same in ("sft.train.lr=5.0e-4", "opd.rounds=2", "registry.bucket=other", "name=other"):
        assert B.cache_key(tiny(tmp_path, same), "fp-a") == key, same
    # the checkpoint (trajectory) key ignores only max_steps: raising it resumes
    assert B.checkpoint_key(tiny(tmp_path, "teacher.bootstrap.max_steps=80"), "fp-a") == B.checkpoint_key(cfg, "fp-a")
    assert B.checkpoint_key(tiny(tmp_path, "teacher.bootstrap.min_accuracy=0.5"), "fp-a") != B.checkpoint_key(cfg, "fp-a")
    assert B.checkpoint_key(cfg, "fp-b") != B.checkpoint_key(cfg, "fp-a")


def test_same_inputs_reuse_the_cached_teacher(tmp_path):
    cfg = tiny(tmp_path, "teacher.bootstrap.min_accuracy=0.0", "teacher.bootstrap.max_steps=10")
    data = data_for(cfg)
    first = warmup.bootstrap_teacher(cfg, data, log=lambda m: None)
    done = (Path(first.path) / DONE).read_text()
    lines = []
    again = warmup.bootstrap_teacher(cfg, data_for(cfg), log=lines.append)  # data rebuilt: same fingerprint
    assert again.path == first.path and (Path(first.path) / DONE).read_text() == done
    assert len(lines) == 1 and lines[0].startswith("teacher cached at"), lines
    assert not any("partial" in f and f.endswith(".pt") for f in teacher_files(tmp_path))  # no leftover checkpoint


def test_user_data_never_reuses_the_synthetic_teacher(tmp_path):
    """A synthetic teacher sits in the home; a run on the user's JSONL with teacher.bootstrap is refused
    before any training (at config load or at the stage), and the cache is left as it was."""
    cfg = tiny(tmp_path, "teacher.bootstrap.min_accuracy=0.0", "teacher.bootstrap.max_steps=10")
    synth = data_for(cfg)
    warmup.bootstrap_teacher(cfg, synth, log=lambda m: None)
    before = teacher_files(tmp_path)
    rows = [{"id": str(i), "prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(40)]
    for name, lines in (("user.jsonl", rows), ("other.jsonl", rows[:30])):
        src = tmp_path / name
        src.write_text("".join(json.dumps(r) + "\n" for r in lines))
        with pytest.raises(PermanentError, match=r"teacher\.path") as e:
            user_cfg = tiny(tmp_path, f"data.source={src}")
            warmup.bootstrap_teacher(user_cfg, synth, log=lambda m: None)  # even handed the synthetic data's ref
        assert "data.source" in str(e.value) and name in str(e.value)
    assert teacher_files(tmp_path) == before


# ---------------------------------------------------------------- resume

def _ckpt_state(home: Path) -> dict:
    (ckpt,) = (home / "cache" / "teachers" / "partial").glob("*.pt")
    return torch.load(ckpt, weights_only=True)


def test_bootstrap_resumes_from_its_last_checkpoint(tmp_path):
    """Stopped after 20 steps (max_steps reached), rerun with max_steps=40: it continues from step 20
    and ends where an uninterrupted 40-step bootstrap ends, bit for bit."""
    short = tiny(tmp_path / "a", "teacher.bootstrap.max_steps=20")
    with pytest.raises(B.TeacherBootstrapFailed, match=r"resumes from step 20"):
        warmup.bootstrap_teacher(short, data_for(short), log=lambda m: None)
    assert _ckpt_state(tmp_path / "a")["step"] == 20
    assert not list((tmp_path / "a" / "cache" / "teachers").glob("*/done.json"))  # nothing published

    lines: list[str] = []
    resumed = tiny(tmp_path / "a")  # max_steps=40
    with pytest.raises(B.TeacherBootstrapFailed):  # min_accuracy=1.0 stays out of reach
        warmup.bootstrap_teacher(resumed, data_for(resumed), log=lines.append)
    assert lines[0].startswith("teacher bootstrap: resuming from the checkpoint at step 20"), lines
    assert [ln.split(":")[0] for ln in lines[1:]] == ["teacher step 30/40", "teacher step 40/40"]

    straight = tiny(tmp_path / "b")
    with pytest.raises(B.TeacherBootstrapFailed):
        warmup.bootstrap_teacher(straight, data_for(straight), log=lambda m: None)
    a, b = _ckpt_state(tmp_path / "a"), _ckpt_state(tmp_path / "b")
    assert a["step"] == b["step"] == 40
    for name, t in b["model"].items():
        assert torch.equal(a["model"][name], t), name
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"])
               for i, s in b["optimizer"]["state"].items())


def test_a_finished_bootstrap_publishes_and_drops_its_checkpoint(tmp_path):
    cfg = tiny(tmp_path, "teacher.bootstrap.min_accuracy=0.0")
    ref = warmup.bootstrap_teacher(cfg, data_for(cfg), log=lambda m: None)
    meta = json.loads((Path(ref.path) / DONE).read_text())
    assert meta["steps"] == 10 and meta["cost"]["wall_s"] > 0
    assert not list((tmp_path / "cache" / "teachers" / "partial").glob("*"))
