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
TEST_PREFECT_PORT = 4250
TEST_S3_PORT = 8350


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    from opd import stack as st

    settings = st.StackSettings(home=tmp_path_factory.mktemp("stack-home"), prefect_port=TEST_PREFECT_PORT,
                                s3_port=TEST_S3_PORT)
    st.up(settings, timeout=180)
    yield settings
    st.down(settings)


@pytest.fixture(scope="session")
def stack_env(stack) -> dict[str, str]:
    from opd.stack import stack_env as env

    return env(stack)


@pytest.fixture
def s3(stack_env):
    from opd.registry.client import make_client

    return make_client(stack_env["OPD_S3_ENDPOINT"])
