"""Data-parallel SFT (tests/dp_sft.py, on the one update path): 2 CPU processes over gloo follow the 1-process loss trajectory.

Both runs are real subprocesses (``python tests/dp_sft.py`` and ``torchrun --nproc_per_node=2 tests/dp_sft.py``)
on the same global batches and the same model init. No mocks.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path


from opd.batching import pack
from dp_sft import make_global_batches
from opd.models import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODEL_ARGS = ["--num-layers", "1", "--hidden-size", "64", "--num-heads", "2", "--intermediate-size", "128"]
STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(launcher: list[str], out: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = launcher + [str(ROOT / "tests" / "dp_sft.py"), "--steps", str(STEPS), "--batch-size", "8", "--lr", "3e-3",
                      "--seed", "0", *MODEL_ARGS, "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_two_gloo_processes_match_one_process(tmp_path):
    """The same SFT steps on one process (whole batch) and on two ranks that each accumulate
    gradients over micro-batches of 3 rows (4 rows per rank: micro-batches of 3 and 1)."""
    one = _run([sys.executable], tmp_path / "one.json")
    port = _free_port()
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={port}"], tmp_path / "two.json", "--micro-batch", "3")
    assert one["num_processes"] == 1 and two["num_processes"] == 2 and two["micro_batch"] == 3
    assert two["backend"] == "gloo", two
    a, b = one["losses"], two["losses"]
    assert len(a) == len(b) == STEPS
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"1 proc: {a}\n2 proc: {b}\nmax |diff| = {diff:.3g}")
    assert diff < 1e-4, (a, b)
    assert a[0] - a[-1] > 0.05, f"loss did not move: {a}"  # training happens, so the comparison can fail


def test_shards_have_unequal_token_counts():
    """The batches the trajectory test uses give the ranks different token counts, so a per-rank mean
    (instead of the global token-weighted mean) would change the loss: the test above can fail."""
    tok = build_char_tokenizer()
    batches = make_global_batches(tok, STEPS, 8, seed=0)
    b = pack([p for p, _ in batches[0]], [c for _, c in batches[0]], tok.pad_token_id)
    assert float(b.loss_mask[:4].sum()) != float(b.loss_mask[4:].sum())  # rank 0's rows vs rank 1's


def test_bf16_autocast_follows_the_fp32_trajectory(tmp_path):
    """training.mixed_precision=bf16 runs the forward in bf16 (accelerate autocast; losses upcast to
    fp32): the loss curve stays near fp32's, yet differs from it, so bf16 really ran."""
    fp32 = _run([sys.executable], tmp_path / "fp32.json")
    bf16 = _run([sys.executable], tmp_path / "bf16.json", "--mixed-precision", "bf16")
    assert bf16["mixed_precision"] == "bf16"
    a, b = fp32["losses"], bf16["losses"]
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"fp32: {a}\nbf16: {b}\nmax |diff| = {diff:.3g}")
    assert 1e-5 < diff < 0.05 * max(a), (a, b)
    assert b[0] - b[-1] > 0.05, f"bf16 loss did not move: {b}"
