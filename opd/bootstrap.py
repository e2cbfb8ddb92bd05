"""The demo teacher's bootstrap: its cache key, and training on ground truth with resumable checkpoints.

The key names everything the teacher depends on (the data it was trained and stopped on, the task,
the model, the recipe, the precision), so a teacher is reused only for inputs that would rebuild it.
Training checkpoints at every eval point (weights, AdamW state, step, accuracy, torch RNG) into one
file written to a temp name and renamed, so a killed or failed bootstrap resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from opd.config import RunConfig
from opd.errors import PermanentError

KEY_VERSION = 2  # 1: before the data fingerprint and max_prompt_tokens were part of the key


class TeacherBootstrapFailed(PermanentError, RuntimeError):
    """The teacher did not reach min_accuracy within max_steps: a retry would end the same way."""


def _recipe(cfg: RunConfig) -> dict:
    """Every input of the training trajectory except the data itself and where it stops."""
    task = cfg.data.synthetic.model_dump()
    # options added later keep their default out of the key, so earlier teachers (and the shipped one) keep theirs
    if task["kind"] == "addition":
        del task["kind"]
        if task["term_order"] == "given":
            del task["term_order"]
    boot = cfg.teacher.bootstrap.model_dump(mode="json")
    if boot["train"]["micro_batch"] is None:
        del boot["train"]["micro_batch"]
    if boot["model"]["architecture"] == "llama":
        del boot["model"]["architecture"]
    spec = {"bootstrap": boot, "task": task, "seed": cfg.seed, "max_tokens": cfg.opd.max_tokens,
            # the teacher's position table is sized for prompt + completion
            "max_prompt_tokens": cfg.data.max_prompt_tokens, "v": KEY_VERSION}
    if cfg.task.prompt_format != "raw":  # the teacher learns the prompts as the chat template renders them
        spec["prompt"] = {"format": cfg.task.prompt_format, "system": cfg.task.system_prompt}
    if cfg.training.mixed_precision != "no":  # a bf16-trained teacher is a different teacher
        spec["mixed_precision"] = cfg.training.mixed_precision
    return spec


def _digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_key(cfg: RunConfig, data_fingerprint: str) -> str:
    """The finished teacher: recipe + the fingerprint of the train/eval data it learned and stopped on."""
    return _digest({**_recipe(cfg), "data": data_fingerprint})


def checkpoint_key(cfg: RunConfig, data_fingerprint: str) -> str:
    """The trajectory: as ``cache_key`` but without max_steps, so a bootstrap that ran out of steps
    resumes when max_steps is raised (the fix its error message gives)."""
    spec = {**_recipe(cfg), "data": data_fingerprint}
    spec["bootstrap"] = {k: v for k, v in spec["bootstrap"].items() if k != "max_steps"}
    return _digest(spec)


@dataclass
class Progress:
    """Where a bootstrap stands: what a checkpoint holds besides the tensors."""

    step: int = 0
    accuracy: float = 0.0
    elapsed_s: float = 0.0  # wall seconds spent so far, over every attempt


def save_checkpoint(path: Path, model, optimizer, progress: Progress) -> None:
    """One file, written under a temp name and renamed: a reader sees the old or the new state, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": progress.step,
                "accuracy": progress.accuracy, "elapsed_s": progress.elapsed_s,
                "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer) -> Progress:
    """Restore ``model`` and ``optimizer`` from ``path``; a fresh Progress when there is none."""
    if not path.is_file():
        return Progress()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(state["step"], state["accuracy"], state["elapsed_s"])


def train(cfg: RunConfig, pairs: list[tuple[list[int], list[int]]], pad_id: int, model, trainer,
          evaluate: Callable[[], float], ckpt: Path, log: Callable[[str], None]) -> Progress:
    """SFT on ground truth in chunks of eval_every steps until min_accuracy or max_steps; a checkpoint
    at every eval point. Batches derive from (seed, chunk start), so a resumed run replays exactly."""
    from opd.sft import sft_train

    boot = cfg.teacher.bootstrap
    prog = load_checkpoint(ckpt, model, trainer.torch_optimizer)
    if prog.step:
        log(f"teacher bootstrap: resuming from the checkpoint at step {prog.step} "
            f"(held-out accuracy {prog.accuracy:.3f})")
    t0 = time.time() - prog.elapsed_s
    while prog.step < boot.max_steps and (prog.step == 0 or prog.accuracy < boot.min_accuracy):
        chunk = min(boot.eval_every, boot.max_steps - prog.step)
        sft_train(trainer, pairs, boot.train, pad_id, cfg.seed, steps=chunk, start_step=prog.step)
        prog = Progress(prog.step + chunk, evaluate(), time.time() - t0)
        if prog.step % boot.eval_every == 0:  # eval points only: a shorter last chunk would not replay
            save_checkpoint(ckpt, model, trainer.torch_optimizer, prog)
        log(f"teacher step {prog.step}/{boot.max_steps}: held-out accuracy {prog.accuracy:.3f}")
    if prog.accuracy < boot.min_accuracy:
        raise TeacherBootstrapFailed(
            f"teacher reached only {prog.accuracy:.3f} < teacher.bootstrap.min_accuracy={boot.min_accuracy} after "
            f"{prog.step} steps: raise teacher.bootstrap.max_steps (it resumes from step {prog.step}) or the model size")
    return prog

