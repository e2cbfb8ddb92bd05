"""Data-parallel SFT steps: every rank takes its shard of the same global batch (DDP via accelerate).

Launch with one process (``python -m opd.distributed``) or several
(``torchrun --nproc_per_node=2 -m opd.distributed`` / ``accelerate launch --num_processes 2 -m opd.distributed``);
on CPU the processes talk over gloo. The loss is the token-weighted mean over the *global* batch:
each rank's summed completion-token NLL is divided by the all-reduced token count and multiplied by
the world size, so DDP's gradient averaging yields exactly the single-process gradient. Hence the loss
trajectory does not depend on the number of processes (up to float summation order).
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch

from opd.batching import PackedBatch, pack
from opd.scoring import token_logprobs
from opd.training import make_optimizer

Pair = tuple[list[int], list[int]]


def make_accelerator():
    """An ``accelerate.Accelerator`` on CPU: single process, or MULTI_CPU (gloo) under a launcher."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def shard_rows(batch: PackedBatch, rank: int, world: int) -> PackedBatch:
    """Rank ``rank``'s contiguous rows of a packed global batch (padding width is the global one)."""
    n = batch.input_ids.shape[0]
    if n < world:
        raise ValueError(f"global batch of {n} rows cannot be split over {world} processes")
    lo, hi = n * rank // world, n * (rank + 1) // world
    return PackedBatch(batch.input_ids[lo:hi], batch.attention_mask[lo:hi], batch.loss_mask[lo:hi])


def global_token_weighted_loss(logp: torch.Tensor, mask: torch.Tensor, accelerator) -> tuple[torch.Tensor, float]:
    """(loss to backward on this rank, global mean NLL for logging).

    local loss = world * local_sum / global_tokens: DDP averages gradients over ranks, so the applied
    gradient is d(global_sum / global_tokens), the single-process token-weighted mean.
    """
    local_sum = -(logp * mask).sum()
    stats = torch.stack([local_sum.detach().double(), mask.sum().double()])
    if accelerator.num_processes > 1:
        stats = accelerator.reduce(stats, reduction="sum")
    global_sum, global_tokens = float(stats[0]), max(1.0, float(stats[1]))
    loss = local_sum * (accelerator.num_processes / global_tokens)
    return loss, global_sum / global_tokens


def train_sft_steps(model, batches: list[list[Pair]], lr: float, pad_id: int, accelerator=None,
                    weight_decay: float = 0.0, max_grad_norm: float | None = 1.0) -> list[float]:
    """One optimizer step per global batch of (prompt_ids, completion_ids); returns the global losses.

    Every rank must pass the same ``batches`` and an identically initialised ``model``. The model is
    wrapped by ``accelerator.prepare`` (DDP when several processes), and trained in place.
    """
    accelerator = accelerator or make_accelerator()
    opt = make_optimizer(model, lr, weight_decay)
    model, opt = accelerator.prepare(model, opt)
    model.train()
    rank, world = accelerator.process_index, accelerator.num_processes
    losses: list[float] = []
    for batch in batches:
        b = pack([p for p, _ in batch], [c for _, c in batch], pad_id)
        b = shard_rows(b, rank, world).to(accelerator.device)
        loss, global_loss = global_token_weighted_loss(token_logprobs(model, b), b.loss_mask, accelerator)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)  # grads are already all-reduced
        opt.step()
        losses.append(global_loss)
    return losses


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
    ap.add_argument("--out", type=Path, default=None, help="write the losses as JSON (rank 0)")
    args = ap.parse_args(argv)

    accelerator = make_accelerator()
    world = accelerator.num_processes
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.use_deterministic_algorithms(True, warn_only=True)
    tok = build_char_tokenizer()
    spec = ModelSpec(num_layers=args.num_layers, hidden_size=args.hidden_size, num_heads=args.num_heads,
                     intermediate_size=args.intermediate_size)
    model = build_llama(spec, tok, max_positions=128, seed=args.seed)  # same init on every rank
    batches = make_global_batches(tok, args.steps, args.batch_size, args.seed)
    losses = train_sft_steps(model, batches, args.lr, tok.pad_token_id, accelerator)
    if accelerator.is_main_process:
        rec = {"num_processes": world, "distributed_type": str(accelerator.distributed_type),
               "backend": accelerator.state.backend, "losses": losses}
        print(json.dumps(rec))
        if args.out:
            args.out.write_text(json.dumps(rec))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
