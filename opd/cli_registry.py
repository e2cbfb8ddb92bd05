"""`opd registry ...`: browse the S3 model registry, pull / verify versions, move aliases.

Refs: MODEL (latest published), MODEL:VERSION, MODEL@ALIAS.  Every command exits 0 on success and
1 with a one-line reason on refusal, conflict or verification failure (no traceback).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from opd.cli import _load, _point_at_stack, console

registry_app = typer.Typer(no_args_is_help=True, help="Browse the S3 model registry, pull, verify, promote.")


ConfigOpt = typer.Option(Path("configs/demo.yaml"), "--config", help="config naming bucket/prefix/endpoint")
BucketOpt = typer.Option(None, "--bucket", help="override registry.bucket")
PrefixOpt = typer.Option(None, "--prefix", help="override registry.prefix")


def _target(config: Path, bucket: Optional[str], prefix: Optional[str]):
    """(s3 client, bucket, prefix) from the config plus overrides."""
    from opd.registry.client import make_client

    cfg = _load(config, [])
    _point_at_stack(cfg)
    return (make_client(cfg.registry.endpoint_url, cfg.registry.region), bucket or cfg.registry.bucket,
            prefix or cfg.registry.prefix)


def _fail(msg: str) -> None:
    console.print(msg, style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@contextlib.contextmanager
def _refusals():
    """Registry refusals, bad refs and S3 errors -> one red line and exit code 1."""
    from botocore.exceptions import BotoCoreError, ClientError

    from opd.registry.client import RegistryError

    try:
        yield
    except typer.Exit:
        raise
    except (RegistryError, ValueError) as e:
        _fail(str(e))
    except ClientError as e:
        err = e.response.get("Error", {})
        _fail(f"S3 error: {err.get('Code', '?')}: {err.get('Message', '')}".rstrip(": "))
    except (BotoCoreError, OSError) as e:
        _fail(f"registry error: {type(e).__name__}: {e}")


@registry_app.command("ls")
def registry_ls(model: Optional[str] = typer.Argument(None), config: Path = typer.Option(Path("configs/demo.yaml")),
                bucket: Optional[str] = None, prefix: Optional[str] = None):
    """List models, or the published versions of MODEL."""
    from opd.registry.client import RegistryError, make_client
    from opd.registry.aliases import list_aliases
    from opd.registry.store import list_models, list_versions, read_manifest

    cfg = _load(config, [])
    _point_at_stack(cfg)
    bucket, prefix = bucket or cfg.registry.bucket, prefix or cfg.registry.prefix
    s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
    try:
        models = [model] if model else list_models(s3, bucket, prefix)
        table = Table(title=f"s3://{bucket}/{prefix}")
        for c in ("model", "version", "aliases", "created_at", "accuracy", "reverse_kl", "files"):
            table.add_column(c)
        for m in models:
            by_version: dict[int, list[str]] = {}
            for a, st in list_aliases(s3, bucket, prefix, m).items():
                by_version.setdefault(st.version, []).append(a)
            for v in list_versions(s3, bucket, prefix, m):
                man = read_manifest(s3, bucket, prefix, m, v)
                res = (man.get("metrics") or {}).get("opd_student", {})
                table.add_row(m, str(v), ", ".join(by_version.get(v, [])), man.get("created_at", "")[:19], f"{res.get('accuracy', float('nan')):.3f}",
                              f"{res.get('reverse_kl', float('nan')):.4f}", str(len(man["files"])))
    except RegistryError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1)
    except Exception as e:  # botocore errors: one line, no traceback, no secrets
        console.print(f"[red]registry error: {type(e).__name__}: {e}[/red]")
        raise typer.Exit(1)
    console.print(table)


@registry_app.command("show")
def registry_show(ref: str = typer.Argument(..., help="MODEL, MODEL:VERSION or MODEL@ALIAS"),
                  config: Path = ConfigOpt, bucket: Optional[str] = BucketOpt, prefix: Optional[str] = PrefixOpt,
                  card: bool = typer.Option(False, "--card", help="print the version's README.md model card")):
    """Show one version: lineage, metrics, aliases and files."""
    from opd.registry.aliases import list_aliases, resolve
    from opd.registry.store import read_manifest

    s3, bucket, prefix = _target(config, bucket, prefix)
    with _refusals():
        model, version = resolve(s3, bucket, prefix, ref)
        man = read_manifest(s3, bucket, prefix, model, version)
        aliases = [a for a, st in list_aliases(s3, bucket, prefix, model).items() if st.version == version]
        if card:
            from opd.registry.store import _versions_prefix

            key = f"{_versions_prefix(prefix, model)}{version}/README.md"
            console.print(s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode(), markup=False,
                          highlight=False)
            return
    info = Table(title=f"{model}:{version}  s3://{bucket}/{prefix.strip('/')}/{model}/versions/{version}/",
                 show_header=False)
    info.add_column("key")
    info.add_column("value")
    for k in ("created_at", "run_key", "flow_run_id", "teacher", "teacher_params", "student_params",
              "dataset_fingerprint"):
        if man.get(k) is not None:
            info.add_row(k, str(man[k]))
    info.add_row("aliases", ", ".join(aliases) or "-")
    for name, m in (man.get("metrics") or {}).items():
        if isinstance(m, dict):
            info.add_row(f"metrics.{name}", ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in m.items()))
    gates = man.get("gates")
    if isinstance(gates, dict):
        info.add_row("gates", "passed" if gates.get("passed") else "failed")
    console.print(info)
    files = Table(title="files")
    for c in ("path", "size", "sha256"):
        files.add_column(c)
    for f in man["files"]:
        files.add_row(f["path"], str(f["size"]), f["sha256"][:16])
    console.print(files)


@registry_app.command("pull")
def registry_pull(ref: str = typer.Argument(..., help="MODEL, MODEL:VERSION or MODEL@ALIAS"),
                  dest: Path = typer.Argument(..., help="new directory to create"),
                  config: Path = ConfigOpt, bucket: Optional[str] = BucketOpt, prefix: Optional[str] = PrefixOpt):
    """Download a version into DEST, verifying every file's sha256 and size (all or nothing)."""
    from opd.registry.store import pull

    s3, bucket, prefix = _target(config, bucket, prefix)
    with _refusals():
        model, version, out = pull(s3, bucket, prefix, ref, dest)
    console.print(f"pulled {model}:{version} -> {out} (every file verified)", markup=False, soft_wrap=True)


@registry_app.command("verify")
def registry_verify(ref: str = typer.Argument(..., help="MODEL, MODEL:VERSION or MODEL@ALIAS"),
                    config: Path = ConfigOpt, bucket: Optional[str] = BucketOpt, prefix: Optional[str] = PrefixOpt):
    """Check every file of a version against its manifest (sha256 and size) in S3."""
    from opd.registry.aliases import resolve
    from opd.registry.store import verify

    s3, bucket, prefix = _target(config, bucket, prefix)
    with _refusals():
        model, version = resolve(s3, bucket, prefix, ref)
        problems = verify(s3, bucket, prefix, model, version)
    if problems:
        _fail(f"{model}:{version} failed verification: " + "; ".join(problems))
    console.print(f"{model}:{version}: every file matches its manifest", markup=False)


@registry_app.command("promote")
def registry_promote(ref: str = typer.Argument(..., help="MODEL:VERSION to point the alias at"),
                     to: str = typer.Option(..., "--to", help="alias to move, e.g. production"),
                     reason: str = typer.Option(..., "--reason", help="why (recorded in the audit log)"),
                     config: Path = ConfigOpt, bucket: Optional[str] = BucketOpt, prefix: Optional[str] = PrefixOpt):
    """Move ALIAS to MODEL:VERSION (refused if that version is not published or the alias moved meanwhile)."""
    from opd.registry.aliases import parse_ref, promote, read_alias

    s3, bucket, prefix = _target(config, bucket, prefix)
    with _refusals():
        model, alias, version = parse_ref(ref)
        if version is None:
            raise ValueError(f"promote needs an explicit version: MODEL:VERSION, not {ref!r}")
        before = read_alias(s3, bucket, prefix, model, to)
        st = promote(s3, bucket, prefix, model, version, to, reason=reason, expected=before)
    was = f"v{before.version}" if before else "unset"
    console.print(f"{model}@{to}: {was} -> v{st.version} (by {st.by})", markup=False, soft_wrap=True)


@registry_app.command("audit")
def registry_audit(model: str = typer.Argument(...), config: Path = ConfigOpt, bucket: Optional[str] = BucketOpt,
                   prefix: Optional[str] = PrefixOpt):
    """The audit log of MODEL, oldest first: who did what, when, why."""
    from opd.registry.aliases import audit

    s3, bucket, prefix = _target(config, bucket, prefix)
    with _refusals():
        events = audit(s3, bucket, prefix, model)
    table = Table(title=f"audit: {model}")
    for c in ("at", "by", "action", "alias", "from", "to", "reason"):
        table.add_column(c)
    for e in events:
        table.add_row(str(e.get("at", ""))[:19], str(e.get("by", "")), str(e.get("action", "")),
                      str(e.get("alias") or ""), "-" if e.get("from") is None else str(e["from"]),
                      "-" if e.get("to") is None else str(e["to"]), str(e.get("reason", "")))
    console.print(table)
