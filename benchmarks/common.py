"""What the benchmarks share: the demo's SFT-warmup checkpoint they branch from, one held-out eval set, the
rollout settings and arm configs of the pipeline's own OPD round, the per-phase FLOP sums, resumable runs of
rounds, and the JSON + PNG + table writers. Each benchmark script keeps only its protocol."""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import statistics
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from opd.data.dataset import DataRef
    from opd.records import ModelRef

EVAL_SEED = 1234  # one sampling seed for every reverse-KL point, so curves differ only by the model
# identical rollouts per step in every arm; all but the budget are the demo's values, set explicitly anyway
ROLLOUT = {"prompts_per_step": 64, "samples_per_prompt": 4, "temperature": 1.0, "top_p": 1.0, "max_tokens": 16,
           "warmup_steps": 20, "micro_batch": 256}


def begin(cfg, why_synthetic: str) -> None:
    """What every benchmark's main does before it starts engines: a SIGTERM unwinds through the main's
    ``finally`` (so a killed run's vLLM engine does not outlive it), the data are the task generator's
    (``why_synthetic`` says why this benchmark needs that), and torch's threads are set."""
    import signal
    import sys

    from opd.models import set_threads

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if cfg.data.source != "synthetic":
        raise SystemExit(f"data.source must be 'synthetic': {why_synthetic}")
    set_threads()


@contextmanager
def library_output(cfg, name: str) -> Iterator[Path]:
    """The benchmark's own lines (``print``, its tables) stay on the terminal; everything else goes to
    ``<home>/bench/<name>/logs/third_party.log`` until the block ends: vLLM's engine and worker processes,
    checkpoint-loading progress bars, library loggers and warnings (``opd_ops.logs.run_logs``, as the flows
    do). A plateau OPD run printed ~12,000 such lines around its ~60 results."""
    import sys

    from opd_ops.logs import run_logs, third_party_log

    run_dir = Path(cfg.home) / "bench" / name
    # vLLM's own logging config would give its logger a handler on sys.stdout, i.e. the terminal's copy below:
    # unconfigured, its records reach the root logger, which run_logs points at the file
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    sys.stdout.flush()
    try:  # print() keeps a private copy of the terminal's descriptor; fd 1 itself goes to the file
        terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):  # stdout not backed by a descriptor: print() never reaches fd 1
        terminal = None
    saved = sys.stdout
    sys.stdout = terminal or saved
    print(f"library output (vLLM, progress bars, warnings): {third_party_log(run_dir)}", flush=True)
    try:
        with run_logs(run_dir) as path:
            yield path
    finally:
        sys.stdout = saved
        if terminal is not None:
            terminal.close()


# ---------------------------------------------------------------- the branch point and the eval set

def warm_start(cfg, log=print) -> tuple[Path, DataRef, ModelRef, ModelRef]:
    """The bench dir, data, teacher and SFT-warmup checkpoint of ``cfg``, each cached under
    ``<home>/bench/sample_efficiency/<teacher key>/`` so every benchmark starting from the same
    checkpoint (benchmarks/opd_vs_rl.py too) trains it once."""
    from opd.data import dataset as ds
    from opd.data.prepare import prepare_data, validate_data
    from opd.warmup import bootstrap_teacher, sft_warmup, teacher_cache_key

    synthetic_fp = ds.fingerprint(ds.synthetic(cfg.data, cfg.seed))  # what prepare_data below will build
    bench = Path(cfg.home) / "bench" / "sample_efficiency" / teacher_cache_key(cfg, synthetic_fp)
    bench.mkdir(parents=True, exist_ok=True)
    # benchmark processes started together (e.g. one per arm) would rebuild the data in the same temp dir at once
    # and tear it from under each other: the first builds the shared start, the others wait and reuse it
    with open(bench / ".warm_start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = prepare_data(cfg, bench / "data")
        report, data = validate_data(cfg, data)
        if data is None:
            raise SystemExit(f"dataset failed validation: {report}")
        teacher = bootstrap_teacher(cfg, data, log=log)
        # the warmup checkpoint is reused across invocations with the same teacher, student and SFT recipe
        warm_key = json.dumps([cfg.seed, cfg.sft.model_dump(mode="json"), cfg.student.model_dump(mode="json")])
        warm = sft_warmup(cfg, data, teacher, bench / ("warm-" + hashlib.sha256(warm_key.encode()).hexdigest()[:12]),
                          log=log)
    return bench, data, teacher, warm


def eval_set(cfg, data, n: int) -> dict[str, list]:
    """``n`` held-out problems: the eval split ``data.synthetic.n_eval=n`` builds. The train split (and so
    the cached teacher and warmup) does not depend on n_eval, and the generator draws in order, so the
    run's own eval split is a prefix of this one (checked)."""
    from opd.config import SyntheticTask
    from opd.data import dataset as ds

    syn = SyntheticTask.model_validate({**cfg.data.synthetic.model_dump(), "n_eval": n})
    ev = ds.synthetic(cfg.data.model_copy(update={"synthetic": syn}), cfg.seed)["eval"]
    d = data.load()
    m = min(n, len(d["eval"]))
    if ev["prompt"][:m] != d["eval"]["prompt"][:m]:
        raise SystemExit("the extended eval split does not start with the run's eval split: eval sets differ")
    if set(ev["prompt"]) & set(d["train"]["prompt"]):
        raise SystemExit("eval problems overlap the train split")
    return {"prompt": ev["prompt"], "answer": ev["answer"]}


# ---------------------------------------------------------------- arms: the pipeline's round, by config

@dataclass(frozen=True)
class Arm:
    """One arm: the loss/reward overrides of the round, and whose checkpoint grades it."""

    kl_coef: float
    reward_weight: float | None
    teacher: str  # "demo" (the shipped teacher) or "rl" (the rl arm's final checkpoint, same seed)


OPD = Arm(1.0, None, "demo")  # reverse KL to the shipped demo teacher, no reward: the report's OPD


def arm_config(cfg, arm: Arm, lr: float, seed: int, steps: int, every: int):
    """The round's config for one run, through the product's validation (e.g. kl_coef 0 needs a reward)."""
    from opd.config import validate_config

    tree = cfg.model_dump(mode="json")
    o = tree["opd"]
    loss = o["loss"] if o["loss"]["kind"] == "reverse_kl_is" else {}
    o.update(lr=lr, steps_per_round=every, rounds=steps // every,
             loss={**loss, "kind": "reverse_kl_is", "kl_coef": arm.kl_coef},
             reward=None if arm.reward_weight is None else {"weight": arm.reward_weight})
    tree["seed"] = seed
    return validate_config(tree)


# ---------------------------------------------------------------- resumable runs of rounds, their cost

ZERO = {"student_train_flops": 0.0, "sample_flops": 0.0, "teacher_flops": 0.0, "student_flops": 0.0,
        "total_flops": 0.0, "wall_s": 0.0}


def add_cost(cum: dict, phase: dict, engine_start_s: float = 0.0) -> dict:
    """Cumulative FLOPs per phase (opd.ledger.PhaseCost of each round) and wall seconds, without eval and
    without the sampler engine's start (paid once, by whichever run comes first)."""
    out = {k: cum[k] + phase[k] for k in ("student_train_flops", "sample_flops", "teacher_flops", "wall_s")}
    out["wall_s"] -= engine_start_s
    out["student_flops"] = out["student_train_flops"] + out["sample_flops"]
    out["total_flops"] = out["student_flops"] + out["teacher_flops"]
    return out


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _by_step(points: dict) -> list[dict]:
    return sorted(points.values(), key=lambda p: p["step"])


def saved_run(run_dir: Path, name: str, log=print) -> dict:
    """A benchmark run's ``curve.json`` so far ({} if none): a complete one is said to be reused, else the run's
    directory is made for it to go on in."""
    path = run_dir / "curve.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("complete"):
        log(f"  {name}: finished by an earlier invocation, reused from {run_dir}")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    return saved


def run_rounds(run_dir: Path, name: str, cfg, data, teacher, student, engines, steps: int, every: int, start: dict,
               point: Callable[[Any, int, dict, dict], dict], line: Callable[[dict], str], log=print,
               stop_on: tuple[type, ...] = (), finish: Callable[[Any], dict] | None = None) -> dict:
    """One benchmark run: ``steps`` steps of the pipeline's own OPD loop (``opd.rounds.opd_round``, one round of
    ``every`` steps per eval point) from ``student``, resumable. ``point(student, step, cost, round_metrics)``
    evaluates (cost: cumulative since ``start``), ``line(point)`` says it. ``curve.json`` is written after each
    point, so a rerun reuses a finished run as is, and within a run a finished round its checkpoint and a saved
    point its evaluation. An error in ``stop_on`` (divergence) ends the run with what it has; ``finish(student)``
    adds keys to a run that went the distance. Returns {"complete", "curve", ...}."""
    from opd.records import RunLayout
    from opd.rounds import opd_round

    saved_path, saved = run_dir / "curve.json", saved_run(run_dir, name, log)
    if saved.get("complete"):
        return saved
    points = {p["step"]: p for p in saved.get("curve", [start])}
    layout, cost, out = RunLayout(run_dir / "work"), dict(ZERO), {"complete": True}
    for k in range(1, steps // every + 1):
        try:
            res = opd_round(cfg, k, data, teacher, student, layout, engines, log=lambda *_: None)
        except stop_on as e:
            log(f"  {name}: stopped in round {k}: {e}")
            out.update(diverged_at=(k - 1) * every, diverged=str(e))
            break
        student, step = res.student, k * every
        cost = add_cost(cost, res.cost, res.metrics.get("engine_start_s") or 0.0)
        if step not in points:
            points[step] = point(student, step, cost, res.metrics)
            write_json(saved_path, {"complete": False, "curve": _by_step(points)})
        log(f"  {name} step {step}: {line(points[step])}")
    else:
        out.update(finish(student) if finish else {})
    shutil.rmtree(layout.root, ignore_errors=True)
    out["curve"] = _by_step(points)
    write_json(saved_path, out)
    return out


def as_model(model):
    """A model, or the checkpoint directory of one (loaded): what the benchmarks' eval points accept."""
    from opd.models import load_model

    return load_model(model) if isinstance(model, (str, Path)) else model


# ---------------------------------------------------------------- resumable SFT runs

class SFTRun:
    """A model trained by ``opd.sft.sft_step`` (fresh AdamW, linear warmup then constant LR) with resumable eval
    points: ``curve.json`` (points, optimizer step, cumulative cost) and ``ckpt-<step>`` (weights and Adam state) of
    the latest point. ``batch(step)`` returns (pairs, tokens the teacher generated for them: counted at
    ``n_teacher``); ``evaluate(model, label, step, cost)`` makes an eval point's fields; ``n_student``: the
    trained model's parameters (counted from it when None)."""

    def __init__(self, tok, run_dir: Path, start, lr: float, warmup: int, batch: Callable[[int], tuple[list, int]],
                 start_point: dict, evaluate: Callable[[Any, int, int, dict], dict], n_student: int | None = None,
                 n_teacher: int = 0):
        from opd.checkpoints import load_optimizer
        from opd.models import num_params
        from opd.records import read_done
        from opd.trainer import StudentTrainer

        self.tok, self.dir, self.lr, self.warmup, self.batch = tok, run_dir, lr, warmup, batch
        self.evaluate, self.n_teacher = evaluate, n_teacher
        run_dir.mkdir(parents=True, exist_ok=True)
        saved_path = run_dir / "curve.json"
        self.saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
        self.complete = bool(self.saved.get("complete"))
        if self.complete:
            return
        ck = run_dir / f"ckpt-{self.saved['optimizer_steps']}" if self.saved else None
        if ck is not None and read_done(ck) is not None:
            self.model, self.step = as_model(ck), self.saved["optimizer_steps"]
            self.curve, self.cost = self.saved["curve"], self.saved["cost"]
        else:
            self.model, self.step, self.curve, self.cost = as_model(start), 0, [start_point], dict(ZERO)
            ck = None
        self.trainer = StudentTrainer(self.model, lr)
        if ck is not None:
            load_optimizer(self.model, self.trainer.torch_optimizer, ck / "optimizer.pt")
        self.n_student = n_student or num_params(self.model)
        self.tokens_trained = self.saved.get("tokens_trained", 0) if ck is not None else 0

    def take_step(self) -> None:
        import time

        from opd.ledger import PhaseCost
        from opd.schedule import lr_at
        from opd.sft import sft_step

        t = time.time()
        pairs, generated = self.batch(self.step)
        tokens = sum(len(p) + len(c) for p, c in pairs)
        sft_step(self.trainer, pairs, self.tok.pad_token_id, lr=lr_at(self.step, self.lr, self.warmup))
        phase = PhaseCost(f"sft_step_{self.step}")
        phase.train(self.n_student, tokens)
        if generated:
            phase.teacher(self.n_teacher, generated)
        phase.wall_s = time.time() - t
        self.cost = add_cost(self.cost, phase.as_dict())
        self.tokens_trained += tokens
        self.step += 1

    def point(self, label: int, **extra) -> dict:
        """Evaluate now, checkpoint, and write the curve (the previous checkpoint is then dropped)."""
        from opd.checkpoints import save_optimizer
        from opd.models import save_model
        from opd.records import fresh, publish_dir

        p = {**self.evaluate(self.model, label, self.step, self.cost), **extra}
        self.curve.append(p)
        ck = self.dir / f"ckpt-{self.step}"
        tmp = fresh(ck)
        save_model(self.model, self.tok, tmp)
        save_optimizer(self.model, self.trainer.torch_optimizer, tmp / "optimizer.pt")
        publish_dir(tmp, ck, {"step": self.step})
        self.write(False)
        for old in self.dir.glob("ckpt-*"):
            if old.name != ck.name and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
        return p

    def write(self, complete: bool, **extra) -> None:
        self.saved = {"complete": complete, "curve": self.curve, "optimizer_steps": self.step, "cost": self.cost,
                      "tokens_trained": self.tokens_trained, **extra}
        write_json(self.dir / "curve.json", self.saved)

    def finish(self, keep_as: str | None = None, **extra) -> dict:
        """Mark complete; ``keep_as``: keep the last checkpoint's weights under that name (e.g. forgetting's M)."""
        last = self.dir / f"ckpt-{self.step}"
        if keep_as:
            kept = self.dir / keep_as
            if kept.exists():
                shutil.rmtree(kept)
            os.replace(last, kept)
            extra["model"] = str(kept)
        self.write(True, **extra)
        for old in self.dir.glob("ckpt-*"):
            shutil.rmtree(old, ignore_errors=True)
        return self.saved


def non_finite() -> tuple[type, ...]:
    """What a diverging run raises (a step refused, or a checkpoint with NaN/inf weights not published)."""
    from opd.checkpoints import NonFiniteWeights
    from opd.trainer import NonFiniteUpdate

    return NonFiniteUpdate, NonFiniteWeights


def run_matched(r: SFTRun, name: str, opd_curve: list[dict], key: str, line: Callable[[dict], str],
                log=print) -> dict:
    """An SFT arm matched to an OPD run: at each of OPD's eval points it trains until its ``key`` FLOPs reach
    the OPD run's there, then evaluates (``flops_budget`` beside the point); a diverging step ends the run."""
    if r.complete:
        log(f"  {name}: finished by an earlier invocation, reused")
        return r.saved
    try:
        for target in opd_curve[1:]:
            if target["step"] <= r.curve[-1]["step"]:
                continue
            while r.cost[key] < target[key]:
                r.take_step()
            p = r.point(target["step"], flops_budget=target[key])
            log(f"  {name} ~opd step {p['step']} ({r.step} SFT steps): {line(p)}")
    except non_finite() as e:
        log(f"  {name}: stopped at SFT step {r.step}: {e}")
        return r.finish(diverged_at=r.step, diverged=str(e))
    return r.finish()


# ---------------------------------------------------------------- results over seeds, written out

def first_reach(curve: list[dict], target: float, key: str = "accuracy") -> tuple[dict, bool]:
    """The first eval point whose ``key`` is at or above target; else the last one (its compute is a lower bound)."""
    for p in curve:
        if p[key] >= target - 1e-12:
            return p, True
    return curve[-1], False


def spread(xs: list[float]) -> dict:
    """Mean, std, min and max over seeds, of the seeds that have a value (a miss is reported beside it)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def mean_or_none(xs: list[float | None]) -> float | None:
    """The mean over seeds, None if any seed has none (a mean over the seeds that got there would hide a miss)."""
    return None if any(x is None or not math.isfinite(x) for x in xs) else statistics.fmean(xs)


def write_outputs(res: dict, out: Path, plot_fn, table_fn) -> None:
    """Every benchmark's results: the PNG (named in the JSON), the JSON, and the text table beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot_fn(res, png)
    res["plot"] = png.name
    out.write_text(json.dumps(res, indent=2))
    table_fn(res, out.with_suffix(".txt"))
    print(f"wrote {out}, {png.name} and {out.with_suffix('.txt').name}")


def replot(out: Path, plot_fn, table_fn) -> int:
    """``--replot``: redraw the PNG and reprint the table from a finished run's JSON."""
    res = json.loads(out.read_text())
    plot_fn(res, out.with_suffix(".png"))
    table_fn(res, out.with_suffix(".txt"))
    return 0
