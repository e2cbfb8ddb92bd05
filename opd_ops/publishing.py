"""Publishing a run's final student to the registry, once per run (a retry after success returns the
same version)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from opd.config import RunConfig
from opd.models import tokenizer_summary
from opd.records import DONE, ModelRef, RunLayout, fresh
from opd.storage import make_client
from opd_ops.registry.client import user_endpoint_advice
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
    # how to prompt it: the tokenizer's specials and chat template travel in the manifest, beside its files
    lineage = {**lineage, "tokenizer": tokenizer_summary(src)}
    s3 = make_client(cfg.registry.endpoint_url, cfg.registry.region)
    # the run key as claim token: a retry after a crash reuses (or returns) this run's version
    with user_endpoint_advice(cfg.registry.endpoint_url, "register"):
        pub = publish(s3, cfg.registry.bucket, cfg.registry.prefix, cfg.registry.model_name, staged, lineage,
                      claim_token=lineage.get("run_key"))
    out = {"model": pub.model, "version": pub.version, "uri": pub.uri}
    marker.write_text(json.dumps(out))
    shutil.rmtree(staged, ignore_errors=True)  # the registry holds it now; the run keeps final.path
    return out
