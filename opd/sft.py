"""SFT: cross-entropy on the completion tokens of (prompt, completion) pairs, one ``StudentTrainer.step``
per batch (micro-batches, mixed precision, any number of processes). The teacher bootstrap and the SFT
warmup train with it."""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable

from opd.batching import pack
from opd.logprobs import token_logprobs
from opd.losses import sft_cross_entropy
from opd.schedule import lr_at
from opd.trainer import StudentTrainer

if TYPE_CHECKING:  # the update path imports without pydantic
    from opd.config import TrainSpec


def sft_step(trainer: StudentTrainer, batch: list[tuple[list[int], list[int]]], pad_id: int,
             micro_batch: int | None = None, lr: float | None = None) -> float:
    """One SFT step: cross-entropy on the completion tokens of the global ``batch`` (token-weighted
    mean, accumulated over micro-batches); returns the loss."""
    total = sum(len(c) for _, c in batch)

    def loss_fn(model, s: int, e: int):
        b = pack([p for p, _ in batch[s:e]], [c for _, c in batch[s:e]], pad_id).to(trainer.device)
        loss = sft_cross_entropy(token_logprobs(model, b), b.loss_mask)
        return loss, int(b.loss_mask.sum()), {"loss": float(loss.detach())}

    return trainer.step(batch, micro_batch or len(batch), loss_fn, total, lr)["loss"]


def sft_train(trainer: StudentTrainer, pairs: list[tuple[list[int], list[int]]], spec: TrainSpec, pad_id: int,
              seed: int, steps: int | None = None, start_step: int = 0,
              on_step: Callable[[int, float], None] | None = None, one_pass: bool = False) -> StudentTrainer:
    """Cross-entropy on completion tokens; `steps` lets a caller train in chunks (eval in between).

    Batches are drawn at random with replacement; ``one_pass`` walks ``pairs`` in order instead, so
    freshly generated data is trained on exactly once (each generated token is paid for once)."""
    rng = random.Random(seed + start_step)
    for step in range(start_step, start_step + (steps or spec.steps)):
        if one_pass:
            i = (step - start_step) * spec.batch_size
            batch = [pairs[(i + j) % len(pairs)] for j in range(spec.batch_size)]
        else:
            batch = [pairs[rng.randrange(len(pairs))] for _ in range(spec.batch_size)]
        loss = sft_step(trainer, batch, pad_id, spec.micro_batch, lr_at(step, spec.lr, spec.warmup_steps, spec.steps))
        if on_step:
            on_step(step, loss)
    return trainer
