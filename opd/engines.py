"""The run's inference engines, owned by one object with a lifetime the flow controls.

A vLLM engine takes tens of seconds to start and holds its memory until closed, so the student's
sampler and the teacher are started once on first use, kept across OPD rounds, and closed when the
flow leaves ``with Engines(cfg) as engines:``. No module-level caches: whoever holds the object
owns the engines.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from opd.config import RunConfig
from opd.models import load_model, pick_device, resolve_dtype
from opd.sampling.base import Sampler, Weights
from opd.teachers import HFTeacher, TeacherScorer, make_teacher


def student_dtype(cfg: RunConfig, model_dir: str) -> str:
    return resolve_dtype(cfg.student.dtype, model_dir, pick_device(cfg.device))


def teacher_dtype(cfg: RunConfig, model_dir: str) -> str:
    return resolve_dtype(cfg.teacher.dtype, model_dir, pick_device(cfg.device))


def make_sampler(cfg: RunConfig, model_dir: str, eos_id: int) -> Sampler:
    """Chosen by config (opd.sampler), never silently: an engine that fails to start is an error."""
    o = cfg.opd
    if o.sampler == "hf":
        from opd.sampling.hf_sampler import HFSampler

        return HFSampler(model_dir, eos_id=eos_id, device=cfg.device, dtype=student_dtype(cfg, model_dir))
    from opd.sampling.vllm_sampler import VLLMSampler

    return VLLMSampler(model_dir, eos_id=eos_id, seed=cfg.seed, max_model_len=cfg.data.max_prompt_tokens + o.max_tokens,
                       weight_sync=o.weight_sync, device=cfg.device, tensor_parallel_size=o.tensor_parallel_size,
                       dtype=student_dtype(cfg, model_dir), gpu_memory_utilization=o.gpu_memory_utilization,
                       enforce_eager=o.enforce_eager,
                       **({"lora_rank": o.lora.r} if o.lora is not None else {}))


# vLLM's "the engine process is gone": every later call fails the same way, so never retry on it as is
DEAD_ENGINE_ERRORS = ("EngineDeadError",)


class Engines:
    """The student's sampler and the teacher (scorer and, where this process runs it, its weights)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._sampler: Sampler | None = None
        self._teacher: TeacherScorer | None = None
        self._teacher_model = None

    def __enter__(self) -> "Engines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def sampling(self) -> bool:
        """Whether the sampler engine is up (its start is a cost of its own, not a weight sync)."""
        return self._sampler is not None

    def sampler(self, student_dir: str, eos_id: int) -> Sampler:
        """The sampler serving the weights in ``student_dir``: started on first use, else handed those
        weights if it serves others (e.g. the next round starting from the last round's checkpoint)."""
        want = Weights(str(student_dir))
        if self._sampler is None:
            self._sampler = make_sampler(self.cfg, str(student_dir), eos_id)
        elif self._sampler.weights != want:
            self._sampler.publish(want)
        return self._sampler

    def teacher_model(self, teacher_dir: str):
        """The teacher's weights in this process (the hf scorer, or a loss on the teacher's logits)."""
        if self._teacher_model is None:
            self._teacher_model = load_model(teacher_dir, pick_device(self.cfg.device),
                                             trust_remote_code=self.cfg.teacher.trust_remote_code,
                                             dtype=teacher_dtype(self.cfg, teacher_dir))
        return self._teacher_model

    def teacher(self, teacher_dir: str, pad_id: int) -> TeacherScorer:
        """The teacher's grader, chosen by teacher.scorer: hf wraps ``teacher_model``; a vLLM engine or a
        server client is made once and kept."""
        if self._teacher is None:
            c, o = self.cfg, self.cfg.opd
            if c.teacher.scorer == "hf":
                self._teacher = HFTeacher(None, model=self.teacher_model(teacher_dir), pad_id=pad_id,
                                          micro_batch=o.micro_batch)
            else:
                self._teacher = make_teacher(
                    c.teacher.scorer, teacher_dir, micro_batch=o.micro_batch, seed=c.seed,
                    # +1: scoring generates 1 token; evaluation may grade longer completions than training
                    max_model_len=c.data.max_prompt_tokens + max(o.max_tokens, c.eval.max_tokens or 0) + 1,
                    endpoint=c.teacher.endpoint, served_model_name=c.teacher.served_model_name,
                    trust_remote_code=c.teacher.trust_remote_code, tensor_parallel_size=c.teacher.tensor_parallel_size,
                    gpu_memory_utilization=c.teacher.gpu_memory_utilization, enforce_eager=c.teacher.enforce_eager,
                    dtype=teacher_dtype(c, teacher_dir))
        return self._teacher

    def drop_if_dead(self, error: BaseException) -> bool:
        """After a failed step: if an engine died (vLLM's EngineDeadError anywhere in the cause chain),
        close them all so the task's retry starts fresh ones instead of calling a dead engine again."""
        seen, e = set(), error
        while e is not None and id(e) not in seen:
            if type(e).__name__ in DEAD_ENGINE_ERRORS:
                self.close()
                return True
            seen.add(id(e))
            e = e.__cause__ or e.__context__
        return False

    @contextlib.contextmanager
    def guard(self, stage: str, log: Callable[[str], None] = print) -> Iterator["Engines"]:
        """Run a stage's engine calls; if an engine died in them, close every engine, say so, and re-raise,
        so the task's retry starts fresh engines instead of calling a dead one. Other errors pass untouched."""
        try:
            yield self
        except BaseException as e:
            if self.drop_if_dead(e):
                log(f"{stage}: an inference engine died ({type(e).__name__}); the retry starts fresh ones")
            raise

    def close(self) -> None:
        for engine in (self._sampler, self._teacher):
            if engine is not None:
                try:
                    engine.close()
                except Exception:  # a dead engine may fail its own shutdown; it is gone either way
                    pass
        self._sampler = self._teacher = self._teacher_model = None


def borrowed(cfg: RunConfig, engines: Engines | None) -> contextlib.AbstractContextManager[Engines]:
    """The caller's engines, left open for it (the flow's, kept from SFT to evaluation), else fresh ones
    closed on leaving: one ``with`` for a stage that runs inside a flow or on its own."""
    return contextlib.nullcontext(engines) if engines is not None else Engines(cfg)
