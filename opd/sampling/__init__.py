"""Samplers: draw completions from the current student, keeping the sampler's own logprobs."""
from opd.sampling.base import Rollout, Sampler, make_sampler

__all__ = ["Rollout", "Sampler", "make_sampler"]
