"""The `promote` flow: re-run the gates for the target alias, optionally wait for a human, move it.

Candidate and incumbent (the version now at the alias) are pulled with sha256 checks and
evaluated on the same eval set in this run, so "no regression" compares like with like.
"""
from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run

from opd.config import load_config
from opd.errors import GateFailed
from opd.names import validate_alias_name
from opd.records import RunLayout
from tasks import stages
from tasks.policy import configured


def promote_run_key(model: str, version: int, alias: str, flow_run_id: str) -> str:
    """``promote-<model>-<version>-<alias>-<time>-<run id>`` from checked parts only (the model and
    alias are valid names, each cut to 32 characters so the key stays a valid run key)."""
    return "-".join(("promote", model[:32], str(int(version)), validate_alias_name(alias)[:32],
                     time.strftime("%Y%m%d-%H%M%S"), str(flow_run_id)[:8]))


class Approval(RunInput):
    """What a reviewer answers in the Prefect UI (or over the API) for a paused promotion."""

    approve: bool
    reason: str = ""


@flow(name="promote")
def promote(config_path: str, version: int, to_alias: str, reason: str, overrides: list[str] | None = None) -> dict:
    cfg = load_config(config_path, overrides or [])
    g = cfg.eval.gates
    layout = RunLayout.of(cfg.home, promote_run_key(cfg.registry.model_name, version, to_alias, flow_run.get_id()))
    log = get_run_logger()
    t = {n: configured(getattr(stages, n), cfg) for n in
         ("resolve_teacher", "preflight", "check_candidate", "prepare_data", "validate_dataset", "bootstrap_teacher",
          "evaluate_candidate", "set_alias")}
    cfg = t["resolve_teacher"](cfg)
    t["preflight"](cfg)
    t["check_candidate"](cfg, version)
    data = t["validate_dataset"](cfg, t["prepare_data"](cfg, layout))
    teacher = t["bootstrap_teacher"](cfg, data)
    results = t["evaluate_candidate"](cfg, data, teacher, version, to_alias, layout)
    gate = stages.gates.with_options(task_run_name=f"gates-{to_alias}")(cfg, results, "candidate", None)
    if g.require_approval:
        log.info(f"waiting up to {g.approval_timeout_s}s for approval of {cfg.registry.model_name}:{version} "
                 f"-> {to_alias} (resume the flow run in the UI, or POST /flow_runs/<id>/resume)")
        try:
            decision = pause_flow_run(wait_for_input=Approval.with_initial_data(approve=False),
                                      timeout=g.approval_timeout_s)
        except Exception as e:  # FlowPauseTimeout: nobody answered
            raise GateFailed(f"no approval within {g.approval_timeout_s}s: promotion rejected") from e
        if not decision.approve:
            raise GateFailed(f"promotion rejected by reviewer: {decision.reason or 'no reason given'}")
        reason = f"{reason} (approved: {decision.reason})" if decision.reason else reason
    moved = t["set_alias"](cfg, version, to_alias, reason)
    return {"results": results, "gates": gate, "alias": moved}
