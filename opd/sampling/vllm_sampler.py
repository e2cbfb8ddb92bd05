"""vLLM sampler, kept alive across OPD rounds; published weights are loaded in place.

The engine reads a published safetensors checkpoint itself (``reload_weights(weights_path=...)`` on
every worker via ``collective_rpc``), so no engine restart and no tensor copy through the driver.
``weight_sync="restart"`` rebuilds the engine instead, for engines where in-place reload is not
supported. Published LoRA adapters are served on top of the engine's weights (a new adapter id each).
"""
from __future__ import annotations

from opd.generation import checkpoint_stop_ids
from opd.rollouts import Rollout
from opd.sampling.base import Weights
from opd.vllm_engine import shutdown_llm, start_llm


class VLLMSampler:
    def __init__(self, model_dir: str, eos_id: int, max_model_len: int = 256, seed: int = 0,
                 weight_sync: str = "inplace", gpu_memory_utilization: float = 0.5,
                 kv_cache_gib: int = 1, device: str | None = None, tensor_parallel_size: int = 1,
                 lora_rank: int | None = None, dtype: str = "float32", enforce_eager: bool = True):
        self.weights, self.version = Weights(str(model_dir)), 0
        self.eos_id = eos_id
        self.stops = checkpoint_stop_ids(model_dir, eos_id)  # vLLM adds the same EOS ids; `finished` must know them
        self.max_model_len = max_model_len
        self.seed = seed
        self.weight_sync = weight_sync
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_gib = kv_cache_gib
        self.tensor_parallel_size = tensor_parallel_size
        self.lora_rank = lora_rank
        self.dtype, self.enforce_eager = dtype, enforce_eager
        self.lora_request = None  # the adapters sampled with, on top of the engine's weights
        self._lora_ids = 0
        self.llm = self._start()

    def _start(self):
        return start_llm(self.weights.path, seed=self.seed, max_model_len=self.max_model_len, dtype=self.dtype,
                         enforce_eager=self.enforce_eager,
                         gpu_memory_utilization=self.gpu_memory_utilization, kv_cache_gib=self.kv_cache_gib,
                         tensor_parallel_size=self.tensor_parallel_size, max_lora_rank=self.lora_rank)

    def sample(self, prompts: list[list[int]], n: int, max_tokens: int, seed: int | None = None,
               temperature: float = 1.0, top_p: float = 1.0) -> list[Rollout]:
        from vllm import SamplingParams

        # One seed per prompt: a single seeded SamplingParams gives every request the same random
        # stream, so samples across prompts would be correlated (8 prompts x 2 gave 3 distinct).
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                                 seed=None if seed is None else seed + i, stop_token_ids=list(self.stops),
                                 detokenize=False) for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                 lora_request=self.lora_request)
        rollouts = []
        for i, out in enumerate(outs):
            for comp in out.outputs:
                ids = list(comp.token_ids)
                lps = [lp[t].logprob for t, lp in zip(ids, comp.logprobs)]
                rollouts.append(Rollout(i, list(prompts[i]), ids, lps,
                                        finished=bool(ids) and ids[-1] in self.stops))
        return rollouts

    def publish(self, weights: Weights) -> int:
        """Full weights: reloaded in place (or the engine restarted); adapters: served on top of the
        engine's weights from the next ``sample``, each under a new id so vLLM loads the files afresh
        rather than serving a cached older step."""
        if weights.adapter:
            if not self.lora_rank:
                raise RuntimeError("this sampler was started without LoRA (lora_rank); set opd.lora")
            from vllm.lora.request import LoRARequest

            self._lora_ids += 1
            self.lora_request = LoRARequest(f"student-{self._lora_ids}", self._lora_ids, weights.path)
        else:
            self.lora_request = None  # adapters were trained on the old weights
            if self.weight_sync == "restart":
                self.close()
                self.weights = weights
                self.llm = self._start()
            else:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": weights.path})
                self.llm.reset_prefix_cache()
        self.weights, self.version = weights, self.version + 1
        return self.version

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        shutdown_llm(llm)
