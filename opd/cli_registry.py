"""`opd registry ...`: browse the S3 model registry."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from opd.cli import _load, _point_at_stack, console

registry_app = typer.Typer(no_args_is_help=True, help="Browse the S3 model registry.")


@registry_app.command("ls")
def registry_ls(model: Optional[str] = typer.Argument(None), config: Path = typer.Option(Path("configs/demo.yaml")),
                bucket: Optional[str] = None, prefix: Optional[str] = None):
    """List models, or the published versions of MODEL."""
    from opd.registry.client import RegistryError, make_client
    from opd.registry.store import list_models, list_versions, read_manifest

    cfg = _load(config, [])
    _point_at_stack(cfg)
    bucket, prefix = bucket or cfg.registry.bucket, prefix or cfg.registry.prefix
    s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
    try:
        models = [model] if model else list_models(s3, bucket, prefix)
        table = Table(title=f"s3://{bucket}/{prefix}")
        for c in ("model", "version", "created_at", "accuracy", "reverse_kl", "files"):
            table.add_column(c)
        for m in models:
            for v in list_versions(s3, bucket, prefix, m):
                man = read_manifest(s3, bucket, prefix, m, v)
                res = (man.get("metrics") or {}).get("opd_student", {})
                table.add_row(m, str(v), man.get("created_at", "")[:19], f"{res.get('accuracy', float('nan')):.3f}",
                              f"{res.get('reverse_kl', float('nan')):.4f}", str(len(man["files"])))
    except RegistryError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1)
    except Exception as e:  # botocore errors: one line, no traceback, no secrets
        console.print(f"[red]registry error: {type(e).__name__}: {e}[/red]")
        raise typer.Exit(1)
    console.print(table)
