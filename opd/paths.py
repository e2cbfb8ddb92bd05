"""Paths built from input stay under their root: the one guard for run keys, names, aliases and S3 keys.

Every directory or file whose name comes from a user, a config or an S3 listing is built with
``within(root, ...)`` after its parts passed ``check_name`` (one component) or ``safe_rel`` (a
relative path): an absolute path, ``..``, a backslash or a symlink that leads out of ``root`` is
refused before anything is created or removed.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from opd.errors import PermanentError

# one path component: starts with a letter or digit, then letters, digits, '.', '_', '-'
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 128


class UnsafePathError(PermanentError, ValueError):
    """A name or relative path that would leave its root; the message names the field and the rule."""


def check_name(value: object, field: str, max_len: int = NAME_MAX) -> str:
    """``value`` as one safe path component, or UnsafePathError naming ``field``."""
    if not isinstance(value, str) or not value:
        raise UnsafePathError(f"{field}: expected a non-empty name, got {value!r}")
    if len(value) > max_len or not NAME.fullmatch(value) or ".." in value:
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise UnsafePathError(f"{field}: {shown!r} is not a safe name: use 1-{max_len} characters from "
                              "[A-Za-z0-9._-], starting with a letter or digit, without '..'")
    return value


def safe_rel(rel: object, field: str) -> PurePosixPath:
    """A relative POSIX path whose every part is a plain name (no '', '.', '..', no backslash, no NUL)."""
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(f"{field}: expected a relative path, got {rel!r}")
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"{field}: unsafe path {rel!r} (absolute, '..', '.', empty part or backslash); "
                              "refusing to write it")
    return PurePosixPath(rel)


def within(root: str | Path, *parts: str | PurePosixPath, field: str = "path") -> Path:
    """``root / parts``, proven to stay under ``root`` once symlinks are resolved.

    Parts are checked by the caller (``check_name``/``safe_rel``); this is the last line: it also
    catches a symlink inside ``root`` that points elsewhere."""
    root = Path(root)
    out = root.joinpath(*parts)
    base = root.resolve()
    resolved = out.resolve()
    if resolved != base and base not in resolved.parents:
        raise UnsafePathError(f"{field}: {out} leaves {root} (it resolves to {resolved}); refusing to touch it")
    return out
