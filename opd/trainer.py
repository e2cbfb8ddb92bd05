"""The one update path for SFT and OPD: an optimizer step over a global batch, built on accelerate.

accelerate owns the process group and device (one process, or a rank under ``torchrun`` /
``accelerate launch``), mixed precision (autocast; fp16 loss scaling), ``backward``, gradient
clipping (unscaled first) and the no-sync context for gradient accumulation. The student is
wrapped by torch directly: DDP for replicas, FSDP2 ``fully_shard`` per decoder layer for sharding.
``accelerator.prepare(model)`` is not used because under mixed precision it wraps ``forward`` to
return fp32 outputs, i.e. full-vocabulary fp32 logits for the whole micro-batch, which OPD never
needs (it gathers the sampled token, then upcasts); and accelerate's FSDP plugin refuses CPU
process groups, so the sharded path would be untestable here.

Every rank passes the same global rows and trains its contiguous shard in micro-batches (gradient
accumulation, one all-reduce per step). Each micro-batch's token-mean loss is weighted by its share
of the *global* token count and scaled by the world size (DDP/FSDP average over ranks), so a step
is the one-process step whatever the number of processes or micro-batches.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from opd.errors import PermanentError

MIXED_PRECISION = ("no", "bf16", "fp16")

STEP_LOSS = "_step_loss"  # the step's token-weighted loss, checked for finiteness, not reported

# loss_fn(model, start, end) -> (token-mean loss of rows[start:end], their token count, metrics)
LossFn = Callable[[torch.nn.Module, int, int], tuple[torch.Tensor, int, dict[str, float]]]


def make_optimizer(model, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (all of them, or only LoRA adapters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))


def make_accelerator(mixed_precision: str = "no", device: str = "auto"):
    """An ``accelerate.Accelerator``: single process, or one rank of a launched group (gloo on CPU,
    NCCL on GPU). Mixed precision is one setting per process in accelerate."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    from opd.models import pick_device

    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"training.mixed_precision={mixed_precision!r}: choose one of {MIXED_PRECISION}")
    cuda = pick_device(device).type == "cuda"
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("training.mixed_precision=fp16 needs a GPU (fp16 loss scaling); use bf16 or 'no' on CPU")
    # autocast's weight-cast cache keeps a 16-bit copy of every weight a forward used until the forward
    # ends (2 B/param: 3.2 GiB at 1.7B; under FSDP every gathered layer's, i.e. the whole model per rank).
    # Each weight is cast once per forward anyway, so without the cache the copies live only as long as
    # backward needs them, which activation checkpointing makes one layer at a time; same numerics.
    try:
        return Accelerator(cpu=not cuda, mixed_precision=mixed_precision,
                           kwargs_handlers=[AutocastKwargs(cache_enabled=False)])
    except ValueError as e:  # accelerate keeps one precision per process
        raise ValueError(f"training.mixed_precision={mixed_precision!r}: this process already trains with another "
                         f"precision; use one value for the whole run ({e})") from e


def wrap_student(model, strategy: str, device: torch.device):
    """DDP replicas, or FSDP2 shards (one all-gather per decoder layer, as torchtune does)."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    if strategy != "ddp":
        raise ValueError(f"training.strategy={strategy!r}: choose 'ddp' or 'fsdp'")
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class NonFiniteUpdate(PermanentError):
    """A step whose loss or gradient norm is NaN/inf: applying it would corrupt the weights, and
    rerunning it replays the same numbers, so it is refused and never retried."""


class StudentTrainer:
    """The student, its AdamW and the accelerator; ``step`` is the only place a gradient is applied."""

    def __init__(self, model, lr: float, *, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                 mixed_precision: str = "no", strategy: str = "ddp", device: str = "auto", optimizer=None,
                 stage: str = "training", lr_field: str = "the learning rate"):
        """``optimizer``: one already built over ``model``'s parameters (one process only); default AdamW.
        ``stage`` and ``lr_field`` name the stage and its config field in a non-finite step's error."""
        self.stage, self.lr_field, self.steps_done = stage, lr_field, 0
        self.mixed_precision = mixed_precision
        self.accelerator = acc = make_accelerator(mixed_precision, device)
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        model = model.to(self.device)
        self.model = wrap_student(model, strategy, self.device) if self.world > 1 else model
        if optimizer is not None and self.world > 1:
            raise ValueError("a prebuilt optimizer cannot follow the student into DDP/FSDP wrapping; pass none")
        self.optimizer = acc.prepare_optimizer(optimizer or make_optimizer(self.model, lr, weight_decay))
        self.max_grad_norm = math.inf if max_grad_norm is None else max_grad_norm

    @classmethod
    def for_run(cls, cfg, model, lr: float, weight_decay: float = 0.0, *, stage: str = "training",
                lr_field: str = "the learning rate") -> "StudentTrainer":
        """The in-process trainer with the run config's precision and device (teacher bootstrap, SFT, OPD)."""
        return cls(model, lr, weight_decay=weight_decay, mixed_precision=cfg.training.mixed_precision,
                   device=cfg.device, stage=stage, lr_field=lr_field)

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The plain AdamW under accelerate's wrapper (for state-dict save/load)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self, rows: Sequence, micro_batch: int, loss_fn: LossFn, total_tokens: int,
             lr: float | None = None) -> dict[str, float]:
        """One optimizer step over the global batch ``rows``; returns token-weighted metrics (``*_max``
        take the max) all-reduced over ranks, plus ``grad_norm`` (before clipping)."""
        if len(rows) % self.world:
            raise ValueError(f"{len(rows)} rows cannot be split evenly over {self.world} processes: make the "
                             "global batch (opd.prompts_per_step * opd.samples_per_prompt, or batch_size) a "
                             "multiple of training.num_processes")
        if lr is not None:
            self.set_lr(lr)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        lo, hi = len(rows) * self.rank // self.world, len(rows) * (self.rank + 1) // self.world
        starts = list(range(lo, hi, micro_batch))  # equal shards -> the same number of backward passes per rank
        agg: dict[str, float] = {STEP_LOSS: 0.0}
        for i, s in enumerate(starts):
            e = min(s + micro_batch, hi)
            with self._grad_sync(last=i == len(starts) - 1):
                with self.accelerator.autocast():
                    loss, tokens, metrics = loss_fn(self.model, s, e)
                weight = tokens / max(1, total_tokens)
                self.accelerator.backward(loss * (weight * self.world))
            agg[STEP_LOSS] += float(loss.detach()) * weight
            for k, v in metrics.items():
                agg[k] = max(agg.get(k, v), v) if k.endswith("_max") else agg.get(k, 0.0) + v * weight
        if self.world > 1:
            agg = _all_reduce_metrics(agg, self.device)
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        agg["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        self.steps_done += 1
        self._refuse_non_finite(agg.pop(STEP_LOSS), agg["grad_norm"])
        self.optimizer.step()
        return agg

    def _refuse_non_finite(self, loss: float, grad_norm: float) -> None:
        """Raise before ``optimizer.step()``: the weights stay as the last finite step left them.

        Both values are global (all-reduced, or computed from all-reduced gradients), so every rank
        of a group refuses the same step. Under fp16 an inf gradient norm is the loss scaler's
        business (it skips the step and lowers the scale); the loss itself must still be finite."""
        bad = [f"loss is {loss}"] if not math.isfinite(loss) else []
        if not math.isfinite(grad_norm) and self.mixed_precision != "fp16":
            bad.append(f"gradient norm is {grad_norm}")
        if not bad:
            return
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        raise NonFiniteUpdate(
            f"{self.stage} step {self.steps_done}: {' and '.join(bad)} (learning rate {lr:g}); the update was not "
            f"applied and no checkpoint is written. Lower {self.lr_field}, or look for inf/NaN in the inputs "
            "(a model with non-finite weights, extreme token log-probs)")

    def _grad_sync(self, last: bool):
        """Reduce gradients across ranks once per step (on the last micro-batch), not per micro-batch."""
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last or self.world == 1)
            return nullcontext()
        return nullcontext() if last or self.world == 1 else self.accelerator.no_sync(self.model)


def _all_reduce_metrics(agg: dict[str, float], device) -> dict[str, float]:
    """Token-weighted partial sums add up across ranks; ``*_max`` metrics take the max."""
    import torch.distributed as dist

    keys = sorted(agg)  # same order on every rank
    sums = torch.tensor([0.0 if k.endswith("_max") else agg[k] for k in keys], dtype=torch.float64, device=device)
    maxes = torch.tensor([agg[k] if k.endswith("_max") else -math.inf for k in keys], dtype=torch.float64,
                         device=device)  # NCCL reduces device tensors only
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    return {k: float(maxes[i] if k.endswith("_max") else sums[i]) for i, k in enumerate(keys)}
