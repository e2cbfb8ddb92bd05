"""Retries, backoff and timeouts for every task, from the run's config."""
from __future__ import annotations

from prefect import Task
from prefect.tasks import exponential_backoff

from opd.config import RunConfig
from opd.errors import PermanentError


def _retryable(task, task_run, state) -> bool:
    """Bad input and failed gates fail the same way every time: do not retry them."""
    return not isinstance(state.data, PermanentError)


def configured(t: Task, cfg: RunConfig) -> Task:
    name = t.name
    return t.with_options(
        retries=cfg.tasks.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=cfg.tasks.retry_delay_seconds) if cfg.tasks.retries else 0,
        retry_jitter_factor=0.2,
        retry_condition_fn=_retryable,
        timeout_seconds=cfg.tasks.timeout(name),
    )
