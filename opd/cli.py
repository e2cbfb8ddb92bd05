"""`opd` command line: run the distill flow, manage the local stack, browse the registry."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
stack_app = typer.Typer(no_args_is_help=True, help="Local Prefect server + SeaweedFS S3 (loopback only).")
app.add_typer(stack_app, name="stack")
# Wide when piped (logs, CI): a narrow default would truncate model names and URIs.
console = Console() if sys.stdout.isatty() else Console(width=200)


def _load(config: Path, overrides: list[str]):
    from opd.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)


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


@app.command()
def run(config: Path, set_: list[str] = typer.Option([], "--set", help="override, e.g. --set opd.rounds=3"),
        run_key: Optional[str] = typer.Option(None, help="reuse a run key to resume a crashed run")):
    """Run the distill flow on CONFIG against the Prefect server in PREFECT_API_URL (default: local stack)."""
    cfg = _load(config, set_)
    _point_at_stack(cfg)
    import urllib.request

    api = os.environ["PREFECT_API_URL"]
    try:
        urllib.request.urlopen(api.rstrip("/") + "/health", timeout=5)
    except OSError:
        console.print(f"[red]no Prefect server at {api}: run `opd stack up` (or set PREFECT_API_URL)[/red]")
        raise typer.Exit(2)
    from flows.distill import distill

    ui = os.environ.get("PREFECT_UI_URL", api.removesuffix("/api"))
    console.print(f"Watch: {ui}/runs  (the flow run's own link is logged as it starts: 'View at ...')\n"
                  f"Artifacts (rounds, gates, cost ledger, run report): {ui}/artifacts\n"
                  f"Run directory: {Path(cfg.home) / 'runs'}/<run key>", highlight=False, soft_wrap=True)
    state = distill(str(config), list(set_), run_key, return_state=True)
    fr_id = state.state_details.flow_run_id
    console.print(f"\nFlow run: {ui}/runs/flow-run/{fr_id}  state: [bold]{state.name}[/bold]")
    if not state.is_completed():
        console.print(f"[red]{state.message}[/red]")
        raise typer.Exit(1)
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
    console.print(f"Registered: {reg['uri']}  ({reg['model']}:{reg['version']})")
    if out.get("report"):
        console.print(f"Report: {out['report']}  (re-render: opd report {out['run_key']} --config {config})",
                      highlight=False, soft_wrap=True)


@app.command()
def promote(config: Path, ref: str = typer.Argument(..., help="MODEL:VERSION"),
            to: str = typer.Option(..., "--to", help="target alias, e.g. staging or production"),
            reason: str = typer.Option(..., "--reason"),
            set_: list[str] = typer.Option([], "--set", help="override, e.g. --set eval.gates.require_approval=true")):
    """Re-run the gates for ALIAS on MODEL:VERSION (and wait for approval if configured), then move it."""
    model, _, version = ref.partition(":")
    if not version.isdigit():
        console.print(f"[red]{ref!r}: expected MODEL:VERSION, e.g. addition-student:3[/red]")
        raise typer.Exit(2)
    cfg = _load(config, set_ + [f"registry.model_name={model}"])
    _point_at_stack(cfg)
    from flows.promote import promote as promote_flow

    state = promote_flow(str(config), int(version), to, reason, list(set_) + [f"registry.model_name={model}"],
                         return_state=True)
    api = os.environ["PREFECT_API_URL"]
    ui = os.environ.get("PREFECT_UI_URL", api.removesuffix("/api"))
    console.print(f"Flow run: {ui}/runs/flow-run/{state.state_details.flow_run_id}  state: [bold]{state.name}[/bold]")
    if not state.is_completed():
        console.print(f"[red]{state.message}[/red]")
        raise typer.Exit(1)
    console.print(f"{model}@{to} -> {model}:{version}")


@app.command()
def deploy(config: Path, set_: list[str] = typer.Option([], "--set", help="override baked into the deployment")):
    """Create/update the `distill` and `promote` deployments for CONFIG on its work pool."""
    cfg = _load(config, set_)
    _point_at_stack(cfg)
    from flows.deployments import deploy as deploy_flows

    for name, dep_id in deploy_flows(str(config), list(set_)).items():
        console.print(f"deployment {name}  id {dep_id}")
    console.print(f"start a worker:  prefect worker start --pool {cfg.deployment.work_pool}")
    console.print(f"trigger a run:   prefect deployment run 'distill/{cfg.name}'")


@app.command()
def report(target: str = typer.Argument(..., metavar="RUN_KEY_OR_MODEL",
                                        help="a run key under <home>/runs/, or MODEL, MODEL:N, MODEL@ALIAS"),
           config: Path = typer.Option(Path("configs/demo.yaml"), "--config", help="config naming home and registry"),
           set_: list[str] = typer.Option([], "--set", help="override, e.g. --set home=/data/opd"),
           out: Optional[Path] = typer.Option(None, "--out", help="output dir (default <home>/reports/<id>/)")):
    """Report a run (from its run directory) or a registered version: tables here, HTML + PNG plots on disk."""
    import re

    from opd import report as R

    cfg = _load(config, set_)
    rdir = Path(cfg.home) / "runs" / target
    if re.fullmatch(r"[A-Za-z0-9_.-]+", target) and target not in (".", "..") and rdir.is_dir():
        lineage, rid = R.lineage_from_run_dir(rdir), target
    else:
        from opd.cli_registry import _refusals
        from opd.registry.client import make_client

        console.print(f"no run directory {rdir}: reading {target} from the registry", style="dim",
                      highlight=False, soft_wrap=True)
        _point_at_stack(cfg)
        with _refusals():
            lineage = R.lineage_from_registry(make_client(cfg.registry.endpoint_url, cfg.registry.region),
                                              cfg.registry.bucket, cfg.registry.prefix, target)
        rid = f"{lineage['registered']['model']}-v{lineage['registered']['version']}"
    R.print_report(lineage, console)
    rep = R.build_report(lineage, out or Path(cfg.home) / "reports" / rid)
    console.print()
    for p in rep.paths:
        console.print(f"wrote {p}", highlight=False, soft_wrap=True)


@stack_app.command("up")
def stack_up(home: Optional[str] = None):
    from opd import stack

    s = _stack_settings(home=home)
    info = stack.up(s)
    for name, v in info.items():
        console.print(f"{name}: {v}")
    console.print(f"Prefect UI: {s.prefect_ui_url}")


@stack_app.command("down")
def stack_down(home: Optional[str] = None):
    from opd import stack

    stopped = stack.down(_stack_settings(home=home))
    console.print(f"stopped: {', '.join(stopped) or 'nothing (no service started by `opd stack up`)'}")


@stack_app.command("status")
def stack_status(home: Optional[str] = None):
    from opd import stack

    st = stack.status(_stack_settings(home=home))
    for name, v in st.items():
        console.print(f"{name}: {v}")
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
