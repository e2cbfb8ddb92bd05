"""The sampler role: draw completions from the current student (keeping the sampler's own log-probs),
and take new weights as they are published."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from opd.rollouts import Rollout


@dataclass(frozen=True)
class Weights:
    """A student's weights where an engine can read them: a full checkpoint, or LoRA adapters trained on
    top of the weights the engine already serves."""

    path: str
    adapter: bool = False


class Sampler(Protocol):
    weights: Weights  # what the sampler serves now
    version: int  # bumped by every publish

    def sample(self, prompts: list[list[int]], n: int, max_tokens: int, seed: int | None = None,
               temperature: float = 1.0, top_p: float = 1.0) -> list[Rollout]: ...

    def publish(self, weights: Weights) -> int:
        """Serve ``weights`` from now on (reloaded in place, a restarted engine, or adapters); the new version."""
        ...

    def close(self) -> None: ...
