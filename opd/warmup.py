"""Before OPD: the teacher (given, shipped, cached or bootstrapped on the demo task) and the SFT warmup.

Both stages take and return small picklable records (``ModelRef``) and publish their output with
``done.json`` written last, so a retried or resumed stage reuses what finished and never half of it.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from opd import bootstrap as boot, shipped
from opd.checkpoints import save_optimizer
from opd.config import RunConfig
from opd.data import dataset as ds
from opd.data.task import is_correct
from opd.engines import Engines, borrowed
from opd.evaluation import accuracy, slice_accuracy, task_check
from opd.prompting import prompt_format
from opd.ledger import PhaseCost
from opd.models import (build_model, check_vocab, count_params, load_model, load_tokenizer, num_params, pick_device,
                        save_model, set_threads, tokenizer_for)
from opd.records import ModelRef, fresh, publish_dir, read_done
from opd.sft import sft_train
from opd.storage import local_model_dir
from opd.trainer import StudentTrainer


def teacher_cache_key(cfg: RunConfig, data_fingerprint: str) -> str:
    """The bootstrapped teacher's identity: recipe, task, model, precision and the data it learned."""
    return boot.cache_key(cfg, data_fingerprint)


def bootstrap_teacher(cfg: RunConfig, data: ds.DataRef, log=print, use_shipped: bool = True) -> ModelRef:
    """The demo teacher: cached by ``teacher_cache_key``, else the checkpoint shipped in the package
    for that key (sha256 verified), else trained on ground truth (resumable) until min_accuracy.
    The config allows a bootstrap only on the synthetic task (RunConfig._bootstrap_needs_task)."""
    if cfg.teacher.ref is not None:  # the flow's resolve_teacher task turns it into a path first
        raise ValueError(f"teacher.ref {cfg.teacher.ref!r} is unresolved: resolve it to a local path first "
                         "(opd_ops.promotion.resolve_teacher)")
    if cfg.teacher.path:
        path = local_model_dir(cfg, cfg.teacher.path)
        return ModelRef(path, count_params(path))  # from the headers: the teacher may be served elsewhere
    teachers = Path(cfg.home) / "cache" / "teachers"
    key = teacher_cache_key(cfg, data.fingerprint)
    final = teachers / key
    if (meta := read_done(final)) is not None:
        log(f"teacher cached at {final} (held-out accuracy {meta['accuracy']:.3f})")
    elif use_shipped and (src := shipped.find(key)) is not None:
        tmp = fresh(final)
        publish_dir(tmp, final, meta := {**shipped.install(key, src, tmp), "source": "shipped"})
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
    tok, fmt = tokenizer_for(cfg), prompt_format(cfg)
    # the prompt as every later stage renders it (chat template or raw), the solution ending in EOS (end of turn)
    pairs = [(fmt.encode(tok, p), tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id])
             for p, c in zip(d["train"]["prompt"], d["train"]["completion"])]
    model = build_model(spec.model, tok, max_positions=cfg.data.max_prompt_tokens + cfg.opd.max_tokens,
                        seed=cfg.seed).to(pick_device(cfg.device))
    ev, check = d["eval"], task_check(cfg) or is_correct
    trainer = StudentTrainer.for_run(cfg, model, spec.train.lr, spec.train.weight_decay, stage="teacher bootstrap",
                                     lr_field="teacher.bootstrap.train.lr")
    prog = boot.train(cfg, pairs, tok.pad_token_id, model, trainer,
                      lambda: accuracy(model, tok, ev["prompt"], ev["answer"], cfg.opd.max_tokens, fmt, check),
                      ckpt, log)
    cost = PhaseCost("teacher_bootstrap")
    avg_len = sum(len(p) + len(c) for p, c in pairs) / len(pairs)
    cost.train(num_params(model), int(prog.step * spec.train.batch_size * avg_len))
    cost.wall_s = prog.elapsed_s
    tmp = fresh(final)
    save_model(model, tok, tmp)
    meta = {"accuracy": prog.accuracy, "steps": prog.step, "params": num_params(model), "cost": cost.as_dict()}
    publish_dir(tmp, final, meta)
    ckpt.unlink(missing_ok=True)  # the finished teacher replaces its trajectory
    return meta


# ---------------------------------------------------------------- SFT warmup

def starting_student(cfg: RunConfig, teacher: ModelRef, log=print) -> ModelRef:
    """``sft: null``: OPD starts from student.path as it is; nothing is trained or written, and the
    gates' baseline is this student (its tokenizer must be the teacher's)."""
    student_dir = local_model_dir(cfg, cfg.student.path)
    check_vocab(load_tokenizer(teacher.path), load_tokenizer(student_dir))
    log(f"SFT warmup skipped (sft: null): OPD starts from {cfg.student.path}")
    return ModelRef(student_dir, count_params(student_dir))


def precomputed_completions(cfg: RunConfig, tok) -> tuple[list[list[int]], list[list[int]]]:
    """sft.completions as token ids: prompts in the run's format, completions + EOS (the end of the turn)."""
    s3 = None
    if cfg.sft.completions.startswith("s3://"):
        from opd.storage import make_client

        s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
    pairs = ds.sft_pairs(cfg.sft.completions, cfg.sft.num_prompts, s3)
    fmt = prompt_format(cfg)
    return ([fmt.encode(tok, p) for p, _ in pairs],
            [tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id] for _, c in pairs])


def teacher_completions(cfg: RunConfig, teacher: ModelRef, tok, prompts: list[list[int]],
                        engines: Engines) -> list[list[int]]:
    """SFT's training data, written where the teacher runs (teacher.scorer): transformers here, else its
    vLLM engine or server, so a served teacher is never loaded into this process; the engine is the one
    the rounds and evaluation then grade with (started once per run)."""
    return engines.teacher(teacher.path, tok.pad_token_id).complete(
        prompts, cfg.opd.max_tokens, tok.eos_token_id, temperature=cfg.sft.teacher_temperature, seed=cfg.seed)


def sft_warmup(cfg: RunConfig, data: ds.DataRef, teacher: ModelRef, out: Path, log=print,
               engines: Engines | None = None) -> ModelRef:
    """Off-policy distillation: the teacher writes completions, the student imitates them. ``engines``: the
    run's teacher (kept for the rounds); without it, one is started here and closed after the completions."""
    if (meta := read_done(out)) is not None:
        log(f"SFT warmup: done by an earlier attempt, reused from {out}")
        return ModelRef(str(out), meta["params"], meta["metrics"], meta["cost"], meta.get("data_cost", {}))
    if cfg.sft is None:
        return starting_student(cfg, teacher, log)
    set_threads()
    t0 = time.time()
    device = pick_device(cfg.device)
    tok = load_tokenizer(teacher.path)
    d = data.load()
    data_cost = PhaseCost("sft_data")
    if cfg.sft.completions:  # written earlier (by this teacher or any other): nothing to generate
        prompts, comps = precomputed_completions(cfg, tok)
        seq_tokens = sum(len(p) + len(c) for p, c in zip(prompts, comps))
    else:
        rng = random.Random(cfg.seed)
        idx = rng.sample(range(len(d["train"])), min(cfg.sft.num_prompts, len(d["train"])))
        prompts = prompt_format(cfg).encode_all(tok, [d["train"][i]["prompt"] for i in idx])
        with borrowed(cfg, engines) as eng, eng.guard("SFT warmup", log):
            comps = teacher_completions(cfg, teacher, tok, prompts, eng)
        seq_tokens = sum(len(p) + len(c) for p, c in zip(prompts, comps))
        data_cost.teacher(count_params(teacher.path), seq_tokens)
    data_cost.wall_s = time.time() - t0
    t0 = time.time()
    cost = PhaseCost("sft")
    if cfg.student.path:
        student_dir = local_model_dir(cfg, cfg.student.path)
        check_vocab(tok, load_tokenizer(student_dir))
        student = load_model(student_dir, device)
    else:
        student = build_model(cfg.student.model, tok, cfg.data.max_prompt_tokens + cfg.opd.max_tokens,
                              seed=cfg.seed + 1).to(device)
    losses = []
    trainer = StudentTrainer.for_run(cfg, student, cfg.sft.train.lr, cfg.sft.train.weight_decay, stage="SFT warmup",
                                     lr_field="sft.train.lr")
    sft_train(trainer, list(zip(prompts, comps)), cfg.sft.train, tok.pad_token_id, cfg.seed,
              on_step=lambda s, l: losses.append(l))
    avg_len = seq_tokens / len(prompts)
    cost.train(num_params(student), int(cfg.sft.train.steps * cfg.sft.train.batch_size * avg_len))
    acc = slice_accuracy(student, tok, d["eval"], cfg.opd.eval_slice, cfg.opd.max_tokens, prompt_format(cfg),
                         task_check(cfg))
    cost.wall_s = time.time() - t0
    metrics = {"final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])), "eval_slice_accuracy": acc}
    source = (f"{len(prompts)} completions read from {cfg.sft.completions}" if cfg.sft.completions else
              f"the teacher wrote {len(prompts)} completions in {data_cost.wall_s:.0f}s")
    log(f"SFT warmup: {source}, "
        f"{cfg.sft.train.steps} steps in {cost.wall_s:.0f}s; loss {metrics['final_loss']:.4f}, "
        f"eval-slice accuracy {acc}")
    tmp = fresh(out)
    save_model(student, tok, tmp)
    save_optimizer(student, trainer.torch_optimizer, tmp / "optimizer.pt")
    publish_dir(tmp, out, {"params": num_params(student), "metrics": metrics, "cost": cost.as_dict(),
                            "data_cost": data_cost.as_dict()})
    return ModelRef(str(out), num_params(student), metrics, cost.as_dict(), data_cost.as_dict())
