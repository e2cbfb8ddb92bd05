"""Thin Prefect tasks over the core's stages: logging, artifacts, and nothing else.

Results are small dataclasses (paths and metrics), never models; caching is off because
each stage is idempotent through its own completion marker on disk.
"""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from opd import evaluation, rounds, warmup
from opd.config import RunConfig
from opd.data import prepare
from opd.data.dataset import DataRef
from opd.engines import Engines, borrowed
from opd.errors import DataValidationFailed, GateFailed
from opd.records import ModelRef, RoundResult, RunLayout


def _log():
    return get_run_logger().info


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(cfg: RunConfig) -> None:
    from opd_ops import preflight as pf
    from opd.storage import make_client

    pf.run(cfg, make_client(cfg.registry.endpoint_url, cfg.registry.region))
    _log()("preflight: model paths, data sources and the registry are reachable")


@task(name="resolve_teacher", cache_policy=NO_CACHE)
def resolve_teacher(cfg: RunConfig) -> RunConfig:
    """teacher.ref -> a verified local copy of that registry version as teacher.path (else cfg as is)."""
    from opd_ops import promotion

    return promotion.resolve_teacher(cfg, log=_log())


@task(name="prepare_data", cache_policy=NO_CACHE)
def prepare_data(cfg: RunConfig, layout: RunLayout) -> DataRef:
    from opd.storage import make_client

    on_s3 = any((src or "").startswith("s3://") for src in (cfg.data.source, cfg.data.eval_source))
    s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region) if on_s3 else None
    ref = prepare.prepare_data(cfg, layout.data, s3)
    _log()(f"data: {ref.n_train} train / {ref.n_eval} eval rows, fingerprint {ref.fingerprint}")
    return ref


@task(name="validate_dataset", cache_policy=NO_CACHE)
def validate_dataset(cfg: RunConfig, data: DataRef) -> DataRef:
    report, valid = prepare.validate_data(cfg, data)
    rows = "\n".join(f"| {r['expectation']} | {r['column']} | {'pass' if r['success'] else 'FAIL'} | "
                     f"{r['unexpected_count'] or 0} |" for r in report.raw["results"])
    create_markdown_artifact(
        key="dataset-validation",
        markdown=f"# Dataset validation (Great Expectations)\n\n| expectation | column | result | bad rows |\n"
                 f"|---|---|---|---|\n{rows}\n\n{report.message()}\n",
        description="GX result for the run's train/eval splits")
    if not report.success:
        raise DataValidationFailed(report.message())
    _log()(report.message())
    return valid


@task(name="bootstrap_teacher", cache_policy=NO_CACHE)
def bootstrap_teacher(cfg: RunConfig, data: DataRef) -> ModelRef:
    return warmup.bootstrap_teacher(cfg, data, log=_log())


@task(name="sft_warmup", cache_policy=NO_CACHE)
def sft_warmup(cfg: RunConfig, data: DataRef, teacher: ModelRef, layout: RunLayout,
               engines: Engines | None = None) -> ModelRef:
    """``engines``: the flow's; the teacher engine that writes SFT's completions grades the rounds."""
    return warmup.sft_warmup(cfg, data, teacher, layout.sft, log=_log(), engines=engines)


@task(name="opd_round", cache_policy=NO_CACHE, task_run_name="opd_round-{k}")
def opd_round(cfg: RunConfig, k: int, data: DataRef, teacher: ModelRef, student: ModelRef, layout: RunLayout,
              engines: Engines) -> RoundResult:
    """``engines`` belongs to the flow: kept across rounds, closed when the flow's rounds end."""
    return rounds.opd_round(cfg, k, data, teacher, student, layout, engines, log=_log())


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: RunConfig, data: DataRef, teacher: ModelRef, sft: ModelRef, final: ModelRef,
             layout: RunLayout, engines: Engines | None = None) -> dict:
    """``engines``: the flow's (the engines the rounds used); without it, started here and closed."""
    from opd_ops import promotion

    incumbent = promotion.pull_alias(cfg, cfg.eval.gates.no_regression_vs, layout.incumbent)
    with borrowed(cfg, engines) as eng, eng.guard("evaluation", get_run_logger().warning):
        results = evaluation.evaluate_all(cfg, data, teacher, sft, final, eng,
                                          incumbent.path if incumbent else None,
                                          incumbent.version if incumbent else None, store=layout.evaluation,
                                          log=_log())
    create_table_artifact(
        key="evaluation",
        table=[{"model": k, "accuracy": _round(v["accuracy"]), "sampled_accuracy": _round(v.get("sampled_accuracy")),
                "reverse_kl": _round(v["reverse_kl"]), "n": v["n"]} for k, v in results.items()],
        description="Held-out accuracy (greedy; sampled at T=1 on the KL samples; empty when the eval split has "
                    "no answers) and mean per-token reverse KL to the teacher")
    return results


def _round(x: float | None) -> float | None:
    """Table cells: 4 decimals; None (no answers to check) stays None."""
    return None if x is None else round(x, 4)


@task(name="check_candidate", cache_policy=NO_CACHE)
def check_candidate(cfg: RunConfig, version: int) -> None:
    """The promote flow's first question, before any data or evaluation work: is the version published?"""
    from opd_ops import promotion

    promotion.require_published(cfg, version)


@task(name="evaluate_candidate", cache_policy=NO_CACHE)
def evaluate_candidate(cfg: RunConfig, data: DataRef, teacher: ModelRef, version: int, alias: str,
                       layout: RunLayout) -> dict:
    from opd_ops import promotion

    name = cfg.registry.model_name
    cand = promotion.pull_version(cfg, f"{name}:{version}", layout.candidate)
    inc = promotion.pull_alias(cfg, alias, layout.incumbent)
    students = {"candidate": cand.path}
    if inc is not None and inc.version != version:
        students["incumbent"] = inc.path
    with Engines(cfg) as engines:
        results = evaluation.evaluate_models(cfg, data, teacher, students, engines)
    results["candidate"]["version"] = version
    if "incumbent" in results:
        results["incumbent"]["version"] = inc.version
    create_table_artifact(key="promotion-evaluation", table=[
        {"model": k, "version": v.get("version", ""), "accuracy": _round(v["accuracy"]),
         "reverse_kl": _round(v["reverse_kl"])} for k, v in results.items()],
        description=f"{name}:{version} vs {name}@{alias} on the same eval set")
    return results


@task(name="gates", cache_policy=NO_CACHE, retries=0)
def gates(cfg: RunConfig, results: dict, candidate: str = "opd_student", baseline: str | None = "sft_student") -> dict:
    from opd_ops import gates as gate_rules

    g = gate_rules.check(cfg.eval.gates, results, candidate, baseline)
    create_markdown_artifact(key="gates", markdown=g.markdown("Evaluation gates"))
    if not g.passed:
        raise GateFailed("evaluation gates failed; nothing registered or promoted:\n" + g.message())
    _log()("gates passed:\n" + g.message())
    return {"passed": True, "checks": g.checks}


@task(name="register", cache_policy=NO_CACHE)
def register(cfg: RunConfig, final: ModelRef, layout: RunLayout, lineage: dict) -> dict:
    from opd_ops.publishing import register as publish_run

    out = publish_run(cfg, final, layout, lineage)
    _log()(f"registered {out['model']}:{out['version']} at {out['uri']}")
    return out


@task(name="set_alias", cache_policy=NO_CACHE)
def set_alias(cfg: RunConfig, version: int, alias: str, reason: str) -> dict:
    from opd_ops import promotion

    if promotion.current_alias_version(cfg, alias) == version:  # a retry after the move landed
        return {"alias": alias, "version": version}
    moved = promotion.move_alias(cfg, version, alias, reason)
    _log()(f"{cfg.registry.model_name}@{alias} -> version {version}")
    return moved


@task(name="report", cache_policy=NO_CACHE)
def report(layout: RunLayout, lineage: dict | None = None) -> dict:
    """Write <run_dir>/report/ (markdown, HTML, PNG plots) and the "run-report" artifact.

    The flow's lineage (evaluation, gates, registration) goes over what the run directory holds.
    """
    from opd_ops import report as run_report

    lin = run_report.lineage_from_run_dir(layout.root)
    lin.update({k: v for k, v in (lineage or {}).items() if v not in (None, {}, [])})
    lin["source"] = f"distill flow, run directory {layout.root}"
    rep = run_report.build_report(lin, layout.report)
    create_markdown_artifact(key="run-report", markdown=run_report.artifact_markdown(lin),
                             description="Stages, gates, evaluation, per-round metrics and plots, cost ledger")
    _log()(f"report: {rep.html}  (re-render with `opd report {lin.get('run_key')}`)")
    return {"html": str(rep.html), "markdown": str(rep.markdown), "plots": {k: str(v) for k, v in rep.plots.items()}}
