"""The `distill` flow: validate data -> SFT warmup -> N OPD rounds -> evaluate + gates -> register.

Only wiring lives here; every stage is a task in `tasks/` over the core in `opd/`.
"""
from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from opd_ops import logs
from opd.config import load_config
from opd.engines import Engines
from opd.ledger import eval_phase
from opd.records import RunLayout
from tasks import runs, stages
from tasks.policy import configured


def default_run_key(name: str) -> str:
    rid = flow_run.get_id() or "local"
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{str(rid)[:8]}"


@flow(name="distill")
def distill(config_path: str, overrides: list[str] | None = None, run_key: str | None = None) -> dict:
    """Same run_key = resume: completed stages and rounds are reused, never redone."""
    cfg = load_config(config_path, overrides or [])
    run_key = run_key or default_run_key(cfg.name)
    layout = RunLayout.of(cfg.home, run_key)
    # one live run per key; earlier runs of the key left RUNNING by a killed process are marked Crashed
    with runs.claim(run_key, str(layout.root)), logs.run_logs(layout.root,
                                                              console_filters=(logs.ROUTINE_TASK_COMPLETIONS,)):
        return _distill(cfg, run_key, layout)


def _distill(cfg, run_key: str, layout: RunLayout) -> dict:
    """The stages; third-party output goes to <run_dir>/logs/third_party.log, not the console."""
    log = get_run_logger()
    log.info(f"run {run_key}: {cfg.opd.rounds} OPD rounds, run dir {layout.root}")
    t = {name: configured(getattr(stages, name), cfg) for name in
         ("resolve_teacher", "preflight", "prepare_data", "validate_dataset", "bootstrap_teacher", "sft_warmup",
          "opd_round", "evaluate", "register", "set_alias")}

    given, cfg = cfg, t["resolve_teacher"](cfg)  # teacher.ref -> a verified local teacher.path
    t["preflight"](cfg)
    data = t["validate_dataset"](cfg, t["prepare_data"](cfg, layout))
    teacher = t["bootstrap_teacher"](cfg, data)
    with Engines(cfg) as engines:  # one teacher and one sampler from SFT's completions to evaluation
        sft = t["sft_warmup"](cfg, data, teacher, layout, engines)
        student, rounds = sft, []
        for k in range(1, cfg.opd.rounds + 1):
            r = t["opd_round"](cfg, k, data, teacher, student, layout, engines)
            rounds.append(r)
            student = r.student
        results = t["evaluate"](cfg, data, teacher, sft, student, layout, engines)
    create_table_artifact(key="opd-rounds", table=[{k: (round(v, 4) if isinstance(v, float) else v)
                                                     for k, v in r.metrics.items()} for r in rounds],
                          description="Per-round OPD metrics")
    gate = stages.gates(cfg, results)
    costs = [c for c in [teacher.cost, sft.data_cost, sft.cost] + [r.cost for r in rounds] + [eval_phase(results)] if c]
    create_table_artifact(key="cost-ledger", table=[{k: (f"{v:.3g}" if isinstance(v, float) else v)
                                                     for k, v in c.items()} for c in costs],
                          description="Work per phase: tokens and FLOPs (6ND train, 2ND sample/score), wall s")
    lineage = {
        "run_key": run_key, "flow_run_id": str(flow_run.get_id()), "config": given.model_dump(mode="json"),
        "dataset_fingerprint": data.fingerprint, "teacher": teacher.path, "teacher_params": teacher.params,
        "student_params": student.params, "metrics": results, "gates": gate, "rounds": [r.metrics for r in rounds],
        "cost": costs,
    }
    reg = t["register"](cfg, student, layout, lineage)
    t["set_alias"](cfg, reg["version"], "candidate", f"distill run {run_key} passed its gates")
    # a report that fails is logged, never fails a run whose model is already registered
    rep = stages.report(layout, {**lineage, "registered": reg}, return_state=True)
    if not rep.is_completed():
        log.warning(f"run report not written: {rep.message}")
    return {"run_key": run_key, "results": results, "registry": reg, "rounds": [r.metrics for r in rounds],
            "report": rep.result()["html"] if rep.is_completed() else None}
