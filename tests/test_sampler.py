"""VLLMSampler (one engine for the module) against transformers: in-place weight sync, n samples,
EOS/max_tokens handling, seeding; and HFSampler's Rollouts."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from opd.config import ModelSpec  # noqa: E402
from opd.models import build_char_tokenizer, build_llama, load_model, save_model  # noqa: E402
from opd.logprobs import score_completions  # noqa: E402
from opd.sampling.base import Weights  # noqa: E402

MAX_LEN = 64
MAX_TOKENS = 12
N = 4
TOL = 1e-3
EOS, PAD = 2, 0
PROMPTS = [[1, 5, 6, 7], [1, 4, 4], [1, 9, 10, 11, 12], [1]]


@pytest.fixture(scope="module")
def student_dirs(tmp_path_factory):
    """(old, new): a tiny student and a perturbed copy whose logprobs clearly differ."""
    tok = build_char_tokenizer()
    model = build_llama(ModelSpec(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=256), tok,
                        max_positions=MAX_LEN, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    old = save_model(model, tok, tmp_path_factory.mktemp("student-old"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # perturb every weight, as a training step would
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * p.detach().std().clamp_min(1e-3))
        model.lm_head.weight.mul_(1.5)
    new = save_model(model, tok, tmp_path_factory.mktemp("student-new"))
    return str(old), str(new)


@pytest.fixture(scope="module")
def sampler(student_dirs):
    from opd.sampling.vllm_sampler import VLLMSampler

    s = VLLMSampler(student_dirs[0], eos_id=EOS, max_model_len=MAX_LEN)
    yield s
    s.close()


def _hf_logprobs(model_dir, rollouts):
    model = load_model(model_dir)
    return score_completions(model, [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], PAD)


def _max_abs_diff(a, b):
    assert [len(x) for x in a] == [len(x) for x in b]
    return max((abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)), default=0.0)


def _check_rollouts(rollouts, n=N, max_tokens=MAX_TOKENS):
    assert len(rollouts) == len(PROMPTS) * n
    assert [r.prompt_index for r in rollouts] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    for r in rollouts:
        assert r.prompt_ids == PROMPTS[r.prompt_index]
        assert 1 <= len(r.completion_ids) <= max_tokens
        assert len(r.sampler_logprobs) == len(r.completion_ids)
        assert EOS not in r.completion_ids[:-1]  # generation stops at the first EOS
        ends_eos = r.completion_ids[-1] == EOS
        assert r.finished == ends_eos
        assert ends_eos or len(r.completion_ids) == max_tokens  # EOS or cut at max_tokens
        assert all(v <= 0 for v in r.sampler_logprobs)


def test_n_samples_eos_or_max_tokens(sampler):
    rollouts = sampler.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=11)
    _check_rollouts(rollouts)
    finished = sum(r.finished for r in rollouts)
    assert 0 < finished < len(rollouts), f"{finished}/{len(rollouts)} finished: both cases must be exercised"


def test_same_seed_same_samples(sampler):
    a = sampler.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=123)
    b = sampler.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=123)
    c = sampler.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=124)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.sampler_logprobs for r in a] == [r.sampler_logprobs for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]


def test_inplace_sync_matches_transformers(sampler, student_dirs):
    old, new = student_dirs
    before = sampler.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=5)
    assert _max_abs_diff([r.sampler_logprobs for r in before], _hf_logprobs(old, before)) < TOL
    sampler.publish(Weights(str(new)))
    try:
        rollouts = sampler.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=5)
        _check_rollouts(rollouts)
        got = [r.sampler_logprobs for r in rollouts]
        d_new = _max_abs_diff(got, _hf_logprobs(new, rollouts))
        d_old = _max_abs_diff(got, _hf_logprobs(old, rollouts))
        print(f"after sync: max |vllm - hf(new)| = {d_new:.3g}, max |vllm - hf(old)| = {d_old:.3g}")
        assert d_new < TOL
        assert d_old > 100 * TOL  # the sync really changed the weights the engine samples with
    finally:
        sampler.publish(Weights(str(old)))  # and back again: the module's engine serves the old student
    again = sampler.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=5)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in before]
    assert _max_abs_diff([r.sampler_logprobs for r in again], _hf_logprobs(old, again)) < TOL


def test_hf_sampler_rollouts(student_dirs):
    from opd.sampling.hf_sampler import HFSampler

    old, _ = student_dirs
    s = HFSampler(old, eos_id=EOS, device="cpu")
    try:
        rollouts = s.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=3)
    finally:
        s.close()
    _check_rollouts(rollouts)
    assert _max_abs_diff([r.sampler_logprobs for r in rollouts], _hf_logprobs(old, rollouts)) < TOL


def test_seeded_samples_are_independent_across_prompts(sampler):
    """One seed for the batch must not give every prompt the same random stream."""
    prompt = [1, 5, 14, 6, 15]
    rollouts = sampler.sample([prompt] * 8, n=1, max_tokens=8, seed=123)
    distinct = {tuple(r.completion_ids) for r in rollouts}
    assert len(distinct) >= 4, distinct


def test_tensor_parallel_engine_syncs_in_place(student_dirs):
    """opd.tensor_parallel_size=2: two vLLM workers (one core each here) hold half the heads each;
    the in-place reload reaches both, and logprobs still match transformers."""
    from opd.sampling.vllm_sampler import VLLMSampler

    old, new = student_dirs
    s = VLLMSampler(old, eos_id=EOS, max_model_len=MAX_LEN, tensor_parallel_size=2)
    try:
        before = s.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=5)
        _check_rollouts(before)
        assert _max_abs_diff([r.sampler_logprobs for r in before], _hf_logprobs(old, before)) < TOL
        s.publish(Weights(str(new)))
        after = s.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=5)
        got = [r.sampler_logprobs for r in after]
        d_new, d_old = _max_abs_diff(got, _hf_logprobs(new, after)), _max_abs_diff(got, _hf_logprobs(old, after))
        print(f"TP=2 after sync: max |vllm - hf(new)| = {d_new:.3g}, max |vllm - hf(old)| = {d_old:.3g}")
        assert d_new < TOL and d_old > 100 * TOL
    finally:
        s.close()
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # the binding does not leak into later engines


def test_cpu_thread_binding():
    from opd.vllm_engine import cpu_thread_binding

    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, list(range(8))) == "0-3|4-7"
    assert cpu_thread_binding(3, [0, 1, 2, 3, 4, 5, 6]) == "0-1|2-3|4-6"
    with pytest.raises(ValueError, match="at least 4 CPU cores"):
        cpu_thread_binding(4, [0, 1])


def _peft_student(base_dir, seed, out):
    """The base student with random LoRA adapters (B != 0, so they change the logprobs)."""
    from opd.config import LoraSpec
    from opd.lora import apply_lora, save_adapter

    model = apply_lora(load_model(base_dir), LoraSpec(r=8, alpha=16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(model, out)
    model.eval()
    return model


def test_lora_adapters_reach_the_engine_without_a_weight_reload(student_dirs, tmp_path):
    """opd.lora: per step the sampler gets only adapters (vLLM LoRA); logprobs match peft's."""
    from opd.sampling.vllm_sampler import VLLMSampler

    old = student_dirs[0]
    adapters = [_peft_student(old, seed, tmp_path / f"a{seed}") for seed in (1, 2)]
    s = VLLMSampler(old, eos_id=EOS, max_model_len=MAX_LEN, lora_rank=8)
    try:
        for seed, model in zip((1, 2), adapters):
            s.publish(Weights(str(tmp_path / f"a{seed}"), adapter=True))
            rollouts = s.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=5)
            _check_rollouts(rollouts)
            got = [r.sampler_logprobs for r in rollouts]
            ref = score_completions(model, [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], PAD)
            d, d_base = _max_abs_diff(got, ref), _max_abs_diff(got, _hf_logprobs(old, rollouts))
            print(f"adapter {seed}: max |vllm - peft| = {d:.3g}, vs base = {d_base:.3g}")
            assert d < TOL and d_base > 100 * TOL
        s.publish(Weights(str(old)))  # back to the bare weights (a full publish drops the adapters)
        base = s.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=5)
        assert _max_abs_diff([r.sampler_logprobs for r in base], _hf_logprobs(old, base)) < TOL
    finally:
        s.close()


def _with_extra_eos(model_dir, out_dir, n_extra=3):
    """A copy of the student whose generation_config.json declares more EOS ids (as Qwen3 chat checkpoints list
    <|im_end|> and <|endoftext|>): tokens its plain greedy completions emit mid-way, so every decoder must cut there."""
    from opd.generation import generate

    model = load_model(model_dir)
    plain = generate(model, PROMPTS, EOS, PAD, MAX_TOKENS)
    inner = [t for c in plain for t in c[:-1] if t != EOS]
    extra = list(dict.fromkeys(inner))[:n_extra]
    assert len(extra) == n_extra, plain
    save_model(model, build_char_tokenizer(), out_dir)
    gen = json.loads((out_dir / "generation_config.json").read_text())
    (out_dir / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [EOS, *extra]}))
    return str(out_dir), plain, (EOS, *extra)


def _cut(completion, stops):
    end = next((i for i, t in enumerate(completion) if t in stops), None)
    return completion if end is None else completion[: end + 1]


def test_decoders_stop_at_the_checkpoints_eos_ids(student_dirs, tmp_path):
    """vLLM stops at every EOS id of a checkpoint's generation config besides the tokenizer's; ``generate`` (the
    evaluation, the hf sampler, an hf teacher) and the rollouts' ``finished`` flag must agree, or a rollout that
    ends at <|endoftext|> under vLLM runs on to max_tokens in the evaluation. The vLLM side: the slow test below."""
    from opd.generation import checkpoint_stop_ids, generate
    from opd.sampling.hf_sampler import HFSampler

    path, plain, stops = _with_extra_eos(student_dirs[0], tmp_path / "extra-eos")
    assert checkpoint_stop_ids(path, EOS) == stops and checkpoint_stop_ids(student_dirs[0], EOS) == (EOS,)
    got = generate(load_model(path), PROMPTS, EOS, PAD, MAX_TOKENS)
    assert got == [_cut(c, stops) for c in plain] and got != plain  # cut at the first stop of the set
    s = HFSampler(path, eos_id=EOS, device="cpu")
    try:
        rollouts = s.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=3)
    finally:
        s.close()
    for r in rollouts:
        c = r.completion_ids
        assert not set(c[:-1]) & set(stops) and r.finished == (c[-1] in stops), r
        assert r.finished or len(c) == MAX_TOKENS
    assert any(r.completion_ids[-1] in stops[1:] for r in rollouts)  # the extra ids do end rollouts


@pytest.mark.slow  # one more engine start (~1 min here)
def test_vllm_rollouts_end_at_the_checkpoints_eos_ids(student_dirs, tmp_path):
    from opd.sampling.vllm_sampler import VLLMSampler

    path, plain, stops = _with_extra_eos(student_dirs[0], tmp_path / "extra-eos")
    s = VLLMSampler(path, eos_id=EOS, max_model_len=MAX_LEN)
    try:
        greedy = s.sample(PROMPTS, n=1, max_tokens=MAX_TOKENS, temperature=0.0, seed=0)
        sampled = s.sample(PROMPTS, n=N, max_tokens=MAX_TOKENS, seed=3)
    finally:
        s.close()
    assert [r.completion_ids for r in greedy] == [_cut(c, stops) for c in plain]  # as generate decodes
    for r in greedy + sampled:
        c = r.completion_ids
        assert not set(c[:-1]) & set(stops) and r.finished == (c[-1] in stops), r
    assert any(r.finished and r.completion_ids[-1] != EOS for r in greedy + sampled)
