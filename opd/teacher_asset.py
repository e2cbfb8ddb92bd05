"""Build a shipped teacher (``make teacher-asset``): bootstrap the config's teacher from scratch with our own
code, copy it under ``opd/assets/teachers/<key>/`` and print the sha256 entry to pin in ``opd/shipped.py``."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from opd.shipped import ASSETS
from opd.storage import sha256_file


def build(config: str, overrides: list[str], home: Path, out: Path | None = None) -> tuple[str, dict]:
    """Bootstrap the teacher of ``config`` from scratch in ``home`` (resumable) and copy it under
    ``out/<key>/``; returns the key and the SHIPPED entry to pin."""
    from opd.config import load_config
    from opd.data.prepare import prepare_data
    from opd.records import DONE, read_done
    from opd.warmup import bootstrap_teacher

    cfg = load_config(config, [*overrides, f"home={home}"])
    data = prepare_data(cfg, home / "data")
    teacher = bootstrap_teacher(cfg, data, use_shipped=False)
    key = Path(teacher.path).name
    meta = read_done(Path(teacher.path))
    dest = (out or ASSETS) / key
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    files = {}
    for p in sorted(Path(teacher.path).iterdir()):
        if p.is_file() and p.name != DONE:
            shutil.copy2(p, dest / p.name)
            files[p.name] = sha256_file(dest / p.name)
    entry = {"accuracy": meta["accuracy"], "steps": meta["steps"], "params": meta["params"], "cost": meta["cost"],
             "recipe": config, "files": files}
    return key, entry


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m opd.teacher_asset", description=__doc__)
    ap.add_argument("command", choices=["build"])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--home", type=Path, default=Path(".opd/shipped-build"))
    a = ap.parse_args(argv)
    key, entry = build(a.config, a.overrides, a.home)
    print(f"wrote {ASSETS / key}; pin it in opd/shipped.py:")
    json.dump({key: entry}, sys.stdout, indent=4)
    print()


if __name__ == "__main__":
    main()
