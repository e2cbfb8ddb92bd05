"""Register the `distill` and `promote` flows as Prefect deployments on a work pool.

The deployments run this checkout's code (`from_source` on the repo directory), so a process
worker on the same machine, or a container built from infra/Dockerfile.* with the repo at the
same path, can execute them.
"""
from __future__ import annotations

from pathlib import Path

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.flows import Flow

from opd.config import load_config

REPO = Path(__file__).resolve().parents[1]


async def _ensure_pool(name: str, pool_type: str) -> None:
    async with get_client() as client:
        try:
            await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))


def deploy(config_path: str, overrides: list[str] | None = None) -> dict[str, str]:
    """Create or update `distill/<config name>` (scheduled if the config has a cron) and
    `promote/<config name>`; returns {deployment name: id}."""
    import asyncio

    overrides = list(overrides or [])
    cfg = load_config(config_path, overrides)  # a bad config never becomes a deployment
    d = cfg.deployment
    asyncio.run(_ensure_pool(d.work_pool, d.pool_type))
    config_abs = str(Path(config_path).resolve())
    out = {}
    distill = Flow.from_source(source=str(REPO), entrypoint="flows/distill.py:distill")
    out[f"distill/{cfg.name}"] = str(distill.deploy(
        name=cfg.name, work_pool_name=d.work_pool, build=False, push=False, print_next_steps=False,
        cron=d.cron, parameters={"config_path": config_abs, "overrides": overrides},
        description=f"On-policy distillation with {config_path}", tags=["opd", cfg.name]))
    promote = Flow.from_source(source=str(REPO), entrypoint="flows/promote.py:promote")
    out[f"promote/{cfg.name}"] = str(promote.deploy(
        name=cfg.name, work_pool_name=d.work_pool, build=False, push=False, print_next_steps=False,
        parameters={"config_path": config_abs, "overrides": overrides},
        description="Re-run the gates for an alias and move it (optionally after human approval)",
        tags=["opd", cfg.name]))
    return out
