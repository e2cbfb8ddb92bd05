"""Thin Prefect tasks over `opd.pipeline`: logging, artifacts, and nothing else.

Results are small dataclasses (paths and metrics), never models; caching is off because
each stage is idempotent through its own completion marker on disk.
"""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from opd import pipeline as P
from opd.config import RunConfig
from opd.data.dataset import DataRef
from opd.errors import DataValidationFailed, GateFailed


def _log():
    return get_run_logger().info


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(cfg: RunConfig) -> None:
    from opd import preflight as pf
    from opd.registry.client import make_client

    pf.run(cfg, make_client(cfg.registry.endpoint_url, cfg.registry.region))
    _log()("preflight: model paths, data sources and the registry are reachable")


@task(name="prepare_data", cache_policy=NO_CACHE)
def prepare_data(cfg: RunConfig, run_dir: str) -> DataRef:
    from opd.registry.client import make_client

    s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region) if "s3://" in cfg.data.source else None
    ref = P.prepare_data(cfg, Path(run_dir) / "data", s3)
    _log()(f"data: {ref.n_train} train / {ref.n_eval} eval rows, fingerprint {ref.fingerprint}")
    return ref


@task(name="validate_dataset", cache_policy=NO_CACHE)
def validate_dataset(cfg: RunConfig, data: DataRef) -> DataRef:
    report, valid = P.validate_data(cfg, data)
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
def bootstrap_teacher(cfg: RunConfig, data: DataRef) -> P.ModelRef:
    return P.bootstrap_teacher(cfg, data, log=_log())


@task(name="sft_warmup", cache_policy=NO_CACHE)
def sft_warmup(cfg: RunConfig, data: DataRef, teacher: P.ModelRef, run_dir: str) -> P.ModelRef:
    return P.sft_warmup(cfg, data, teacher, Path(run_dir) / "sft", log=_log())


@task(name="opd_round", cache_policy=NO_CACHE, task_run_name="opd_round-{k}")
def opd_round(cfg: RunConfig, k: int, data: DataRef, teacher: P.ModelRef, student: P.ModelRef,
              run_dir: str) -> P.RoundResult:
    return P.opd_round(cfg, k, data, teacher, student, Path(run_dir) / f"round_{k:03d}", sampler_key=run_dir,
                       log=_log())


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: RunConfig, data: DataRef, teacher: P.ModelRef, sft: P.ModelRef, final: P.ModelRef) -> dict:
    P.close_samplers()  # free the sampler's memory before evaluation loads three models
    results = P.evaluate_all(cfg, data, teacher, sft, final)
    create_table_artifact(
        key="evaluation",
        table=[{"model": k, "accuracy": round(v["accuracy"], 4), "reverse_kl": round(v["reverse_kl"], 4),
                "n": v["n"]} for k, v in results.items()],
        description="Held-out accuracy and mean per-token reverse KL to the teacher")
    return results


@task(name="gates", cache_policy=NO_CACHE, retries=0)
def gates(cfg: RunConfig, results: dict) -> dict:
    g = P.check_gates(cfg, results)
    create_markdown_artifact(key="gates", markdown="# Evaluation gates\n\n" + g.message())
    if not g.passed:
        raise GateFailed("evaluation gates failed; nothing registered:\n" + g.message())
    _log()("gates passed:\n" + g.message())
    return {"passed": True, "checks": g.checks}


@task(name="register", cache_policy=NO_CACHE)
def register(cfg: RunConfig, final: P.ModelRef, run_dir: str, lineage: dict) -> dict:
    out = P.register(cfg, final, Path(run_dir), lineage)
    _log()(f"registered {out['model']}:{out['version']} at {out['uri']}")
    return out
