"""``sample_efficiency.py --regime plateau``: more SFT vs OPD once SFT has flattened (benchmarks/README.md,
protocol commit 6bed30a); ``sample_efficiency.py`` parses the command line and hands the regime to ``plateau_main``.

The protocol, as pre-registered: one SFT trajectory (seed 0) from the warmup checkpoint on fresh, greedily
teacher-completed problems at a constant LR with the warmup's Adam state carried, eval points at
N_k = N_0 x 2^k (N_0 = the warmup's 1200 x 64 = 76,800 examples), k = 0..5; the log-linear rule picks the
branch checkpoint C; from C, SFT-continue (the trajectory's recipe, 3 N_k more examples, an eval point every
N_k / 8) vs OPD (the product's round, 600 steps, an eval point every 30), each with a 3-point LR grid searched
on seed 0, seeds 1 and 2 at the winner; FLOPs from C to C's T=1 accuracy + 5 points, student-only and with
the teacher's generation (SFT) or grading (OPD); confirmed if the student-only ratio SFT/OPD is >= 9.
Every trajectory point and every (arm, LR, seed) run is kept under <home>/bench/sample_efficiency_plateau/,
so a killed run continues where it stopped (the trajectory from its last N_k, a run from its last eval point).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import (EVAL_SEED, OPD, ROLLOUT, ZERO, add_cost, arm_config, as_model, begin, eval_set,
                               first_reach, library_output, mean_or_none, non_finite, replot, run_rounds, saved_run,
                               spread, warm_start, write_json, write_outputs)

REPO = Path(__file__).resolve().parents[1]
PROTOCOL_COMMIT = "6bed30a"  # benchmarks/README.md, "sample_efficiency.py --regime plateau"; before any code or run
PLATEAU_OUT = REPO / "benchmarks" / "results" / "sample_efficiency_plateau.json"
THRESHOLD = 9.0  # confirmed if ratio_sft_over_opd (student-only FLOPs to target, SFT / OPD, mean over seeds) >= 9
N0_PROTOCOL = 76_800  # the demo's SFT warmup: 1200 steps x 64
TRAJ_LR = 1e-3  # the trajectory's constant LR
SFT_GRID = [3e-4, 1e-3, 3e-3]  # SFT-continue
OPD_GRID = [1e-5, 3e-5, 1e-4]  # OPD
EVAL_SAMPLES = 4  # temperature-1 samples per eval problem
TARGET_GAIN = 0.05  # target = C's T=1 accuracy + 5 points
LOGLINEAR_RULE = {"first_k": 3, "fit_points": 3, "max_residual": 0.015, "gain_ratio": 0.5}
BLOCK_STEPS = 100  # fresh SFT problems are drawn and completed this many steps (x batch) at a time
QUICK_WARMUP = ["sft.train.steps=32", "sft.train.warmup_steps=4"]  # --quick: N_0 = 32 x 64 = 2,048 examples
ARM_NAMES = ("sft_continue", "opd")

PLATEAU_CHOICES = [
    "k = 0 is the SFT-warmup checkpoint itself; N_0 = sft.train.steps x sft.train.batch_size (76,800 for the demo, "
    "checked: n0_matches_protocol). N counts examples trained on (the warmup draws its 20,000 teacher-completed "
    "prompts with replacement; every later example is fresh and trained on once)",
    "the trajectory runs to its last N_k (k = 5) even when an earlier k passes the rule: the protocol lists all six "
    "eval points and the plot shows them; C is the first k that passes",
    "log-linear rule: accuracies as fractions (1.5 points = 0.015); for each k >= 3 the fit uses the points k-2..k; "
    "'gain over the last doubling' = acc(N_k) - acc(N_k-1), 'over the first' = acc(N_1) - acc(N_0), T=1 accuracy",
    "fresh SFT data: the task generator's problems (never one of the 1,024 eval problems), drawn and completed "
    "greedily by the teacher 100 steps (6,400 distinct problems) at a time from a stream seeded by (stream, seed, "
    "block); a problem may recur across blocks, as in branch A. The trajectory's stream (seed 0) and SFT-continue's "
    "(seeds 0-2; the same data for every LR of a seed) are different streams",
    "SFT-continue 'budget 3 N_k more examples or the target': the LR search runs (seed 0) take the full budget (the "
    "LR rule says so); seeds 1 and 2 stop at the first eval point at or above the target. OPD runs its 600 steps on "
    "every seed (no early stop is named for it); FLOPs to target are the same either way",
    "SFT-continue at every LR carries C's Adam state (moments) and sets the LR to the grid value, constant",
    "LR rule: the mean T=1 accuracy over the eval points leaves out step 0 (C itself, the same for every LR)",
    "FLOPs: SFT trains on and the teacher generates prompt + completion tokens (opd.ledger.PhaseCost, as branch A); "
    "OPD's from each opd_round's ledger (6 N x sequence tokens trained + 2 N x completion tokens sampled; teacher "
    "2 N_teacher x sequence tokens graded); counted from C; eval not counted",
    "ratios: per seed SFT / OPD at the first eval point at or above the target (T=1 accuracy); null for a seed whose "
    "OPD missed, and the mean over seeds is null if any seed is; SFT missing in a seed makes the mean a lower bound "
    "(ratio_is_lower_bound), and the threshold is applied to it as written",
    "eval set: the eval split data.synthetic.n_eval=1024 builds beside the run's data (its first 512 are the demo's "
    "eval split; none in the train split; checked), as in opd_vs_rl.py; greedy accuracy and the reverse KL to the "
    "teacher beside the T=1 accuracy; one sampling seed (1234) at every point",
    "wall seconds exclude evaluation and the one vLLM engine start",
    "fresh SFT data blocks are kept under <root>/data and made once per (stream, seed, block): the LRs of a seed read "
    "the teacher's completions the first made (the same rows it would regenerate), so their wall seconds are lower; "
    "FLOPs count the teacher's generation in every run, as the protocol's accounting says",
]
PLATEAU_DEVIATIONS = [
    "output path: benchmarks/results/sample_efficiency_plateau.json (.png, .txt beside it), not "
    "sample_efficiency.json as the protocol's Output line names, so the steep run's result (regime 'steep') is not "
    "overwritten; the keys are the protocol's",
    "'branch A's code (sft_train(one_pass=True)) ... lr 1e-3 constant': sft_train always decays the LR on a cosine "
    "over its spec.steps (branch A ended its 1500 steps at 10% of its LR), so the trajectory and SFT-continue call "
    "opd.sft.sft_step, the step sft_train takes, on the same one-pass walk of fresh data at a constant LR",
]


def plateau_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> argparse.Namespace:
    steep = [f for f in ("sft_steps", "evals", "target") if getattr(a, f) is not None]
    if steep:
        p.error(f"--{steep[0].replace('_', '-')} is a --regime steep option")
    a.out = a.out or str(PLATEAU_OUT)
    for name, default in (("max_k", 5), ("sft_budget", 3), ("sft_evals_per_nk", 8), ("opd_steps", 600),
                          ("opd_every", 30), ("eval_n", 1024)):
        if getattr(a, name) is None:
            setattr(a, name, default)
    if a.quick:  # CI-sized: 1 seed, 1 LR per arm, k <= 3, one more doubling, 20 OPD steps, 128 eval problems
        a.seeds, a.max_k, a.sft_budget, a.sft_evals_per_nk = a.seeds[:1], min(a.max_k, 3), 1, 4
        a.opd_steps, a.opd_every, a.eval_n = 20, 10, min(a.eval_n, 128)
        a.sft_lrs = a.sft_lrs[:1] if a.sft_lrs else [TRAJ_LR]
        a.opd_lrs = a.opd_lrs[:1] if a.opd_lrs else [1e-4]
    a.sft_lrs, a.opd_lrs = a.sft_lrs or list(SFT_GRID), a.opd_lrs or list(OPD_GRID)
    if a.max_k < LOGLINEAR_RULE["first_k"]:
        p.error(f"--max-k {a.max_k}: the log-linear rule looks at k >= {LOGLINEAR_RULE['first_k']}")
    if a.arms is None and len(a.sft_lrs) != len(a.opd_lrs):
        p.error(f"the LR grids must have as many points: {len(a.sft_lrs)} SFT vs {len(a.opd_lrs)} OPD")
    if a.opd_steps % a.opd_every:
        p.error(f"--opd-steps {a.opd_steps} is not a multiple of --opd-every {a.opd_every}")
    return a


# ---------------------------------------------------------------- the log-linear rule (pure)

def _least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def loglinear_fit(ns: list[float], accs: list[float], first_k: int = 3, fit_points: int = 3,
                  max_residual: float = 0.015, gain_ratio: float = 0.5) -> dict:
    """The pre-registered rule on a trajectory (``ns[k]`` examples, ``accs[k]`` T=1 accuracy as a fraction, k = 0..):
    fit acc = a + b log10(N) by least squares on the last ``fit_points`` points; the curve is log-linear at the
    first k >= ``first_k`` where every residual of that fit is <= ``max_residual`` and the gain over the last
    doubling (acc[k] - acc[k-1]) is <= ``gain_ratio`` x the gain over the first (acc[1] - acc[0]).

    Returns the fit at that k (``loglinear`` true) or, if no k passes, at the last k (``loglinear`` false), with
    every k's check in ``checks``."""
    if len(ns) != len(accs):
        raise ValueError(f"{len(ns)} N values for {len(accs)} accuracies")
    if len(ns) < max(first_k + 1, fit_points, 2):
        raise ValueError(f"the rule needs points k = 0..{max(first_k, fit_points - 1, 1)}; got {len(ns)}")
    first_gain = accs[1] - accs[0]
    checks = []
    for k in range(max(first_k, fit_points - 1), len(ns)):
        window = list(range(k - fit_points + 1, k + 1))
        xs = [math.log10(ns[i]) for i in window]
        ys = [accs[i] for i in window]
        a, b = _least_squares(xs, ys)
        residuals = [y - (a + b * x) for x, y in zip(xs, ys)]
        last_gain = accs[k] - accs[k - 1]
        residual_ok = max(abs(r) for r in residuals) <= max_residual + 1e-12
        gain_ok = last_gain <= gain_ratio * first_gain + 1e-12
        checks.append({"k": k, "window_k": window, "a": a, "b": b, "residuals": residuals,
                       "max_abs_residual": max(abs(r) for r in residuals), "residual_ok": residual_ok,
                       "last_gain": last_gain, "first_gain": first_gain, "gain_ok": gain_ok,
                       "passes": residual_ok and gain_ok})
    chosen = next((c for c in checks if c["passes"]), None)
    at = chosen or checks[-1]
    return {"loglinear": chosen is not None, "k": at["k"], "n": ns[at["k"]], "a": at["a"], "b": at["b"],
            "window_k": at["window_k"], "residuals": at["residuals"], "first_gain": first_gain,
            "last_gain": at["last_gain"],
            "points": [{"k": k, "n": n, "log10_n": math.log10(n), "accuracy": acc}
                       for k, (n, acc) in enumerate(zip(ns, accs))],
            "checks": checks,
            "rule": {"first_k": first_k, "fit_points": fit_points, "max_residual": max_residual,
                     "gain_ratio": gain_ratio, "metric": "temperature-1 accuracy"}}


# ---------------------------------------------------------------- setup

@dataclass
class Plateau:
    """What the trajectory and every arm share."""

    a: argparse.Namespace
    cfg: Any
    data: Any
    teacher: Any  # ModelRef of the shipped demo teacher
    warm: Any  # ModelRef of the SFT-warmup checkpoint (k = 0)
    ev: dict
    held_out: frozenset  # prompts fresh SFT data never uses
    tok: Any
    t_model: Any  # the teacher in this process: writes the SFT data, grades every eval point's reverse KL
    engines: Any
    root: Path  # <home>/bench/sample_efficiency_plateau/<trajectory key>[/quick-<pid>]
    runs: Path  # root/runs-<arms key>
    n0: int
    batch: int


def plateau_config(a: argparse.Namespace):
    """The config with the protocol's rollout settings (the demo's own values, set explicitly) as overrides;
    --quick keeps the (CI) config's rollout and shortens the warmup so N_0 is tiny."""
    from opd.config import load_config

    extra = list(QUICK_WARMUP) if a.quick else [f"opd.{k}={v}" for k, v in ROLLOUT.items()]
    return load_config(a.config, [*extra, *a.overrides])


def _key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def plateau_setup(a: argparse.Namespace, cfg) -> Plateau:
    from opd.engines import Engines
    from opd.models import load_model, load_tokenizer

    if cfg.data.synthetic.kind != "addition":
        raise SystemExit("--regime plateau draws fresh addition problems: data.synthetic.kind must be 'addition'")
    bench, data, teacher, warm = warm_start(cfg)
    ev = eval_set(cfg, data, a.eval_n)
    n0, batch = cfg.sft.train.steps * cfg.sft.train.batch_size, cfg.sft.train.batch_size
    traj_key = _key({"warm": warm.path, "teacher": teacher.path, "n0": n0, "batch": batch, "lr": TRAJ_LR,
                     "block": BLOCK_STEPS, "max_tokens": cfg.opd.max_tokens, "data": cfg.data.model_dump(mode="json"),
                     "task": cfg.task.model_dump(mode="json"), "micro_batch": cfg.sft.train.micro_batch,
                     "weight_decay": cfg.sft.train.weight_decay, "eval_n": a.eval_n, "eval_seed": EVAL_SEED,
                     "eval_samples": EVAL_SAMPLES, "protocol": PROTOCOL_COMMIT})
    root = bench.parent.parent / "sample_efficiency_plateau" / traj_key
    root = root / f"quick-{os.getpid()}" if a.quick else root
    arms_key = _key({"opd": cfg.opd.model_dump(mode="json", exclude={"lr", "loss", "reward", "rounds",
                                                                     "steps_per_round"}),
                     "training": cfg.training.model_dump(mode="json"), "sft_budget": a.sft_budget,
                     "sft_evals_per_nk": a.sft_evals_per_nk, "opd_steps": a.opd_steps, "opd_every": a.opd_every})
    runs = root / f"runs-{arms_key}"
    runs.mkdir(parents=True, exist_ok=True)
    d = data.load()
    held_out = frozenset(ev["prompt"]) | frozenset(d["eval"]["prompt"])
    return Plateau(a, cfg, data, teacher, warm, ev, held_out, load_tokenizer(teacher.path), load_model(teacher.path),
                   Engines(cfg), root, runs, n0, batch)


# ---------------------------------------------------------------- fresh SFT data, SFT steps, eval points

def stream_seed(stream: str, seed: int, block: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{stream}/{seed}/{block}".encode()).digest()[:4], "big")


class FreshData:
    """The SFT data stream ``stream`` of seed ``seed``: BLOCK_STEPS x batch fresh problems at a time from the task
    generator (never an eval problem), completed greedily by the teacher; step t trains on the rows
    [t x batch, (t+1) x batch) of its block, so a resumed run sees the data an uninterrupted one would.

    Blocks are kept under <root>/data: every LR of a seed trains on the same stream, and the teacher's greedy
    completions are two thirds of an SFT step's time here, so the second and third LR (run after or beside the
    first) read them instead of regenerating them. A block is made under an exclusive lock, so two processes on
    one stream make it once; its FLOPs are counted by every run that trains on it (the protocol's accounting)."""

    def __init__(self, b: Plateau, stream: str, seed: int):
        self.b, self.stream, self.seed = b, stream, seed
        self.dir = b.root / "data" / f"{stream}-{seed}"
        self._block: int | None = None
        self._rows: list[tuple[list[int], list[int]]] = []

    def _load(self, block: int) -> list[tuple[list[int], list[int]]]:
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"block-{block}.json"  # renamed into place whole: there or not, never half
        if not path.is_file():
            with open(self.dir / ".lock", "w") as lock:  # one maker per stream at a time
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not path.is_file():
                    rows = self._make(block)
                    tmp = path.with_name(path.name + ".tmp")
                    tmp.write_text(json.dumps(rows, separators=(",", ":")))
                    os.replace(tmp, path)
                    return rows
        return [(p, c) for p, c in json.loads(path.read_text())]

    def _make(self, block: int) -> list[tuple[list[int], list[int]]]:
        from opd.data import task
        from opd.generation import generate
        from opd.prompting import prompt_format

        b, syn = self.b, self.b.cfg.data.synthetic
        probs = task.generate(BLOCK_STEPS * b.batch, syn.num_terms, syn.max_digits,
                              seed=stream_seed(self.stream, self.seed, block), exclude=set(b.held_out),
                              prefix=f"{self.stream}-{self.seed}-{block}", any_order=syn.term_order == "any")
        prompts = prompt_format(b.cfg).encode_all(b.tok, [e.prompt for e in probs])
        comps = generate(b.t_model, prompts, b.tok.eos_token_id, b.tok.pad_token_id, b.cfg.opd.max_tokens,
                         temperature=0.0)
        return list(zip(prompts, comps))

    def batch(self, step: int) -> tuple[list[tuple[list[int], list[int]]], int]:
        """Step ``step``'s rows and their tokens (prompt + completion: what is trained on and what the teacher
        processed writing them)."""
        block, i = divmod(step, BLOCK_STEPS)
        if block != self._block:
            self._block, self._rows = block, self._load(block)
        rows = self._rows[i * self.b.batch:(i + 1) * self.b.batch]
        return rows, sum(len(p) + len(c) for p, c in rows)


class SFTChain:
    """SFT steps (``opd.sft.sft_step``) at a constant LR on a fresh-data stream, from a checkpoint's weights and
    Adam state (its optimizer.pt); cumulative student and teacher FLOPs as opd_vs_rl.py counts them."""

    def __init__(self, b: Plateau, ckpt: str | Path, lr: float, data: FreshData, step: int = 0,
                 cost: dict | None = None):
        from opd.checkpoints import load_optimizer
        from opd.models import load_model
        from opd.trainer import StudentTrainer

        self.b, self.lr, self.data, self.step = b, lr, data, step
        self.trainer = StudentTrainer(load_model(str(ckpt)), lr, weight_decay=b.cfg.sft.train.weight_decay,
                                      device=b.cfg.device, stage="SFT (plateau benchmark)", lr_field="--sft-lrs")
        load_optimizer(self.trainer.model, self.trainer.torch_optimizer, Path(ckpt) / "optimizer.pt")
        self.cost = {k: (cost or ZERO)[k] for k in ZERO}

    @property
    def model(self):
        return self.trainer.model

    def advance(self, to_step: int) -> None:
        from opd.ledger import PhaseCost
        from opd.sft import sft_step

        while self.step < to_step:
            t = time.time()
            pairs, tokens = self.data.batch(self.step)
            sft_step(self.trainer, pairs, self.b.tok.pad_token_id, self.b.cfg.sft.train.micro_batch, lr=self.lr)
            phase = PhaseCost(f"sft_{self.step}")
            phase.train(self.b.warm.params, tokens)
            phase.teacher(self.b.teacher.params, tokens)
            phase.wall_s = time.time() - t
            self.cost = add_cost(self.cost, phase.as_dict())
            self.step += 1

    def save(self, out: Path, meta: dict) -> None:
        """Weights + Adam state, published (DONE written last) at ``out``."""
        from opd.checkpoints import save_optimizer
        from opd.models import save_model
        from opd.records import fresh, publish_dir

        tmp = fresh(out)
        save_model(self.model, self.b.tok, tmp)
        save_optimizer(self.model, self.trainer.torch_optimizer, tmp / "optimizer.pt")
        publish_dir(tmp, out, {"params": self.b.warm.params, **meta})


def plateau_eval(b: Plateau, model) -> dict:
    """Greedy and temperature-1 accuracy (EVAL_SAMPLES per problem, sampling seed EVAL_SEED at every point) and the
    reverse KL to the teacher on those samples, on the 1,024 held-out problems."""
    from opd.evaluation import evaluate, task_check
    from opd.prompting import prompt_format

    model = as_model(model)
    r = evaluate(model, b.t_model, b.tok, b.ev["prompt"], b.ev["answer"], b.cfg.opd.max_tokens, EVAL_SEED,
                 kl_samples=EVAL_SAMPLES, fmt=prompt_format(b.cfg), check=task_check(b.cfg))
    return {"accuracy": r.accuracy, "sampled_accuracy": r.sampled_accuracy, "reverse_kl": r.reverse_kl,
            "eval_s": r.wall_s}


# ---------------------------------------------------------------- the trajectory (seed 0, once)

def run_trajectory(b: Plateau, log=print) -> list[dict]:
    """Eval points at N_k = N_0 x 2^k, k = 0..max_k; the checkpoint (weights + Adam state) and the eval of every
    N_k are kept in <root>/trajectory, and a later invocation continues from the last one."""
    from opd.records import read_done
    d = b.root / "trajectory"
    d.mkdir(parents=True, exist_ok=True)
    saved = d / "trajectory.json"
    points = json.loads(saved.read_text())["points"] if saved.is_file() else []
    kept = []  # the longest prefix whose checkpoints are all there
    for p in points:
        if p["k"] != len(kept) or (p["k"] > 0 and read_done(Path(p["checkpoint"])) is None):
            break
        kept.append(p)
    points = kept
    if not points:
        points = [{"k": 0, "n_examples": b.n0, "steps": 0, **ZERO, **plateau_eval(b, b.warm.path),
                   "checkpoint": b.warm.path}]
        write_json(saved, {"points": points})
    if points[-1]["k"] < b.a.max_k:
        last = points[-1]
        log(f"trajectory: continuing from k = {last['k']} ({last['n_examples']:,} examples)")
        chain = SFTChain(b, last["checkpoint"], TRAJ_LR, FreshData(b, "trajectory", 0), last["steps"], last)
        for k in range(last["k"] + 1, b.a.max_k + 1):
            n = b.n0 * 2 ** k
            chain.advance((n - b.n0) // b.batch)
            out = d / f"k{k}"
            chain.save(out, {"k": k, "n_examples": n, "steps": chain.step})
            points.append({"k": k, "n_examples": n, "steps": chain.step, **chain.cost, **plateau_eval(b, chain.model),
                           "checkpoint": str(out)})
            write_json(saved, {"points": points})
            p = points[-1]
            log(f"trajectory k = {k} ({n:,} examples, {chain.step} steps): T=1 {p['sampled_accuracy']:.3f} greedy "
                f"{p['accuracy']:.3f} kl {p['reverse_kl']:.4f} ({p['wall_s']:.0f}s train in all, "
                f"{p['eval_s']:.0f}s this eval)")
    return points[:b.a.max_k + 1]


# ---------------------------------------------------------------- the arms from C

def branch_start(c: dict) -> dict:
    """C's trajectory point as step 0 of an arm: its eval, no cost since C."""
    return {"step": 0, "examples": 0, **ZERO, **{k: c[k] for k in ("accuracy", "sampled_accuracy",
                                                                          "reverse_kl", "eval_s")}}


def _reached(p: dict, target: float | None) -> bool:
    return target is not None and p["step"] > 0 and p["sampled_accuracy"] >= target - 1e-12


def run_sft_continue(b: Plateau, c: dict, lr: float, seed: int, stop_at: float | None, log=print) -> dict:
    """SFT-continue from C: the trajectory's recipe (C's Adam state, fresh data of seed ``seed``, constant ``lr``),
    ``sft_budget`` x N_C more examples, an eval point every N_C / ``sft_evals_per_nk``; with ``stop_at``, stop at
    the first eval point whose T=1 accuracy is at or above it. Resumes from its last eval point."""
    from opd.records import read_done

    name = f"sft_continue-k{c['k']}-lr{lr:g}-s{seed}" + ("" if stop_at is None else f"-to-{stop_at:.6f}")
    run_dir = b.runs / name
    saved_path, saved = run_dir / "curve.json", saved_run(run_dir, name, log)
    if saved.get("complete"):
        return saved
    every = max(1, c["n_examples"] // b.a.sft_evals_per_nk // b.batch)
    budget = b.a.sft_budget * c["n_examples"] // b.batch
    curve = saved.get("curve") or [branch_start(c)]
    ckpt = run_dir / f"ckpt-{curve[-1]['step']}"
    if curve[-1]["step"] == 0 or read_done(ckpt) is None:
        curve, ckpt = [branch_start(c)], Path(c["checkpoint"])
    chain = SFTChain(b, ckpt, lr, FreshData(b, "sft_continue", seed), curve[-1]["step"], curve[-1])
    out: dict = {"complete": True}
    try:
        while chain.step < budget and not _reached(curve[-1], stop_at):
            chain.advance(min(budget, chain.step + every))
            ck = run_dir / f"ckpt-{chain.step}"
            chain.save(ck, {"step": chain.step})
            curve.append({"step": chain.step, "examples": chain.step * b.batch, **chain.cost,
                          **plateau_eval(b, chain.model)})
            write_json(saved_path, {"complete": False, "curve": curve})
            for old in run_dir.glob("ckpt-*"):
                if old.name != ck.name:
                    shutil.rmtree(old, ignore_errors=True)
            p = curve[-1]
            log(f"  {name} step {p['step']} ({p['examples']:,} examples): T=1 {p['sampled_accuracy']:.3f} greedy "
                f"{p['accuracy']:.3f} kl {p['reverse_kl']:.4f} ({p['wall_s']:.0f}s train in all)")
    except non_finite() as e:
        log(f"  {name}: stopped at step {chain.step}: {e}")
        out.update(diverged_at=chain.step, diverged=str(e))
    out.update(curve=curve, stopped_at_target=_reached(curve[-1], stop_at), budget_steps=budget, eval_every=every)
    write_json(saved_path, out)
    for old in run_dir.glob("ckpt-*"):
        shutil.rmtree(old, ignore_errors=True)
    return out


def run_opd_from(b: Plateau, c: dict, lr: float, seed: int, log=print) -> dict:
    """OPD from C: ``opd.rounds.opd_round`` (fresh AdamW, warmup 20, reverse_kl_is with kl_coef 1, no reward),
    one round of ``opd_every`` steps per eval point, ``opd_steps`` in all. Resumes from its saved rounds."""
    from opd.records import ModelRef

    def point(student, step: int, cost: dict, m: dict) -> dict:
        return {"step": step, **cost, **plateau_eval(b, student.path), "train_reverse_kl": m.get("reverse_kl"),
                "train_ratio_max": m.get("ratio_max")}

    def line(p: dict) -> str:
        return (f"T=1 {p['sampled_accuracy']:.3f} greedy {p['accuracy']:.3f} kl {p['reverse_kl']:.4f} "
                f"({p['wall_s']:.0f}s train in all)")

    name = f"opd-k{c['k']}-lr{lr:g}-s{seed}"
    cfg = arm_config(b.cfg, OPD, lr, seed, b.a.opd_steps, b.a.opd_every)
    return run_rounds(b.runs / name, name, cfg, b.data, b.teacher, ModelRef(c["checkpoint"], b.warm.params),
                          b.engines, b.a.opd_steps, b.a.opd_every, branch_start(c), point=point, line=line, log=log,
                          stop_on=non_finite())


def plateau_lr_score(curve: list[dict]) -> float | None:
    """The LR rule: mean T=1 accuracy over the eval points (step 0, C itself, left out); None without any."""
    pts = [p["sampled_accuracy"] for p in curve[1:]]
    return statistics.fmean(pts) if pts else None


def plateau_search(arm: str, grid: list[float], seeds: list[int], run: Callable[[float, int, bool], dict],
                   log=print) -> tuple[dict, dict]:
    """Every LR on the first seed for its full budget; the best (``plateau_lr_score``) on the other seeds
    (``run(lr, seed, later_seed)``)."""
    s0, tried = seeds[0], {}
    for lr in grid:
        tried[lr] = run(lr, s0, False)
    score = {lr: plateau_lr_score(r["curve"]) for lr, r in tried.items()}
    best = max((lr for lr in grid if score[lr] is not None), key=lambda lr: score[lr], default=grid[0])
    log(f"{arm}: LR {best:g} chosen (mean T=1 accuracy {score[best]} on seed {s0})")
    runs = {s0: tried[best], **{s: run(best, s, True) for s in seeds[1:]}}
    notes = {f"{lr:g}": {k: r[k] for k in ("diverged_at", "diverged") if k in r} for lr, r in tried.items()}
    return ({str(s): r["curve"] for s, r in runs.items()},
            {"grid": grid, "mean_sampled_accuracy_on_seed": {f"{lr:g}": v for lr, v in score.items()},
             "chosen": best, "search_seed": s0, "curves_by_lr": {f"{lr:g}": r["curve"] for lr, r in tried.items()},
             "diverged": {k: v for k, v in notes.items() if v},
             "stopped_at_target": {str(s): r.get("stopped_at_target", False) for s, r in runs.items()}})


# ---------------------------------------------------------------- FLOPs to target, ratios, verdict

def plateau_compare(curves: dict, seeds: list[str], target: float, loglinear: bool) -> dict:
    """Per seed, each arm's FLOPs from C at its first eval point whose T=1 accuracy is at or above ``target``
    (else its whole budget, reached false), both accountings; the ratios SFT / OPD (null where OPD missed), their
    means over seeds (null if any seed's is), and the verdict."""
    per_seed = {}
    for s in seeds:
        row: dict = {}
        for arm in ARM_NAMES:
            p, ok = first_reach(curves[arm][s], target, "sampled_accuracy")
            row[arm] = {"reached": ok, "step": p["step"], "examples": p.get("examples"),
                        "student_flops": p["student_flops"], "total_flops": p["total_flops"], "wall_s": p["wall_s"],
                        "sampled_accuracy": p["sampled_accuracy"]}
        sft, opd = row["sft_continue"], row["opd"]
        for name, key in (("ratio_student", "student_flops"), ("ratio_with_generation", "total_flops")):
            row[name] = sft[key] / opd[key] if opd["reached"] and opd[key] > 0 else None
        per_seed[s] = row
    ratio = mean_or_none([per_seed[s]["ratio_student"] for s in seeds])
    ratio_gen = mean_or_none([per_seed[s]["ratio_with_generation"] for s in seeds])
    return {"target_accuracy": target, "per_seed": per_seed,
            "ratio_sft_over_opd": ratio, "ratio_with_generation": ratio_gen,
            "ratio_is_lower_bound": ratio is not None and any(not per_seed[s]["sft_continue"]["reached"]
                                                              for s in seeds),
            "opd_missed_target": [s for s in seeds if not per_seed[s]["opd"]["reached"]],
            "sft_missed_target": [s for s in seeds if not per_seed[s]["sft_continue"]["reached"]],
            "ratio_spread": {"student": spread([per_seed[s]["ratio_student"] for s in seeds]),
                             "with_generation": spread([per_seed[s]["ratio_with_generation"] for s in seeds])},
            "verdict": plateau_verdict(loglinear, ratio),
            "end": {arm: {k: spread([curves[arm][s][-1][k] for s in seeds])
                          for k in ("accuracy", "sampled_accuracy", "reverse_kl")} for arm in ARM_NAMES}}


def plateau_verdict(loglinear: bool, ratio: float | None) -> str:
    """Inconclusive if C is not shown log-linear; else confirmed if the student-only ratio is >= THRESHOLD,
    refuted if below or null."""
    if not loglinear:
        return "inconclusive"
    return "confirmed" if ratio is not None and ratio >= THRESHOLD else "refuted"


# ---------------------------------------------------------------- plot and table

def trajectory_panel(ax, res: dict) -> None:
    """The trajectory's T=1 (and greedy) accuracy vs log10 examples, the rule's fit and C (the plots' left panel)."""
    fit, c = res["loglinear_fit"], res["branch_point"]
    pts = res["trajectory"]["points"]
    xs = [math.log10(p["n_examples"]) for p in pts]
    ax.plot(xs, [p["sampled_accuracy"] for p in pts], "o-", color="tab:blue", label="T=1 accuracy (the metric)")
    ax.plot(xs, [p["accuracy"] for p in pts], "x--", color="tab:blue", alpha=0.45, label="greedy accuracy")
    wx = [math.log10(pts[k]["n_examples"]) for k in fit["window_k"]]
    line = lambda x: fit["a"] + fit["b"] * x  # noqa: E731
    ax.plot([min(xs), max(xs)], [line(min(xs)), line(max(xs))], ":", color="gray", lw=1)
    ax.plot(wx, [line(x) for x in wx], "-", color="black", lw=1.5,
            label=f"fit a + b log10 N on k = {fit['window_k'][0]}..{fit['window_k'][-1]} (b = {fit['b']:.3f})")
    ax.axvline(math.log10(c["n_examples"]), color="tab:green", ls="--",
               label=f"C = N_{c['k']} ({c['n_examples']:,}); log-linear: {res['loglinear']}")
    ax.axhline(res["target_accuracy"], color="tab:red", ls="--", lw=1, label="target (C + 5 points)")
    ax.set_xlabel("log10 SFT examples (N_k = N_0 x 2^k)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("SFT trajectory (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_plateau(res: dict, path: Path) -> None:
    """Left: the trajectory's T=1 (and greedy) accuracy vs log10 examples, the fit and C. Middle, right: T=1
    accuracy vs student FLOPs from C, and vs FLOPs with the teacher's generation/grading, both arms, every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 5.8))
    trajectory_panel(axes[0], res)
    c = res["branch_point"]
    colors = {"sft_continue": "tab:blue", "opd": "tab:red"}
    for ax, (xkey, xlabel) in zip(axes[1:], (("student_flops", "student FLOPs from C"),
                                             ("total_flops", "FLOPs from C incl. the teacher's generation/grading"))):
        for arm, by_seed in res["curves"].items():
            for i, curve in enumerate(by_seed.values()):
                q = [p for p in curve if p[xkey] > 0]
                ax.plot([p[xkey] for p in q], [p["sampled_accuracy"] for p in q], "o-", ms=3, lw=1, alpha=0.75,
                        color=colors.get(arm), label=f"{arm} (LR {res['lr_search'][arm]['chosen']:g})" if i == 0
                        else None)
        ax.axhline(c["sampled_accuracy"], color="tab:green", ls=":", lw=1, label="C (T=1)")
        ax.axhline(res["target_accuracy"], color="gray", ls="--", lw=1, label="target")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("T=1 accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Plateau regime (protocol {res['protocol_commit']}): SFT/OPD student FLOPs to target "
                 f"{_fmt_plateau_ratio(res['ratio_sft_over_opd'], res)}, with generation "
                 f"{_fmt_plateau_ratio(res['ratio_with_generation'], res)}; verdict: {res['verdict']}"
                 + (" (--quick smoke run)" if res.get("quick") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt_plateau_ratio(x: float | None, res: dict) -> str:
    if x is None:
        return "null (OPD missed the target)"
    return (">= " if res.get("ratio_is_lower_bound") else "") + f"{x:.2f}x"


def print_table_plateau(res: dict, path: Path | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=200, record=True, highlight=False)
    tt = Table(title=f"SFT trajectory (seed 0, lr {res['trajectory']['lr']:g} constant, fresh teacher data)")
    for col in ("k", "N examples", "steps", "T=1 acc", "greedy acc", "reverse KL", "student FLOPs", "+ teacher FLOPs"):
        tt.add_column(col, justify="right")
    for p in res["trajectory"]["points"]:
        tt.add_row(str(p["k"]), f"{p['n_examples']:,}", str(p["steps"]), f"{p['sampled_accuracy']:.3f}",
                   f"{p['accuracy']:.3f}", f"{p['reverse_kl']:.4f}", "%.3g" % p["student_flops"],
                   "%.3g" % p["total_flops"])
    con.print(tt)
    fit, c = res["loglinear_fit"], res["branch_point"]
    for ch in fit["checks"]:
        con.print(f"rule at k = {ch['k']}: fit on k = {ch['window_k'][0]}..{ch['window_k'][-1]}: a {ch['a']:.4f}, "
                  f"b {ch['b']:.4f}, max |residual| {100 * ch['max_abs_residual']:.2f} points (<= "
                  f"{100 * fit['rule']['max_residual']:.1f}: {ch['residual_ok']}), last gain "
                  f"{100 * ch['last_gain']:.2f} vs half the first {50 * ch['first_gain']:.2f} points ({ch['gain_ok']})")
    con.print(f"log-linear: {res['loglinear']}; C = N_{c['k']} = {c['n_examples']:,} examples: T=1 "
              f"{c['sampled_accuracy']:.3f}, greedy {c['accuracy']:.3f}; target (C + 5 points) "
              f"{res['target_accuracy']:.3f}")
    t = Table(title="FLOPs from C to the target (first eval point at or above it; '+' = missed, whole budget)")
    for col in ("seed", "SFT student FLOPs", "OPD student FLOPs", "ratio", "SFT + generation", "OPD + grading",
                "ratio", "SFT examples", "OPD steps"):
        t.add_column(col, justify="right")
    f = lambda r, k: ("%.3g" % r[k]) + ("" if r["reached"] else "+")  # noqa: E731
    g = lambda x: "null" if x is None else f"{x:.2f}x"  # noqa: E731
    for s, row in res["per_seed"].items():
        sft, opd = row["sft_continue"], row["opd"]
        t.add_row(s, f(sft, "student_flops"), f(opd, "student_flops"), g(row["ratio_student"]), f(sft, "total_flops"),
                  f(opd, "total_flops"), g(row["ratio_with_generation"]),
                  f"{sft['examples']:,}" + ("" if sft["reached"] else "+"),
                  str(opd["step"]) + ("" if opd["reached"] else "+"))
    con.print(t)
    for arm, s in res["lr_search"].items():
        if isinstance(s, dict):
            con.print(f"LR search {arm} (seed {s['search_seed']}, mean T=1 accuracy): " + ", ".join(
                "%s: %s" % (k, "-" if v is None else f"{v:.3f}") for k, v in s["mean_sampled_accuracy_on_seed"].items())
                + f" -> {s['chosen']:g}")
    con.print(f"ratio SFT/OPD, student FLOPs (ratio_sft_over_opd, mean over seeds): "
              f"{_fmt_plateau_ratio(res['ratio_sft_over_opd'], res)}")
    con.print(f"ratio SFT/OPD, with the teacher's generation/grading (ratio_with_generation): "
              f"{_fmt_plateau_ratio(res['ratio_with_generation'], res)}")
    con.print(f"pre-registered threshold: ratio_sft_over_opd >= {res['threshold']['value']:g} -> verdict: "
              f"{res['verdict']}")
    if path is not None:
        path.write_text(con.export_text())


# ---------------------------------------------------------------- report, main

def plateau_report(a, argv, cfg, b: Plateau, traj: list[dict], fit: dict, teacher_acc: float, curves: dict,
                   search: dict, t0: float) -> dict:
    import torch

    c = traj[fit["k"]]
    seeds = [str(s) for s in a.seeds]
    target = c["sampled_accuracy"] + TARGET_GAIN
    cmp = plateau_compare(curves, seeds, target, fit["loglinear"])
    return {
        "command": "python benchmarks/sample_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "regime": "plateau",
        "protocol_commit": PROTOCOL_COMMIT,
        "protocol": "benchmarks/README.md, section \"sample_efficiency.py --regime plateau\"",
        "deviations": (["--quick: a CI smoke run, not the protocol (CI config, 32-step warmup, k <= 3, one more "
                        "doubling, 20 OPD steps, 1 seed, 1 LR per arm, 128 eval problems)"] if a.quick else [])
        + PLATEAU_DEVIATIONS,
        "choices": PLATEAU_CHOICES,
        "threshold": {"value": THRESHOLD, "rule": "confirmed if ratio_sft_over_opd (student-only FLOPs from C to "
                      "target, SFT / OPD, mean over seeds) >= 9; refuted if below or null; inconclusive if C is not "
                      "shown log-linear. ratio_with_generation is reported without a threshold"},
        "verdict": cmp.pop("verdict"),
        "ratio_sft_over_opd": cmp.pop("ratio_sft_over_opd"),
        "ratio_with_generation": cmp.pop("ratio_with_generation"),
        "loglinear": fit["loglinear"],
        "loglinear_fit": fit,
        "target_rule": "C's temperature-1 accuracy + 0.05; reached per seed at the first eval point whose "
                       "sampled_accuracy is at or above it",
        **cmp,
        "branch_point": {k: c[k] for k in ("k", "n_examples", "steps", "accuracy", "sampled_accuracy", "reverse_kl",
                                           "checkpoint")},
        "trajectory": {"points": traj, "n0": b.n0, "n0_protocol": N0_PROTOCOL,
                       "n0_matches_protocol": b.n0 == N0_PROTOCOL, "max_k": a.max_k, "lr": TRAJ_LR, "batch": b.batch,
                       "seed": 0, "teacher_temperature": 0.0,
                       "optimizer": "the warmup's AdamW state carried (betas 0.9/0.98), constant LR, grad clip 1",
                       "data": f"fresh problems, {BLOCK_STEPS} x batch per block, none of the eval set, completed "
                               "greedily by the teacher; every example trained on once",
                       "flops": "cumulative from the warmup checkpoint (k = 0)"},
        "lr_search": {**search, "rule": "3 LRs per arm; each runs its full budget on seed 0; the highest mean T=1 "
                                        "accuracy over its eval points (step 0 excluded) wins; seeds 1 and 2 run at "
                                        "it"},
        "curves": curves,
        "seeds": a.seeds, "quick": a.quick,
        "config": os.path.relpath(a.config, REPO) if os.path.isabs(a.config) else a.config,
        "overrides": a.overrides,
        "settings": {"sft_continue": {"budget_examples": a.sft_budget * c["n_examples"],
                                      "eval_every_examples": c["n_examples"] // a.sft_evals_per_nk,
                                      "batch": b.batch, "grid": a.sft_lrs},
                     "opd": {"steps": a.opd_steps, "eval_every": a.opd_every, "grid": a.opd_lrs,
                             "rollout": {k: getattr(cfg.opd, k) for k in ("prompts_per_step", "samples_per_prompt",
                                                                          "temperature", "top_p", "max_tokens",
                                                                          "warmup_steps", "micro_batch")},
                             "loss": "reverse_kl_is, kl_coef 1, no reward", "optimizer": "fresh AdamW at C"},
                     "device": "cuda" if torch.cuda.is_available() else "cpu",
                     "torch_threads": torch.get_num_threads()},
        "eval": {"examples": len(b.ev["prompt"]), "temperature1_samples_per_problem": EVAL_SAMPLES,
                 "sampling_seed": EVAL_SEED, "metric": "temperature-1 accuracy; greedy and the reverse KL to the "
                                                       "teacher beside it"},
        "teacher": {"path": b.teacher.path, "params": b.teacher.params, "accuracy": teacher_acc},
        "student": {"params": b.warm.params, "warmup": b.warm.path, "warmup_cost": b.warm.cost},
        "flops": "student-only: SFT 6 N x tokens trained; OPD 6 N x tokens trained + 2 N x tokens sampled. With "
                 "generation: + 2 N_teacher x tokens the teacher generated (SFT) or graded (OPD). From C; eval not "
                 "counted",
        "wall_s_total": time.time() - t0,
    }


def write_plateau_outputs(res: dict, out: Path) -> None:
    write_outputs(res, out, plot_plateau, print_table_plateau)


def _teacher_accuracy(b: Plateau) -> float:
    """The teacher's greedy accuracy on the eval set (context, not a target); cached with the trajectory."""
    from opd.evaluation import accuracy, task_check
    from opd.prompting import prompt_format

    saved = b.root / "teacher.json"
    if saved.is_file():
        return json.loads(saved.read_text())["accuracy"]
    acc = accuracy(b.t_model, b.tok, b.ev["prompt"], b.ev["answer"], b.cfg.opd.max_tokens, prompt_format(b.cfg),
                   task_check(b.cfg))
    write_json(saved, {"accuracy": acc})
    return acc


def plateau_main(a: argparse.Namespace, argv=None) -> int:
    out = Path(a.out)
    if a.replot:
        return replot(out, plot_plateau, print_table_plateau)
    t0 = time.time()
    cfg = plateau_config(a)
    begin(cfg, "the SFT data are fresh problems from the generator")
    with library_output(cfg, "sample_efficiency_plateau"):
        return _plateau(a, argv, cfg, out, t0)


def _plateau(a: argparse.Namespace, argv, cfg, out: Path, t0: float) -> int:
    """The trajectory, the rule, the arms from C and the report (``plateau_main``'s body)."""
    b = plateau_setup(a, cfg)
    log = lambda m: print(m, flush=True)  # noqa: E731
    try:
        teacher_acc = _teacher_accuracy(b)
        log(f"teacher greedy {teacher_acc:.3f}; N_0 = {b.n0:,} examples (protocol {N0_PROTOCOL:,}); "
            f"kept in {b.root}")
        traj = run_trajectory(b, log)
        fit = loglinear_fit([p["n_examples"] for p in traj], [p["sampled_accuracy"] for p in traj],
                            **LOGLINEAR_RULE)
        c = traj[fit["k"]]
        target = c["sampled_accuracy"] + TARGET_GAIN
        log(f"log-linear: {fit['loglinear']}; C = N_{c['k']} ({c['n_examples']:,} examples): T=1 "
            f"{c['sampled_accuracy']:.3f}; target {target:.3f}")
        if a.trajectory_only:
            for ch in fit["checks"]:
                log(f"  k = {ch['k']}: max |residual| {ch['max_abs_residual']:.4f} ({ch['residual_ok']}), last gain "
                    f"{ch['last_gain']:.4f} vs first {ch['first_gain']:.4f} ({ch['gain_ok']})")
            return 0
        curves, search = {}, {}
        if a.arms is None or "sft_continue" in a.arms:
            curves["sft_continue"], search["sft_continue"] = plateau_search(
                "sft_continue", a.sft_lrs, a.seeds,
                lambda lr, s, later: run_sft_continue(b, c, lr, s, target if later else None, log), log)
        if a.arms is None or "opd" in a.arms:
            curves["opd"], search["opd"] = plateau_search(
                "opd", a.opd_lrs, a.seeds, lambda lr, s, later: run_opd_from(b, c, lr, s, log), log)
        if a.arms is not None:
            lrs = {"sft_continue": a.sft_lrs, "opd": a.opd_lrs}
            log(f"ran {'; '.join(f'{arm} at LRs {lrs[arm]}' for arm in a.arms)} on seeds {a.seeds}; no report: run "
                "without --arms to write it from the kept runs")
            return 0
        res = plateau_report(a, argv, cfg, b, traj, fit, teacher_acc, curves, search, t0)
    finally:
        b.engines.close()
        if a.quick:
            shutil.rmtree(b.root, ignore_errors=True)
    write_plateau_outputs(res, out)
    return 0
