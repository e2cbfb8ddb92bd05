"""The CLI's console and the helpers every command shares: literal printing, one refusal path, config
loading, the stack's endpoints, and registry errors turned into one line."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

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


def load_config_or_exit(config: Path, overrides: list[str]):
    from opd.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as e:
        fail(str(e), 2)


def checked(check, *args, field: str = "", code: int = 2):
    """``check(*args)``, or a refusal (prefixed with the option ``field``) when it raises ValueError."""
    try:
        return check(*args)
    except ValueError as e:
        fail(f"{field}: {e}" if field else str(e), code)


def stack_settings(cfg=None, home: str | None = None):
    from opd_ops.stack import StackSettings

    if cfg is None:
        return StackSettings(home=Path(home or os.environ.get("OPD_HOME", ".opd")))
    return StackSettings(home=Path(cfg.home), host=cfg.stack.host, prefect_port=cfg.stack.prefect_port,
                         s3_port=cfg.stack.s3_port)


def point_at_stack(cfg) -> None:
    """Clients talk to the local stack unless the environment already names a server."""
    from opd_ops.stack import stack_env

    for k, v in stack_env(stack_settings(cfg)).items():
        os.environ.setdefault(k, v)


def prefect_api() -> str:
    """PREFECT_API_URL, once its server answers; exit 2 with the fix otherwise."""
    import urllib.request

    from opd_ops.registry.client import is_loopback

    api = os.environ["PREFECT_API_URL"]
    try:
        urllib.request.urlopen(api.rstrip("/") + "/health", timeout=5)
    except (OSError, ValueError):
        fail(f"no Prefect server at {api}: " + ("run `opd stack up` (or set PREFECT_API_URL)" if is_loopback(api)
                                                else "check PREFECT_API_URL and that the server is up"), 2)
    return api


def ui_url(api: str) -> str:
    return os.environ.get("PREFECT_UI_URL", api.removesuffix("/api"))


def flow_outcome(state, ui: str) -> None:
    """The flow run's link and state; its failure message (data, paths, errors: printed literally) exits 1."""
    say(Text.assemble(f"Flow run: {ui}/runs/flow-run/{state.state_details.flow_run_id}  state: ",
                      (state.name, "bold")))
    if not state.is_completed():
        fail(state.message or f"flow run ended {state.name}")


def promote_args(ref: str, to: str, reason: str, code: int = 2) -> tuple[str, int]:
    """(model, version) from MODEL:VERSION, with the alias and reason checked before any work."""
    from opd_ops.registry.refs import parse_ref
    from opd.names import validate_alias_name

    model, alias, version = checked(parse_ref, ref, code=code)
    if alias is not None or version is None:
        fail(f"{ref!r}: expected MODEL:VERSION, e.g. addition-student:3", code)
    checked(validate_alias_name, to, field="--to", code=code)
    if not reason.strip():
        fail("--reason: say why the alias moves (it is recorded in the audit log)", code)
    return model, version


@contextlib.contextmanager
def refusals(s3=None):
    """Registry refusals, bad refs and S3 errors -> one red line and exit code 1.

    With `s3`, an endpoint that does not answer is named with what to check (the local stack is
    suggested only when the endpoint is loopback)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from opd_ops.registry.client import RegistryError, named_s3_errors

    try:
        with named_s3_errors(s3, "registry") if s3 is not None else contextlib.nullcontext():
            yield
    except typer.Exit:
        raise
    except (RegistryError, ValueError) as e:
        fail(str(e))
    except ClientError as e:
        err = e.response.get("Error", {})
        fail(f"S3 error: {err.get('Code', '?')}: {err.get('Message', '')}".rstrip(": "))
    except (BotoCoreError, OSError) as e:  # botocore's messages can span lines: keep it to one
        fail(f"registry error: {type(e).__name__}: {' '.join(str(e).split())}")
