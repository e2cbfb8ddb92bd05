"""The learner: the student and its optimizer, fed train batches, publishing weights for the sampler.

``learn_step`` is the generic update: one optimizer step (``StudentTrainer.step``: micro-batches,
mixed precision, and under torchrun each rank its shard of the same global rows) whose per-micro-batch
loss the spec picks (``opd.objectives.micro_batch_loss``). ``LocalLearner`` keeps the student in this
process; ``opd.learner_group.GroupLearner`` keeps it on a torchrun group. Both answer the same three
calls: ``update``, ``weights`` (write them where the sampler reads) and ``finish`` (the checkpoint).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from opd.batching import length_buckets, pack, scatter_completion
from opd.checkpoints import write_checkpoint, write_sync
from opd.lm_head import window_logprobs
from opd.losses import masked_mean, sampled_logprobs
from opd.objectives import MicroBatch, micro_batch_loss, topk_grid
from opd.rollouts import TrainBatch
from opd.sampling.base import Weights
from opd.trainer import StudentTrainer


class Learner(Protocol):
    def update(self, batch: TrainBatch, lr: float) -> dict[str, float]:
        """One optimizer step on the batch; the step's metrics (token-weighted over the global batch)."""
        ...

    def weights(self) -> Weights:
        """The current weights, written where the sampler can read them (full weights, or LoRA adapters)."""
        ...

    def finish(self, out: Path):
        """Write the round's checkpoint to ``out``; return the plain trained model (for evaluation)."""
        ...

    def close(self) -> None: ...


def learn_step(trainer: StudentTrainer, batch: TrainBatch, spec, pad_id: int, micro_batch: int,
               lr: float | None = None, teacher_model=None, lm_head: str = "full") -> dict[str, float]:
    """One optimizer step over ``batch.rollouts`` with the loss of ``spec`` (a loss spec of
    ``opd.config``: ``kind`` and its settings); ``teacher_model`` for the specs whose signal is the
    teacher's logits. Every loss reports ``student_entropy`` (mean over completion tokens).

    ``lm_head="chunked"`` (training.lm_head; losses on the sampled token only) runs the LM head in row
    blocks inside the model's forward (``opd.lm_head.window_logprobs``): the [tokens, vocab] logits never
    exist at once, so a 152k vocabulary costs one block of them, not the micro-batch's. Micro-batches are
    cut from length-sorted rows (``opd.batching.length_buckets``) wherever a rank has more than one."""
    batch = batch.reordered(length_buckets([len(r.prompt_ids) + len(r.completion_ids) for r in batch.rollouts],
                                           trainer.world, micro_batch))
    rollouts = batch.rollouts

    def loss_fn(model, s: int, e: int):
        chunk = rollouts[s:e]
        b = pack([r.prompt_ids for r in chunk], [r.completion_ids for r in chunk], pad_id).to(trainer.device)
        if lm_head == "chunked":
            logits_BTV = None
            logp_new_BT, entropy_BT = window_logprobs(model, b)
        else:
            logits_BTV = b.logits(model)
            logp_new_BT, entropy_BT = sampled_logprobs(logits_BTV, b.targets)
        mb = MicroBatch(b, logits_BTV, logp_new_BT, scatter_completion([r.sampler_logprobs for r in chunk], b),
                        advantages_BT=None if batch.advantages is None else scatter_completion(batch.advantages[s:e], b),
                        topk=None if batch.teacher_topk is None else topk_grid(batch.teacher_topk, s, e, b),
                        teacher_model=teacher_model)
        loss, metrics = micro_batch_loss(spec, mb)
        metrics["student_entropy"] = float(masked_mean(entropy_BT, b.loss_mask))
        return loss, int(b.loss_mask.sum()), metrics

    return trainer.step(rollouts, micro_batch, loss_fn, batch.completion_tokens, lr)


class LocalLearner:
    """The student in this process (training.num_processes == 1)."""

    def __init__(self, trainer: StudentTrainer, tok, spec, micro_batch: int, sync_dir: Path, lora: bool,
                 teacher_model=None, lm_head: str = "full"):
        self.trainer, self.tok, self.spec, self.micro_batch = trainer, tok, spec, micro_batch
        self.sync_dir, self.lora, self.teacher_model, self.lm_head = Path(sync_dir), lora, teacher_model, lm_head

    def update(self, batch: TrainBatch, lr: float) -> dict[str, float]:
        return learn_step(self.trainer, batch, self.spec, self.tok.pad_token_id, self.micro_batch, lr,
                          self.teacher_model, self.lm_head)

    def weights(self) -> Weights:
        write_sync(self.trainer, self.tok, self.sync_dir, lora=self.lora)
        return Weights(str(self.sync_dir), adapter=self.lora)

    def finish(self, out: Path):
        return write_checkpoint(self.trainer, self.tok, out, lora=self.lora)

    def close(self) -> None:
        pass
