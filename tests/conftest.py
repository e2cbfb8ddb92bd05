"""Shared fixtures: one real local stack (Prefect server + SeaweedFS) per test session.

It runs on its own ports and home so it never touches a developer's `make demo` stack.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parents[1]


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_block(start: int, width: int, step: int = 20) -> int:
    """First base port with `width` free ports after it: two test sessions never collide."""
    for base in range(start, start + 100 * step, step):
        if all(_free(base + i) for i in range(width)):
            return base
    raise RuntimeError(f"no free block of {width} ports from {start}")


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    from opd_ops import stack as st

    # SeaweedFS takes s3_port and the 9 ports after it
    settings = st.StackSettings(home=tmp_path_factory.mktemp("stack-home"), prefect_port=_free_block(14250, 1),
                                s3_port=_free_block(18350, 10))
    st.up(settings, timeout=180)
    yield settings
    st.down(settings)


@pytest.fixture(scope="session")
def stack_env(stack) -> dict[str, str]:
    from opd_ops.stack import stack_env as env

    return env(stack)


@pytest.fixture
def s3(stack_env):
    from opd.storage import make_client

    return make_client(stack_env["OPD_S3_ENDPOINT"])


@pytest.fixture(scope="session")
def opd_home(tmp_path_factory) -> Path:
    """One OPD home for the flow tests, so the CI teacher is bootstrapped once per session."""
    return tmp_path_factory.mktemp("opd-home")


def opd_bin() -> str:
    import sys

    return str(Path(sys.executable).with_name("opd"))


def api_json(url: str, body: dict | None = None, *, attempts: int = 6):
    """GET (or POST ``body`` to) a Prefect REST endpoint and decode its JSON answer (None if empty).

    Retries 429/502/503 the way Prefect's own client does: its server answers 503 for
    errors it calls client-retryable (e.g. SQLite "database is locked" under a busy suite),
    and the transaction behind such an answer was rolled back, so a retry is safe.
    """
    import json
    import time
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    for attempt in range(attempts):
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req) as r:
                raw = r.read()
            return json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            if e.code not in (429, 502, 503) or attempt == attempts - 1:
                raise
            time.sleep(float(e.headers.get("Retry-After") or 2 ** attempt))
