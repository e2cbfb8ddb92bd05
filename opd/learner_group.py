"""The learner on several processes (torchrun; DDP, or FSDP2 for students too big for one GPU).

The round's driver keeps the sampler and the teacher; a group launched once per round keeps the
student and its optimizer in memory, so a step costs one message each way, not a model load. They
talk through files in the round's work dir (one filesystem: a node, or a pod's volume): the driver
writes ``step_<i>.pt`` (the train batch and the learning rate); every rank runs ``learn_step`` on its
shard (global token weighting makes the step equal to the one-process step); rank 0 writes the new
weights to the sync dir the sampler reloads from, then ``step_<i>.json`` (metrics). ``stop`` makes
the group write the final weights and optimizer state and exit. Ranks exit on their own if the
driver dies. The loss spec travels as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from opd.errors import PermanentError
from opd.models import load_model, pick_device, resolve_dtype
from opd.rollouts import TrainBatch
from opd.sampling.base import Weights

POLL_S = 0.02


@dataclass(frozen=True)
class GroupSpec:
    """Everything a rank needs; written once as spec.json."""

    num_processes: int
    strategy: str  # "ddp" | "fsdp"
    device: str  # "auto" | "cpu" | "cuda"
    student_dir: str
    optimizer_path: str | None  # previous round's state; None = fresh Adam
    teacher_dir: str | None  # set when the loss reads the teacher's logits: every rank runs the teacher
    sync_dir: str
    final_dir: str
    lr: float
    pad_id: int
    micro_batch: int
    loss: str  # the loss spec as JSON (opd.config.LossSpec)
    driver_pid: int
    devices: list[int] | None = None  # CUDA_VISIBLE_DEVICES for the ranks
    lora: dict | None = None  # opd.config.LoraSpec fields: train adapters, sync adapters, merge at the end
    mixed_precision: str = "no"
    gradient_checkpointing: str = "none"  # opd.memory policy
    lm_head: str = "full"  # "full" | "chunked"
    student_dtype: str = "auto"  # student.dtype: the round's end model for the eval slice (training stays fp32)
    teacher_dtype: str = "float32"  # the logit loss's teacher, resolved by the driver as its engines do


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- driver side

class GroupLearner:
    """Driver-side handle (a ``Learner``): start the ranks, feed them steps, collect the final checkpoint."""

    def __init__(self, spec: GroupSpec, workdir: Path):
        self.spec, self.workdir, self.step_i = spec, Path(workdir), 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        for f in self.workdir.iterdir():  # a retried round starts its exchange afresh
            if f.is_file():
                f.unlink()
        (self.workdir / "spec.json").write_text(json.dumps(asdict(spec)))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        if spec.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, spec.devices))
        if pick_device(spec.device).type != "cuda":
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // spec.num_processes))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.num_processes}",
               "-m", "opd.learner_group", "--workdir", str(self.workdir)]
        self.log = open(self.workdir / "group.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def _wait(self, path: Path) -> dict:
        while not path.is_file():
            if self.proc.poll() is not None:
                errors = sorted(self.workdir.glob("error_rank*.txt"))
                cause = errors[0].read_text() if errors else "(no rank recorded an error)"
                if any(self.workdir.glob("permanent_rank*")):  # bad input or a non-finite step: no retry
                    raise PermanentError(f"{cause} (on the {self.spec.num_processes}-process update group)")
                raise RuntimeError(f"the {self.spec.num_processes}-process update group exited with code "
                                   f"{self.proc.returncode}: {cause}\nits log ({self.workdir / 'group.log'}) "
                                   f"ends:\n{self.log_tail(2000)}")
            time.sleep(POLL_S)
        return json.loads(path.read_text())

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        return (self.workdir / "group.log").read_bytes()[-n:].decode(errors="replace")

    def update(self, batch: TrainBatch, lr: float) -> dict:
        """One optimizer step on the group; returns the step's (all-reduced) metrics."""
        i, self.step_i = self.step_i, self.step_i + 1
        _write_atomic(self.workdir / f"step_{i}.pt", lambda p: torch.save({"lr": lr, **batch.to_message()}, p))
        return self._wait(self.workdir / f"step_{i}.json")

    def weights(self) -> Weights:
        """Rank 0 wrote the step's weights to the sync dir before answering the step."""
        return Weights(self.spec.sync_dir, adapter=self.spec.lora is not None)

    def finish(self, out: Path):
        """Ask for the final weights + optimizer state, wait for the group to exit, and copy them to ``out``."""
        import shutil

        (self.workdir / "stop").write_text("")
        self._wait(self.workdir / "final.json")
        self.proc.wait(timeout=600)
        self.close()
        shutil.copytree(self.spec.final_dir, out, dirs_exist_ok=True)
        device = pick_device(self.spec.device)
        return load_model(out, device, dtype=resolve_dtype(self.spec.student_dtype, out, device))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------- rank side

def _wait_for(workdir: Path, name: str, driver_pid: int) -> bool:
    """True when ``name`` appears, False on ``stop``; exits if the driver is gone."""
    while True:
        if (workdir / name).is_file():
            return True
        if (workdir / "stop").is_file():
            return False
        try:
            os.kill(driver_pid, 0)
        except ProcessLookupError:
            sys.exit("update group: the driver process is gone; exiting")
        time.sleep(POLL_S)


def serve(workdir: Path) -> None:
    """Run one rank; its exception is also written for the driver, which quotes it."""
    try:
        _serve(workdir)
    except Exception as e:
        rank = os.environ.get("RANK", "0")
        (workdir / f"error_rank{rank}.txt").write_text(f"rank {rank}: {type(e).__name__}: {e}")
        if isinstance(e, PermanentError):
            (workdir / f"permanent_rank{rank}").write_text("")
        raise


def _serve(workdir: Path) -> None:
    import torch.distributed as dist

    from opd.checkpoints import load_optimizer, write_checkpoint, write_sync
    from opd.config import LOSS_SPEC
    from opd.learner import learn_step
    from opd.models import load_tokenizer
    from opd.trainer import StudentTrainer

    spec = GroupSpec(**json.loads((workdir / "spec.json").read_text()))
    loss = LOSS_SPEC.validate_json(spec.loss)
    model = load_model(spec.student_dir)
    if spec.lora is not None:
        from opd.config import LoraSpec
        from opd.lora import apply_lora

        model = apply_lora(model, LoraSpec(**spec.lora))
    if spec.gradient_checkpointing != "none":
        from opd.memory import apply_checkpointing

        apply_checkpointing(model, spec.gradient_checkpointing)
    # accelerate starts the process group (NCCL on GPUs, gloo on CPU) and picks this rank's device
    trainer = StudentTrainer(model, spec.lr, mixed_precision=spec.mixed_precision, strategy=spec.strategy,
                             device=spec.device, stage="OPD update", lr_field="opd.lr")
    rank, world = trainer.rank, trainer.world
    tok = load_tokenizer(spec.student_dir)
    if spec.optimizer_path:
        load_optimizer(trainer.model, trainer.torch_optimizer, spec.optimizer_path)
    teacher = load_model(spec.teacher_dir, trainer.device, dtype=spec.teacher_dtype) if spec.teacher_dir else None
    i = 0
    while _wait_for(workdir, f"step_{i}.pt", spec.driver_pid):
        msg = torch.load(workdir / f"step_{i}.pt", weights_only=True)
        metrics = learn_step(trainer, TrainBatch.from_message(msg), loss, spec.pad_id, spec.micro_batch, msg["lr"],
                             teacher, spec.lm_head)
        write_sync(trainer, tok, spec.sync_dir, lora=spec.lora is not None)
        if rank == 0:
            metrics["num_processes"] = world
            _write_atomic(workdir / f"step_{i}.json", lambda p: p.write_text(json.dumps(metrics)))
        i += 1
    write_checkpoint(trainer, tok, spec.final_dir, lora=spec.lora is not None)
    dist.barrier()
    if rank == 0:
        _write_atomic(workdir / "final.json", lambda p: p.write_text(json.dumps({"steps": i})))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="one rank of the OPD learner group (launched by torchrun)")
    ap.add_argument("--workdir", type=Path, required=True)
    serve(ap.parse_args(argv).workdir)


if __name__ == "__main__":
    main()
