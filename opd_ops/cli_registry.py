"""`opd registry ...`: browse the S3 model registry, pull / verify versions, move aliases.

Refs: MODEL (latest published), MODEL:VERSION, MODEL@ALIAS.  Every command exits 0 on success and
1 with a one-line reason on refusal, conflict or verification failure (no traceback).  Names, keys
and reasons read from S3 are printed literally (the CLI console has markup off).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from opd_ops.console import console, fail, load_config_or_exit, point_at_stack, promote_args, refusals, say

registry_app = typer.Typer(no_args_is_help=True, help="Browse the S3 model registry, pull, verify, promote.")


ConfigOpt = typer.Option(Path("configs/demo.yaml"), "--config", help="config naming bucket/prefix/endpoint")
BucketOpt = typer.Option(None, "--bucket", help="override registry.bucket")
PrefixOpt = typer.Option(None, "--prefix", help="override registry.prefix")


def _target(config: Path, bucket: Optional[str], prefix: Optional[str]):
    """(s3 client, bucket, prefix) from the config; --bucket / --prefix go in as overrides (JSON-quoted,
    so '[/x]' stays a string), which the config schema checks like the config's own values."""
    import json

    from opd.storage import make_client

    given = (("bucket", bucket), ("prefix", prefix))
    cfg = load_config_or_exit(config, [f"registry.{k}={json.dumps(v)}" for k, v in given if v is not None])
    point_at_stack(cfg)
    return make_client(cfg.registry.endpoint_url, cfg.registry.region), cfg.registry.bucket, cfg.registry.prefix


@registry_app.command("ls")
def registry_ls(model: Optional[str] = typer.Argument(None), config: Path = ConfigOpt,
                bucket: Optional[str] = BucketOpt, prefix: Optional[str] = PrefixOpt):
    """List models, or the published versions of MODEL."""
    from opd_ops.registry.aliases import list_aliases
    from opd_ops.registry.s3io import require_model
    from opd_ops.registry.store import list_models, list_versions, read_manifest

    s3, bucket, prefix = _target(config, bucket, prefix)
    table = Table(title=f"s3://{bucket}/{prefix}")
    for c in ("model", "version", "aliases", "created_at", "accuracy", "reverse_kl", "files"):
        table.add_column(c)
    with refusals(s3):
        if model:
            require_model(s3, bucket, prefix, model)
        for m in [model] if model else list_models(s3, bucket, prefix):
            by_version: dict[int, list[str]] = {}
            for a, st in list_aliases(s3, bucket, prefix, m).items():
                by_version.setdefault(st.version, []).append(a)
            for v in list_versions(s3, bucket, prefix, m):
                man = read_manifest(s3, bucket, prefix, m, v)
                res = (man.get("metrics") or {}).get("opd_student", {})
                table.add_row(m, str(v), ", ".join(by_version.get(v, [])), str(man.get("created_at", ""))[:19],
                              f"{res.get('accuracy', float('nan')):.3f}", f"{res.get('reverse_kl', float('nan')):.4f}",
                              str(len(man["files"])))
    console.print(table)


@registry_app.command("show")
def registry_show(ref: str = typer.Argument(..., help="MODEL, MODEL:VERSION or MODEL@ALIAS"),
                  config: Path = ConfigOpt, bucket: Optional[str] = BucketOpt, prefix: Optional[str] = PrefixOpt,
                  card: bool = typer.Option(False, "--card", help="print the version's README.md model card")):
    """Show one version: lineage, metrics, aliases and files."""
    from opd_ops.registry.aliases import list_aliases
    from opd_ops.registry.refs import resolve
    from opd_ops.registry.store import read_manifest

    s3, bucket, prefix = _target(config, bucket, prefix)
    with refusals(s3):
        model, version = resolve(s3, bucket, prefix, ref)
        man = read_manifest(s3, bucket, prefix, model, version)
        aliases = [a for a, st in list_aliases(s3, bucket, prefix, model).items() if st.version == version]
        if card:
            from opd_ops.registry.s3io import versions_prefix

            key = f"{versions_prefix(prefix, model)}{version}/README.md"
            console.print(s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode())
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
    from opd_ops.registry.refs import pull

    s3, bucket, prefix = _target(config, bucket, prefix)
    with refusals(s3):
        model, version, out = pull(s3, bucket, prefix, ref, dest)
    say(f"pulled {model}:{version} -> {out} (every file verified)")


@registry_app.command("verify")
def registry_verify(ref: str = typer.Argument(..., help="MODEL, MODEL:VERSION or MODEL@ALIAS"),
                    config: Path = ConfigOpt, bucket: Optional[str] = BucketOpt, prefix: Optional[str] = PrefixOpt):
    """Check every file of a version against its manifest (sha256 and size) in S3."""
    from opd_ops.registry.refs import resolve
    from opd_ops.registry.store import verify

    s3, bucket, prefix = _target(config, bucket, prefix)
    with refusals(s3):
        model, version = resolve(s3, bucket, prefix, ref)
        problems = verify(s3, bucket, prefix, model, version)
    if problems:
        fail(f"{model}:{version} failed verification: " + "; ".join(problems))
    say(f"{model}:{version}: every file matches its manifest")


@registry_app.command("promote")
def registry_promote(ref: str = typer.Argument(..., help="MODEL:VERSION to point the alias at"),
                     to: str = typer.Option(..., "--to", help="alias to move, e.g. production"),
                     reason: str = typer.Option(..., "--reason", help="why (recorded in the audit log)"),
                     no_verify: bool = typer.Option(False, "--no-verify",
                                                    help="skip checking the version's files against its manifest"),
                     config: Path = ConfigOpt, bucket: Optional[str] = BucketOpt, prefix: Optional[str] = PrefixOpt):
    """Move ALIAS to MODEL:VERSION after checking its files (refused if unpublished, corrupt, or the alias moved)."""
    from opd_ops.registry.aliases import promote, read_alias
    from opd_ops.registry.refs import resolve
    from opd_ops.registry.store import verify

    model, version = promote_args(ref, to, reason, code=1)  # before the config or S3 is touched
    s3, bucket, prefix = _target(config, bucket, prefix)
    with refusals(s3):
        resolve(s3, bucket, prefix, f"{model}:{version}")
        problems = [] if no_verify else verify(s3, bucket, prefix, model, version)
        if problems:
            fail(f"{model}:{version} failed verification ({'; '.join(problems)}); {model}@{to} not moved "
                 "(--no-verify skips this check)")
        before = read_alias(s3, bucket, prefix, model, to)
        st = promote(s3, bucket, prefix, model, version, to, reason=reason, expected=before)
    was = f"v{before.version}" if before else "unset"
    say(f"{model}@{to}: {was} -> v{st.version} (by {st.by})")


@registry_app.command("gc")
def registry_gc(model: str = typer.Argument(...),
                older_than: float = typer.Option(86400, "--older-than", min=0, metavar="SECONDS",
                                                 help="only versions idle this long (keep it above the longest "
                                                      "publish: a live publisher's claim looks the same)"),
                config: Path = ConfigOpt, bucket: Optional[str] = BucketOpt, prefix: Optional[str] = PrefixOpt):
    """Delete MODEL's aborted publishes: versions with a claim (and maybe partial files) but no manifest."""
    from opd_ops.registry.s3io import require_model
    from opd_ops.registry.store import gc_orphans

    s3, bucket, prefix = _target(config, bucket, prefix)
    with refusals(s3):
        require_model(s3, bucket, prefix, model)
        deleted = gc_orphans(s3, bucket, prefix, model, older_than)
    if not deleted:
        say(f"{model}: no unpublished version idle for more than {older_than:g} s; nothing deleted")
    else:
        say(f"{model}: deleted unpublished versions {', '.join(str(v) for v in deleted)} "
            f"(claimed, never given a manifest, idle > {older_than:g} s)")


@registry_app.command("audit")
def registry_audit(model: str = typer.Argument(...), config: Path = ConfigOpt, bucket: Optional[str] = BucketOpt,
                   prefix: Optional[str] = PrefixOpt):
    """The audit log of MODEL, oldest first: who did what, when, why."""
    from opd_ops.registry.audit import audit

    s3, bucket, prefix = _target(config, bucket, prefix)
    with refusals(s3):
        events = audit(s3, bucket, prefix, model)
    table = Table(title=f"audit: {model}")
    for c in ("at", "by", "action", "alias", "from", "to", "reason"):
        table.add_column(c)
    for e in events:
        table.add_row(str(e.get("at", ""))[:19], str(e.get("by", "")), str(e.get("action", "")),
                      str(e.get("alias") or ""), "-" if e.get("from") is None else str(e["from"]),
                      "-" if e.get("to") is None else str(e["to"]), str(e.get("reason", "")))
    console.print(table)
