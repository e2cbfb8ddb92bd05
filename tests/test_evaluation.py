"""opd.evaluation on real (tiny, untrained) models: the sampled accuracy verifies the very
temperature-1 samples the reverse KL is measured on, each against its own prompt's answer."""
from __future__ import annotations

import torch

from opd.config import ModelSpec
from opd.data.task import extract_answer, is_correct
from opd.evaluation import evaluate
from opd.generation import generate
from opd.models import build_char_tokenizer, build_llama


def test_sampled_accuracy_scores_each_kl_sample_against_its_prompt():
    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    spec = ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128)
    student, teacher = build_llama(spec, tok, 64, seed=0), build_llama(spec, tok, 64, seed=1)
    prompts = ["12+34=", "7+8=", "100+1=", "5+5+5=", "9+9=", "3+4=", "1+1=", "20+2="]
    ids = [tok(p).input_ids for p in prompts]
    k, seed = 4, 3
    # the same draws evaluate() makes: answers taken from each prompt's first sample make some
    # samples right, and only if every sample is checked against its own prompt's answer
    samples = tok.batch_decode(generate(student, ids, tok.eos_token_id, tok.pad_token_id, 12, temperature=1.0,
                                        n=k, seed=seed), skip_special_tokens=True)
    answers = [extract_answer(samples[i * k]) or "none" for i in range(len(prompts))]
    expected = sum(is_correct(s, answers[j // k]) for j, s in enumerate(samples)) / len(samples)
    assert 0 < expected < 1, "the draws should give a mix of right and wrong samples"

    r = evaluate(student, teacher, tok, prompts, answers, 12, seed, kl_samples=k)
    assert r.sampled_accuracy == expected
    assert r.accuracy <= 1 and r.reverse_kl > 0 and r.as_dict()["sampled_accuracy"] == expected
    # the teacher against itself: no samples drawn, so no sampled accuracy to report
    assert evaluate(teacher, teacher, tok, prompts, answers, 12, seed).sampled_accuracy is None
