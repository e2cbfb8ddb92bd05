"""The teacher shipped in the package: found by the bootstrap's cache key, its files' sha256 pinned in
code and checked on the copy that is used (a changed, missing or extra file is refused), and reproducible
from its recipe by our own bootstrap (slow)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from opd import shipped, warmup
from opd.records import DONE
from opd.teacher_asset import build
from opd.config import load_config
from test_bootstrap import TINY, data_for, tiny


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A teacher built by `opd.teacher_asset.build` (our bootstrap), and the entry that pins it."""
    root = tmp_path_factory.mktemp("tiny-build")
    key, entry = build("configs/ci.yaml", [*TINY, "teacher.bootstrap.min_accuracy=0.0"], root / "home",
                               out=root / "assets")
    return key, entry, root / "assets" / key


@pytest.fixture
def tiny_shipped(tiny_build, tmp_path, monkeypatch):
    """``tiny_build`` pinned and shipped from a private asset root (a copy each test may change)."""
    key, entry, built = tiny_build
    assets = tmp_path / "assets"
    shutil.copytree(built, assets / key)
    monkeypatch.setattr(shipped, "ASSETS", assets)
    monkeypatch.setitem(shipped.SHIPPED, key, entry)
    return key, assets / key


def test_shipped_teacher_is_used_by_its_key(tiny_shipped, tmp_path):
    key, src = tiny_shipped
    cfg = tiny(tmp_path / "fresh", "teacher.bootstrap.min_accuracy=0.0")
    lines: list[str] = []
    ref = warmup.bootstrap_teacher(cfg, data_for(cfg), log=lines.append)
    assert Path(ref.path).name == key and "shipped" in lines[0] and "sha256 verified" in lines[0], lines
    assert not (tmp_path / "fresh" / "cache" / "teachers" / "partial").exists()  # nothing trained
    for f in src.iterdir():
        assert (Path(ref.path) / f.name).read_bytes() == f.read_bytes()


@pytest.mark.parametrize("tamper", ["flip_weight_byte", "edit_config", "drop_tokenizer", "add_pickle"])
def test_a_changed_shipped_teacher_is_refused(tiny_shipped, tmp_path, tamper):
    key, src = tiny_shipped
    if tamper == "flip_weight_byte":
        raw = bytearray((src / "model.safetensors").read_bytes())
        raw[-1] ^= 1
        (src / "model.safetensors").write_bytes(bytes(raw))
    elif tamper == "edit_config":
        (src / "config.json").write_text((src / "config.json").read_text().replace("silu", "relu"))
    elif tamper == "drop_tokenizer":
        (src / "tokenizer.json").unlink()
    else:
        (src / "extra.bin").write_bytes(b"\x80\x04K\x01.")
    home = tmp_path / "fresh"
    cfg = tiny(home, "teacher.bootstrap.min_accuracy=0.0")
    with pytest.raises(shipped.ShippedTeacherTampered, match=key):
        warmup.bootstrap_teacher(cfg, data_for(cfg), log=lambda m: None)
    assert not list((home / "cache" / "teachers").glob(f"{key}/{DONE}"))  # never becomes the cached teacher


def test_every_pinned_teacher_ships_and_verifies():
    assert shipped.SHIPPED, "the demo teacher should ship with the package"
    for key in shipped.SHIPPED:
        src = shipped.find(key)
        assert src is not None, f"{key} is pinned but {shipped.ASSETS / key} is missing"
        shipped.verify(key, src)


@pytest.mark.parametrize("recipe", ["configs/demo.yaml", "configs/word-problems.yaml"])
def test_shipped_configs_find_their_teacher(recipe, tmp_path):
    """Each shipped config's cache key (its data fingerprint included) is one the package ships: a first
    `make demo` (or word-problems run) skips the bootstrap."""
    cfg = load_config(recipe, [f"home={tmp_path}"])
    data = data_for(cfg)
    key = warmup.teacher_cache_key(cfg, data.fingerprint)
    assert shipped.find(key) is not None, (key, sorted(shipped.SHIPPED))
    entry = shipped.SHIPPED[key]
    assert entry["accuracy"] >= cfg.teacher.bootstrap.min_accuracy and entry["recipe"] == recipe


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(shipped.SHIPPED))
def test_recipe_reproduces_shipped_teacher(key, tmp_path):
    """Our bootstrap, from the recipe alone, trains a teacher as accurate as the shipped one (minutes to an hour
    on 2 CPU cores; `pytest -m slow tests/test_bootstrap.py`)."""
    entry = shipped.SHIPPED[key]
    cfg = load_config(entry["recipe"], [f"home={tmp_path}"])
    data = data_for(cfg)
    assert warmup.teacher_cache_key(cfg, data.fingerprint) == key
    ref = warmup.bootstrap_teacher(cfg, data, use_shipped=False)
    assert ref.metrics["accuracy"] >= cfg.teacher.bootstrap.min_accuracy
    # it stops at the first eval point past min_accuracy: equal up to one eval point's progress
    assert abs(ref.metrics["accuracy"] - entry["accuracy"]) <= 0.03, (ref.metrics, entry["accuracy"])
    assert ref.params == entry["params"]
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
