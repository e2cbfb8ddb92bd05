"""Forgetting recovery: a model good at task A is mid-trained on task B until A collapses; OPD with the original
model as teacher (A prompts only) vs FLOP-matched SFT on that model's samples vs a 70/30 B/A replay mix.

    python benchmarks/forgetting.py             # full protocol: 3 seeds, 3 arms x (5 LRs + 2 seeds); resumable
    python benchmarks/forgetting.py --quick     # CI smoke run: 1 seed, 1 LR, tiny budgets, 128-problem eval sets
    python benchmarks/forgetting.py --replot    # redraw the PNG and table from --out's JSON
    # also: --arms, --seeds, --steps, --every, --eval-n, --lrs, --mid-every, --mid-cap, --config, --set, --out

Implements the protocol pre-registered in benchmarks/README.md ("forgetting.py", commit 0a48a4e), before any run:

    T0       the shipped demo teacher (configs/demo.yaml): good at A (addition with a scratchpad)
    B        digit reversal in the same character vocabulary: "40712=" -> "21704#21704", checked exactly
    mid      per seed, T0 + SFT on B ground truth (lr 1e-3, batch 64) until A greedy drops >= 20 points -> M
    opd      from M: the product's round (opd.rounds.opd_round), teacher T0, A's train prompts only, 200 steps
    sft      from M: SFT on T0's temperature-1 samples of A prompts, FLOP-matched to opd (T0's generation counted)
    replay   from T0: the mid-training recipe for as many steps as mid-training took, batches 45 B + 19 A

Measured on this machine's 2 shared CPU cores (load average 8-9, torch on 1 thread; 2026-11-30, a 20-step run): an
eval point (1,024 A + 1,024 B problems, greedy and T=1) ~22 s, an opd step ~2.3 s, the sft arm ~1.3 s per opd-step
equivalent (~4.5 SFT steps, T0's generation included), a mid-training or replay step ~0.23 s, the vLLM engine start
~2 min. So an opd run is ~12 min, an sft run ~8 min, a replay run ~2 min, and the full protocol (21 runs + 3
mid-trainings) ~2.5-3 hours here, less on a quiet machine.

Every (arm, LR, seed) run keeps its curve, and its latest checkpoint until it finishes, under
``<home>/bench/forgetting/<settings key>/``, so a killed full run restarts where it stopped (rerun the command).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import benchmarks.common as common  # noqa: E402
from benchmarks.common import (EVAL_SEED, ROLLOUT, ZERO, SFTRun, eval_set, mean_or_none, non_finite,  # noqa: E402
                               run_matched, run_rounds, spread, write_json)

DEFAULT_OUT = REPO / "benchmarks" / "results" / "forgetting.json"
PROTOCOL_COMMIT = "0a48a4e"  # benchmarks/README.md, "forgetting.py": committed before this script existed
THRESHOLD = {"recovered_fraction": 0.9, "b_drop_points": 5.0}
LR_GRID = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]  # the same for every arm; 1e-3 is the mid-training (and demo SFT) LR
EVAL_SAMPLES = 4  # temperature-1 samples per eval problem
MID = {"lr": 1e-3, "batch": 64, "warmup_steps": 20, "drop": 0.20}  # mid-training recipe (replay's too)
SFT_BATCH, SFT_WARMUP = 64, 20  # the sft arm: T0's samples, one step per 64 fresh prompts
REPLAY_B, REPLAY_A = 45, 19  # 70.3% / 29.7% of a 64-row batch
REPLAY_POINTS = 5
B_EVAL_SEED, B_TRAIN_SEED = 4_242_000, 9_100_000
ARMS = ("opd", "sft", "replay")


# ---------------------------------------------------------------- task B: digit reversal

def reversal_digits(max_tokens: int) -> tuple[int, int]:
    """Digit counts of task B: 4..7 when the completion "<rev>#<rev>" + EOS fits max_tokens 16 (the demo);
    fewer for a shorter budget (configs/ci.yaml's 12: 2..5)."""
    hi = min(7, (max_tokens - 2) // 2)
    if hi < 1:
        raise SystemExit(f"opd.max_tokens={max_tokens} cannot hold a reversal completion")
    return max(1, hi - 3), hi


def reversal_example(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    """(prompt, completion): "40712=" -> "21704#21704"; digits uniform, leading zeros allowed."""
    s = "".join(str(rng.randrange(10)) for _ in range(rng.randint(lo, hi)))
    return s + "=", s[::-1] + "#" + s[::-1]


def reversal_problems(n: int, seed: int, lo: int, hi: int, exclude: set[str] | frozenset = frozenset(),
                      distinct: bool = True) -> list[tuple[str, str]]:
    """``n`` problems from the stream ``seed``, none of whose prompts is in ``exclude``."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        p, c = reversal_example(rng, lo, hi)
        if p in exclude or (distinct and p in seen):
            continue
        seen.add(p)
        out.append((p, c))
    return out


def reversal_correct(text: str, target: str) -> bool:
    """Exact: the decoded completion (specials dropped) is the whole target, scratchpad and answer."""
    return text == target


# ---------------------------------------------------------------- setup

@dataclass
class Bench:
    """What every run shares: config, data, T0, eval sets, tokenizer, engines and where runs are kept."""

    cfg: Any
    data: Any
    teacher: Any  # ModelRef of T0
    ev_a: dict
    ev_b: dict  # {"prompt": [...], "target": [...]}
    train_a: dict  # A's train split: prompt, completion (ground truth)
    b_digits: tuple[int, int]
    tok: Any
    t_model: Any  # T0 in this process: grades every A eval point's reverse KL and writes the sft arm's data
    engines: Any
    root: Path
    a: argparse.Namespace
    t0: dict | None = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="sft needs opd: it is added")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first one runs the LR search")
    p.add_argument("--steps", type=int, default=200, help="opd steps (and the sft arm's FLOP budget in opd steps)")
    p.add_argument("--every", type=int, default=20, help="opd steps between eval points (one opd_round each)")
    p.add_argument("--eval-n", type=int, default=1024, help="held-out problems per task per eval point")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help=f"LR grid of every arm (default {LR_GRID})")
    p.add_argument("--mid-every", type=int, default=50, help="mid-training steps between A checks")
    p.add_argument("--mid-cap", type=int, default=2000, help="mid-training steps at most")
    p.add_argument("--replay-points", type=int, default=REPLAY_POINTS, help="eval points of the replay arm")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: 1 seed, 1 LR (3e-4), mid-training checks every 10 steps capped at 50, 2 opd "
                        "eval points of 10 steps of 16 prompts x 4 samples, 2 replay points, 128-problem eval sets, "
                        "nothing kept for resuming")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path; the PNG and .txt table go beside it")
    p.add_argument("--replot", action="store_true", help="redraw the PNG and reprint the table from --out's JSON")
    a = p.parse_args(argv)
    if "sft" in a.arms and "opd" not in a.arms:
        a.arms = ["opd", *a.arms]
    a.arms = [k for k in ARMS if k in a.arms]
    if a.quick:
        a.seeds, a.steps, a.every, a.eval_n = a.seeds[:1], 20, 10, min(a.eval_n, 128)
        a.mid_every, a.mid_cap, a.replay_points = 10, 50, 2
        a.lrs = a.lrs[:1] if a.lrs else [3e-4]
    a.lrs = a.lrs or list(LR_GRID)
    if a.steps % a.every:
        p.error(f"--steps {a.steps} is not a multiple of --every {a.every}")
    if a.mid_cap % a.mid_every:
        p.error(f"--mid-cap {a.mid_cap} is not a multiple of --mid-every {a.mid_every}")
    return a


def protocol_config(path: str, overrides: list[str], quick: bool = False):
    """The config with the protocol's rollout settings as overrides (all equal to the demo's); --quick samples
    16 prompts per step instead of 64 (the sft arm's FLOP budget follows)."""
    from opd.config import load_config

    rollout = {**ROLLOUT, "prompts_per_step": 16} if quick else ROLLOUT
    return load_config(path, [*(f"opd.{k}={v}" for k, v in rollout.items()), *overrides])


def settings_key(cfg, teacher_path: str, a: argparse.Namespace) -> str:
    """What a saved run depends on besides (arm, LR, seed): a finished run is reused only under the same key."""
    spec = {"teacher": teacher_path, "opd": cfg.opd.model_dump(mode="json", exclude={"lr", "loss", "reward", "rounds",
                                                                                     "steps_per_round"}),
            "training": cfg.training.model_dump(mode="json"), "task": cfg.task.model_dump(mode="json"),
            "data": cfg.data.model_dump(mode="json"), "steps": a.steps, "every": a.every, "eval_n": a.eval_n,
            "eval_seed": EVAL_SEED, "eval_samples": EVAL_SAMPLES, "mid": MID, "mid_every": a.mid_every,
            "mid_cap": a.mid_cap, "replay": [REPLAY_B, REPLAY_A, a.replay_points], "sft": [SFT_BATCH, SFT_WARMUP],
            "b": [B_EVAL_SEED, B_TRAIN_SEED], "protocol": PROTOCOL_COMMIT}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def setup(a: argparse.Namespace, cfg, log=print) -> Bench:
    """Data and T0 (the teacher bootstrap's cache, i.e. the shipped checkpoint for the demo recipe), the two
    eval sets, T0 in this process, and one engine set (the OPD teacher is T0 for every run)."""
    from opd.data import dataset as ds
    from opd.data.prepare import prepare_data, validate_data
    from opd.engines import Engines
    from opd.models import load_model, load_tokenizer
    from opd.warmup import bootstrap_teacher, teacher_cache_key

    fp = ds.fingerprint(ds.synthetic(cfg.data, cfg.seed))
    base = Path(cfg.home) / "bench" / "forgetting"
    data = prepare_data(cfg, base / "data" / teacher_cache_key(cfg, fp))
    report, data = validate_data(cfg, data)
    if data is None:
        raise SystemExit(f"dataset failed validation: {report}")
    teacher = bootstrap_teacher(cfg, data, log=log)
    ev_a = eval_set(cfg, data, a.eval_n)
    lo, hi = reversal_digits(cfg.opd.max_tokens)
    b = reversal_problems(a.eval_n, B_EVAL_SEED, lo, hi)
    tr = data.load()["train"]
    root = base / settings_key(cfg, teacher.path, a)
    root = root / f"quick-{os.getpid()}" if a.quick else root
    root.mkdir(parents=True, exist_ok=True)
    return Bench(cfg, data, teacher, ev_a, {"prompt": [p for p, _ in b], "target": [c for _, c in b]},
                 {"prompt": tr["prompt"], "completion": tr["completion"]}, (lo, hi), load_tokenizer(teacher.path),
                 load_model(teacher.path), Engines(cfg), root, a)


# ---------------------------------------------------------------- evaluation: A and B, greedy and T=1

def eval_b(b: Bench, model) -> tuple[float, float]:
    """Task B's greedy and temperature-1 accuracy (EVAL_SAMPLES per problem, the eval sampling seed)."""
    from opd.generation import generate
    from opd.prompting import prompt_format

    tok, mt = b.tok, b.cfg.opd.max_tokens
    ids = prompt_format(b.cfg).encode_all(tok, b.ev_b["prompt"])
    greedy = tok.batch_decode(generate(model, ids, tok.eos_token_id, tok.pad_token_id, mt), skip_special_tokens=True)
    sampled = tok.batch_decode(generate(model, ids, tok.eos_token_id, tok.pad_token_id, mt, temperature=1.0,
                                        n=EVAL_SAMPLES, seed=EVAL_SEED), skip_special_tokens=True)
    tg = b.ev_b["target"]
    return (sum(map(reversal_correct, greedy, tg)) / len(tg),
            sum(reversal_correct(t, tg[i // EVAL_SAMPLES]) for i, t in enumerate(sampled)) / len(sampled))


def eval_point(b: Bench, model, step: int, cost: dict, **extra) -> dict:
    """A: greedy and T=1 accuracy and the reverse KL to T0 on those samples; B: greedy and T=1 accuracy.
    The same problems and sampling seed at every point, so curves differ only by the model."""
    from opd.evaluation import evaluate, task_check
    from opd.prompting import prompt_format

    model = common.as_model(model)
    t = time.time()
    r = evaluate(model, b.t_model, b.tok, b.ev_a["prompt"], b.ev_a["answer"], b.cfg.opd.max_tokens, EVAL_SEED,
                 kl_samples=EVAL_SAMPLES, fmt=prompt_format(b.cfg), check=task_check(b.cfg))
    bg, bs = eval_b(b, model)
    return {"step": step, "a_accuracy": r.accuracy, "a_sampled_accuracy": r.sampled_accuracy,
            "a_reverse_kl": r.reverse_kl, "b_accuracy": bg, "b_sampled_accuracy": bs, **cost,
            "eval_s": time.time() - t, **extra}


def t0_point(b: Bench) -> dict:
    """T0 itself (a second copy, so evaluate samples it; its reverse KL to itself is 0); cached with the runs."""
    from opd.models import load_model

    saved = b.root / "t0.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    p = eval_point(b, load_model(b.teacher.path), 0, {**ZERO, "flops_since_t0": 0.0})
    write_json(saved, p)
    return p


# ---------------------------------------------------------------- SFT-type runs (mid-training, sft arm, replay)

def ids_pair(b: Bench, prompt: str, completion: list[int] | str) -> tuple[list[int], list[int]]:
    """(prompt ids in the run's format, completion ids + EOS): ground truth as text, or generated ids as they are."""
    from opd.prompting import prompt_format

    p = prompt_format(b.cfg).encode(b.tok, prompt)
    if isinstance(completion, str):
        return p, b.tok(completion, add_special_tokens=False).input_ids + [b.tok.eos_token_id]
    return p, completion


def b_batch(b: Bench, seed: int, step: int, n: int) -> list[tuple[list[int], list[int]]]:
    """``n`` fresh B problems for step ``step`` of seed ``seed`` (never an eval prompt)."""
    probs = reversal_problems(n, (B_TRAIN_SEED + seed) * 100_003 + step, *b.b_digits,
                              exclude=frozenset(b.ev_b["prompt"]), distinct=False)
    return [ids_pair(b, p, c) for p, c in probs]


def mid_batch(b: Bench, seed: int):
    return lambda step: (b_batch(b, seed, step, MID["batch"]), 0)


def replay_batch(b: Bench, seed: int):
    """45 B problems (mid-training's stream) + 19 ground-truth A examples from A's train split."""
    def make(step: int):
        rng = random.Random((seed * 7919 + 17) * 100_003 + step)
        idx = [rng.randrange(len(b.train_a["prompt"])) for _ in range(REPLAY_A)]
        a = [ids_pair(b, b.train_a["prompt"][i], b.train_a["completion"][i]) for i in idx]
        return b_batch(b, seed, step, REPLAY_B) + a, 0
    return make


def t0_sample_batch(b: Bench, seed: int):
    """64 A train prompts, completed by T0 at temperature 1; returns the pairs and the tokens T0 processed."""
    from opd.generation import generate
    from opd.prompting import prompt_format

    def make(step: int):
        rng = random.Random((seed * 7919 + 29) * 100_003 + step)
        prompts = [b.train_a["prompt"][rng.randrange(len(b.train_a["prompt"]))] for _ in range(SFT_BATCH)]
        ids = prompt_format(b.cfg).encode_all(b.tok, prompts)
        comps = generate(b.t_model, ids, b.tok.eos_token_id, b.tok.pad_token_id, b.cfg.opd.max_tokens,
                         temperature=1.0, seed=(seed * 7919 + 31) * 100_003 + step)
        return list(zip(ids, comps)), sum(len(p) + len(c) for p, c in zip(ids, comps))
    return make


def sft_point(b: Bench, offset_flops: float = 0.0):
    """An SFT-type run's eval point (``common.SFTRun``): A and B as every point, FLOPs since T0 beside the cost."""
    return lambda model, label, step, cost: eval_point(
        b, model, label, {**cost, "flops_since_t0": offset_flops + cost["total_flops"]}, optimizer_steps=step)


def mid_training(b: Bench, seed: int, log=print) -> dict:
    """T0 + SFT on B ground truth; an eval point every --mid-every steps, stop at the first whose A greedy
    accuracy is T0's - 0.20 or lower (cap --mid-cap). Returns the saved record: curve, model (M), steps, dropped."""
    a, t0 = b.a, b.t0
    r = SFTRun(b.tok, b.root / f"mid-s{seed}", b.teacher.path, MID["lr"], MID["warmup_steps"], mid_batch(b, seed),
               t0, sft_point(b), b.teacher.params, b.teacher.params)
    if r.complete:
        log(f"  mid-training seed {seed}: finished by an earlier invocation (M at step {r.saved['steps']})")
        return r.saved
    bar = t0["a_accuracy"] - MID["drop"]
    while True:
        dropped = r.curve[-1]["step"] > 0 and r.curve[-1]["a_accuracy"] <= bar + 1e-12
        if dropped or r.step >= a.mid_cap:
            break
        while r.step < r.curve[-1]["step"] + a.mid_every:
            r.take_step()
        p = r.point(r.step)
        log(f"  mid-training seed {seed} step {r.step}: A greedy {p['a_accuracy']:.3f} T1 {p['a_sampled_accuracy']:.3f}"
            f", B greedy {p['b_accuracy']:.3f} T1 {p['b_sampled_accuracy']:.3f} ({p['wall_s']:.0f}s train)")
    return r.finish("M", steps=r.step, dropped=dropped, stop_rule=f"A greedy <= {bar:.4f} (T0 {t0['a_accuracy']:.4f}"
                    f" - {MID['drop']}), checked every {a.mid_every} steps, cap {a.mid_cap}")


def branch_point(mid: dict) -> dict:
    """M's eval point as step 0 of a recovery arm: no cost since the branch, mid-training's FLOPs since T0."""
    m = dict(mid["curve"][-1])
    return {**m, **ZERO, "step": 0, "optimizer_steps": 0, "eval_s": m["eval_s"], "flops_since_t0": m["total_flops"]}


def run_sft(b: Bench, lr: float, seed: int, mid: dict, opd_curve: dict, opd_lr: float, log=print) -> dict:
    """The sft arm: from M, steps on T0's temperature-1 samples of A prompts while its cumulative FLOPs are
    below the opd run's (same seed, opd's chosen LR) at the same eval point."""
    name = f"sft-lr{lr:g}-s{seed}-budget-opd-lr{opd_lr:g}"
    start = branch_point(mid)
    r = SFTRun(b.tok, b.root / "runs" / name, mid["model"], lr, SFT_WARMUP, t0_sample_batch(b, seed), start,
               sft_point(b, start["flops_since_t0"]), b.teacher.params, b.teacher.params)
    return run_matched(r, name, opd_curve, "total_flops", lambda p: (
        f"A greedy {p['a_accuracy']:.3f} T1 {p['a_sampled_accuracy']:.3f}, B greedy {p['b_accuracy']:.3f} T1 "
        f"{p['b_sampled_accuracy']:.3f}"), log)


def run_replay(b: Bench, lr: float, seed: int, steps: int, log=print) -> dict:
    """The replay arm: from T0, ``steps`` (mid-training's count for this seed) of the mid-training recipe on
    45 B + 19 A-ground-truth batches, at LR ``lr``; eval points at round(steps * j / --replay-points)."""
    name = f"replay-lr{lr:g}-s{seed}-steps{steps}"
    r = SFTRun(b.tok, b.root / "runs" / name, b.teacher.path, lr, MID["warmup_steps"], replay_batch(b, seed),
               b.t0, sft_point(b), b.teacher.params, b.teacher.params)
    if r.complete:
        log(f"  {name}: finished by an earlier invocation, reused")
        return r.saved
    n = max(1, min(b.a.replay_points, steps))
    try:
        for j in range(1, n + 1):
            label = round(steps * j / n)
            if label <= r.curve[-1]["step"]:
                continue
            while r.step < label:
                r.take_step()
            p = r.point(label)
            log(f"  {name} step {label}: A greedy {p['a_accuracy']:.3f} T1 {p['a_sampled_accuracy']:.3f}, B greedy "
                f"{p['b_accuracy']:.3f} T1 {p['b_sampled_accuracy']:.3f}")
    except non_finite() as e:
        log(f"  {name}: stopped at step {r.step}: {e}")
        return r.finish(diverged_at=r.step, diverged=str(e))
    return r.finish()


# ---------------------------------------------------------------- the opd arm: the product's round

def opd_config(cfg, lr: float, seed: int, steps: int, every: int):
    from opd.config import validate_config

    tree = cfg.model_dump(mode="json")
    o = tree["opd"]
    loss = o["loss"] if o["loss"]["kind"] == "reverse_kl_is" else {}
    o.update(lr=lr, steps_per_round=every, rounds=steps // every,
             loss={**loss, "kind": "reverse_kl_is", "kl_coef": 1.0}, reward=None)
    tree["seed"] = seed
    return validate_config(tree)


def run_opd(b: Bench, lr: float, seed: int, mid: dict, log=print) -> dict:
    """``--steps`` on-policy steps from M with T0 as teacher, one opd_round per eval point; resumes from its
    saved curve and rounds."""
    from opd.records import ModelRef

    start = branch_point(mid)

    def point(student, step: int, cost: dict, m: dict) -> dict:
        since_t0 = start["flops_since_t0"] + cost["total_flops"]
        return eval_point(b, student.path, step, {**cost, "flops_since_t0": since_t0}, optimizer_steps=step,
                          train_reverse_kl=m.get("reverse_kl"), train_ratio_max=m.get("ratio_max"))

    def line(p: dict) -> str:
        return (f"A greedy {p['a_accuracy']:.3f} T1 {p['a_sampled_accuracy']:.3f} kl {p['a_reverse_kl']:.4f}, "
                f"B greedy {p['b_accuracy']:.3f} T1 {p['b_sampled_accuracy']:.3f} ({p['wall_s']:.0f}s train in all)")

    name = f"opd-lr{lr:g}-s{seed}"
    return run_rounds(b.root / "runs" / name, name, opd_config(b.cfg, lr, seed, b.a.steps, b.a.every), b.data,
                      b.teacher, ModelRef(mid["model"], b.teacher.params), b.engines, b.a.steps, b.a.every, start,
                      point=point, line=line, log=log, stop_on=non_finite())


# ---------------------------------------------------------------- the LR rule, the arms in order

def lr_score(curve: list[dict], key: str = "both") -> float:
    """The protocol's rule: mean over the eval points (step 0, the same for every LR, left out) of
    (A T=1 + B T=1) / 2. ``key`` "a" / "b": the one-task means, recorded beside it."""
    pts = curve[1:]
    f = {"both": lambda p: (p["a_sampled_accuracy"] + p["b_sampled_accuracy"]) / 2,
         "a": lambda p: p["a_sampled_accuracy"], "b": lambda p: p["b_sampled_accuracy"]}[key]
    return statistics.fmean(f(p) for p in pts)


def search_and_seed(arm: str, grid: list[float], seeds: list[int], run: Callable[[float, int], dict],
                    log=print) -> tuple[dict, dict]:
    """Every LR on the first seed, the best (``lr_score``) on the others. Returns (curves by seed, search)."""
    s0 = seeds[0]
    tried = {lr: run(lr, s0) for lr in grid}
    score = {lr: -math.inf if r.get("diverged_at") is not None else lr_score(r["curve"]) for lr, r in tried.items()}
    best = max(score, key=score.get)
    log(f"{arm}: LR {best:g} chosen (mean (A T1 + B T1)/2 {score[best]:.3f} on seed {s0})")
    runs = {s0: tried[best], **{s: run(best, s) for s in seeds[1:]}}
    search = {"grid": grid, "score_on_seed": {f"{k:g}": v for k, v in score.items()},
              "mean_a_sampled_accuracy_on_seed": {f"{k:g}": lr_score(r["curve"], "a") for k, r in tried.items()},
              "mean_b_sampled_accuracy_on_seed": {f"{k:g}": lr_score(r["curve"], "b") for k, r in tried.items()},
              "chosen": best, "search_seed": s0,
              "curves_by_lr": {f"{k:g}": r["curve"] for k, r in tried.items()}}
    return {str(s): r["curve"] for s, r in runs.items()}, search


def run_all(b: Bench, mids: dict, log=print) -> tuple[dict, dict]:
    a = b.a
    curves, search = {}, {}
    if "opd" in a.arms:
        curves["opd"], search["opd"] = search_and_seed("opd", a.lrs, a.seeds,
                                                       lambda lr, s: run_opd(b, lr, s, mids[s], log), log)
    if "sft" in a.arms:
        opd_lr = search["opd"]["chosen"]
        curves["sft"], search["sft"] = search_and_seed(
            "sft", a.lrs, a.seeds, lambda lr, s: run_sft(b, lr, s, mids[s], curves["opd"][str(s)], opd_lr, log), log)
        search["sft"]["flops_budget"] = f"the opd arm's curve at its chosen LR ({opd_lr:g}), same seed"
    if "replay" in a.arms:
        curves["replay"], search["replay"] = search_and_seed(
            "replay", a.lrs, a.seeds, lambda lr, s: run_replay(b, lr, s, mids[s]["steps"], log), log)
    return curves, search


# ---------------------------------------------------------------- headline numbers and verdict

METRICS = {"t1": ("a_sampled_accuracy", "b_sampled_accuracy"), "greedy": ("a_accuracy", "b_accuracy")}


def recovery(curve: list[dict], t0: dict, m: dict, end_step: int, metric: str = "t1") -> dict:
    """One seed of a recovery arm: recovered fraction and B drop (points) at its end, and the first eval step
    at which the fraction is >= 0.9 with the B drop <= 5 points (None if none)."""
    ka, kb = METRICS[metric]
    den = t0[ka] - m[ka]

    def at(p):
        frac = (p[ka] - m[ka]) / den if den > 0 else None
        return frac, 100.0 * (m[kb] - p[kb])

    if curve[-1]["step"] < end_step:  # the run stopped on a non-finite update: no end point, a miss
        return {"recovered_fraction": None, "b_drop_points": None, "steps_to_threshold": None,
                "a_lost_points": 100.0 * den, "end_step": curve[-1]["step"]}
    frac, drop = at(curve[-1])
    first = next((p["step"] for p in curve[1:] if (f := at(p))[0] is not None
                  and f[0] >= THRESHOLD["recovered_fraction"] - 1e-12 and f[1] <= THRESHOLD["b_drop_points"] + 1e-12),
                 None)
    return {"recovered_fraction": frac, "b_drop_points": drop, "steps_to_threshold": first,
            "a_lost_points": 100.0 * den, "end_step": curve[-1]["step"]}


def compare(curves: dict, seeds: list[str], t0: dict, mids: dict, end_step: int) -> dict:
    out: dict = {"by_metric": {}}
    m = {s: mids[int(s)]["curve"][-1] for s in seeds}
    for metric in METRICS:
        out["by_metric"][metric] = {}
        for arm in ("opd", "sft"):
            if arm not in curves:
                continue
            rows = {s: recovery(curves[arm][s], t0, m[s], end_step, metric) for s in seeds}
            out["by_metric"][metric][arm] = {
                "per_seed": rows,
                "recovered_fraction": mean_or_none([r["recovered_fraction"] for r in rows.values()]),
                "recovered_fraction_spread": spread([r["recovered_fraction"] for r in rows.values()]),
                "b_drop_points": mean_or_none([r["b_drop_points"] for r in rows.values()]),
                "b_drop_points_spread": spread([r["b_drop_points"] for r in rows.values()]),
                "steps_to_threshold": {s: r["steps_to_threshold"] for s, r in rows.items()}}
        if "replay" in curves:
            ka, kb = METRICS[metric]
            rows = {s: {"a": curves["replay"][s][-1][ka], "b": curves["replay"][s][-1][kb],
                        "a_lost_points_vs_t0": 100.0 * (t0[ka] - curves["replay"][s][-1][ka]),
                        "b_minus_mid_points": 100.0 * (curves["replay"][s][-1][kb] - m[s][kb])} for s in seeds}
            out["by_metric"][metric]["replay"] = {
                "per_seed": rows, **{k: spread([r[k] for r in rows.values()]) for k in next(iter(rows.values()))}}
    out["end"] = {arm: {k: spread([c[s][-1][k] for s in seeds]) for k in
                        ("a_accuracy", "a_sampled_accuracy", "a_reverse_kl", "b_accuracy", "b_sampled_accuracy",
                         "flops_since_t0")} for arm, c in curves.items()}
    out["mid_end"] = {k: spread([m[s][k] for s in seeds]) for k in
                      ("a_accuracy", "a_sampled_accuracy", "a_reverse_kl", "b_accuracy", "b_sampled_accuracy",
                       "total_flops")}
    return out


def verdict(cmp: dict, mids: dict, seeds: list[int]) -> str:
    missed = [s for s in seeds if not mids[s]["dropped"]]
    if missed:
        return f"undetermined: mid-training did not drop A greedy by 20 points in seed(s) {missed}"
    o = cmp["by_metric"]["t1"].get("opd")
    if o is None:
        return "not computed: the opd arm was not run"
    rf, bd = o["recovered_fraction"], o["b_drop_points"]
    if rf is None or bd is None:
        return "refuted: a recovered fraction or B drop is null in some seed"
    ok = rf >= THRESHOLD["recovered_fraction"] and bd <= THRESHOLD["b_drop_points"]
    return ("confirmed" if ok else "refuted") + f" (recovered fraction {rf:.3f}, B drop {bd:.1f} points)"


# ---------------------------------------------------------------- plot and table

COLORS = {"mid": "tab:gray", "opd": "tab:red", "sft": "tab:blue", "replay": "tab:green"}


def plot(res: dict, path: Path) -> None:
    """A and B accuracy over FLOPs since T0 and the (A, B) pairs, T=1 (top) and greedy (bottom), every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = res["t0"]
    series = {"mid": {s: m["curve"] for s, m in res["mid_training"]["per_seed"].items()}, **res["curves"]}
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    for r, (metric, label) in enumerate((("t1", "T=1"), ("greedy", "greedy"))):
        ka, kb = METRICS[metric]
        for arm, by_seed in series.items():
            for i, curve in enumerate(by_seed.values()):
                kw = dict(color=COLORS.get(arm), alpha=0.7, ms=3, lw=1, label=arm if i == 0 else None)
                x = [p["flops_since_t0"] for p in curve]
                axes[r][0].plot(x, [p[ka] for p in curve], "o-", **kw)
                axes[r][1].plot(x, [p[kb] for p in curve], "o-", **kw)
                axes[r][2].plot([p[ka] for p in curve], [p[kb] for p in curve], "o-", **kw)
                axes[r][2].plot([curve[-1][ka]], [curve[-1][kb]], "s", color=COLORS.get(arm), ms=6)
        axes[r][0].axhline(t0[ka], color="black", ls=":", lw=1, label="T0")
        mid_a = [m["curve"][-1][ka] for m in res["mid_training"]["per_seed"].values()]
        goal = statistics.fmean(mid_a) + THRESHOLD["recovered_fraction"] * (t0[ka] - statistics.fmean(mid_a))
        axes[r][0].axhline(goal, color="gray", ls="--", lw=1, label="90% of the lost A (mean M)")
        axes[r][2].plot([t0[ka]], [t0[kb]], "k*", ms=12, label="T0")
        for c, (xl, yl) in enumerate((("FLOPs since T0 (as counted)", f"task A accuracy ({label})"),
                                      ("FLOPs since T0 (as counted)", f"task B accuracy ({label})"),
                                      (f"task A accuracy ({label})", f"task B accuracy ({label}); squares: ends"))):
            axes[r][c].set_xlabel(xl)
            axes[r][c].set_ylim(-0.03, 1.03)
            if c == 2:
                axes[r][c].set_xlim(-0.03, 1.03)
            axes[r][c].set_ylabel(yl)
            axes[r][c].grid(alpha=0.3)
        axes[r][0].legend(fontsize=8)
        axes[r][2].legend(fontsize=8)
    rf = res.get("recovered_fraction")
    fig.suptitle(f"Forgetting recovery ({len(res['seeds'])} seeds): recovered fraction (T=1) "
                 f"{'null' if rf is None else format(rf, '.3f')}, B drop {_num(res.get('b_drop_points'), '.1f')} "
                 f"points; verdict: {res.get('verdict')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _num(x, spec: str = ".3f") -> str:
    return "null" if x is None else format(x, spec)


def print_table(res: dict, path: Path | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t0, seeds = res["t0"], [str(s) for s in res["seeds"]]
    t = Table(title=f"T0: A greedy {t0['a_accuracy']:.3f} / T=1 {t0['a_sampled_accuracy']:.3f}, B greedy "
                    f"{t0['b_accuracy']:.3f} / T=1 {t0['b_sampled_accuracy']:.3f} ({res['eval']['examples_per_task']} "
                    f"problems per task); mean (min-max) over seeds")
    for col in ("arm", "LR", "A greedy", "A T=1", "B greedy", "B T=1", "recovered (T=1)", "B drop pts (T=1)",
                "steps to threshold", "FLOPs since T0"):
        t.add_column(col, justify="right")

    def m(sp: dict, spec: str = ".3f") -> str:
        return "-" if sp is None or sp.get("mean") is None else (
            f"{sp['mean']:{spec}} ({sp['min']:{spec}}-{sp['max']:{spec}})")

    me = res["mid_end"]
    t.add_row("M (mid-trained)", f"{MID['lr']:g}", m(me["a_accuracy"]), m(me["a_sampled_accuracy"]), m(me["b_accuracy"]),
              m(me["b_sampled_accuracy"]), "", "", " / ".join(str(res["mid_training"]["per_seed"][s]["steps"])
                                                              for s in seeds) + " steps", m(me["total_flops"], ".3g"))
    bm = res["by_metric"]["t1"]
    for arm, e in res["end"].items():
        rec = bm.get(arm, {})
        frac = m(rec.get("recovered_fraction_spread")) if arm != "replay" else "-"
        drop = m(rec.get("b_drop_points_spread"), ".1f") if arm != "replay" else "-"
        steps = ("-" if arm == "replay" else
                 " / ".join("null" if rec["steps_to_threshold"][s] is None else str(rec["steps_to_threshold"][s])
                            for s in seeds))
        t.add_row(arm, f"{res['lr_search'][arm]['chosen']:g}", m(e["a_accuracy"]), m(e["a_sampled_accuracy"]),
                  m(e["b_accuracy"]), m(e["b_sampled_accuracy"]), frac, drop, steps, m(e["flops_since_t0"], ".3g"))
    con = Console(width=220, record=True, highlight=False)
    con.print(t)
    g = res["by_metric"]["greedy"].get("opd", {})
    con.print(f"opd: recovered_fraction (T=1) {_num(res['recovered_fraction'])}, b_drop_points (T=1) "
              f"{_num(res['b_drop_points'], '.1f')}; on greedy accuracy {_num(g.get('recovered_fraction'))} and "
              f"{_num(g.get('b_drop_points'), '.1f')}")
    th = res["threshold"]
    con.print(f"pre-registered threshold: recovered_fraction >= {th['recovered_fraction']:g} and b_drop_points <= "
              f"{th['b_drop_points']:g} -> verdict: {res['verdict']}")
    if "replay" in bm:
        r = bm["replay"]
        con.print(f"replay end (T=1): A lost {m(r['a_lost_points_vs_t0'], '.1f')} points vs T0, B "
                  f"{m(r['b_minus_mid_points'], '+.1f')} points vs M")
    for arm, s in res["lr_search"].items():
        if isinstance(s, dict):
            con.print(f"LR search {arm} (seed {s['search_seed']}, mean (A T1 + B T1)/2; A T1; B T1): " + ", ".join(
                f"{k}: {v:.3f}; {s['mean_a_sampled_accuracy_on_seed'][k]:.3f}; "
                f"{s['mean_b_sampled_accuracy_on_seed'][k]:.3f}" for k, v in s["score_on_seed"].items())
                + f" -> {s['chosen']:g}")
    if path is not None:
        path.write_text(con.export_text())


# ---------------------------------------------------------------- main

# where this script had to choose what the pre-registered text leaves open
DEVIATIONS = [
    "eval set A: the eval split data.synthetic.n_eval=1024 builds, made beside the run's data; the run itself (train "
    "split, T0's cache key, opd_round's eval slice) keeps the demo's n_eval=512; its first 512 problems are the "
    "demo's eval split (checked), none is in the train split (checked)",
    "recovery arms' step 0 is M's last mid-training eval point (the same numbers, its cost moved to flops_since_t0)",
    "the LR rule's mean leaves out step 0, the same for every LR (it cannot change the choice)",
    "wall seconds leave out evaluation and the one vLLM engine start",
    "a run stopped by a non-finite update or weights keeps its curve so far (diverged_at): its LR is never chosen, "
    "and a seed whose chosen-LR run stopped has a null recovered fraction (a miss)",
]


def report(a, argv, cfg, b: Bench, mids: dict, curves: dict, search: dict, t0_wall: float) -> dict:
    import torch

    seeds = [str(s) for s in a.seeds]
    cmp = compare(curves, seeds, b.t0, mids, a.steps)
    opd = cmp["by_metric"]["t1"].get("opd", {})
    return {
        "command": "python benchmarks/forgetting.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "protocol_commit": PROTOCOL_COMMIT, "protocol": "benchmarks/README.md, section forgetting.py",
        "deviations": DEVIATIONS if not a.quick else ["--quick: a smoke run, not the protocol", *DEVIATIONS],
        "threshold": {**THRESHOLD, "rule": "confirmed if recovered_fraction (mean over seeds, T=1) >= 0.9 and "
                      "b_drop_points (mean over seeds, T=1) <= 5; refuted otherwise or if null; undetermined if a "
                      "seed's mid-training did not drop A greedy by 20 points"},
        "verdict": verdict(cmp, mids, a.seeds),
        "recovered_fraction": opd.get("recovered_fraction"),
        "recovered_fraction_spread": opd.get("recovered_fraction_spread"),
        "b_drop_points": opd.get("b_drop_points"), "b_drop_points_spread": opd.get("b_drop_points_spread"),
        "opd_steps": {"per_seed": opd.get("steps_to_threshold"), "budget": a.steps,
                      "rule": "first eval step with recovered fraction >= 0.9 and B drop <= 5 points (T=1); null: "
                              "not within the budget"},
        "seeds": a.seeds, "quick": a.quick, "arms": list(curves),
        "config": os.path.relpath(a.config, REPO) if os.path.isabs(a.config) else a.config, "overrides": a.overrides,
        "t0": b.t0,
        "teacher": {"path": b.teacher.path, "params": b.teacher.params},
        "task_b": {"kind": "digit reversal", "digits": list(b.b_digits), "example": reversal_problems(1, 0, *b.b_digits)[0],
                   "check": "decoded completion == '<reversed>#<reversed>' exactly"},
        "mid_training": {"recipe": {**MID, "every": a.mid_every, "cap": a.mid_cap, "optimizer": "fresh AdamW (betas "
                                    "0.9/0.98, wd 0, clip 1)", "schedule": "linear warmup then constant"},
                         "per_seed": {str(s): {k: mids[s][k] for k in ("steps", "dropped", "stop_rule", "curve",
                                                                       "model")} for s in a.seeds},
                         "all_dropped": all(mids[s]["dropped"] for s in a.seeds)},
        "mid_end": cmp.pop("mid_end"),
        "settings": {"opd": {"steps": a.steps, "eval_every": a.every, "rollout": {k: getattr(cfg.opd, k) for k in ROLLOUT},
                             "loss": "reverse_kl_is, kl_coef 1, no reward", "teacher": "T0", "prompts": "A's train split"},
                     "sft": {"batch": SFT_BATCH, "warmup_steps": SFT_WARMUP, "data": "T0's temperature-1 completions of "
                             "A train prompts, each trained on once", "flops_matched_to": "opd's curve at its chosen LR, "
                             "same seed: steps while cumulative total FLOPs < opd's at the same eval point"},
                     "replay": {"batch": f"{REPLAY_B} B + {REPLAY_A} A ground truth", "steps": "mid-training's, per seed",
                                "eval_points": a.replay_points, "warmup_steps": MID["warmup_steps"]},
                     "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads()},
        "eval": {"examples_per_task": len(b.ev_a["prompt"]), "b_examples": len(b.ev_b["prompt"]),
                 "temperature1_samples_per_problem": EVAL_SAMPLES, "sampling_seed": EVAL_SEED,
                 "reverse_kl": "task A, to T0", "b_eval_seed": B_EVAL_SEED},
        "flops": "opd.ledger.PhaseCost: student train 6*N*sequence tokens; opd's sampling 2*N*completion tokens and T0 "
                 "grading 2*N_T0*sequence tokens; sft's T0 generation 2*N_T0*sequence tokens; cumulative from each "
                 "arm's branch point, flops_since_t0 adds the seed's mid-training FLOPs for opd and sft; eval not counted",
        **cmp,
        "lr_search": {**search, "rule": "each LR of the grid runs the full budget on the first seed; the LR with the "
                                        "highest mean over its eval points (step 0 excluded) of (A T=1 + B T=1)/2 is "
                                        "chosen; the other seeds run at it"},
        "curves": curves,
        "wall_s_total": time.time() - t0_wall,
    }


def write_outputs(res: dict, out: Path) -> None:
    common.write_outputs(res, out, plot, print_table)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    if a.replot:
        return common.replot(out, plot, print_table)
    t_start = time.time()
    cfg = protocol_config(a.config, a.overrides, a.quick)
    common.begin(cfg, "task A is the generator's addition")
    log = lambda m: print(m, flush=True)  # noqa: E731
    with common.library_output(cfg, "forgetting"):
        b = setup(a, cfg)
        try:
            b.t0 = t0_point(b)
            log(f"T0: A greedy {b.t0['a_accuracy']:.3f} T1 {b.t0['a_sampled_accuracy']:.3f}, B greedy "
                f"{b.t0['b_accuracy']:.3f} T1 {b.t0['b_sampled_accuracy']:.3f} ({len(b.ev_a['prompt'])} problems per "
                f"task); runs kept in {b.root}")
            mids = {s: mid_training(b, s, log) for s in a.seeds}
            curves, search = run_all(b, mids, log)
            res = report(a, argv, cfg, b, mids, curves, search, t_start)
        finally:
            b.engines.close()
            if a.quick:
                shutil.rmtree(b.root, ignore_errors=True)
    write_outputs(res, out)
    return 0


if __name__ == "__main__":  # vLLM spawns workers: the entry must be import-safe
    sys.exit(main())
