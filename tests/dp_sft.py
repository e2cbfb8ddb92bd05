"""Data-parallel SFT steps through the one update path (opd.trainer.StudentTrainer, on accelerate).

A test helper, launched with one process (``python tests/dp_sft.py``) or several
(``torchrun --nproc_per_node=2 tests/dp_sft.py`` / ``accelerate launch --num_processes 2 tests/dp_sft.py``);
on CPU the processes talk over gloo. Every rank takes its contiguous rows of the same global batch;
the loss is the token-weighted mean over the *global* batch, so the loss trajectory does not depend
on the number of processes or micro-batches (up to float summation order).
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch

from opd.trainer import MIXED_PRECISION, StudentTrainer
from opd.sft import sft_step

Pair = tuple[list[int], list[int]]


def train_sft_steps(model, batches: list[list[Pair]], lr: float, pad_id: int, micro_batch: int | None = None,
                    mixed_precision: str = "no", weight_decay: float = 0.0) -> tuple[StudentTrainer, list[float]]:
    """One optimizer step per global batch of (prompt_ids, completion_ids); returns the trainer and the
    global losses. Every rank must pass the same ``batches`` and an identically initialised ``model``."""
    trainer = StudentTrainer(model, lr, weight_decay=weight_decay, mixed_precision=mixed_precision)
    return trainer, [sft_step(trainer, batch, pad_id, micro_batch) for batch in batches]


def make_global_batches(tokenizer, steps: int, batch_size: int, seed: int, num_terms: int = 3,
                        max_digits: int = 3) -> list[list[Pair]]:
    """Deterministic global batches of tokenized synthetic-task pairs (same on every rank)."""
    from opd.data.task import generate

    examples = generate(max(64, steps * batch_size), num_terms, max_digits, seed)
    pairs = [(tokenizer(e.prompt).input_ids,
              tokenizer(e.completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
             for e in examples]
    rng = random.Random(seed)
    return [[pairs[rng.randrange(len(pairs))] for _ in range(batch_size)] for _ in range(steps)]


def main(argv: list[str] | None = None) -> None:
    from opd.config import ModelSpec
    from opd.models import build_char_tokenizer, build_llama

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8, help="global batch size (split over processes)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-layers", type=int, default=1)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--num-heads", type=int, default=2)
    ap.add_argument("--intermediate-size", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=None, help="rows per forward/backward (gradient accumulation)")
    ap.add_argument("--mixed-precision", default="no", choices=MIXED_PRECISION)
    ap.add_argument("--out", type=Path, default=None, help="write the losses as JSON (rank 0)")
    args = ap.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.use_deterministic_algorithms(True, warn_only=True)
    tok = build_char_tokenizer()
    spec = ModelSpec(num_layers=args.num_layers, hidden_size=args.hidden_size, num_heads=args.num_heads,
                     intermediate_size=args.intermediate_size)
    model = build_llama(spec, tok, max_positions=128, seed=args.seed)  # same init on every rank
    batches = make_global_batches(tok, args.steps, args.batch_size, args.seed)
    trainer, losses = train_sft_steps(model, batches, args.lr, tok.pad_token_id, args.micro_batch,
                                      args.mixed_precision)
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        rec = {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
               "backend": accelerator.state.backend, "mixed_precision": accelerator.mixed_precision,
               "micro_batch": args.micro_batch, "losses": losses}
        print(json.dumps(rec))
        if args.out:
            args.out.write_text(json.dumps(rec))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
