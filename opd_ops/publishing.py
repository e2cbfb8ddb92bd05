"""Publishing a run's final student to the registry, once per run (a retry after success returns the
same version)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from opd.config import RunConfig
from opd.records import DONE, ModelRef, RunLayout, fresh
from opd.storage import make_client
from opd_ops.registry.client import RegistryUnavailable
from opd_ops.registry.store import publish


PUBLISHED_FILES_EXCLUDE = ("optimizer.pt", DONE)


def register(cfg: RunConfig, final: ModelRef, layout: RunLayout, lineage: dict) -> dict:
    """Publish the final student once per run (a retry after success returns the same version)."""
    marker = layout.registered
    if marker.is_file():
        return json.loads(marker.read_text())
    src = Path(final.path)
    staged = fresh(layout.publish)
    for f in src.iterdir():
        if f.is_file() and f.name not in PUBLISHED_FILES_EXCLUDE:
            try:  # a hard link: staging a 16 GB checkpoint should not double its disk use
                os.link(f, staged / f.name)
            except OSError:
                shutil.copy2(f, staged / f.name)
    s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
    try:  # the run key as claim token: a retry after a crash reuses (or returns) this run's version
        pub = publish(s3, cfg.registry.bucket, cfg.registry.prefix, cfg.registry.model_name, staged, lineage,
                      claim_token=lineage.get("run_key"))
    except RegistryUnavailable as e:
        if cfg.registry.endpoint_url is None:  # the local stack's: its message says how to start it
            raise
        # the user's own endpoint (loopback or not): `opd stack up` would not bring it back
        raise RegistryUnavailable(f"register: cannot reach S3 endpoint {cfg.registry.endpoint_url} "
                                  f"({type(e.__cause__ or e).__name__}); check registry.endpoint_url and that the "
                                  "endpoint is up (the task retries with backoff, tasks.registry_retries)") from e
    out = {"model": pub.model, "version": pub.version, "uri": pub.uri}
    marker.write_text(json.dumps(out))
    shutil.rmtree(staged, ignore_errors=True)  # the registry holds it now; the run keeps final.path
    return out
