"""The one path guard: names and relative paths from input never leave their root."""
from __future__ import annotations

import os

import pytest

from opd.paths import UnsafePathError, check_name, safe_rel, within


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "/abs", "x/../../y", ".hidden", "-flag", "a..b",
                                 "a b", "a\\b", "x" * 129, "ä", "[bold]x", None, 7])
def test_check_name_refuses(bad):
    with pytest.raises(UnsafePathError, match="run_key"):
        check_name(bad, "run_key")


@pytest.mark.parametrize("good", ["demo", "demo-20261129-231500-ab12cd34", "a.b_c-1", "X" * 128])
def test_check_name_accepts(good):
    assert check_name(good, "run_key") == good


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a\\b", "a/\0"])
def test_safe_rel_refuses(bad):
    with pytest.raises(UnsafePathError, match="s3 key"):
        safe_rel(bad, "s3 key")


def test_within_catches_a_symlink_out_of_root(tmp_path):
    root, outside = tmp_path / "home", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    assert within(root, "runs", "k") == root / "runs" / "k"
    with pytest.raises(UnsafePathError, match="leaves"):
        within(root, "link", "x")
    with pytest.raises(UnsafePathError, match="leaves"):
        within(root, "..", "outside")
