"""transformers `generate` sampler behind the Sampler interface, for models vLLM cannot load."""
from __future__ import annotations

import torch

from opd.generation import generate, stop_ids
from opd.logprobs import score_completions
from opd.models import load_model, pick_device
from opd.rollouts import Rollout
from opd.sampling.base import Weights


class HFSampler:
    def __init__(self, model_dir: str, eos_id: int, device: str | None = None, dtype: str = "float32"):
        self.device = pick_device(device or "auto")
        self.dtype = dtype
        self.weights, self.version = Weights(str(model_dir)), 0
        self.model = load_model(model_dir, self.device, dtype=dtype)
        self.eos_id = eos_id
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else eos_id

    @property
    def stops(self) -> tuple[int, ...]:
        """The tokens ``generate`` ends a completion at, for ``finished``: those of the model now served."""
        return stop_ids(self.eos_id, self.model.generation_config.eos_token_id)

    def sample(self, prompts, n, max_tokens, seed=None, temperature=1.0, top_p=1.0) -> list[Rollout]:
        comps = generate(self.model, prompts, self.eos_id, self.pad_id, max_tokens, temperature, top_p, n, seed=seed)
        expanded = [p for p in prompts for _ in range(n)]
        # logprobs of the untempered distribution, as vLLM reports them
        lps = score_completions(self.model, expanded, comps, self.pad_id, device=self.device)
        stops = self.stops
        return [Rollout(i // n, list(p), c, lp, bool(c) and c[-1] in stops)
                for i, (p, c, lp) in enumerate(zip(expanded, comps, lps))]

    def publish(self, weights: Weights) -> int:
        if weights.adapter:
            raise RuntimeError("the hf sampler serves full weights only (opd.lora needs opd.sampler=vllm)")
        self.model = load_model(weights.path, self.device, dtype=self.dtype)
        self.weights, self.version = weights, self.version + 1
        return self.version

    def close(self) -> None:
        self.model = None
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
