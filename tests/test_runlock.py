"""One live process per run key (opd_ops.runlock): a second run of a live key is refused by name, and a
killed holder (kill -9, no cleanup) frees the key at once. Real processes, real flock."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from opd.errors import PermanentError
from opd_ops.runlock import RunKeyInUse, hold

HOLDER = """
import sys, time
from opd_ops.runlock import hold
with hold(sys.argv[1], "k1"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_live_run_key_is_refused_and_a_killed_holder_frees_it(tmp_path):
    rdir = tmp_path / "runs" / "k1"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(rdir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunKeyInUse, match=rf"--run-key k1: process {proc.pid} on .* is running it now; wait "
                                              "for that run to finish, or start this one with another --run-key") as e:
            with hold(rdir, "k1"):
                pytest.fail("entered a run dir a live process holds")
        assert isinstance(e.value, PermanentError)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with hold(rdir, "k1"):  # the kernel dropped the dead holder's lock
        assert (rdir / ".lock").read_text() == f"process {os.getpid()} on {os.uname().nodename}"
    with hold(rdir, "k1"):  # and released on leaving the block
        pass
