"""Compute to a target accuracy: more SFT vs OPD, both from one SFT-warmup checkpoint of the demo student.

    python benchmarks/sample_efficiency.py            # full: 3 seeds, LR search, ~30 min on 2 cores
    python benchmarks/sample_efficiency.py --quick    # CI smoke run: 1 seed, small budget, < 10 min
    python benchmarks/sample_efficiency.py --regime plateau          # branch once SFT is flat: ~8-24 h here; resumable
    python benchmarks/sample_efficiency.py --regime plateau --quick  # its CI smoke run

``--regime steep`` (the default) is the comparison described here; ``--regime plateau`` implements the protocol
pre-registered in benchmarks/README.md (commit 6bed30a): an SFT trajectory from the warmup checkpoint to 32x its
examples, the log-linear rule that picks the branch checkpoint C, then SFT-continue vs OPD from C (in
benchmarks/plateau.py).

Branch A (SFT): keeps training the warmup checkpoint (its Adam state too) on *fresh* problems the
teacher completes as SFT warmup did (same temperature); every generated example is trained on once.
Branch B (OPD): `opd.rounds.opd_round`, the product's own round (vLLM sampling, teacher grading,
importance-sampled reverse-KL update, in-place weight sync), one round per eval interval.

Both are evaluated on the same held-out problems (greedy exact match; reverse KL on 4 samples per
prompt) at regular intervals. Compute is counted from the branch point with `opd.ledger.PhaseCost`:
student = 6*N*train tokens + 2*N*sampled tokens, teacher = 2*N_teacher*(generated or graded tokens).
Target = teacher accuracy - 5 points, or the best mean accuracy SFT reaches, if lower. Each branch
gets the same LR search budget (the same number of grid points, picked by the mean accuracy over the
curve on the first seed), recorded in the JSON.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import (EVAL_SEED, begin, first_reach, library_output, replot, spread, warm_start,  # noqa: E402
                               write_outputs)
from benchmarks.plateau import plateau_args, plateau_main  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "sample_efficiency.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=("steep", "plateau"), default="steep",
                   help="steep: branch at the SFT-warmup checkpoint (the default, as before); plateau: the protocol "
                        "pre-registered in benchmarks/README.md (commit 6bed30a), branch once SFT is log-linear")
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sft-steps", type=int, default=None, help="steep: SFT branch budget in optimizer steps (1500)")
    p.add_argument("--opd-steps", type=int, default=None,
                   help="OPD branch budget in optimizer steps (steep 300, plateau 600)")
    p.add_argument("--evals", type=int, default=None, help="steep: eval points per branch after the branch point (6)")
    p.add_argument("--sft-lrs", type=float, nargs="+", default=None,
                   help="SFT LR grid (steep: sft.train.lr x {0.3, 1, 3}; plateau: 3e-4 1e-3 3e-3)")
    p.add_argument("--opd-lrs", type=float, nargs="+", default=None,
                   help="OPD LR grid (steep: opd.lr x {1, 3.33, 10}; plateau: 1e-5 3e-5 1e-4); as many points as SFT's")
    p.add_argument("--target", type=float, default=None, help="steep: fix the target accuracy instead of the rule")
    # plateau only (defaults = the pre-registered protocol)
    p.add_argument("--max-k", type=int, default=None, help="plateau: last trajectory point N_k = N_0 x 2^k (5)")
    p.add_argument("--sft-budget", type=int, default=None,
                   help="plateau: SFT-continue budget in multiples of C's N_k (3: two more doublings)")
    p.add_argument("--sft-evals-per-nk", type=int, default=None,
                   help="plateau: SFT-continue eval points per N_k examples (8: one every N_k / 8)")
    p.add_argument("--opd-every", type=int, default=None, help="plateau: OPD steps between eval points (30)")
    p.add_argument("--eval-n", type=int, default=None, help="plateau: held-out problems per eval point (1024)")
    p.add_argument("--trajectory-only", action="store_true",
                   help="plateau: run (or resume) the SFT trajectory, apply the log-linear rule, print, stop")
    p.add_argument("--arms", nargs="+", choices=("sft_continue", "opd"), default=None,
                   help="plateau: run (or resume) only these arms' runs and stop without a report, to spread one "
                        "benchmark over processes; e.g. two processes '--arms sft_continue --sft-lrs 3e-4 --seeds 0' "
                        "and '... --sft-lrs 1e-3 ...' share seed 0's teacher data. A run's cache does not depend on "
                        "how it was started: the invocation with every arm reuses them and writes the report")
    p.add_argument("--quick", action="store_true", help="1 seed, no LR search, small budgets (CI smoke run)")
    p.add_argument("--out", default=None,
                   help="JSON path; the PNG and table go beside it (default benchmarks/results/sample_efficiency.json, "
                        "plateau: sample_efficiency_plateau.json)")
    p.add_argument("--replot", action="store_true", help="redraw the PNG and reprint the table from --out's JSON")
    a = p.parse_args(argv)
    if a.regime == "plateau":
        return plateau_args(p, a)
    given = [f for f in ("max_k", "sft_budget", "sft_evals_per_nk", "opd_every", "eval_n", "arms")
             if getattr(a, f) is not None]
    if given or a.trajectory_only:
        p.error(f"--{(given or ['trajectory_only'])[0].replace('_', '-')} is a --regime plateau option")
    a.out = a.out or str(DEFAULT_OUT)
    a.sft_steps = 1500 if a.sft_steps is None else a.sft_steps
    a.opd_steps = 300 if a.opd_steps is None else a.opd_steps
    a.evals = 6 if a.evals is None else a.evals
    if a.quick:
        a.seeds, a.sft_steps, a.opd_steps, a.evals = a.seeds[:1], 200, 20, 2
    return a


# ---------------------------------------------------------------- one evaluation point

def _eval_point(student, teacher, tok, ev, cfg, step: int, cost: dict) -> dict:
    from opd.evaluation import evaluate

    r = evaluate(student, teacher, tok, ev["prompt"], ev["answer"], cfg.opd.max_tokens, EVAL_SEED,
                 kl_samples=cfg.eval.kl_samples_per_prompt)
    return {"step": step, "accuracy": r.accuracy, "sampled_accuracy": r.sampled_accuracy, "reverse_kl": r.reverse_kl,
            **cost}


def _cum(cost: dict, phase: dict) -> dict:
    s = cost["student_flops"] + phase["student_train_flops"] + phase["sample_flops"]
    t = cost["teacher_flops"] + phase["teacher_flops"]
    return {"student_flops": s, "teacher_flops": t, "total_flops": s + t, "wall_s": cost["wall_s"] + phase["wall_s"]}


STEEP_ZERO = {"student_flops": 0.0, "teacher_flops": 0.0, "total_flops": 0.0, "wall_s": 0.0}


# ---------------------------------------------------------------- branch A: more SFT on fresh teacher data

def run_sft_branch(cfg, teacher, warm, ev, seed: int, lr: float, steps: int, every: int, start: dict,
                   log=print) -> list[dict]:
    from opd.config import TrainSpec
    from opd.data import task
    from opd.generation import generate
    from opd.ledger import PhaseCost
    from opd.models import load_model, load_tokenizer, num_params
    from opd.trainer import StudentTrainer
    from opd.checkpoints import load_optimizer
    from opd.sft import sft_train

    tok = load_tokenizer(teacher.path)
    t_model, student = load_model(teacher.path), load_model(warm.path)
    trainer = StudentTrainer(student, lr)
    load_optimizer(student, trainer.torch_optimizer, Path(warm.path) / "optimizer.pt")  # SFT simply goes on
    spec = TrainSpec(steps=steps, batch_size=cfg.sft.train.batch_size, lr=lr, warmup_steps=0)
    syn, held_out = cfg.data.synthetic, set(ev["prompt"])
    curve, cost = [start], dict(STEEP_ZERO)
    for i in range(steps // every):
        phase = PhaseCost(f"sft_more_{i}")
        t0 = time.time()
        probs = task.generate(every * spec.batch_size, syn.num_terms, syn.max_digits,
                              seed=10_000_000 + seed * 10_000 + i, exclude=held_out, prefix="sft-more")
        prompts = [tok(e.prompt).input_ids for e in probs]
        comps = generate(t_model, prompts, tok.eos_token_id, tok.pad_token_id, cfg.opd.max_tokens,
                         temperature=cfg.sft.teacher_temperature, seed=seed * 1000 + i)
        tokens = sum(len(p) + len(c) for p, c in zip(prompts, comps))
        phase.teacher(num_params(t_model), tokens)
        sft_train(trainer, list(zip(prompts, comps)), spec, tok.pad_token_id, seed, steps=every,
                  start_step=i * every, one_pass=True)
        phase.train(num_params(student), tokens)
        phase.wall_s = time.time() - t0
        cost = _cum(cost, phase.as_dict())
        curve.append(_eval_point(student, t_model, tok, ev, cfg, (i + 1) * every, cost))
        log(f"  sft seed {seed} lr {lr:g} step {(i + 1) * every}: acc {curve[-1]['accuracy']:.3f} "
            f"kl {curve[-1]['reverse_kl']:.4f}")
    return curve


# ---------------------------------------------------------------- branch B: OPD rounds (the product's code)

def run_opd_branch(cfg, data, teacher, warm, ev, seed: int, lr: float, steps: int, every: int, start: dict,
                   work: Path, engines, log=print) -> list[dict]:
    from opd.models import load_model, load_tokenizer
    from opd.records import RunLayout
    from opd.rounds import opd_round

    c = cfg.model_copy(update={"seed": seed, "opd": cfg.opd.model_copy(update={"lr": lr, "steps_per_round": every})})
    tok = load_tokenizer(teacher.path)
    t_model = load_model(teacher.path)
    student, curve, cost = warm, [start], dict(STEEP_ZERO)
    for k in range(1, steps // every + 1):
        res = opd_round(c, k, data, teacher, student, RunLayout(work), engines, log=lambda *_: None)
        student = res.student
        cost = _cum(cost, res.cost)
        curve.append(_eval_point(load_model(student.path), t_model, tok, ev, cfg, k * every, cost))
        log(f"  opd seed {seed} lr {lr:g} step {k * every}: acc {curve[-1]['accuracy']:.3f} "
            f"kl {curve[-1]['reverse_kl']:.4f} (ratio_max {res.metrics['ratio_max']:.2f})")
    return curve


# ---------------------------------------------------------------- the comparison

def compare(curves: dict, seeds: list[int], teacher_acc: float, fixed_target: float | None) -> dict:
    n = min(len(curves["sft"][s]) for s in seeds)
    sft_mean = [statistics.fmean(curves["sft"][s][i]["accuracy"] for s in seeds) for i in range(n)]
    best_sft = max(sft_mean[1:] or sft_mean)
    target = fixed_target if fixed_target is not None else min(teacher_acc - 0.05, best_sft)
    per_seed, lower, upper = {}, False, False
    for s in seeds:
        a, a_ok = first_reach(curves["sft"][s], target)
        b, b_ok = first_reach(curves["opd"][s], target)
        row = {"sft_reached": a_ok, "opd_reached": b_ok}
        for key, name in (("student_flops", "student"), ("total_flops", "total"), ("wall_s", "wall")):
            row[f"sft_{name}"], row[f"opd_{name}"] = a[key], b[key]
            # OPD reaching the target at the branch point itself (0 compute) would make any ratio infinite
            row[f"ratio_{name}"] = (a[key] / b[key]) if (b_ok and b[key] > 0) else None
        lower |= not a_ok
        upper |= not b_ok
        per_seed[str(s)] = row
    out = {"target_accuracy": target, "best_sft_mean_accuracy": best_sft, "per_seed": per_seed,
           "ratio_is_lower_bound": lower, "ratio_is_upper_bound": upper,
           # where each branch ends, over seeds: did the branch improve the student at all, and on which metric
           "end": {b: {k: spread([curves[b][s][-1].get(k) for s in seeds])
                       for k in ("accuracy", "sampled_accuracy", "reverse_kl")} for b in ("sft", "opd")}}
    for name in ("student", "total", "wall"):
        sp = spread([per_seed[str(s)][f"ratio_{name}"] for s in seeds])
        out[f"ratio_{name}"] = sp
    out["ratio_sft_over_opd"] = out["ratio_student"]["mean"]
    out["ratio_sft_over_opd_total"] = out["ratio_total"]["mean"]
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = (("student_flops", "cumulative student FLOPs"), ("total_flops", "student + teacher FLOPs"),
          ("wall_s", "wall seconds (excl. eval)"))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for col, (xkey, xlabel) in enumerate(xs):
        for row, (ykey, ylabel) in enumerate((("accuracy", "held-out accuracy"), ("reverse_kl", "reverse KL / token"))):
            ax = axes[row][col]
            for branch, color in (("sft", "tab:blue"), ("opd", "tab:red")):
                for i, (seed, curve) in enumerate(res["curves"][branch].items()):
                    ax.plot([p[xkey] for p in curve], [p[ykey] for p in curve], "o-", color=color, alpha=0.7,
                            ms=3, lw=1, label=f"{branch.upper()}" if i == 0 else None)
                    if ykey == "accuracy" and curve[0].get("sampled_accuracy") is not None:
                        ax.plot([p[xkey] for p in curve], [p.get("sampled_accuracy") for p in curve], "x--",
                                color=color, alpha=0.5, ms=3, lw=1,
                                label=f"{branch.upper()} sampled (T=1)" if i == 0 else None)
            if ykey == "accuracy":
                ax.axhline(res["target_accuracy"], color="gray", ls="--", lw=1, label="target")
                ax.axhline(res["teacher"]["accuracy"], color="black", ls=":", lw=1, label="teacher")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel + (" (o greedy, x sampled)" if ykey == "accuracy" else ""))
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend()
    r = res["ratio_student"]
    fig.suptitle(f"SFT vs OPD from one SFT checkpoint ({len(res['seeds'])} seeds); "
                 f"SFT/OPD student FLOPs to target: {_fmt_ratio(r, res)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_ratio(sp: dict, res: dict) -> str:
    if sp["mean"] is None:
        return "n/a (OPD did not reach the target)"
    prefix = ">= " if res["ratio_is_lower_bound"] else ("<= " if res["ratio_is_upper_bound"] else "")
    return f"{prefix}{sp['mean']:.1f}x (seeds {sp['min']:.1f}-{sp['max']:.1f}, std {sp['std']:.1f})"


def print_table(res: dict, path: Path | None = None) -> None:
    """Print the table and summary lines; with ``path``, also save them there as plain text."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Compute to {res['target_accuracy']:.3f} held-out accuracy, from the SFT-warmup checkpoint "
                    f"(acc {res['warmup']['accuracy']:.3f}; teacher {res['teacher']['accuracy']:.3f})")
    for c in ("seed", "SFT student FLOPs", "OPD student FLOPs", "ratio", "SFT+teacher FLOPs", "OPD+teacher FLOPs",
              "ratio", "SFT wall s", "OPD wall s", "ratio"):
        t.add_column(c, justify="right")
    f = lambda x, ok: ("%.3g" % x) + ("" if ok else "+")  # noqa: E731
    g = lambda x: "-" if x is None else f"{x:.1f}x"  # noqa: E731
    for s, row in res["per_seed"].items():
        t.add_row(s, f(row["sft_student"], row["sft_reached"]), f(row["opd_student"], row["opd_reached"]),
                  g(row["ratio_student"]), f(row["sft_total"], row["sft_reached"]),
                  f(row["opd_total"], row["opd_reached"]), g(row["ratio_total"]),
                  f(row["sft_wall"], row["sft_reached"]), f(row["opd_wall"], row["opd_reached"]), g(row["ratio_wall"]))
    con = Console(width=200, record=True, highlight=False)
    con.print(t)
    print_ = con.print
    print_(f"ratio SFT/OPD, student FLOPs: {_fmt_ratio(res['ratio_student'], res)}")
    print_(f"ratio SFT/OPD, student + teacher FLOPs: {_fmt_ratio(res['ratio_total'], res)}")
    print_(f"ratio SFT/OPD, wall seconds: {_fmt_ratio(res['ratio_wall'], res)}")
    print_("'+' = the branch never reached the target: its whole budget is shown (the ratio is then a bound)")
    w = res["warmup"]
    for b, e in (res.get("end") or {}).items():
        h = lambda k: "-" if e[k]["mean"] is None else f"{e[k]['mean']:.3f} ± {e[k]['std']:.3f}"  # noqa: E731
        print_(f"{b.upper()} end of budget (mean ± std over seeds): greedy accuracy {h('accuracy')} "
               f"(warmup {w['accuracy']:.3f}), sampled accuracy {h('sampled_accuracy')} "
               f"(warmup {'-' if w.get('sampled_accuracy') is None else format(w['sampled_accuracy'], '.3f')}), "
               f"reverse KL {h('reverse_kl')} "
               f"(warmup {w['reverse_kl']:.3f})")
    if path is not None:
        path.write_text(con.export_text())


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    a = parse_args(argv)
    if a.regime == "plateau":
        return plateau_main(a, argv)
    if a.replot:
        return replot(Path(a.out), plot, print_table)
    from opd.config import load_config

    cfg = load_config(a.config, a.overrides)
    begin(cfg, "the SFT branch draws fresh problems from the generator")
    with library_output(cfg, "sample_efficiency"):
        return _steep(a, argv, cfg)


def _steep(a: argparse.Namespace, argv, cfg) -> int:
    """The steep regime: both branches from the SFT-warmup checkpoint, the LR search, the report."""
    import torch

    from opd.engines import Engines
    from opd.evaluation import accuracy
    from opd.models import load_model, load_tokenizer

    t_start = time.time()
    bench, data, teacher, warm = warm_start(cfg)
    d = data.load()
    n = min(cfg.eval.max_examples, len(d["eval"]))
    ev = {"prompt": d["eval"]["prompt"][:n], "answer": d["eval"]["answer"][:n]}
    tok = load_tokenizer(teacher.path)
    t_model = load_model(teacher.path)
    teacher_acc = accuracy(t_model, tok, ev["prompt"], ev["answer"], cfg.opd.max_tokens)
    start = _eval_point(load_model(warm.path), t_model, tok, ev, cfg, 0, dict(STEEP_ZERO))
    print(f"teacher {teacher.params} params, acc {teacher_acc:.3f}; warmup student {warm.params} params, "
          f"acc {start['accuracy']:.3f}, reverse KL {start['reverse_kl']:.4f}", flush=True)

    lr_sft, lr_opd = cfg.sft.train.lr, cfg.opd.lr
    sft_grid = a.sft_lrs or ([lr_sft * 0.3] if a.quick else [round(lr_sft * f, 12) for f in (0.3, 1, 3)])
    opd_grid = a.opd_lrs or ([lr_opd] if a.quick else [round(lr_opd * f, 12) for f in (1, 10 / 3, 10)])
    if len(sft_grid) != len(opd_grid):
        raise SystemExit(f"the LR search budget must match: {len(sft_grid)} SFT vs {len(opd_grid)} OPD grid points")
    sft_every, opd_every = max(1, a.sft_steps // a.evals), max(1, a.opd_steps // a.evals)
    runs = bench / f"runs-{os.getpid()}"

    def run(branch: str, seed: int, lr: float) -> list[dict]:
        if branch == "sft":
            return run_sft_branch(cfg, teacher, warm, ev, seed, lr, a.sft_steps, sft_every, start)
        return run_opd_branch(cfg, data, teacher, warm, ev, seed, lr, a.opd_steps, opd_every, start,
                              runs / f"opd-{seed}-{lr:g}", engines)

    curves: dict[str, dict[str, list]] = {"sft": {}, "opd": {}}
    search: dict[str, dict] = {}
    engines = Engines(cfg)  # one sampler engine for every OPD run, closed below
    try:
        for branch, grid in (("sft", sft_grid), ("opd", opd_grid)):
            s0, tried = a.seeds[0], {}
            for lr in grid:
                tried[lr] = run(branch, s0, lr)
            score = {lr: statistics.fmean(p["accuracy"] for p in c[1:]) for lr, c in tried.items()}
            best = max(score, key=score.get)
            search[branch] = {"grid": grid, "mean_accuracy_on_seed": {f"{k:g}": v for k, v in score.items()},
                              "chosen": best, "search_seed": s0}
            curves[branch][str(s0)] = tried[best]
            for s in a.seeds[1:]:
                curves[branch][str(s)] = run(branch, s, best)
    finally:
        engines.close()
        shutil.rmtree(runs, ignore_errors=True)

    cmp = compare(curves, [str(s) for s in a.seeds], teacher_acc, a.target)
    res = {
        "command": "python benchmarks/sample_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": os.path.relpath(a.config, REPO) if os.path.isabs(a.config) else a.config,
        "overrides": a.overrides, "quick": a.quick, "regime": "steep",
        "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
        "seeds": a.seeds,
        "teacher": {"params": teacher.params, "accuracy": teacher_acc},
        "student": {"params": warm.params},
        "warmup": {"accuracy": start["accuracy"], "sampled_accuracy": start["sampled_accuracy"],
                   "reverse_kl": start["reverse_kl"], "cost": warm.cost,
                   "sft_steps": cfg.sft.train.steps},
        "eval": {"examples": n, "kl_samples_per_prompt": cfg.eval.kl_samples_per_prompt, "decoding": "greedy",
                 "sampled_accuracy": "share of the temperature-1 KL samples the verifier accepts (not the target)"},
        "budgets": {"sft_steps": a.sft_steps, "opd_steps": a.opd_steps, "evals": a.evals,
                    "sft_batch": cfg.sft.train.batch_size, "sft_teacher_temperature": cfg.sft.teacher_temperature,
                    "opd_prompts_per_step": cfg.opd.prompts_per_step,
                    "opd_samples_per_prompt": cfg.opd.samples_per_prompt, "opd_loss": cfg.opd.loss.kind},
        "lr_search": {**search, "rule": "same number of LRs per branch; each LR runs the full budget on the first "
                                        "seed; the LR with the highest mean accuracy over its eval points wins"},
        "target_rule": "min(teacher accuracy - 0.05, best mean-over-seeds SFT accuracy)" if a.target is None
        else "fixed by --target",
        "flops": "student = 6*N_student*trained tokens + 2*N_student*sampled tokens; teacher = 2*N_teacher*"
                 "(generated or graded tokens); counted from the branch point; eval not counted",
        **cmp,
        "curves": curves,
        "wall_s_total": time.time() - t_start,
    }
    write_outputs(res, Path(a.out), plot, print_table)
    return 0


if __name__ == "__main__":  # vLLM spawns workers: the entry must be import-safe
    sys.exit(main())
