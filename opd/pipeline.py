"""The distillation stages as plain functions over a RunConfig and paths.

`tasks/` wraps each in a Prefect task; nothing here knows about Prefect. Every stage takes
and returns small, picklable values (paths, metrics), never models or tensors, and writes its
outputs to a temp dir renamed into place, so a retried stage never sees half a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


from opd import bootstrap as boot, shipped
from opd.config import RunConfig
from opd.data import dataset as ds
from opd.data.validate import ValidationReport, validate
from opd.evaluation import EvalResult, accuracy, evaluate
from opd.generation import generate
from opd.ledger import PhaseCost
from opd.lora import apply_lora
from opd.paths import check_name, within
from opd.models import (build_char_tokenizer, build_llama, load_model, load_tokenizer, num_params, pick_device,
                        save_model, set_threads)
from opd.sampling import Sampler, make_sampler
from opd.scoring import score_completions
from opd.teachers import TeacherScorer, make_teacher
from opd.trainer import StudentTrainer
from opd.training import (LOGIT_LOSSES, NonFiniteWeights, check_finite_weights, load_optimizer, opd_update,
                          save_optimizer, sft_train, write_checkpoint, write_sync)
from opd.update_group import GroupSpec, UpdateGroup

DONE = "done.json"


@dataclass(frozen=True)
class ModelRef:
    path: str
    params: int
    metrics: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    data_cost: dict = field(default_factory=dict)  # SFT warmup only: the teacher writing its training data


@dataclass(frozen=True)
class RoundResult:
    round: int
    student: ModelRef
    metrics: dict
    cost: dict


def run_dir(cfg: RunConfig, run_key: str) -> Path:
    """<home>/runs/<run_key>; the key is checked before any path is built from it."""
    return within(Path(cfg.home) / "runs", check_name(run_key, "--run-key"), field="--run-key")


def _publish_dir(tmp: Path, final: Path, meta: dict) -> None:
    """Write DONE last and rename into place: a directory with DONE is complete.

    Weights with NaN/inf are never published: the temp dir is removed and the stage fails for good."""
    try:
        check_finite_weights(tmp, final.name)
    except NonFiniteWeights:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / DONE).write_text(json.dumps(meta, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _fresh(path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _done(path: Path) -> dict | None:
    f = path / DONE
    return json.loads(f.read_text()) if f.is_file() else None


def tokenizer_for(cfg: RunConfig):
    if cfg.teacher.path:
        return load_tokenizer(cfg.teacher.path, cfg.teacher.trust_remote_code)
    return build_char_tokenizer()


def _encode_prompts(tok, prompts: list[str]) -> list[list[int]]:
    return [tok(p).input_ids for p in prompts]


def _eval_slice_accuracy(cfg: RunConfig, model, tok, ev) -> float | None:
    """Greedy accuracy on the first `opd.eval_slice` eval rows; None when the data has no answers."""
    if "answer" not in ev.column_names:
        return None
    n = min(cfg.opd.eval_slice, len(ev))
    return accuracy(model, tok, ev["prompt"][:n], ev["answer"][:n], cfg.opd.max_tokens)


# ---------------------------------------------------------------- data

UNVALIDATED = ".unvalidated"


def prepare_data(cfg: RunConfig, out: Path, s3=None) -> ds.DataRef:
    """Build the splits into `<out>.unvalidated`; only `validate_data` promotes them to `out`."""
    if cfg.data.source == "synthetic":
        d = ds.synthetic(cfg.data, cfg.seed)
    else:
        d = ds.from_jsonl(cfg.data, cfg.seed, s3)
    return ds.save(d, out.with_name(out.name + UNVALIDATED))


def validate_data(cfg: RunConfig, data: ds.DataRef) -> tuple[ValidationReport, ds.DataRef | None]:
    """GX checks; valid data moves into place, invalid data is deleted (a refused run leaves nothing)."""
    d = data.load()
    report = validate(d["train"].to_pandas(), d["eval"].to_pandas(), tokenizer_for(cfg),
                      cfg.data.min_prompt_tokens, cfg.data.max_prompt_tokens, sources=ds.source_names(cfg.data))
    src = Path(data.dir)
    if not report.success:
        shutil.rmtree(src, ignore_errors=True)
        return report, None
    final = src.with_name(src.name.removesuffix(UNVALIDATED)) if src.name.endswith(UNVALIDATED) else src
    if final != src:
        if final.exists():
            shutil.rmtree(final)
        src.rename(final)
    return report, ds.DataRef(str(final), data.fingerprint, data.n_train, data.n_eval)


# ---------------------------------------------------------------- teacher

def teacher_cache_key(cfg: RunConfig, data_fingerprint: str) -> str:
    """The bootstrapped teacher's identity: recipe, task, model, precision and the data it learned."""
    return boot.cache_key(cfg, data_fingerprint)


def local_model_dir(cfg: RunConfig, path: str) -> str:
    """A local directory for a model given as a path or s3:// URI (fetched once into the cache)."""
    if not path.startswith("s3://"):
        return path
    from opd.registry.client import make_client
    from opd.storage import fetch_dir

    s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
    return str(fetch_dir(path, Path(cfg.home) / "cache" / "models", s3))


def bootstrap_teacher(cfg: RunConfig, data: ds.DataRef, log=print, use_shipped: bool = True) -> ModelRef:
    """The demo teacher: cached by ``teacher_cache_key``, else the checkpoint shipped in the package
    for that key (sha256 verified), else trained on ground truth (resumable) until min_accuracy.
    The config allows a bootstrap only on the synthetic task (RunConfig._bootstrap_needs_task)."""
    if cfg.teacher.path:
        path = local_model_dir(cfg, cfg.teacher.path)
        return ModelRef(path, num_params(load_model(path, trust_remote_code=cfg.teacher.trust_remote_code)))
    teachers = Path(cfg.home) / "cache" / "teachers"
    key = teacher_cache_key(cfg, data.fingerprint)
    final = teachers / key
    if (meta := _done(final)) is not None:
        log(f"teacher cached at {final} (held-out accuracy {meta['accuracy']:.3f})")
    elif use_shipped and (src := shipped.find(key)) is not None:
        tmp = _fresh(final)
        _publish_dir(tmp, final, meta := {**shipped.install(key, src, tmp), "source": "shipped"})
        log(f"teacher: the checkpoint shipped for this recipe (sha256 verified, held-out accuracy "
            f"{meta['accuracy']:.3f}), installed at {final}")
    else:
        meta = _train_teacher(cfg, data, final, teachers / "partial" / f"{boot.checkpoint_key(cfg, data.fingerprint)}.pt",
                              log)
    return ModelRef(str(final), meta["params"], {"accuracy": meta["accuracy"]}, meta.get("cost", {}))


def _train_teacher(cfg: RunConfig, data: ds.DataRef, final: Path, ckpt: Path, log) -> dict:
    """Train from ground truth (resuming from ``ckpt``), publish to ``final``; returns its metadata."""
    d = data.load()
    set_threads()
    spec = cfg.teacher.bootstrap
    tok = build_char_tokenizer()
    pairs = [(tok(p).input_ids, tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id])
             for p, c in zip(d["train"]["prompt"], d["train"]["completion"])]
    model = build_llama(spec.model, tok, max_positions=cfg.data.max_prompt_tokens + cfg.opd.max_tokens,
                        seed=cfg.seed).to(pick_device(cfg.device))
    ev = d["eval"]
    trainer = _trainer(cfg, model, spec.train.lr, spec.train.weight_decay, "teacher bootstrap",
                       "teacher.bootstrap.train.lr")
    prog = boot.train(cfg, pairs, tok.pad_token_id, model, trainer,
                      lambda: accuracy(model, tok, ev["prompt"], ev["answer"], cfg.opd.max_tokens), ckpt, log)
    cost = PhaseCost("teacher_bootstrap")
    avg_len = sum(len(p) + len(c) for p, c in pairs) / len(pairs)
    cost.train(num_params(model), int(prog.step * spec.train.batch_size * avg_len))
    cost.wall_s = prog.elapsed_s
    tmp = _fresh(final)
    save_model(model, tok, tmp)
    meta = {"accuracy": prog.accuracy, "steps": prog.step, "params": num_params(model), "cost": cost.as_dict()}
    _publish_dir(tmp, final, meta)
    ckpt.unlink(missing_ok=True)  # the finished teacher replaces its trajectory
    return meta


def _trainer(cfg: RunConfig, model, lr: float, weight_decay: float = 0.0, stage: str = "training",
             lr_field: str = "the learning rate") -> StudentTrainer:
    """The in-process student trainer (teacher bootstrap, SFT, one-process OPD updates); ``stage`` and
    ``lr_field`` name the stage and its learning-rate field if a step goes non-finite."""
    return StudentTrainer(model, lr, weight_decay=weight_decay, mixed_precision=cfg.training.mixed_precision,
                          device=cfg.device, stage=stage, lr_field=lr_field)


def check_vocab(teacher_tok, student_tok) -> None:
    """OPD grades the student's tokens with the teacher: the two must share one vocabulary."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
        diff = sorted(set(a.items()) ^ set(b.items()))[:5]
        raise ValueError(f"teacher and student tokenizers differ (e.g. {diff}); OPD needs one shared vocabulary: "
                         "pick a student from the teacher's family or retokenize")


# ---------------------------------------------------------------- SFT warmup

def sft_warmup(cfg: RunConfig, data: ds.DataRef, teacher: ModelRef, out: Path, log=print) -> ModelRef:
    """Off-policy distillation: the teacher writes completions, the student imitates them."""
    if (meta := _done(out)) is not None:
        log(f"SFT warmup: done by an earlier attempt, reused from {out}")
        return ModelRef(str(out), meta["params"], meta["metrics"], meta["cost"], meta.get("data_cost", {}))
    set_threads()
    t0 = time.time()
    device = pick_device(cfg.device)
    tok = load_tokenizer(teacher.path)
    teacher_model = load_model(teacher.path, device)
    d = data.load()
    rng = random.Random(cfg.seed)
    idx = rng.sample(range(len(d["train"])), min(cfg.sft.num_prompts, len(d["train"])))
    prompts = _encode_prompts(tok, [d["train"][i]["prompt"] for i in idx])
    comps = generate(teacher_model, prompts, tok.eos_token_id, tok.pad_token_id, cfg.opd.max_tokens,
                     temperature=cfg.sft.teacher_temperature, seed=cfg.seed)
    seq_tokens = sum(len(p) + len(c) for p, c in zip(prompts, comps))
    data_cost = PhaseCost("sft_data")
    data_cost.teacher(num_params(teacher_model), seq_tokens)
    data_cost.wall_s = time.time() - t0
    t0 = time.time()
    cost = PhaseCost("sft")
    if cfg.student.path:
        student_dir = local_model_dir(cfg, cfg.student.path)
        check_vocab(tok, load_tokenizer(student_dir))
        student = load_model(student_dir, device)
    else:
        student = build_llama(cfg.student.model, tok, cfg.data.max_prompt_tokens + cfg.opd.max_tokens,
                              seed=cfg.seed + 1).to(device)
    losses = []
    trainer = _trainer(cfg, student, cfg.sft.train.lr, cfg.sft.train.weight_decay, "SFT warmup", "sft.train.lr")
    sft_train(trainer, list(zip(prompts, comps)), cfg.sft.train, tok.pad_token_id, cfg.seed,
              on_step=lambda s, l: losses.append(l))
    avg_len = seq_tokens / len(prompts)
    cost.train(num_params(student), int(cfg.sft.train.steps * cfg.sft.train.batch_size * avg_len))
    acc = _eval_slice_accuracy(cfg, student, tok, d["eval"])
    cost.wall_s = time.time() - t0
    metrics = {"final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])), "eval_slice_accuracy": acc}
    log(f"SFT warmup: the teacher wrote {len(prompts)} completions in {data_cost.wall_s:.0f}s, "
        f"{cfg.sft.train.steps} steps in {cost.wall_s:.0f}s; loss {metrics['final_loss']:.4f}, "
        f"eval-slice accuracy {acc}")
    tmp = _fresh(out)
    save_model(student, tok, tmp)
    save_optimizer(student, trainer.torch_optimizer, tmp / "optimizer.pt")
    _publish_dir(tmp, out, {"params": num_params(student), "metrics": metrics, "cost": cost.as_dict(),
                            "data_cost": data_cost.as_dict()})
    return ModelRef(str(out), num_params(student), metrics, cost.as_dict(), data_cost.as_dict())


# ---------------------------------------------------------------- OPD rounds

_SAMPLERS: dict[str, Sampler] = {}


def get_sampler(cfg: RunConfig, key: str, model_dir: str, eos_id: int, weights_version: int = 0) -> Sampler:
    """One engine per run, kept alive across rounds; new weights are synced, not reloaded.

    (model_dir, weights_version) names the weights: the per-step sync directory is rewritten in
    place, so the version tells the sampler its contents changed."""
    s = _SAMPLERS.get(key)
    weights = (model_dir, weights_version)
    if s is None:
        s = make_sampler(cfg.opd.sampler, model_dir, eos_id, seed=cfg.seed,
                         max_model_len=cfg.data.max_prompt_tokens + cfg.opd.max_tokens,
                         weight_sync=cfg.opd.weight_sync, device=cfg.device,
                         tensor_parallel_size=cfg.opd.tensor_parallel_size,
                         **({"lora_rank": cfg.opd.lora.r} if cfg.opd.lora is not None else {}))
        s.current = weights
        _SAMPLERS[key] = s
    elif s.current != weights:
        s.update_weights(model_dir)
        s.current = weights
    return s


_TEACHERS: dict[str, TeacherScorer] = {}


def get_teacher(cfg: RunConfig, teacher_path: str, model=None, pad_id: int | None = None) -> TeacherScorer:
    """The teacher's grader, chosen by teacher.scorer. hf wraps the teacher already loaded here;
    a vllm engine or a server client is made once per process and kept across rounds."""
    if cfg.teacher.scorer == "hf":
        return make_teacher("hf", teacher_path, model=model, pad_id=pad_id, micro_batch=cfg.opd.micro_batch)
    key = f"{cfg.teacher.scorer}:{teacher_path}"
    if key not in _TEACHERS:
        _TEACHERS[key] = make_teacher(
            cfg.teacher.scorer, teacher_path, micro_batch=cfg.opd.micro_batch, seed=cfg.seed,
            max_model_len=cfg.data.max_prompt_tokens + cfg.opd.max_tokens + 1,  # +1: scoring generates 1 token
            endpoint=cfg.teacher.endpoint, served_model_name=cfg.teacher.served_model_name,
            trust_remote_code=cfg.teacher.trust_remote_code,
            tensor_parallel_size=cfg.teacher.tensor_parallel_size,
            gpu_memory_utilization=0.3)  # shares the GPU with the sampler engine (0.5) and the trainer
    return _TEACHERS[key]


def close_samplers() -> None:
    while _SAMPLERS:
        _SAMPLERS.popitem()[1].close()
    while _TEACHERS:
        _TEACHERS.popitem()[1].close()


class LocalUpdate:
    """The student and its optimizer in this process (training.num_processes == 1)."""

    def __init__(self, cfg: RunConfig, student_dir: str, opt_state: Path | None, teacher_model, tok, device):
        self.cfg, self.tok, self.teacher_model = cfg, tok, teacher_model
        model = load_model(student_dir, device)
        if cfg.opd.lora is not None:
            model = apply_lora(model, cfg.opd.lora)
        self.trainer = _trainer(cfg, model, cfg.opd.lr, stage="OPD update", lr_field="opd.lr")
        if opt_state is not None:
            load_optimizer(self.trainer.model, self.trainer.torch_optimizer, opt_state)

    def update(self, rollouts, teacher_lp, lr: float, teacher_topk=None) -> dict:
        o = self.cfg.opd
        return opd_update(self.trainer, rollouts, teacher_lp, self.tok.pad_token_id, o.micro_batch, o.kl_coef,
                          o.clip_ratio, o.advantage_baseline, loss=o.loss, teacher_model=self.teacher_model,
                          topk=o.topk, gkd_beta=o.gkd_beta, forward_kl_coef=o.forward_kl_coef,
                          teacher_topk=teacher_topk, lr=lr, discount=o.discount)

    def sync_dir(self, path: Path) -> str:
        return write_sync(self.trainer, self.tok, path, lora=self.cfg.opd.lora is not None)

    def finish(self, out: Path):
        """Write the round's checkpoint to ``out``; return the trained model (for eval)."""
        return write_checkpoint(self.trainer, self.tok, out, lora=self.cfg.opd.lora is not None)

    def close(self) -> None:
        pass


class GroupUpdate:
    """The student on a torchrun group of training.num_processes ranks (opd.update_group)."""

    def __init__(self, cfg: RunConfig, student_dir: str, opt_state: Path | None, teacher_dir: str | None, tok,
                 device, workdir: Path, sync: Path):
        o = cfg.opd
        self.device = device
        spec = GroupSpec(num_processes=cfg.training.num_processes, strategy=cfg.training.strategy, device=cfg.device,
                         student_dir=student_dir, optimizer_path=str(opt_state) if opt_state else None,
                         teacher_dir=teacher_dir, sync_dir=str(sync), final_dir=str(workdir / "final"), lr=o.lr,
                         pad_id=tok.pad_token_id, micro_batch=o.micro_batch, kl_coef=o.kl_coef,
                         clip_ratio=o.clip_ratio, baseline=o.advantage_baseline, loss=o.loss, topk=o.topk,
                         gkd_beta=o.gkd_beta, forward_kl_coef=o.forward_kl_coef, driver_pid=os.getpid(),
                         devices=cfg.training.devices, lora=o.lora.model_dump() if o.lora else None,
                         mixed_precision=cfg.training.mixed_precision, discount=o.discount)
        self.group = UpdateGroup(spec, workdir)

    def update(self, rollouts, teacher_lp, lr: float, teacher_topk=None) -> dict:
        return self.group.update(rollouts, teacher_lp, lr, teacher_topk)

    def sync_dir(self, path: Path) -> str:
        return self.group.spec.sync_dir  # rank 0 wrote the step's weights there before answering

    def finish(self, out: Path):
        final = self.group.finish()
        shutil.copytree(final, out, dirs_exist_ok=True)
        return load_model(out, self.device)

    def close(self) -> None:
        self.group.close()


def opd_round(cfg: RunConfig, k: int, data: ds.DataRef, teacher: ModelRef, student: ModelRef, out: Path,
              sampler_key: str, log=print) -> RoundResult:
    """`steps_per_round` on-policy steps (sample -> teacher grades every token -> one update),
    the sampler synced to the trainer's weights before each; one checkpoint at the end."""
    if (meta := _done(out)) is not None:  # a retried task never re-applies a completed round
        log(f"round {k}: done by an earlier attempt, reused from {out}")
        return RoundResult(k, ModelRef(str(out), meta["params"]), meta["metrics"], meta["cost"])
    set_threads()
    device = pick_device(cfg.device)
    o = cfg.opd
    tok = load_tokenizer(teacher.path)
    d = data.load()
    train_prompts = d["train"]["prompt"]
    # reverse_kl_topk takes a vLLM/remote teacher's top-k (prompt_logprobs=k); with the hf scorer it,
    # like the other logit losses, runs the teacher inside the update on the same batch.
    scorer_topk = o.loss == "reverse_kl_topk" and cfg.teacher.scorer != "hf"
    use_scorer = o.loss == "reverse_kl_is" or scorer_topk
    # The teacher's weights load here only if this process runs them: the hf scorer, or a logit
    # loss in an in-process update. A served teacher (32B in the Qwen config) never loads here.
    in_update = o.loss in LOGIT_LOSSES and not scorer_topk and cfg.training.num_processes == 1
    teacher_model = (load_model(teacher.path, device)
                     if in_update or (use_scorer and cfg.teacher.scorer == "hf") else None)
    scorer = get_teacher(cfg, teacher.path, teacher_model, tok.pad_token_id) if use_scorer else None
    # Round 1 starts Adam afresh: SFT's second moments are tuned to small, converged gradients,
    # and dividing the noisier policy-gradient by them makes the first OPD steps far too large.
    opt_state = Path(student.path) / "optimizer.pt"
    opt_state = opt_state if k > 1 and opt_state.is_file() and o.lora is None else None
    sync_dir = out.with_name(out.name + ".sync")
    if cfg.training.num_processes > 1:
        trainer = GroupUpdate(cfg, student.path, opt_state, None if scorer_topk else teacher.path, tok, device,
                              out.with_name(out.name + ".group"), sync_dir)
    else:
        trainer = LocalUpdate(cfg, student.path, opt_state, teacher_model, tok, device)
    cost = PhaseCost(f"opd_round_{k}")
    timings = {"sample_s": 0.0, "score_s": 0.0, "update_s": 0.0, "sync_s": 0.0}
    steps, n_sampled, n_scored, n_rollouts, n_finished = [], 0, 0, 0, 0
    try:
        timings["engine_start_s"] = 0.0  # the engine starts once per run: its own line, not part of sync_s
        if sampler_key not in _SAMPLERS:
            t = time.time()
            get_sampler(cfg, sampler_key, student.path, tok.eos_token_id)
            timings["engine_start_s"] = time.time() - t
            log(f"{o.sampler} sampler engine started in {timings['engine_start_s']:.1f}s")
        for step in range(o.steps_per_round):
            t = time.time()
            if step == 0:
                sampler = get_sampler(cfg, sampler_key, student.path, tok.eos_token_id)
                if o.lora is not None:
                    sampler.update_adapter(None)  # the round starts from merged weights, no adapters
            elif o.lora is not None:  # the trainer moved its adapters: the sampler takes only those
                sampler.update_adapter(trainer.sync_dir(sync_dir))
            else:  # the trainer moved: hand the sampler the new weights (in place, no restart)
                sampler = get_sampler(cfg, sampler_key, trainer.sync_dir(sync_dir), tok.eos_token_id,
                                      weights_version=step)
            timings["sync_s"] += time.time() - t

            t = time.time()
            rng = random.Random((cfg.seed * 1000 + k) * 1000 + step)
            idx = rng.sample(range(len(train_prompts)), min(o.prompts_per_step, len(train_prompts)))
            rollouts = sampler.sample(_encode_prompts(tok, [train_prompts[i] for i in idx]),
                                      n=o.samples_per_prompt, max_tokens=o.max_tokens, temperature=o.temperature,
                                      top_p=o.top_p, seed=rng.randrange(2**31))
            timings["sample_s"] += time.time() - t

            t = time.time()
            prompts_ids, comps = [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts]
            teacher_lp = teacher_topk = None  # logit losses run the teacher inside the update
            if scorer_topk:
                teacher_topk = scorer.score_topk(prompts_ids, comps, o.topk)
            elif scorer is not None:
                teacher_lp = scorer.score(prompts_ids, comps)
            timings["score_s"] += time.time() - t

            t = time.time()
            global_step = (k - 1) * o.steps_per_round + step
            # linear warmup: Adam's first steps are sign-like, so keep them small
            lr = o.lr * min(1.0, (global_step + 1) / max(1, o.warmup_steps))
            steps.append(trainer.update(rollouts, teacher_lp, lr, teacher_topk))
            timings["update_s"] += time.time() - t
            tokens = sum(len(r.completion_ids) for r in rollouts)
            seq_tokens = sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
            n_sampled, n_scored = n_sampled + tokens, n_scored + seq_tokens
            n_rollouts, n_finished = n_rollouts + len(rollouts), n_finished + sum(r.finished for r in rollouts)
        tmp = _fresh(out)
        model = trainer.finish(tmp)
    finally:
        trainer.close()
    cost.sample(student.params, n_sampled)
    cost.teacher(teacher.params, n_scored)
    cost.train(student.params, n_scored)

    acc = _eval_slice_accuracy(cfg, model, tok, d["eval"])
    mean = lambda key: sum(m[key] for m in steps) / len(steps)  # noqa: E731
    metrics = {
        "round": k,
        "reverse_kl": mean("reverse_kl"),  # on-policy samples, measured before each step's update
        "loss": mean("loss"),
        "ratio_max": max(m["ratio_max"] for m in steps),
        "sampler_trainer_absdiff_max": max(m["sampler_trainer_absdiff_max"] for m in steps),
        "grad_norm": mean("grad_norm"),
        "student_entropy": mean("student_entropy"),
        "mean_completion_tokens": n_sampled / n_rollouts,
        "eos_fraction": n_finished / n_rollouts,
        "eval_slice_accuracy": acc,
        "sample_tokens_per_s": n_sampled / max(timings["sample_s"], 1e-9),
        "score_tokens_per_s": n_scored / max(timings["score_s"], 1e-9),
        "update_tokens_per_s": n_scored / max(timings["update_s"], 1e-9),
        "update_processes": cfg.training.num_processes,
        **timings,
    }
    cost.wall_s = sum(timings.values())
    log(f"round {k}: reverse KL {metrics['reverse_kl']:.4f}, eval-slice accuracy {acc}, "
        f"sample {timings['sample_s']:.1f}s score {timings['score_s']:.1f}s update {timings['update_s']:.1f}s "
        f"sync {timings['sync_s']:.1f}s" + (f" ({cfg.training.num_processes} update processes)"
                                            if cfg.training.num_processes > 1 else ""))
    # Weights, optimizer state and metrics are the whole round state: prompt choice and sampling
    # seeds derive from (seed, round, step), so a resumed run replays the next round exactly.
    _publish_dir(tmp, out, {"params": student.params, "metrics": metrics, "cost": cost.as_dict(),
                            "completed_at": time.time(), "pid": os.getpid(),
                            "rng": {"seed": cfg.seed, "scheme": "(seed*1000+round)*1000+step"}})
    shutil.rmtree(sync_dir, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".group"), ignore_errors=True)
    return RoundResult(k, ModelRef(str(out), student.params), metrics, cost.as_dict())


# ---------------------------------------------------------------- evaluation

def evaluate_models(cfg: RunConfig, data: ds.DataRef, teacher: ModelRef, students: dict[str, str]) -> dict[str, dict]:
    """Teacher and each named student on the same eval prompts, answers and sampling seed."""
    set_threads()
    device = pick_device(cfg.device)
    tok = load_tokenizer(teacher.path)
    ev = data.load()["eval"]
    n = min(cfg.eval.max_examples, len(ev))
    # answer is optional in user data: no column (or no values) -> accuracies None, the KL still measured
    prompts, answers = ev["prompt"][:n], ev["answer"][:n] if "answer" in ev.column_names else None
    t_model = load_model(teacher.path, device)
    out = {"teacher": {**evaluate(t_model, t_model, tok, prompts, answers, cfg.opd.max_tokens, cfg.seed).as_dict(),
                       "params": num_params(t_model)}}
    scorer = get_teacher(cfg, teacher.path, t_model, tok.pad_token_id)
    for name, path in students.items():
        m = load_model(path, device)
        out[name] = {**evaluate(m, t_model, tok, prompts, answers, cfg.opd.max_tokens, cfg.seed,
                                cfg.eval.kl_samples_per_prompt, teacher_scorer=scorer).as_dict(),
                     "params": num_params(m)}
    return out


EVALUATION = "evaluation.json"


def _dir_identity(path: str) -> list[list]:
    """(name, size, mtime) of a model directory's files: a rewritten checkpoint changes it, and it
    costs no read of the weights (hashing a 16 GB student on every resume would)."""
    return [[f.name, (st := f.stat()).st_size, st.st_mtime_ns] for f in sorted(Path(path).iterdir()) if f.is_file()]


def evaluation_key(cfg: RunConfig, data: ds.DataRef, teacher: ModelRef, students: dict[str, str],
                   incumbent_version: int | None) -> str:
    """What an evaluation measured: the models' files, the eval data and settings. The incumbent is
    named by its registry version (immutable, verified on pull), not its freshly pulled files."""
    spec = {"eval": cfg.eval.model_dump(mode="json", exclude={"gates"}), "max_tokens": cfg.opd.max_tokens,
            "seed": cfg.seed, "scorer": cfg.teacher.scorer, "data": [data.fingerprint, data.n_eval],
            "teacher": [teacher.path, _dir_identity(teacher.path)], "incumbent_version": incumbent_version,
            "students": {k: [p, _dir_identity(p)] for k, p in sorted(students.items()) if k != "incumbent"}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _reuse_evaluation(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["results"] if saved.get("key") == key else None


def evaluate_all(cfg: RunConfig, data: ds.DataRef, teacher: ModelRef, sft: ModelRef, final: ModelRef,
                 incumbent: str | None = None, incumbent_version: int | None = None, rdir: Path | None = None,
                 log=print) -> dict[str, dict]:
    """Teacher, SFT and OPD students (and the incumbent) on one eval set. With ``rdir``, the results are
    kept in ``rdir/evaluation.json`` (written last, renamed into place) under ``evaluation_key``, so a
    resumed run reuses them instead of evaluating the same models again."""
    students = {"sft_student": sft.path, "opd_student": final.path}
    if incumbent:
        students["incumbent"] = incumbent
    key = evaluation_key(cfg, data, teacher, students, incumbent_version if incumbent else None)
    out = Path(rdir) / EVALUATION if rdir is not None else None
    if out is not None and (results := _reuse_evaluation(out, key)) is not None:
        log(f"evaluation reused from {out} (same models, data and eval settings)")
        return results
    results = evaluate_models(cfg, data, teacher, students)
    if incumbent and incumbent_version is not None:
        results["incumbent"]["version"] = incumbent_version
    if out is not None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "results": results}, indent=2))
        os.replace(tmp, out)
    return results


# ---------------------------------------------------------------- registry

PUBLISHED_FILES_EXCLUDE = ("optimizer.pt", DONE)


def register(cfg: RunConfig, final: ModelRef, rdir: Path, lineage: dict) -> dict:
    """Publish the final student once per run (a retry after success returns the same version)."""
    from opd.registry.client import RegistryUnavailable, make_client
    from opd.registry.store import publish

    marker = rdir / "registered.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    src = Path(final.path)
    staged = _fresh(rdir / "publish")
    for f in src.iterdir():
        if f.is_file() and f.name not in PUBLISHED_FILES_EXCLUDE:
            try:  # a hard link: staging a 16 GB checkpoint should not double its disk use
                os.link(f, staged / f.name)
            except OSError:
                shutil.copy2(f, staged / f.name)
    s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
    try:  # the run key as claim token: a retry after a crash reuses (or returns) this run's version
        pub = publish(s3, cfg.registry.bucket, cfg.registry.prefix, cfg.registry.model_name, staged, lineage,
                      claim_token=lineage.get("run_key"))
    except RegistryUnavailable as e:
        if cfg.registry.endpoint_url is None:  # the local stack's: its message says how to start it
            raise
        # the user's own endpoint (loopback or not): `opd stack up` would not bring it back
        raise RegistryUnavailable(f"register: cannot reach S3 endpoint {cfg.registry.endpoint_url} "
                                  f"({type(e.__cause__ or e).__name__}); check registry.endpoint_url and that the "
                                  "endpoint is up (the task retries with backoff, tasks.registry_retries)") from e
    out = {"model": pub.model, "version": pub.version, "uri": pub.uri}
    marker.write_text(json.dumps(out))
    shutil.rmtree(staged, ignore_errors=True)  # the registry holds it now; the run keeps final.path
    return out
