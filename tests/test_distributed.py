"""Data-parallel SFT (opd.distributed): 2 CPU processes over gloo follow the 1-process loss trajectory.

Both runs are real subprocesses (``python -m opd.distributed`` and ``torchrun --nproc_per_node=2``)
on the same global batches and the same model init. No mocks.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from opd.batching import pack
from opd.distributed import make_global_batches, shard_rows
from opd.models import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODEL_ARGS = ["--num-layers", "1", "--hidden-size", "64", "--num-heads", "2", "--intermediate-size", "128"]
STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(launcher: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = launcher + ["-m", "opd.distributed", "--steps", str(STEPS), "--batch-size", "8", "--lr", "3e-3",
                      "--seed", "0", *MODEL_ARGS, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_two_gloo_processes_match_one_process(tmp_path):
    one = _run([sys.executable], tmp_path / "one.json")
    port = _free_port()
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                f"--master_addr=127.0.0.1", f"--master_port={port}"], tmp_path / "two.json")
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert two["backend"] == "gloo", two
    a, b = one["losses"], two["losses"]
    assert len(a) == len(b) == STEPS
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"1 proc: {a}\n2 proc: {b}\nmax |diff| = {diff:.3g}")
    assert diff < 1e-4, (a, b)
    assert a[0] - a[-1] > 0.05, f"loss did not move: {a}"  # training happens, so the comparison can fail


def test_shards_have_unequal_token_counts():
    """The batches the trajectory test uses give the ranks different token counts, so a per-rank mean
    (instead of the all-reduced token-weighted mean) would change the loss: the test above can fail."""
    tok = build_char_tokenizer()
    batches = make_global_batches(tok, STEPS, 8, seed=0)
    b = pack([p for p, _ in batches[0]], [c for _, c in batches[0]], tok.pad_token_id)
    s0, s1 = shard_rows(b, 0, 2), shard_rows(b, 1, 2)
    assert s0.input_ids.shape[0] + s1.input_ids.shape[0] == 8
    assert float(s0.loss_mask.sum()) != float(s1.loss_mask.sum())
    with pytest.raises(ValueError, match="cannot be split"):
        shard_rows(b, 0, 9)
