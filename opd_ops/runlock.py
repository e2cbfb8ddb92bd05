"""One live process per run key: an exclusive lock on the run directory, held while the flow runs.

The kernel drops an ``flock`` when its process dies (``kill -9`` included), so a resumed run takes
the lock at once, and a second run started with the key of one that is still alive is refused
instead of both writing the same checkpoints. Holding the lock also proves that any earlier flow
run of this key still shown as running is not: it can be marked crashed (``tasks.runs``).
"""
from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from opd.errors import PermanentError

LOCK = ".lock"


class RunKeyInUse(PermanentError):
    """Another live process runs this run key."""


@contextmanager
def hold(rdir: str | Path, run_key: str) -> Iterator[None]:
    """Lock ``rdir`` (made if missing) for the block; RunKeyInUse if a live process holds it."""
    rdir = Path(rdir)
    rdir.mkdir(parents=True, exist_ok=True)
    with open(rdir / LOCK, "a+") as f:  # not opened with "w": that would erase the holder's note
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunKeyInUse(f"--run-key {run_key}: {holder} is running it now; wait for that run to finish, "
                              "or start this one with another --run-key") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
