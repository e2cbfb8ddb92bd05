"""`opd` command line: run the distill flow, manage the local stack, browse the registry."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Locals in a traceback can hold credentials: never print them.
app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_show_locals=False)
stack_app = typer.Typer(no_args_is_help=True, help="Local Prefect server + SeaweedFS S3 (loopback only).")
app.add_typer(stack_app, name="stack")
# Markup off for everything this console prints (tables and titles included): model names, keys,
# config errors and data rows are printed as they are, so a '[/x]' in them can neither raise
# MarkupError nor style the output. Our own styling goes through style= or rich.text.Text.
# Wide when piped (logs, CI): a narrow default would truncate model names and URIs.
console = Console(markup=False, highlight=False, **({} if sys.stdout.isatty() else {"width": 200}))


def say(text: str | Text, style: str | None = None) -> None:
    """One line (or block) of output, printed literally, never wrapped mid-URI."""
    console.print(text, style=style, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """The one refusal path: a red message, exit ``code`` (2: bad usage or config, 1: refused or failed)."""
    say(message, "red")
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str]):
    from opd.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as e:
        fail(str(e), 2)


def _checked(check, *args, field: str = "", code: int = 2):
    """``check(*args)``, or a refusal (prefixed with the option ``field``) when it raises ValueError."""
    try:
        return check(*args)
    except ValueError as e:
        fail(f"{field}: {e}" if field else str(e), code)


def _stack_settings(cfg=None, home: str | None = None):
    from opd.stack import StackSettings

    if cfg is None:
        return StackSettings(home=Path(home or os.environ.get("OPD_HOME", ".opd")))
    return StackSettings(home=Path(cfg.home), host=cfg.stack.host, prefect_port=cfg.stack.prefect_port,
                         s3_port=cfg.stack.s3_port)


def _point_at_stack(cfg) -> None:
    """Clients talk to the local stack unless the environment already names a server."""
    from opd.stack import stack_env

    for k, v in stack_env(_stack_settings(cfg)).items():
        os.environ.setdefault(k, v)


def _prefect_api() -> str:
    """PREFECT_API_URL, once its server answers; exit 2 with the fix otherwise."""
    import urllib.request

    from opd.registry.client import is_loopback

    api = os.environ["PREFECT_API_URL"]
    try:
        urllib.request.urlopen(api.rstrip("/") + "/health", timeout=5)
    except (OSError, ValueError):
        fail(f"no Prefect server at {api}: " + ("run `opd stack up` (or set PREFECT_API_URL)" if is_loopback(api)
                                                else "check PREFECT_API_URL and that the server is up"), 2)
    return api


def _ui(api: str) -> str:
    return os.environ.get("PREFECT_UI_URL", api.removesuffix("/api"))


def _flow_outcome(state, ui: str) -> None:
    """The flow run's link and state; its failure message (data, paths, errors: printed literally) exits 1."""
    say(Text.assemble(f"Flow run: {ui}/runs/flow-run/{state.state_details.flow_run_id}  state: ",
                      (state.name, "bold")))
    if not state.is_completed():
        fail(state.message or f"flow run ended {state.name}")


@app.command()
def run(config: Path, set_: list[str] = typer.Option([], "--set", help="override, e.g. --set opd.rounds=3"),
        run_key: Optional[str] = typer.Option(None, help="reuse a run key to resume a crashed run")):
    """Run the distill flow on CONFIG against the Prefect server in PREFECT_API_URL (default: local stack)."""
    from opd.paths import check_name

    if run_key is not None:
        _checked(check_name, run_key, "--run-key")
    cfg = _load(config, set_)
    _point_at_stack(cfg)
    api = _prefect_api()
    from flows.distill import distill

    ui = _ui(api)
    say(f"Watch: {ui}/runs  (the flow run's own link is logged as it starts: 'View at ...')\n"
        f"Artifacts (rounds, gates, cost ledger, run report): {ui}/artifacts\n"
        f"Run directory: {Path(cfg.home) / 'runs'}/<run key>")
    state = distill(str(config), list(set_), run_key, return_state=True)
    say("")
    _flow_outcome(state, ui)
    out = state.result()
    table = Table(title="Held-out evaluation")
    table.add_column("model")
    table.add_column("accuracy (greedy)", justify="right")
    table.add_column("accuracy (sampled, T=1)", justify="right")
    table.add_column("mean reverse KL / token", justify="right")
    labels = {"teacher": "teacher", "sft_student": "student after SFT", "opd_student": "student after OPD"}
    for k, v in out["results"].items():
        sampled = v.get("sampled_accuracy")
        table.add_row(labels.get(k, k), f"{v['accuracy']:.3f}", "-" if sampled is None else f"{sampled:.3f}",
                      f"{v['reverse_kl']:.4f}")
    console.print(table)
    reg = out["registry"]
    say(f"Registered: {reg['uri']}  ({reg['model']}:{reg['version']})")
    if out.get("report"):
        say(f"Report: {out['report']}  (re-render: opd report {out['run_key']} --config {config})")


def promote_args(ref: str, to: str, reason: str, code: int = 2) -> tuple[str, int]:
    """(model, version) from MODEL:VERSION, with the alias and reason checked before any work."""
    from opd.registry.aliases import parse_ref
    from opd.registry.names import validate_alias_name

    model, alias, version = _checked(parse_ref, ref, code=code)
    if alias is not None or version is None:
        fail(f"{ref!r}: expected MODEL:VERSION, e.g. addition-student:3", code)
    _checked(validate_alias_name, to, field="--to", code=code)
    if not reason.strip():
        fail("--reason: say why the alias moves (it is recorded in the audit log)", code)
    return model, version


@app.command()
def promote(config: Path, ref: str = typer.Argument(..., help="MODEL:VERSION"),
            to: str = typer.Option(..., "--to", help="target alias, e.g. staging or production"),
            reason: str = typer.Option(..., "--reason"),
            set_: list[str] = typer.Option([], "--set", help="override, e.g. --set eval.gates.require_approval=true")):
    """Re-run the gates for ALIAS on MODEL:VERSION (and wait for approval if configured), then move it."""
    from opd.cli_registry import _refusals
    from opd.registry.aliases import resolve
    from opd.registry.client import make_client

    model, version = promote_args(ref, to, reason)
    overrides = list(set_) + [f"registry.model_name={model}"]
    cfg = _load(config, overrides)
    _point_at_stack(cfg)
    s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
    with _refusals(s3):  # a version that is not published is refused here, not minutes into the flow
        resolve(s3, cfg.registry.bucket, cfg.registry.prefix, f"{model}:{version}")
    api = _prefect_api()
    from flows.promote import promote as promote_flow

    state = promote_flow(str(config), version, to, reason, overrides, return_state=True)
    _flow_outcome(state, _ui(api))
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
    cfg = _load(config, set_)
    _point_at_stack(cfg)
    _prefect_api()
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
    cfg = _load(config, set_)
    if pool is not None:
        from opd.paths import check_name

        _checked(check_name, pool, "--pool")
    pool = pool or cfg.deployment.work_pool
    _point_at_stack(cfg)
    _prefect_api()
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
    from opd import report as R
    from opd.paths import check_name, within

    cfg = _load(config, set_)
    rdir = _run_dir_of(cfg.home, target)
    if rdir is not None and rdir.is_dir():
        lineage, rid = R.lineage_from_run_dir(rdir), target
    else:
        from opd.cli_registry import _refusals
        from opd.registry.client import make_client

        if rdir is not None:
            say(f"no run directory {rdir}: reading {target} from the registry", "dim")
        _point_at_stack(cfg)
        s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
        with _refusals(s3):
            lineage = R.lineage_from_registry(s3, cfg.registry.bucket, cfg.registry.prefix, target)
        rid = f"{lineage['registered']['model']}-v{lineage['registered']['version']}"
    R.print_report(lineage, console)
    rep = R.build_report(lineage, out or within(Path(cfg.home) / "reports", check_name(rid, "report id")))
    say("")
    for p in rep.paths:
        say(f"wrote {p}")


@stack_app.command("up")
def stack_up(home: Optional[str] = None):
    from opd import stack

    s = _stack_settings(home=home)
    info = stack.up(s)
    for name, v in info.items():
        say(f"{name}: {v}")
    say(f"Prefect UI: {s.prefect_ui_url}")


@stack_app.command("down")
def stack_down(home: Optional[str] = None):
    from opd import stack

    stopped = stack.down(_stack_settings(home=home))
    say(f"stopped: {', '.join(stopped) or 'nothing (no service started by `opd stack up`)'}")


@stack_app.command("status")
def stack_status(home: Optional[str] = None):
    from opd import stack

    st = stack.status(_stack_settings(home=home))
    for name, v in st.items():
        say(f"{name}: {v}")
    if not all(v.get("healthy") for v in st.values()):
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":
    # `python -m opd.cli`: this file runs as __main__, a second copy of opd.cli. Hand over to the
    # package module, so opd.cli_registry imports one fully built opd.cli (no import cycle).
    from opd.cli import main as _package_main

    _package_main()
else:
    from opd.cli_registry import registry_app  # noqa: E402  (it imports helpers above)

    app.add_typer(registry_app, name="registry")
