"""Retries, backoff and timeouts for every task, from the run's config."""
from __future__ import annotations

from prefect import Task

from opd.config import RunConfig, TaskPolicy
from opd.errors import PermanentError

# They write to the registry once, at the end of a run that may have trained for hours: a few
# minutes of S3 outage must not throw that away, so they get their own, longer retry budget.
REGISTRY_TASKS = ("register", "set_alias")


def _retryable(task, task_run, state) -> bool:
    """Bad input and failed gates fail the same way every time: do not retry them."""
    return not isinstance(state.data, PermanentError)


def retry_delays(policy: TaskPolicy, task: str) -> list[float]:
    """Exponential backoff from ``retry_delay_seconds`` (x2 per retry); registry tasks take
    ``registry_retries`` waits, each capped at ``registry_max_delay_seconds``."""
    if task in REGISTRY_TASKS:
        n, cap = policy.registry_retries, policy.registry_max_delay_seconds
    else:
        n, cap = policy.retries, float("inf")
    return [min(cap, policy.retry_delay_seconds * 2 ** i) for i in range(n)]


def configured(t: Task, cfg: RunConfig) -> Task:
    delays = retry_delays(cfg.tasks, t.name)
    return t.with_options(
        retries=len(delays),
        retry_delay_seconds=delays or 0,
        retry_jitter_factor=0.2,
        retry_condition_fn=_retryable,
        timeout_seconds=cfg.tasks.timeout(t.name),
    )
