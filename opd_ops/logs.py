"""What a person sees while a run works: one line per stage event; the libraries' noise goes to a file.

``run_logs(run_dir)`` points file descriptors 1 and 2 of this process at
``<run_dir>/logs/third_party.log`` for the duration of a run, so whatever the libraries write there
lands in the file: records of library loggers (vLLM, Great Expectations, datasets, transformers, torch,
httpx, ...), Python warnings, progress bars, stray prints, C++ warnings, and the whole output of the
processes started meanwhile (vLLM's engine core and worker, torchrun groups), which inherit those fds.
The console handlers configured before the run (the orchestrator's) get a private copy of the
terminal's descriptor, so the run's own lines still reach it, trimmed by ``console_filters``.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

THIRD_PARTY_LOG = "third_party.log"

# Library loggers whose records belong in the file, never on the console (some bring their own
# console handler: replaced for the run).
THIRD_PARTY = ("vllm", "great_expectations", "datasets", "transformers", "huggingface_hub", "tokenizers", "torch",
               "accelerate", "peft", "httpx", "httpcore", "urllib3", "botocore", "boto3", "s3transfer", "filelock",
               "fsspec", "matplotlib", "PIL", "numexpr", "py.warnings", "asyncio")


def third_party_log(run_dir: str | Path) -> Path:
    return Path(run_dir) / "logs" / THIRD_PARTY_LOG


def quiet_libraries() -> None:
    """Progress bars and telemetry off, whether or not a run log is open."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read by datasets at import
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@contextmanager
def run_logs(run_dir: str | Path, console_filters: tuple[logging.Filter, ...] = ()) -> Iterator[Path]:
    """Send third-party output to ``<run_dir>/logs/third_party.log`` until the block ends;
    ``console_filters`` further trim what the console handlers print meanwhile."""
    path = third_party_log(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    # left open after the block: a library may keep writing to it (an engine shut down at exit)
    stream = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    with ExitStack() as undo:
        undo.enter_context(_library_loggers(stream))
        root = logging.getLogger()
        consoles = [h for h in root.handlers if isinstance(h, logging.StreamHandler) and h.stream is not stream]
        for h in consoles:
            undo.enter_context(_console(h, (_Origin(own=True), *console_filters)))
        undo.enter_context(_captured_warnings())
        undo.enter_context(_fds_to(stream))
        yield path


@contextmanager
def _library_loggers(stream) -> Iterator[None]:
    """The listed library loggers write to ``stream`` alone; anything else not ours that reaches the
    root logger is copied there too."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Origin(own=False))
    saved = {}
    for name in THIRD_PARTY:
        lg = logging.getLogger(name)
        saved[name] = (lg.handlers[:], lg.propagate)
        lg.handlers, lg.propagate = [handler], False
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        for name, (handlers, propagate) in saved.items():
            lg = logging.getLogger(name)
            added = [h for h in lg.handlers if h is not handler and h not in handlers]  # configured meanwhile
            lg.handlers, lg.propagate = handlers + added, propagate


@contextmanager
def _console(handler: logging.StreamHandler, filters: tuple[logging.Filter, ...]) -> Iterator[None]:
    """``handler`` keeps printing to the terminal (a private duplicate of its descriptor, untouched
    by the redirect of fds 1/2), through ``filters``."""
    old = handler.stream
    try:
        fd = old.fileno()
    except (AttributeError, OSError, ValueError):  # not backed by a descriptor: nothing to keep apart
        fd = None
    own = os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                    errors="replace") if fd is not None else None
    if own is not None:
        old.flush()
        _set_stream(handler, own)
    for f in filters:
        handler.addFilter(f)
    try:
        yield
    finally:
        for f in filters:
            handler.removeFilter(f)
        if own is not None:
            own.flush()
            _set_stream(handler, old)
            own.close()


def _set_stream(handler: logging.StreamHandler, stream) -> None:
    handler.setStream(stream)
    if hasattr(getattr(handler, "console", None), "file"):  # Rich-based handlers (Prefect's) print via a Console
        handler.console.file = stream


@contextmanager
def _captured_warnings() -> Iterator[None]:
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)


@contextmanager
def _fds_to(stream) -> Iterator[None]:
    """Descriptors 1 and 2 of this process (and of every process it starts) point at ``stream``."""
    for s in (sys.stdout, sys.stderr):
        s.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    try:
        yield
    finally:
        for s in (sys.stdout, sys.stderr):
            s.flush()
        stream.flush()
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
