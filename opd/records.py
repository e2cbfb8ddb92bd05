"""Typed run records: the run directory's layout, completion markers, and what a stage hands the next.

Every stage writes into a temp dir and renames it into place with ``done.json`` written last
(``publish_dir``), so a directory holding ``done.json`` is complete and a retried stage never sees half
a checkpoint. The report, the benchmarks and the tests read a run through ``RunLayout`` and
``RoundMetrics``, never through spelled-out paths or keys.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from opd.paths import check_name, within

DONE = "done.json"


@dataclass(frozen=True)
class RunLayout:
    """``<home>/runs/<run_key>/``: where each stage of one run keeps its output."""

    root: Path

    @classmethod
    def of(cls, home: str | Path, run_key: str) -> "RunLayout":
        """The key is checked before any path is built from it."""
        return cls(within(Path(home) / "runs", check_name(run_key, "--run-key"), field="--run-key"))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    def round(self, k: int) -> Path:
        return self.root / f"round_{k:03d}"

    def round_sync(self, k: int) -> Path:
        """The weights the sampler reloads after each step of round ``k`` (exists only mid-round)."""
        return self.root / f"round_{k:03d}.sync"

    def round_group(self, k: int) -> Path:
        """The torchrun learner group's exchange dir of round ``k`` (exists only mid-round)."""
        return self.root / f"round_{k:03d}.group"

    def rounds(self) -> list[Path]:
        """Round directories that hold a completed round, in order."""
        done = [p for p in self.root.glob("round_*") if p.name[6:].isdigit() and (p / DONE).is_file()]
        return sorted(done, key=lambda p: int(p.name[6:]))

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def registered(self) -> Path:
        return self.root / "registered.json"

    @property
    def publish(self) -> Path:
        return self.root / "publish"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def incumbent(self) -> Path:
        return self.root / "incumbent"

    @property
    def candidate(self) -> Path:
        return self.root / "candidate"


@dataclass(frozen=True)
class ModelRef:
    """A model a stage produced or was given: where its weights are, its size, what it measured and cost."""

    path: str
    params: int
    metrics: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    data_cost: dict = field(default_factory=dict)  # SFT warmup only: the teacher writing its training data


@dataclass(frozen=True)
class RoundMetrics:
    """One OPD round, averaged over its steps (``*_max``: the max) plus its timings; the report's columns."""

    round: int
    reverse_kl: float  # per token on the on-policy samples, measured before each step's update
    loss: float
    ratio_max: float
    sampler_trainer_absdiff_max: float
    grad_norm: float
    student_entropy: float
    mean_completion_tokens: float
    eos_fraction: float
    eval_slice_accuracy: float | None
    sample_tokens_per_s: float
    score_tokens_per_s: float
    update_tokens_per_s: float
    update_processes: int
    sample_s: float
    score_s: float
    update_s: float
    sync_s: float
    engine_start_s: float = 0.0  # the sampler engine starts once per run: not part of sync_s
    student_topk_mass: float | None = None  # reverse_kl_topk: the student's mass on the teacher's top-k
    reward_mean: float | None = None  # opd.reward: share of the round's rollouts the verifier accepted

    TIMINGS = ("sample_s", "score_s", "update_s", "sync_s")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RoundMetrics":
        """Read a stored round (unknown keys of other versions ignored, missing optional ones defaulted)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class RoundResult:
    round: int
    student: ModelRef
    metrics: dict  # RoundMetrics.as_dict()
    cost: dict


# ---------------------------------------------------------------- completion markers

def fresh(path: Path) -> Path:
    """An empty ``<path>.tmp`` to build a stage's output in."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def read_done(path: Path) -> dict | None:
    """The completion marker of a stage's directory, or None while it is not complete."""
    f = Path(path) / DONE
    return json.loads(f.read_text()) if f.is_file() else None


def publish_dir(tmp: Path, final: Path, meta: dict) -> None:
    """Write DONE last and rename into place: a directory with DONE is complete.

    Weights with NaN/inf are never published: the temp dir is removed and the stage fails for good."""
    from opd.checkpoints import NonFiniteWeights, check_finite_weights

    try:
        check_finite_weights(tmp, final.name)
    except NonFiniteWeights:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / DONE).write_text(json.dumps(meta, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
