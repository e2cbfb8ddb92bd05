"""A run key's flow runs in Prefect: tag each with its key, and mark the ones a resume supersedes
as Crashed, so a killed run does not stay RUNNING in the UI forever."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator
from uuid import UUID

from prefect import get_client, get_run_logger
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, FlowRunFilterState,
                                            FlowRunFilterStateType, FlowRunFilterTags, TaskRunFilter,
                                            TaskRunFilterState, TaskRunFilterStateType)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Crashed

from opd_ops import runlock

LIVE = [StateType.RUNNING, StateType.PENDING]


def run_key_tag(run_key: str) -> str:
    """The tag that finds a run key's flow runs (``read_flow_runs`` filters on tags)."""
    return f"run_key:{run_key}"


@contextmanager
def claim(run_key: str, rdir: str) -> Iterator[None]:
    """For the flow's duration: hold the run dir's lock (a live run of the key refuses this one),
    then mark the key's earlier flow runs still RUNNING/PENDING as Crashed and tag this run."""
    with runlock.hold(rdir, run_key):
        me = flow_run.get_id()
        if me is not None:
            with get_client(sync_client=True) as client:
                crash_superseded(client, run_key, UUID(str(me)))
                tags = set(client.read_flow_run(UUID(str(me))).tags) | {run_key_tag(run_key)}
                client.update_flow_run(UUID(str(me)), tags=sorted(tags))
        yield


def crash_superseded(client, run_key: str, me: UUID) -> list[UUID]:
    """Earlier flow runs of ``run_key`` still live in Prefect, and their live task runs, -> Crashed.

    Only called with the run dir's lock held: no live process runs them, whatever their state says."""
    stale = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        tags=FlowRunFilterTags(all_=[run_key_tag(run_key)]), id=FlowRunFilterId(not_any_=[me]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=LIVE))))
    log = get_run_logger()
    for fr in stale:
        why = (f"superseded by flow run {flow_run.get_name() or ''} ({me}), which resumed run key {run_key!r} and "
               f"found this run's process gone (it was {fr.state.name if fr.state else 'unknown'})")
        client.set_flow_run_state(fr.id, Crashed(message=why), force=True)
        live = TaskRunFilterState(type=TaskRunFilterStateType(any_=LIVE), name=None)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])),
                                      task_run_filter=TaskRunFilter(state=live))
        for tr in tasks:
            client.set_task_run_state(tr.id, Crashed(message=why), force=True)
        log.info(f"marked flow run {fr.name} ({fr.id}) of run key {run_key} Crashed: its process is gone")
    return [fr.id for fr in stale]
