from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Rollout:
    """One sampled completion: token ids after the prompt and the sampler's logprob of each."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]
    finished: bool  # ended with EOS (not cut at max_tokens)


class Sampler(Protocol):
    def sample(self, prompts: list[list[int]], n: int, max_tokens: int, temperature: float = 1.0,
               top_p: float = 1.0, seed: int | None = None) -> list[Rollout]: ...

    def update_weights(self, model_dir: str) -> None: ...

    def close(self) -> None: ...


def make_sampler(kind: str, model_dir: str, eos_id: int, **kw) -> "Sampler":
    """Chosen by config, never silently: an unknown kind or an engine that fails is an error."""
    if kind == "vllm":
        from opd.sampling.vllm_sampler import VLLMSampler

        return VLLMSampler(model_dir, eos_id=eos_id, **kw)
    if kind == "hf":
        from opd.sampling.hf_sampler import HFSampler

        return HFSampler(model_dir, eos_id=eos_id, **{k: v for k, v in kw.items() if k in ("device",)})
    raise ValueError(f"opd.sampler={kind!r}: choose 'vllm' or 'hf'")
