"""The one learning-rate schedule for every update (teacher bootstrap, SFT, OPD)."""
from __future__ import annotations

import math


def lr_at(step: int, base: float, warmup_steps: int, total_steps: int | None = None) -> float:
    """Linear warmup over the first ``warmup_steps`` (Adam's first steps are sign-like: keep them small),
    then constant, or with ``total_steps`` a cosine decay to 10% of ``base`` at ``total_steps``."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if total_steps is None:
        return base
    frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
