"""One OPD round: resume, ``steps_per_round`` calls of ``opd.step.step``, a checkpoint, its record.

Weights, optimizer state and metrics are the whole state of a round: prompt choice and sampling seeds
derive from (seed, round, step), so a resumed run replays the next round exactly.
"""
from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from opd.config import RunConfig
from opd.data.dataset import DataRef
from opd.engines import Engines, teacher_dtype
from opd.evaluation import slice_accuracy, task_check
from opd.learner import Learner, LocalLearner
from opd.learner_group import GroupLearner, GroupSpec
from opd.ledger import PhaseCost
from opd.models import load_model, load_tokenizer, pick_device, set_threads
from opd.objectives import signal_for
from opd.prompting import prompt_format
from opd.rewards import verifier_rewards
from opd.records import ModelRef, RoundMetrics, RoundResult, RunLayout, fresh, publish_dir, read_done
from opd.schedule import lr_at
from opd.step import StepResult, step
from opd.trainer import StudentTrainer

RNG_SCHEME = "(seed*1000+round)*1000+step"


def step_prompts(seed: int, k: int, s: int, n_prompts: int, per_step: int) -> tuple[list[int], int]:
    """Which prompts step ``s`` of round ``k`` samples, and its sampling seed (``RNG_SCHEME``)."""
    rng = random.Random((seed * 1000 + k) * 1000 + s)
    return rng.sample(range(n_prompts), min(per_step, n_prompts)), rng.randrange(2**31)


def make_learner(cfg: RunConfig, k: int, student: ModelRef, teacher: ModelRef, tok, layout: RunLayout,
                 engines: Engines, signal: str) -> Learner:
    """The student for round ``k``, in this process or on a torchrun group (training.num_processes).

    Round 1 starts Adam afresh: SFT's second moments are tuned to small, converged gradients, and
    dividing the noisier policy gradient by them makes the first OPD steps far too large."""
    o, spec = cfg.opd, cfg.opd.loss
    opt_state = Path(student.path) / "optimizer.pt"
    opt_state = opt_state if k > 1 and opt_state.is_file() and o.lora is None else None
    if cfg.training.num_processes > 1:
        t = cfg.training
        return GroupLearner(GroupSpec(
            num_processes=t.num_processes, strategy=t.strategy, device=cfg.device, student_dir=student.path,
            optimizer_path=str(opt_state) if opt_state else None,
            teacher_dir=teacher.path if signal == "logits" else None, sync_dir=str(layout.round_sync(k)),
            final_dir=str(layout.round_group(k) / "final"), lr=o.lr, pad_id=tok.pad_token_id,
            micro_batch=o.micro_batch, loss=spec.model_dump_json(), driver_pid=os.getpid(), devices=t.devices,
            lora=o.lora.model_dump() if o.lora else None, mixed_precision=t.mixed_precision,
            gradient_checkpointing=t.gradient_checkpointing, lm_head=t.lm_head, student_dtype=cfg.student.dtype,
            teacher_dtype=teacher_dtype(cfg, teacher.path) if signal == "logits" else "float32"),
            layout.round_group(k))
    model = load_model(student.path, pick_device(cfg.device))
    if o.lora is not None:
        from opd.lora import apply_lora

        model = apply_lora(model, o.lora)
    if cfg.training.gradient_checkpointing != "none":
        from opd.memory import apply_checkpointing

        apply_checkpointing(model, cfg.training.gradient_checkpointing)
    trainer = StudentTrainer(model, o.lr, mixed_precision=cfg.training.mixed_precision, device=cfg.device,
                             stage="OPD update", lr_field="opd.lr")
    if opt_state is not None:
        from opd.checkpoints import load_optimizer

        load_optimizer(trainer.model, trainer.torch_optimizer, opt_state)
    return LocalLearner(trainer, tok, spec, o.micro_batch, layout.round_sync(k), lora=o.lora is not None,
                        teacher_model=engines.teacher_model(teacher.path) if signal == "logits" else None,
                        lm_head=cfg.training.lm_head)


@dataclass
class RoundStats:
    """What a round's steps add up to: their metrics, tokens and seconds."""

    steps: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        (*RoundMetrics.TIMINGS, "engine_start_s"), 0.0))
    sampled_tokens: int = 0
    sequence_tokens: int = 0
    rollouts: int = 0
    finished: int = 0

    def add(self, r: StepResult) -> None:
        self.steps.append(r.metrics)
        for key, s in r.seconds.items():
            self.seconds[key] += s
        self.sampled_tokens += r.sampled_tokens
        self.sequence_tokens += r.sequence_tokens
        self.rollouts += len(r.rollouts)
        self.finished += sum(x.finished for x in r.rollouts)

    def metrics(self, k: int, eval_slice_accuracy: float | None, processes: int) -> RoundMetrics:
        mean = lambda key: sum(m[key] for m in self.steps) / len(self.steps)  # noqa: E731
        sec = self.seconds
        return RoundMetrics(
            round=k, reverse_kl=mean("reverse_kl"), loss=mean("loss"),
            ratio_max=max(m["ratio_max"] for m in self.steps),
            sampler_trainer_absdiff_max=max(m["sampler_trainer_absdiff_max"] for m in self.steps),
            grad_norm=mean("grad_norm"), student_entropy=mean("student_entropy"),
            mean_completion_tokens=self.sampled_tokens / self.rollouts, eos_fraction=self.finished / self.rollouts,
            eval_slice_accuracy=eval_slice_accuracy,
            sample_tokens_per_s=self.sampled_tokens / max(sec["sample_s"], 1e-9),
            score_tokens_per_s=self.sequence_tokens / max(sec["score_s"], 1e-9),
            update_tokens_per_s=self.sequence_tokens / max(sec["update_s"], 1e-9),
            update_processes=processes, **sec,
            student_topk_mass=mean("student_topk_mass") if "student_topk_mass" in self.steps[0] else None,
            reward_mean=mean("reward_mean") if "reward_mean" in self.steps[0] else None)

    def cost(self, k: int, student_params: int, teacher_params: int) -> dict:
        cost = PhaseCost(f"opd_round_{k}")
        cost.sample(student_params, self.sampled_tokens)
        cost.teacher(teacher_params, self.sequence_tokens)
        cost.train(student_params, self.sequence_tokens)
        cost.wall_s = sum(self.seconds.values())
        return cost.as_dict()


def eval_slice_accuracy(cfg: RunConfig, model, tok, ev) -> float | None:
    """Greedy accuracy on the first ``opd.eval_slice`` eval rows; None without answers or a verifier."""
    return slice_accuracy(model, tok, ev, cfg.opd.eval_slice, cfg.opd.max_tokens, prompt_format(cfg), task_check(cfg))


def opd_round(cfg: RunConfig, k: int, data: DataRef, teacher: ModelRef, student: ModelRef, layout: RunLayout,
              engines: Engines, log=print) -> RoundResult:
    """``steps_per_round`` on-policy steps, then one checkpoint; a completed round is never re-applied."""
    out = layout.round(k)
    if (meta := read_done(out)) is not None:
        log(f"round {k}: done by an earlier attempt, reused from {out}")
        return RoundResult(k, ModelRef(str(out), meta["params"]), meta["metrics"], meta["cost"])
    set_threads()
    o, spec = cfg.opd, cfg.opd.loss
    tok = load_tokenizer(teacher.path)
    d = data.load()
    train_prompts, fmt = d["train"]["prompt"], prompt_format(cfg)
    answers = d["train"]["answer"] if o.reward is not None else None  # prepare_data refused data without
    stats = RoundStats()
    t, starting = time.time(), not engines.sampling
    sampler = engines.sampler(student.path, tok.eos_token_id)
    stats.seconds["engine_start_s" if starting else "sync_s"] += time.time() - t
    if starting:  # once per run: its own line, and not part of sync_s
        log(f"{o.sampler} sampler engine started in {stats.seconds['engine_start_s']:.1f}s")
    signal = signal_for(spec, cfg.teacher.scorer)
    grader = engines.teacher(teacher.path, tok.pad_token_id) if signal != "logits" else None
    learner = make_learner(cfg, k, student, teacher, tok, layout, engines, signal)
    try:
        with engines.guard(f"round {k}", log):
            for s in range(o.steps_per_round):
                idx, seed = step_prompts(cfg.seed, k, s, len(train_prompts), o.prompts_per_step)
                prompts_P = fmt.encode_all(tok, [train_prompts[i] for i in idx])
                lr = lr_at((k - 1) * o.steps_per_round + s, o.lr, o.warmup_steps)
                rewards = (None if answers is None else
                           verifier_rewards(tok, task_check(cfg), [answers[i] for i in idx]))
                stats.add(step(sampler, grader, learner, spec, prompts_P, samples_per_prompt=o.samples_per_prompt,
                               max_tokens=o.max_tokens, seed=seed, lr=lr, signal=signal,
                               publish=s < o.steps_per_round - 1, reward_fn=rewards,
                               reward_weight=o.reward.weight if o.reward is not None else 0.0))
            tmp = fresh(out)
            model = learner.finish(tmp)
    finally:
        learner.close()
    metrics = stats.metrics(k, eval_slice_accuracy(cfg, model, tok, d["eval"]), cfg.training.num_processes)
    sec = stats.seconds
    log(f"round {k}: reverse KL {metrics.reverse_kl:.4f}, eval-slice accuracy {metrics.eval_slice_accuracy}, "
        f"sample {sec['sample_s']:.1f}s score {sec['score_s']:.1f}s update {sec['update_s']:.1f}s "
        f"sync {sec['sync_s']:.1f}s" + (f" ({cfg.training.num_processes} update processes)"
                                        if cfg.training.num_processes > 1 else ""))
    cost = stats.cost(k, student.params, teacher.params)
    publish_dir(tmp, out, {"params": student.params, "metrics": metrics.as_dict(), "cost": cost,
                           "completed_at": time.time(), "pid": os.getpid(),
                           "rng": {"seed": cfg.seed, "scheme": RNG_SCHEME}})
    shutil.rmtree(layout.round_sync(k), ignore_errors=True)
    shutil.rmtree(layout.round_group(k), ignore_errors=True)
    return RoundResult(k, ModelRef(str(out), student.params), metrics.as_dict(), cost)
