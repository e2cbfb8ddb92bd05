"""What a person sees while a run works: one line per stage event; the libraries' noise goes to a file.

``run_logs(run_dir)`` sends, for the duration of a run, everything third-party to
``<run_dir>/logs/third_party.log``: records of library loggers (vLLM, Great Expectations, datasets,
transformers, torch, httpx, ...), Python warnings, progress bars and stray prints (``sys.stdout`` /
``sys.stderr`` point at the file), and, through ``child_output()``, the whole output of processes
started meanwhile (vLLM's engine core inherits fds 1 and 2). Handlers that were configured before
the run (the orchestrator's console handler) keep their own streams, so the run's own log lines
still reach the terminal; ``quiet_console`` trims those to the lines that say something.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

THIRD_PARTY_LOG = "third_party.log"

# Library loggers whose records belong in the file, never on the console.
THIRD_PARTY = ("vllm", "great_expectations", "datasets", "transformers", "huggingface_hub", "tokenizers", "torch",
               "accelerate", "peft", "httpx", "httpcore", "urllib3", "botocore", "boto3", "s3transfer", "filelock",
               "fsspec", "matplotlib", "PIL", "numexpr", "py.warnings", "asyncio")

_active: dict[str, object] = {}  # the open run log while run_logs is active: {"path", "file"}


def third_party_log(run_dir: str | Path) -> Path:
    return Path(run_dir) / "logs" / THIRD_PARTY_LOG


def active_log() -> Path | None:
    """The third-party log of the run in progress in this process, if any."""
    return _active.get("path")  # type: ignore[return-value]


def quiet_libraries() -> None:
    """Progress bars and per-load chatter off, whether or not a run log is open."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read by datasets at import
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@contextmanager
def run_logs(run_dir: str | Path, console_filters: tuple[logging.Filter, ...] = ()) -> Iterator[Path]:
    """Route third-party output to ``<run_dir>/logs/third_party.log`` until the block ends;
    ``console_filters`` further trim what the console handlers print meanwhile."""
    path = third_party_log(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    stream = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - left open, see below
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Origin(own=False))
    saved = _adopt(THIRD_PARTY, handler)
    root = logging.getLogger()
    root.addHandler(handler)  # loggers not listed above still reach the file through the root
    filters = (_Origin(own=True), *console_filters)
    consoles = [h for h in root.handlers if h is not handler]
    for h in consoles:
        for f in filters:
            h.addFilter(f)
    logging.captureWarnings(True)
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout.flush(), sys.stderr.flush()
    sys.stdout = sys.stderr = stream
    _active.update(path=path, file=stream)
    try:
        yield path
    finally:
        _active.clear()
        sys.stdout, sys.stderr = old_out, old_err
        logging.captureWarnings(False)
        for h in consoles:
            for f in filters:
                h.removeFilter(f)
        root.removeHandler(handler)
        _restore(saved, handler)
        stream.flush()  # left open: a library may still hold it (e.g. an engine shut down at exit)


def _adopt(names: tuple[str, ...], handler: logging.Handler) -> dict[str, tuple]:
    """Point each named logger at ``handler`` alone; return what to restore."""
    saved = {}
    for name in names:
        lg = logging.getLogger(name)
        saved[name] = (lg.handlers[:], lg.propagate)
        lg.handlers = [handler]
        lg.propagate = False
    return saved


def _restore(saved: dict[str, tuple], handler: logging.Handler) -> None:
    for name, (handlers, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers = [h for h in lg.handlers if h is not handler] + [h for h in handlers if h not in lg.handlers]
        lg.propagate = propagate


@contextmanager
def child_output() -> Iterator[None]:
    """Processes started in this block write their fds 1 and 2 into the open run log (none open:
    no change). vLLM's engine core and its workers are such processes: they inherit the fds."""
    stream = _active.get("file")
    if stream is None:
        yield
        return
    stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


class _Origin(logging.Filter):
    """Pass only the orchestrator's and our own records (``own``), or only everyone else's."""

    OWN = ("prefect", "opd", "flows", "tasks", "__main__")

    def __init__(self, own: bool):
        super().__init__()
        self.own = own

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.name.split(".")[0] in self.OWN) == self.own


class DropMessages(logging.Filter):
    """Drop records of ``logger`` whose message matches ``pattern`` (e.g. routine completions)."""

    def __init__(self, logger: str, pattern: str):
        super().__init__()
        self.logger, self.pattern = logger, re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith(self.logger) and self.pattern.search(record.getMessage()))


# The orchestrator's "Finished in state Completed()" after every task: the stage's own line already
# said it finished; failures, retries and the flow's final state still print.
ROUTINE_TASK_COMPLETIONS = DropMessages("prefect.task_runs", r"^Finished in state Completed\(\)")
