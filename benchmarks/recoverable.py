"""On-policy distillation vs SFT on the teacher's completions where a wrong step can be undone, for 3 student sizes.

    python benchmarks/recoverable.py                 # the protocol: teacher, 3 warmups, 3 sizes x 2 arms; resumable
    python benchmarks/recoverable.py --sizes S       # one size (processes can split the sizes); then the plain
                                                     # command writes the report from the kept runs
    python benchmarks/recoverable.py --quick         # CI smoke run (slow test): 1 size, 1 LR, 1 seed, tiny budgets
    python benchmarks/recoverable.py --replot        # redraw the PNG and table from --out's JSON

Implements the protocol pre-registered in benchmarks/README.md ("recoverable.py", commit 2c52277) before any
code or run. The task "walk": prompt ``SS+GG=`` (two-digit start and goal, 1 <= distance <= 12); the
completion lists the positions visited (``08;09;10#``). A move away from the goal is an error the walk can undo,
unlike a wrong partial sum in the demo's addition. The teacher is trained on oracle continuations from detoured
states, so it knows how to come back; the students learn from its greedy (straight) walks, then either go on
with more of them (SFT) or are graded token by token on their own walks (OPD, the product's round).

Every run keeps its curve (and its latest checkpoint until it finishes) under
``<home>/bench/recoverable/<settings key>/``; rerun the command after a kill.
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
from benchmarks.common import (EVAL_SEED, ROLLOUT, ZERO, SFTRun, as_model, begin, library_output,  # noqa: E402
                               non_finite, replot, run_matched, run_rounds, spread, write_json, write_outputs)

DEFAULT_OUT = REPO / "benchmarks" / "results" / "recoverable.json"
PROTOCOL_COMMIT = "2c52277"  # benchmarks/README.md, "recoverable.py": committed before this script existed
POSITIONS, MAX_DIST, MAX_TOKENS = 100, 12, 48
EVAL_PAIRS_SEED, DETOUR_EVAL_SEED = 4_300_000, 4_400_000
EVAL_N, EVAL_SAMPLES = 1024, 4
MAX_POSITIONS = 64  # prompt (7) + a 3-move detour (9) + 48 completion tokens
TEACHER = {"model": (4, 128, 4, 512), "lr": 1e-3, "warmup": 50, "batch": 64, "every": 500, "cap": 6000,
           "min_clean": 0.99, "min_detoured": 0.98, "detour_k": (0, 0, 1, 2, 3)}
SIZES = {"S": (1, 32, 1, 64), "M": (2, 64, 2, 128), "L": (2, 128, 4, 256)}  # layers, hidden, heads, intermediate
WARMUP = {"lr": 1e-3, "warmup": 20, "batch": 64, "every": 100, "cap": 3000, "target": 0.5}
LR_GRID = [3e-4, 1e-3, 3e-3]  # both arms, every size
OPD_STEPS, OPD_EVERY, SFT_BATCH, SFT_WARMUP = 120, 30, 64, 20
THRESHOLD = {"min_gap_smallest": 0.03, "smallest_gap_largest": True}
ARMS = ("opd", "sft")


# ---------------------------------------------------------------- the task (pure)

def prompt_of(start: int, goal: int) -> str:
    return f"{start:02d}+{goal:02d}="


def oracle_walk(pos: int, goal: int) -> str:
    """The shortest walk from ``pos`` to ``goal`` (positions after each move; ``#`` after the goal)."""
    step = 1 if goal > pos else -1
    return ";".join(f"{p:02d}" for p in range(pos + step, goal + step, step)) + "#"


def check_walk(prompt: str, text: str) -> tuple[bool, int]:
    """(correct, wrong moves) of a completion: positions in 00..99, each one move from the one before, the goal
    only as the last position and ``#`` right after it. Anything after the first ``#`` is ignored."""
    start, goal = int(prompt[:2]), int(prompt[3:5])
    if "#" not in text:
        body, ended = text, False
    else:
        body, ended = text[: text.index("#")], True
    items = body.split(";") if body else []
    pos, wrong = start, 0
    for i, item in enumerate(items):
        if len(item) != 2 or not item.isdigit() or abs(int(item) - pos) != 1:
            return False, wrong
        v = int(item)
        wrong += abs(goal - v) > abs(goal - pos)
        if v == goal and i != len(items) - 1:
            return False, wrong
        pos = v
    return ended and bool(items) and pos == goal, wrong


def all_pairs() -> list[tuple[int, int]]:
    return [(s, g) for s in range(POSITIONS) for g in range(POSITIONS) if 1 <= abs(g - s) <= MAX_DIST]


def split_pairs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, eval): 1,024 eval pairs drawn with EVAL_PAIRS_SEED, the rest train."""
    pairs = all_pairs()
    random.Random(EVAL_PAIRS_SEED).shuffle(pairs)
    return sorted(pairs[EVAL_N:]), pairs[:EVAL_N]


def detour(rng: random.Random, start: int, goal: int, k: int) -> tuple[str, int]:
    """``k`` random moves from ``start`` that stay in 00..99 and never reach the goal: (their text, where they end).
    Fewer where no such move is left (start 00, goal 01: none)."""
    pos, text = start, ""
    for _ in range(k):
        options = [p for p in (pos - 1, pos + 1) if 0 <= p < POSITIONS and p != goal]
        if not options:
            break
        pos = rng.choice(options)
        text += f"{pos:02d};"
    return text, pos


# ---------------------------------------------------------------- setup

@dataclass
class Bench:
    cfg: Any
    tok: Any
    train: list[tuple[int, int]]
    ev: list[tuple[int, int]]
    root: Path
    a: argparse.Namespace
    data: Any = None  # DataRef of the train prompts (the OPD round reads them)
    teacher: Any = None  # ModelRef
    t_model: Any = None
    teacher_data: dict | None = None  # train prompt -> (prompt ids, the teacher's greedy completion ids)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first one runs the LR search")
    p.add_argument("--quick", action="store_true", help="CI smoke run: size S, LR 1e-3, seed 0, a 200-step "
                   "teacher, 100-step warmup, 2 OPD eval points of 5 steps of 16 prompts, 128 eval pairs")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--replot", action="store_true")
    a = p.parse_args(argv)
    a.lrs, a.steps, a.every, a.eval_n = list(LR_GRID), OPD_STEPS, OPD_EVERY, EVAL_N
    a.teacher_cap, a.teacher_every, a.warm_cap, a.warm_every = TEACHER["cap"], TEACHER["every"], WARMUP["cap"], \
        WARMUP["every"]
    if a.quick:
        a.sizes, a.seeds, a.lrs, a.steps, a.every, a.eval_n = a.sizes[:1], a.seeds[:1], [1e-3], 10, 5, 128
        a.teacher_cap, a.teacher_every, a.warm_cap, a.warm_every = 200, 100, 100, 50
    return a


def bench_config(a: argparse.Namespace):
    from opd.config import load_config

    rollout = {**ROLLOUT, "max_tokens": MAX_TOKENS, **({"prompts_per_step": 16} if a.quick else {})}
    return load_config(a.config, [*(f"opd.{k}={v}" for k, v in rollout.items()), "opd.eval_slice=1", *a.overrides])


def settings_key(cfg, a: argparse.Namespace) -> str:
    spec = {"opd": cfg.opd.model_dump(mode="json", exclude={"lr", "loss", "reward", "rounds", "steps_per_round"}),
            "training": cfg.training.model_dump(mode="json"), "teacher_scorer": cfg.teacher.scorer,
            "steps": a.steps, "every": a.every, "eval_n": a.eval_n, "teacher": TEACHER, "warmup": WARMUP,
            "sizes": SIZES, "caps": [a.teacher_cap, a.teacher_every, a.warm_cap, a.warm_every],
            "sft": [SFT_BATCH, SFT_WARMUP], "protocol": PROTOCOL_COMMIT, "quick": a.quick}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def setup(a: argparse.Namespace, cfg) -> Bench:
    from opd.models import build_char_tokenizer

    train, ev = split_pairs()
    root = Path(cfg.home) / "bench" / "recoverable" / settings_key(cfg, a)
    root = root / f"quick-{os.getpid()}" if a.quick else root
    root.mkdir(parents=True, exist_ok=True)
    return Bench(cfg, build_char_tokenizer(), train, ev[: a.eval_n], root, a)


def write_prompts(b: Bench) -> None:
    """The train prompts as the round's dataset (train.parquet; an eval split without answers: no slice check)."""
    from datasets import Dataset

    from opd.data.dataset import DataRef

    d = b.root / "data"
    if not (d / "train.parquet").is_file():
        d.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict({"prompt": [prompt_of(*p) for p in b.ev]}).to_parquet(str(d / "eval.parquet"))
        tmp = d / "train.parquet.tmp"
        Dataset.from_dict({"prompt": [prompt_of(*p) for p in b.train]}).to_parquet(str(tmp))
        os.replace(tmp, d / "train.parquet")
    fp = hashlib.sha256(json.dumps([b.train, b.ev]).encode()).hexdigest()[:16]
    b.data = DataRef(str(d), fp, len(b.train), len(b.ev))


# ---------------------------------------------------------------- evaluation

def encode(b: Bench, texts: list[str]) -> list[list[int]]:
    return [b.tok(t).input_ids for t in texts]


def eval_model(b: Bench, model, prompts: list[str] | None = None, prefixes: list[str] | None = None) -> dict:
    """Greedy and T=1 accuracy (EVAL_SAMPLES per pair, EVAL_SEED) on the eval pairs, and the fraction of T=1
    walks with a wrong move that still end right. ``prefixes``: moves already made (the teacher's detour check)."""
    from opd.generation import generate

    model = as_model(model)
    prompts = prompts or [prompt_of(*p) for p in b.ev]
    prefixes = prefixes or [""] * len(prompts)
    ids = encode(b, [p + x for p, x in zip(prompts, prefixes)])
    eos, pad = b.tok.eos_token_id, b.tok.pad_token_id
    t = time.time()
    greedy = b.tok.batch_decode(generate(model, ids, eos, pad, MAX_TOKENS), skip_special_tokens=True)
    sampled = b.tok.batch_decode(generate(model, ids, eos, pad, MAX_TOKENS, temperature=1.0, n=EVAL_SAMPLES,
                                          seed=EVAL_SEED), skip_special_tokens=True)
    g = [check_walk(p, x + c) for p, x, c in zip(prompts, prefixes, greedy)]
    s = [check_walk(prompts[i // EVAL_SAMPLES], prefixes[i // EVAL_SAMPLES] + c) for i, c in enumerate(sampled)]
    erred = [ok for ok, wrong in s if wrong > 0]  # (a detour prefix counts: only students are read for it)
    return {"accuracy": sum(ok for ok, _ in g) / len(g), "sampled_accuracy": sum(ok for ok, _ in s) / len(s),
            "sampled_with_wrong_move": len(erred) / len(s),
            "recovered": (sum(erred) / len(erred)) if erred else None, "eval_s": time.time() - t}


def student_point(b: Bench):
    """A student's eval point for ``common.SFTRun``: the label, the optimizer step, the evaluation, the cost."""
    return lambda model, label, step, cost: {"step": label, "optimizer_steps": step, **eval_model(b, model), **cost}


# ---------------------------------------------------------------- SFT runs (teacher, warmups, the sft arm)

def _ids_pair(b: Bench, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    return b.tok(prompt).input_ids, b.tok(completion, add_special_tokens=False).input_ids + [b.tok.eos_token_id]


def teacher_batch(b: Bench):
    """Oracle continuations from detoured states of train pairs (detour in the prompt: no loss on it)."""
    def make(step: int):
        rng = random.Random(7_000_003 * (step + 1))
        out = []
        for _ in range(TEACHER["batch"]):
            s, g = b.train[rng.randrange(len(b.train))]
            prefix, pos = detour(rng, s, g, rng.choice(TEACHER["detour_k"]))
            out.append(_ids_pair(b, prompt_of(s, g) + prefix, oracle_walk(pos, g)))
        return out, 0
    return make


def detour_set(b: Bench) -> tuple[list[str], list[str]]:
    rng = random.Random(DETOUR_EVAL_SEED)
    prompts, prefixes = [], []
    for s, g in b.ev:
        prompts.append(prompt_of(s, g))
        prefixes.append(detour(rng, s, g, rng.randint(1, 3))[0])
    return prompts, prefixes


def train_teacher(b: Bench, log=print) -> dict:
    """The teacher: SFT from scratch until its greedy checks pass (or the cap); kept as ``teacher/T``."""
    from opd.config import ModelSpec
    from opd.models import build_llama, num_params, save_model
    from opd.records import ModelRef

    d = b.root / "teacher"
    init = d / "init"
    if not (init / "config.json").is_file():
        layers, hidden, heads, inter = TEACHER["model"]
        save_model(build_llama(ModelSpec(num_layers=layers, hidden_size=hidden, num_heads=heads,
                                         intermediate_size=inter), b.tok, MAX_POSITIONS, seed=0), b.tok, init)
    detoured = detour_set(b)

    def evaluate(model, label: int, step: int, cost: dict) -> dict:
        clean = eval_model(b, model)
        det = eval_model(b, model, *detoured)
        return {"step": label, "optimizer_steps": step, **clean, "detoured_accuracy": det["accuracy"],
                "detoured_sampled_accuracy": det["sampled_accuracy"], **cost}

    r = SFTRun(b.tok, d, str(init), TEACHER["lr"], TEACHER["warmup"], teacher_batch(b), {"step": 0}, evaluate)
    if not r.complete:
        while True:
            last = r.curve[-1]
            passed = last["step"] > 0 and last["accuracy"] >= TEACHER["min_clean"] and \
                last["detoured_accuracy"] >= TEACHER["min_detoured"]
            if passed or r.step >= b.a.teacher_cap:
                break
            while r.step < last["step"] + b.a.teacher_every:
                r.take_step()
            p = r.point(r.step)
            log(f"  teacher step {r.step}: greedy {p['accuracy']:.3f} (detoured {p['detoured_accuracy']:.3f}), T=1 "
                f"{p['sampled_accuracy']:.3f} ({p['wall_s']:.0f}s train)")
        r.finish("T", steps=r.step, passed=passed)
    saved = r.saved
    b.t_model = as_model(saved["model"])
    b.teacher = ModelRef(saved["model"], num_params(b.t_model))
    return saved


def teacher_completions(b: Bench) -> None:
    """The teacher's greedy walk for every train prompt: the SFT data of the warmups and the sft arm (made once;
    every use counts its generation FLOPs)."""
    from opd.generation import generate

    path = b.root / "teacher_data.json"
    if not path.is_file():
        prompts = [prompt_of(*p) for p in b.train]
        ids = encode(b, prompts)
        comps = generate(b.t_model, ids, b.tok.eos_token_id, b.tok.pad_token_id, MAX_TOKENS)
        write_json(path, {"prompts": prompts, "ids": ids, "completions": comps})
    d = json.loads(path.read_text())
    b.teacher_data = {"pairs": list(zip(d["ids"], d["completions"])),
                      "correct": sum(check_walk(p, b.tok.decode(c, skip_special_tokens=True))[0]
                                     for p, c in zip(d["prompts"], d["completions"])) / len(d["prompts"])}


def sft_batch(b: Bench, seed: int, stream: int):
    """64 train prompts with the teacher's greedy walks, drawn per (stream, seed, step)."""
    pairs = b.teacher_data["pairs"]

    def make(step: int):
        rng = random.Random((stream * 1_000_003 + seed) * 100_003 + step)
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(SFT_BATCH)]
        return batch, sum(len(p) + len(c) for p, c in batch)
    return make


def warmup_student(b: Bench, size: str, log=print) -> dict:
    """The size's start W: SFT on the teacher's walks until T=1 accuracy >= 0.5 at a check (or the cap)."""
    from opd.config import ModelSpec
    from opd.models import build_llama, save_model

    d = b.root / f"warm-{size}"
    init = d / "init"
    if not (init / "config.json").is_file():
        layers, hidden, heads, inter = SIZES[size]
        save_model(build_llama(ModelSpec(num_layers=layers, hidden_size=hidden, num_heads=heads,
                                         intermediate_size=inter), b.tok, MAX_POSITIONS, seed=0), b.tok, init)
    r = SFTRun(b.tok, d, str(init), WARMUP["lr"], WARMUP["warmup"], sft_batch(b, 0, 1), {"step": 0, **ZERO},
               student_point(b), n_teacher=b.teacher.params)
    if not r.complete:
        while True:
            last = r.curve[-1]
            reached = last["step"] > 0 and last["sampled_accuracy"] >= WARMUP["target"]
            if reached or r.step >= b.a.warm_cap:
                break
            while r.step < last["step"] + b.a.warm_every:
                r.take_step()
            p = r.point(r.step)
            log(f"  warmup {size} step {r.step}: T=1 {p['sampled_accuracy']:.3f} greedy {p['accuracy']:.3f}")
        r.finish("W", steps=r.step, reached=reached, params=r.n_student)
    return r.saved


# ---------------------------------------------------------------- the arms

def start_point(warm: dict) -> dict:
    last = warm["curve"][-1]
    return {**{k: last[k] for k in ("accuracy", "sampled_accuracy", "sampled_with_wrong_move", "recovered",
                                     "eval_s")}, **ZERO, "step": 0, "optimizer_steps": 0}


def opd_config(cfg, lr: float, seed: int, a):
    from opd.config import validate_config

    tree = cfg.model_dump(mode="json")
    o = tree["opd"]
    loss = o["loss"] if o["loss"]["kind"] == "reverse_kl_is" else {}
    o.update(lr=lr, steps_per_round=a.every, rounds=a.steps // a.every,
             loss={**loss, "kind": "reverse_kl_is", "kl_coef": 1.0}, reward=None)
    tree["seed"] = seed
    return validate_config(tree)


def run_opd(b: Bench, size: str, warm: dict, engines, lr: float, seed: int, log=print) -> dict:
    from opd.records import ModelRef

    def point(student, step: int, cost: dict, m: dict) -> dict:
        return {"step": step, "optimizer_steps": step, **eval_model(b, student.path), **cost,
                "train_reverse_kl": m.get("reverse_kl")}

    def line(p: dict) -> str:
        return (f"T=1 {p['sampled_accuracy']:.3f} greedy {p['accuracy']:.3f} recovered {_num(p['recovered'])} "
                f"({p['wall_s']:.0f}s train in all)")

    name = f"opd-{size}-lr{lr:g}-s{seed}"
    return run_rounds(b.root / "runs" / name, name, opd_config(b.cfg, lr, seed, b.a), b.data, b.teacher,
                      ModelRef(warm["model"], warm["params"]), engines, b.a.steps, b.a.every, start_point(warm),
                      point=point, line=line, log=log, stop_on=non_finite())


def run_sft(b: Bench, size: str, warm: dict, lr: float, seed: int, opd_curve: list[dict], log=print) -> dict:
    """SFT from W on the teacher's walks, stopping at each of OPD's eval points once its student FLOPs reach the
    OPD run's (same size and seed, OPD's chosen LR) there."""
    name = f"sft-{size}-lr{lr:g}-s{seed}"
    r = SFTRun(b.tok, b.root / "runs" / name, warm["model"], lr, SFT_WARMUP, sft_batch(b, seed, 2), start_point(warm),
               student_point(b), n_teacher=b.teacher.params)
    return run_matched(r, name, opd_curve, "student_flops", lambda p: (
        f"T=1 {p['sampled_accuracy']:.3f} greedy {p['accuracy']:.3f} recovered {_num(p['recovered'])}"), log)


def lr_score(r: dict) -> float:
    if r.get("diverged_at") is not None:
        return -math.inf
    return statistics.fmean(p["sampled_accuracy"] for p in r["curve"][1:])


def search(arm: str, grid: list[float], seeds: list[int], run: Callable[[float, int], dict], log=print):
    s0 = seeds[0]
    tried = {lr: run(lr, s0) for lr in grid}
    score = {lr: lr_score(r) for lr, r in tried.items()}
    best = max(score, key=score.get)
    log(f"{arm}: LR {best:g} chosen (mean T=1 {score[best]:.3f} on seed {s0})")
    runs = {s0: tried[best], **{s: run(best, s) for s in seeds[1:]}}
    return ({str(s): r["curve"] for s, r in runs.items()},
            {"grid": grid, "score_on_seed": {f"{k:g}": v for k, v in score.items()}, "chosen": best,
             "search_seed": s0, "curves_by_lr": {f"{k:g}": r["curve"] for k, r in tried.items()}})


def run_size(b: Bench, size: str, log=print) -> dict:
    """Warmup, then OPD's LR search and seeds, then SFT's (matched to OPD's chosen-LR run of the same seed)."""
    from opd.engines import Engines

    warm = warmup_student(b, size, log)
    log(f"{size}: W at warmup step {warm['steps']} (T=1 {warm['curve'][-1]['sampled_accuracy']:.3f}, "
        f"{warm['params']:,} params)")
    engines = Engines(b.cfg)
    try:
        opd_curves, opd_search = search(f"opd {size}", b.a.lrs, b.a.seeds,
                                        lambda lr, s: run_opd(b, size, warm, engines, lr, s, log), log)
    finally:
        engines.close()
    sft_curves, sft_search = search(f"sft {size}", b.a.lrs, b.a.seeds,
                                    lambda lr, s: run_sft(b, size, warm, lr, s, opd_curves[str(s)], log), log)
    return {"warmup": {k: warm[k] for k in ("steps", "reached", "params", "curve")},
            "curves": {"opd": opd_curves, "sft": sft_curves}, "lr_search": {"opd": opd_search, "sft": sft_search}}


# ---------------------------------------------------------------- report

def gaps(res_sizes: dict, seeds: list[str]) -> dict:
    out = {}
    for size, r in res_sizes.items():
        per_seed = {s: r["curves"]["opd"][s][-1]["sampled_accuracy"] - r["curves"]["sft"][s][-1]["sampled_accuracy"]
                    for s in seeds}
        opd_end = [r["curves"]["opd"][s][-1]["sampled_accuracy"] for s in seeds]
        sft_end = [r["curves"]["sft"][s][-1]["sampled_accuracy"] for s in seeds]
        out[size] = {"gap": statistics.fmean(per_seed.values()), "per_seed": per_seed,
                     "spread": spread(list(per_seed.values())), "opd_end": spread(opd_end), "sft_end": spread(sft_end),
                     "every_opd_beats_every_sft": min(opd_end) > max(sft_end)}
    return out


def verdict(g: dict) -> str:
    if "S" not in g:
        return "not run"
    small, others = g["S"]["gap"], [g[k]["gap"] for k in g if k != "S"]
    ok = small >= THRESHOLD["min_gap_smallest"] and all(small > o for o in others) and len(others) == 2
    return "confirmed" if ok else "refuted"


def _num(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(res["sizes"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(max(9, 6 * len(sizes)), 5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        r = res["sizes"][size]
        for arm, color in (("opd", "tab:red"), ("sft", "tab:blue")):
            for i, curve in enumerate(r["curves"][arm].values()):
                ax.plot([p["student_flops"] for p in curve], [p["sampled_accuracy"] for p in curve], "o-", ms=3,
                        color=color, alpha=0.75, label=f"{arm} (LR {r['lr_search'][arm]['chosen']:g})" if i == 0
                        else None)
        g = res["gap"][size]
        ax.set(title=f"student {size} ({r['warmup']['params']:,} params): gap {g['gap']:+.3f}",
               xlabel="student FLOPs from W", ylabel="T=1 accuracy (eval pairs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"walk task (recoverable errors), protocol {res['protocol_commit']}: verdict {res['verdict']}"
                 + (" (--quick smoke run)" if res.get("quick") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(res: dict, path: Path | None = None) -> None:
    lines = [f"teacher: {res['teacher']['params']:,} params, {res['teacher']['steps']} steps, greedy "
             f"{res['teacher']['accuracy']:.3f} clean / {res['teacher']['detoured_accuracy']:.3f} detoured, T=1 "
             f"{res['teacher']['sampled_accuracy']:.3f}; its greedy walks of the train prompts correct: "
             f"{res['teacher']['train_walks_correct']:.3f}",
             f"{'size':>4} {'params':>8} {'W step':>6} {'W T=1':>6} {'OPD LR':>7} {'SFT LR':>7} {'OPD T=1 end':>18} "
             f"{'SFT T=1 end':>18} {'gap':>7} {'gap min-max':>15} {'OPD recov.':>10} {'SFT recov.':>10}"]
    for size, r in res["sizes"].items():
        g, w = res["gap"][size], r["warmup"]
        rec = {arm: spread([c[-1]["recovered"] for c in r["curves"][arm].values()])["mean"] for arm in ARMS}
        lines.append(f"{size:>4} {w['params']:>8,} {w['steps']:>6} {w['curve'][-1]['sampled_accuracy']:>6.3f} "
                     f"{r['lr_search']['opd']['chosen']:>7g} {r['lr_search']['sft']['chosen']:>7g} "
                     f"{g['opd_end']['mean']:.3f} ({g['opd_end']['min']:.3f}-{g['opd_end']['max']:.3f}) "
                     f"{g['sft_end']['mean']:.3f} ({g['sft_end']['min']:.3f}-{g['sft_end']['max']:.3f}) "
                     f"{g['gap']:>+7.3f} {g['spread']['min']:+.3f}..{g['spread']['max']:+.3f} "
                     f"{_num(rec['opd']):>10} {_num(rec['sft']):>10}")
    lines.append(f"threshold: gap(S) >= {THRESHOLD['min_gap_smallest']} and gap(S) > gap(M), gap(L) -> verdict: "
                 f"{res['verdict']}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if path is not None:
        path.write_text(text)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    if a.replot:
        return replot(out, plot, table)
    t0 = time.time()
    cfg = bench_config(a)
    begin(cfg, "the walk task's prompts are the script's own")
    log = lambda m: print(m, flush=True)  # noqa: E731
    with library_output(cfg, "recoverable"):
        b = setup(a, cfg)
        try:
            write_prompts(b)
            t = train_teacher(b, log)
            teacher_completions(b)
            log(f"teacher: {b.teacher.params:,} params, {t['steps']} steps, passed {t['passed']}; its greedy walks "
                f"of the train prompts correct: {b.teacher_data['correct']:.3f}; kept in {b.root}")
            sizes = {size: run_size(b, size, log) for size in a.sizes}
        finally:
            if a.quick:
                shutil.rmtree(b.root, ignore_errors=True)
    if set(a.sizes) != set(SIZES) and not a.quick:
        log(f"ran sizes {a.sizes}; no report: run without --sizes to write it from the kept runs")
        return 0
    seeds = [str(s) for s in a.seeds]
    g = gaps(sizes, seeds)
    last = t["curve"][-1]
    res = {"command": "python benchmarks/recoverable.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "protocol_commit": PROTOCOL_COMMIT,
           "protocol": "benchmarks/README.md, section \"recoverable.py\"",
           "deviations": ["--quick: a CI smoke run, not the protocol"] if a.quick else [],
           "threshold": THRESHOLD, "verdict": verdict(g), "gap": g, "sizes": sizes, "seeds": a.seeds,
           "quick": a.quick,
           "teacher": {"params": b.teacher.params, "steps": t["steps"], "passed": t["passed"],
                       **{k: last[k] for k in ("accuracy", "detoured_accuracy", "sampled_accuracy",
                                               "detoured_sampled_accuracy")},
                       "train_walks_correct": b.teacher_data["correct"], "curve": t["curve"]},
           "task": {"positions": POSITIONS, "max_distance": MAX_DIST, "max_tokens": MAX_TOKENS,
                    "train_pairs": len(b.train), "eval_pairs": len(b.ev)},
           "eval": {"samples_per_pair": EVAL_SAMPLES, "sampling_seed": EVAL_SEED},
           "settings": {"teacher": TEACHER, "sizes": SIZES, "warmup": WARMUP, "lr_grid": a.lrs, "opd_steps": a.steps,
                        "opd_every": a.every, "sft_batch": SFT_BATCH, "sft_warmup": SFT_WARMUP,
                        "rollout": {k: getattr(cfg.opd, k) for k in ("prompts_per_step", "samples_per_prompt",
                                                                     "temperature", "max_tokens", "warmup_steps")}},
           "wall_s_total": time.time() - t0}
    write_outputs(res, out, plot, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
