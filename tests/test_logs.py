"""opd_ops.logs: during a run the console shows the run's own lines; library noise, stray prints, warnings,
progress bars, C-level writes and child processes' output land in <run_dir>/logs/third_party.log."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent(r"""
    import logging, os, subprocess, sys, warnings
    from opd_ops import logs

    # the orchestrator's console handler, configured before the run (as Prefect's is, at import)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(name)s | %(message)s"))
    logging.getLogger().addHandler(console)
    logging.getLogger().setLevel(logging.INFO)
    vllm = logging.getLogger("vllm")  # a library with its own stdout handler (vLLM configures one)
    vllm.addHandler(logging.StreamHandler(sys.stdout))
    vllm.propagate = False

    print("before the run")
    with logs.run_logs(sys.argv[1], console_filters=(logs.ROUTINE_TASK_COMPLETIONS,)) as path:
        logging.getLogger("prefect.task_runs").info("stage line: SFT warmup done")
        logging.getLogger("prefect.task_runs").info("Finished in state Completed()")
        logging.getLogger("prefect.task_runs").error("Finished in state Failed('boom')")
        vllm.warning("RotaryEmbedding: Failed to load weights")
        logging.getLogger("great_expectations.validator").warning("gx noise")
        logging.getLogger("some.unknown.lib").warning("unlisted library noise")
        print("stray print")
        warnings.warn("a library warning")
        from tqdm import tqdm
        for _ in tqdm(range(3), desc="Calculating Metrics"):
            pass
        subprocess.run(["sh", "-c", "echo child-stdout; echo child-stderr >&2"], check=True)
        os.write(2, b"c-level noise\n")  # what C++ code (torch, gloo) writes straight to the descriptor
    print("after the run", path)
    subprocess.run(["sh", "-c", "echo own-child"], check=True)  # after the run: the terminal again
""")

NOISE = ("Failed to load weights", "gx noise", "unlisted library noise", "stray print", "a library warning",
         "Calculating Metrics", "child-stdout", "child-stderr", "c-level noise")


def test_run_logs_route_noise_to_the_run_file(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(run)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    assert "before the run" in proc.stdout and "after the run" in proc.stdout and "own-child" in proc.stdout
    assert "stage line: SFT warmup done" in console and "Finished in state Failed('boom')" in console
    assert "Finished in state Completed()" not in console
    for noise in NOISE:
        assert noise not in console, noise
    log = (run / "logs" / "third_party.log").read_text()
    for noise in NOISE:
        assert noise in log, noise
    assert "stage line" not in log  # the run's own lines are not duplicated into the noise file
    assert len(console.splitlines()) == 5, console
