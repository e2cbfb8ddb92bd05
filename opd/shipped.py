"""Teachers shipped inside the package, so a first `make demo` skips the teacher bootstrap.

Each was produced by this code's own bootstrap (`python -m opd.teacher_asset build configs/demo.yaml`)
and is found by the same cache key a bootstrap would use. The expected sha256 of every file is
pinned here, in code, and checked on the copy that will be used: a changed file is refused.
`tests/test_bootstrap.py::test_recipe_reproduces_shipped_teacher` (slow) retrains one from its recipe.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from opd.errors import PermanentError
from opd.storage import sha256_file

ASSETS = Path(__file__).parent / "assets" / "teachers"

# cache key -> what the bootstrap recorded, and the sha256 of each file it wrote
SHIPPED: dict[str, dict] = {
    # configs/demo.yaml: 3 x 128 Llama, 6000 steps to 97.1% greedy on the 512 held-out problems
    # (`make teacher-asset`, torch 2.13 CPU on one thread: 40 min on the shared 2-core machine)
    "f5cef4634d3c705f": {
        "accuracy": 0.970703125,
        "steps": 6000,
        "params": 791936,
        "cost": {"phase": "teacher_bootstrap", "wall_s": 2392.4, "student_train_tokens": 8245257,
                 "student_train_flops": 39178295085312.0, "sample_tokens": 0, "sample_flops": 0.0,
                 "teacher_tokens": 0, "teacher_flops": 0.0},
        "recipe": "configs/demo.yaml",
        "files": {
            "config.json": "59c13c861def2bf77a665d8e182753b854109ab4ffd847b039052ad19dcd4ffe",
            "generation_config.json": "b42364a4bd79f84c6c9a882dec047b944e926f93c95211e7497a5662652f5716",
            "model.safetensors": "5411c4c8a512a72ffe5f16a536740b98712e771345a56fc3d7196dcfc35befdd",
            "tokenizer.json": "23be5e8c16cc68f238e7ebcaa760db41e831a1fa3570daf49d86591321e5aa02",
            "tokenizer_config.json": "e406c1671f7227dc8794a216484d7d88ced3c580c0d2a0951af2386fa540d74e",
        },
    },
    # configs/word-problems.yaml: 4 x 128 Qwen3 with the task's BPE and ChatML template, 500 steps to 66.0% greedy
    # (math verifier) on the 256 held-out problems (`python -m opd.teacher_asset build configs/word-problems.yaml`,
    # torch 2.13 CPU on one thread: 24 min on the shared 2-core machine)
    "0165a9a24c1eacdc": {
        "accuracy": 0.66015625,
        "steps": 500,
        "params": 1248640,
        "cost": {"phase": "teacher_bootstrap", "wall_s": 1430.7, "student_train_tokens": 5297364,
                 "student_train_flops": 39687003509760.0, "sample_tokens": 0, "sample_flops": 0.0,
                 "teacher_tokens": 0, "teacher_flops": 0.0},
        "recipe": "configs/word-problems.yaml",
        "files": {
            "chat_template.jinja": "2eefca287a0f008b170ce31bc2c4dabb398a64eb74716bf64db5d9a21da50da9",
            "config.json": "c0673e5b26cf33eb4c8615b9db0348c5499dcbe5bc86bba2e8c5de82484393ba",
            "generation_config.json": "af6491f6c99225b00ce50606a7a66dfcb17122a3c675768e13d14df515fa54f0",
            "model.safetensors": "f2d448d5d66ff77f6e909c3740efdf40575bc522a061e098afefe52c7e40c47b",
            "tokenizer.json": "ac05d10c30eaa0b70426d6ba08a0fb8a4c6c7667d66c327e8361b7ba8fb01a0b",
            "tokenizer_config.json": "501e7e91a75a5e1210fdc861a1f2659cd9180b70278501e5a091e30678efcccd",
        },
    },
}


class ShippedTeacherTampered(PermanentError):
    """A shipped teacher's file differs from the sha256 pinned in opd/shipped.py."""


def find(key: str) -> Path | None:
    """The shipped teacher for ``key``, if this package has one."""
    src = ASSETS / key
    return src if key in SHIPPED and src.is_dir() else None


def verify(key: str, folder: Path) -> None:
    """Every pinned file present with its sha256, and no other file: else ShippedTeacherTampered."""
    files = SHIPPED[key]["files"]
    present = {p.name for p in folder.iterdir()}
    if present != set(files):
        raise ShippedTeacherTampered(
            f"shipped teacher {key}: files {sorted(present)} differ from the pinned {sorted(files)}; "
            "reinstall opd-pipeline (pip install --force-reinstall .)")
    for name, want in files.items():
        got = sha256_file(folder / name)
        if got != want:
            raise ShippedTeacherTampered(
                f"shipped teacher {key}: {name} has sha256 {got}, expected {want}; refusing to use it: "
                "reinstall opd-pipeline (pip install --force-reinstall .)")


def install(key: str, src: Path, dest: Path) -> dict:
    """Copy ``src`` into the empty directory ``dest`` and verify the copy (what will be loaded);
    returns the recorded metadata (accuracy, steps, params, cost)."""
    for name in SHIPPED[key]["files"]:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    extra = sorted(p.name for p in src.iterdir() if p.name not in SHIPPED[key]["files"])
    if extra:
        raise ShippedTeacherTampered(f"shipped teacher {key}: unexpected files {extra}; "
                                     "reinstall opd-pipeline (pip install --force-reinstall .)")
    verify(key, dest)
    return {k: v for k, v in SHIPPED[key].items() if k != "files"}
