"""`opd` command line: run the distill flow, manage the local stack, browse the registry."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from opd_ops.cli_registry import registry_app
from opd_ops.console import (checked, console, fail, flow_outcome, load_config_or_exit, point_at_stack, prefect_api,
                             promote_args, refusals, say, stack_settings, ui_url)

# Locals in a traceback can hold credentials: never print them.
app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_show_locals=False)
stack_app = typer.Typer(no_args_is_help=True, help="Local Prefect server + SeaweedFS S3 (loopback only).")
app.add_typer(stack_app, name="stack")


def _num(x: float | None, digits: int = 3) -> str:
    """A table cell: data without answers has no accuracy, so print a dash rather than crash."""
    return "-" if x is None else f"{x:.{digits}f}"


def results_table(results: dict[str, dict]) -> Table:
    """The run's closing table: held-out accuracy and reverse KL per model."""
    table = Table(title="Held-out evaluation")
    table.add_column("model")
    table.add_column("accuracy (greedy)", justify="right")
    table.add_column("accuracy (sampled, T=1)", justify="right")
    table.add_column("mean reverse KL / token", justify="right")
    labels = {"teacher": "teacher", "sft_student": "student after SFT", "opd_student": "student after OPD"}
    for k, v in results.items():
        table.add_row(labels.get(k, k), _num(v.get("accuracy")), _num(v.get("sampled_accuracy")),
                      _num(v.get("reverse_kl"), 4))
    return table


@app.command()
def run(config: Path, set_: list[str] = typer.Option([], "--set", help="override, e.g. --set opd.rounds=3"),
        run_key: Optional[str] = typer.Option(None, help="reuse a run key to resume a crashed run")):
    """Run the distill flow on CONFIG against the Prefect server in PREFECT_API_URL (default: local stack)."""
    from opd.paths import check_name

    if run_key is not None:
        checked(check_name, run_key, "--run-key")
    cfg = load_config_or_exit(config, set_)
    point_at_stack(cfg)
    api = prefect_api()
    from flows.distill import distill

    ui = ui_url(api)
    say(f"Watch: {ui}/runs  (the flow run's own link is logged as it starts: 'View at ...')\n"
        f"Artifacts (rounds, gates, cost ledger, run report): {ui}/artifacts\n"
        f"Run directory: {Path(cfg.home) / 'runs'}/<run key>")
    state = distill(str(config), list(set_), run_key, return_state=True)
    say("")
    flow_outcome(state, ui)
    out = state.result()
    console.print(results_table(out["results"]))
    reg = out["registry"]
    say(f"Registered: {reg['uri']}  ({reg['model']}:{reg['version']})")
    if out.get("report"):
        say(f"Report: {out['report']}  (re-render: opd report {out['run_key']} --config {config})")


@app.command()
def plan(config: Path, set_: list[str] = typer.Option([], "--set", help="override, e.g. --set opd.micro_batch=2"),
         gpu_gib: float = typer.Option(80.0, help="memory of each GPU, GiB"),
         host_gib: Optional[float] = typer.Option(None, help="memory of the host for a CPU run (default: this one's)")):
    """Which process holds which model, its dtype and estimated memory, without loading a weight; refuse
    (exit 2) a placement that cannot fit, naming the fix."""
    from opd_ops import plan as planning

    cfg = load_config_or_exit(config, set_)
    teacher_path = cfg.teacher.path
    if cfg.teacher.ref is not None:  # a registry version: its config.json is read there, nothing is pulled
        from opd_ops import promotion
        from opd_ops.registry.client import RegistryError

        try:
            teacher_path = promotion.version_uri(cfg, cfg.teacher.ref)
        except RegistryError as e:
            fail(f"teacher.ref {cfg.teacher.ref}: {e}", 2)
    s3 = None
    if any(p and p.startswith("s3://") for p in (cfg.student.path, teacher_path)):
        from opd.storage import make_client

        s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
    try:
        student = planning.read_shape(cfg.student.path, s3) if cfg.student.path else None
        teacher = planning.read_shape(teacher_path, s3) if teacher_path else None
    except planning.PlanError as e:
        fail(str(e), 2)
    if student is None or teacher is None:
        fail("opd plan sizes trained models: set student.path and teacher.path or teacher.ref (a built demo "
             "model is tiny)", 2)
    if host_gib is None:
        import psutil

        host_gib = psutil.virtual_memory().total / planning.GiB
    p = planning.plan(cfg, student, teacher, gpu_gib=gpu_gib, host_gib=host_gib)
    where = f"GPUs of {gpu_gib:g} GiB" if cfg.device != "cpu" else f"CPU, {host_gib:.0f} GiB"
    table = Table(title=f"Placement of {cfg.name} ({where})")
    for col in ("process", "device", "holds", "GiB", "of which"):
        table.add_column(col, justify="right" if col == "GiB" else "left")
    for h in p.holdings:
        table.add_row(h.process, h.device, h.holds, f"{h.total / planning.GiB:.1f}",
                      ", ".join(f"{k} {v / planning.GiB:.1f}" for k, v in h.parts.items()))
    console.print(table)
    rounds, evaluation = p.per_device("rounds"), p.per_device("evaluation")
    for dev, used in p.per_device().items():
        peak = " (in the evaluation)" if evaluation.get(dev, 0) > rounds.get(dev, 0) else ""
        say(f"{dev}: {used / planning.GiB:.1f} of {p.capacity / planning.GiB:.0f} GiB{peak}")
    for n in p.notes:
        say(n)
    if p.problems:
        fail("does not fit:\n" + "\n".join(f"  {x}" for x in p.problems), 2)
    say("fits")


@app.command()
def promote(config: Path, ref: str = typer.Argument(..., help="MODEL:VERSION"),
            to: str = typer.Option(..., "--to", help="target alias, e.g. staging or production"),
            reason: str = typer.Option(..., "--reason"),
            set_: list[str] = typer.Option([], "--set", help="override, e.g. --set eval.gates.require_approval=true")):
    """Re-run the gates for ALIAS on MODEL:VERSION (and wait for approval if configured), then move it."""
    from opd_ops.registry.refs import resolve
    from opd.storage import make_client

    model, version = promote_args(ref, to, reason)
    overrides = list(set_) + [f"registry.model_name={model}"]
    cfg = load_config_or_exit(config, overrides)
    point_at_stack(cfg)
    s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
    with refusals(s3):  # a version that is not published is refused here, not minutes into the flow
        resolve(s3, cfg.registry.bucket, cfg.registry.prefix, f"{model}:{version}")
    api = prefect_api()
    from flows.promote import promote as promote_flow

    state = promote_flow(str(config), version, to, reason, overrides, return_state=True)
    flow_outcome(state, ui_url(api))
    say(f"{model}@{to} -> {model}:{version}")


def _deploy_hints(config: Path, overrides: list[str], cfg, ids: dict[str, str]) -> list[str]:
    """How to run the new deployments: a worker with the right environment, and the exact REST calls."""
    api = os.environ["PREFECT_API_URL"].rstrip("/")
    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    dep_id = ids.get(f"distill/{cfg.name}", "<id>")
    body = '{"parameters": {"run_key": "nightly-1"}}'
    return [
        f"start a worker:  opd worker --config {shlex.quote(str(config))}{sets}",
        f"trigger a run:   PREFECT_API_URL={api} prefect deployment run 'distill/{cfg.name}'",
        "or over REST (parameters you pass replace the deployment's defaults for those keys):",
        f"  curl -s {api}/deployments/name/distill/{cfg.name}    # its \"id\": {dep_id}",
        f"  curl -s -X POST -H 'Content-Type: application/json' -d '{body}' "
        f"{api}/deployments/{dep_id}/create_flow_run",
    ]


@app.command()
def deploy(config: Path, set_: list[str] = typer.Option([], "--set", help="override baked into the deployment")):
    """Create/update the `distill` and `promote` deployments for CONFIG on its work pool."""
    cfg = load_config_or_exit(config, set_)
    point_at_stack(cfg)
    prefect_api()
    from flows.deployments import deploy as deploy_flows

    ids = deploy_flows(str(config), list(set_))
    for name, dep_id in ids.items():
        say(f"deployment {name}  id {dep_id}")
    for line in _deploy_hints(config, list(set_), cfg, ids):
        say(line)


@app.command()
def worker(config: Path = typer.Option(Path("configs/demo.yaml"), "--config", help="config naming the pool and home"),
           pool: Optional[str] = typer.Option(None, "--pool", help="work pool (default: deployment.work_pool)"),
           set_: list[str] = typer.Option([], "--set", help="override, e.g. --set home=/data/opd")):
    """Start a Prefect worker for CONFIG's deployments, with the environment a deployed run needs.

    PREFECT_API_URL and OPD_S3_ENDPOINT are taken from the environment when set, else from the
    local stack of CONFIG's home; the runs the worker starts inherit them (and AWS credentials)."""
    cfg = load_config_or_exit(config, set_)
    if pool is not None:
        from opd.paths import check_name

        checked(check_name, pool, "--pool")
    pool = pool or cfg.deployment.work_pool
    point_at_stack(cfg)
    prefect_api()
    say(f"worker for pool {pool}: PREFECT_API_URL={os.environ['PREFECT_API_URL']}  "
        f"OPD_S3_ENDPOINT={os.environ['OPD_S3_ENDPOINT']}")
    sys.stdout.flush()
    # the pool's type (process, kubernetes, ...) is read from the server: `opd deploy` created it
    os.execv(sys.executable, [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool])  # the worker takes this process's place: signals reach it directly


def _run_dir_of(home: str, target: str) -> Path | None:
    """<home>/runs/<target>, built through the path guard, or None when TARGET cannot be a run key."""
    from opd.paths import UnsafePathError, check_name, within

    try:
        return within(Path(home) / "runs", check_name(target, "run key"), field="run key")
    except UnsafePathError:
        return None


@app.command()
def report(target: str = typer.Argument(..., metavar="RUN_KEY_OR_MODEL",
                                        help="a run key under <home>/runs/, or MODEL, MODEL:N, MODEL@ALIAS"),
           config: Path = typer.Option(Path("configs/demo.yaml"), "--config", help="config naming home and registry"),
           set_: list[str] = typer.Option([], "--set", help="override, e.g. --set home=/data/opd"),
           out: Optional[Path] = typer.Option(None, "--out", help="output dir (default <home>/reports/<id>/)")):
    """Report a run (from its run directory) or a registered version: tables here, HTML + PNG plots on disk."""
    from opd_ops import report as run_report
    from opd.paths import check_name, within

    cfg = load_config_or_exit(config, set_)
    rdir = _run_dir_of(cfg.home, target)
    if rdir is not None and rdir.is_dir():
        lineage, rid = run_report.lineage_from_run_dir(rdir), target
    else:
        from opd.storage import make_client

        if rdir is not None:
            say(f"no run directory {rdir}: reading {target} from the registry", "dim")
        point_at_stack(cfg)
        s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
        with refusals(s3):
            lineage = run_report.lineage_from_registry(s3, cfg.registry.bucket, cfg.registry.prefix, target)
        rid = f"{lineage['registered']['model']}-v{lineage['registered']['version']}"
    run_report.print_report(lineage, console)
    rep = run_report.build_report(lineage, out or within(Path(cfg.home) / "reports", check_name(rid, "report id")))
    say("")
    for p in rep.paths:
        say(f"wrote {p}")


@stack_app.command("up")
def stack_up(home: Optional[str] = None):
    from opd_ops import stack

    s = stack_settings(home=home)
    info = stack.up(s)
    for name, v in info.items():
        say(f"{name}: {v}")
    say(f"Prefect UI: {s.prefect_ui_url}")


@stack_app.command("down")
def stack_down(home: Optional[str] = None):
    from opd_ops import stack

    stopped = stack.down(stack_settings(home=home))
    say(f"stopped: {', '.join(stopped) or 'nothing (no service started by `opd stack up`)'}")


@stack_app.command("status")
def stack_status(home: Optional[str] = None):
    from opd_ops import stack

    st = stack.status(stack_settings(home=home))
    for name, v in st.items():
        say(f"{name}: {v}")
    if not all(v.get("healthy") for v in st.values()):
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


app.add_typer(registry_app, name="registry")

if __name__ == "__main__":
    main()
