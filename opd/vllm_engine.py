"""Starting and stopping an offline vLLM engine: shared by the sampler and the vLLM teacher.

Prompts always go in as token ids (`skip_tokenizer_init`): the tokenizer that matters is the
trainer's, and vLLM never re-tokenizes text behind our back.
"""
from __future__ import annotations

import gc
import os

# vLLM logs every weight reload at INFO; a run with hundreds of syncs would drown in them.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def start_llm(model_dir: str, *, seed: int, max_model_len: int, dtype: str = "float32",
              gpu_memory_utilization: float = 0.5, kv_cache_gib: int = 1, enforce_eager: bool = True,
              trust_remote_code: bool = False):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    from vllm import LLM

    return LLM(model=str(model_dir), skip_tokenizer_init=True, dtype=dtype, seed=seed,
               max_model_len=max_model_len, enforce_eager=enforce_eager,
               gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code)


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
