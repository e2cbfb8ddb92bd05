"""opd.evaluation on real (tiny, untrained) models: the sampled accuracy verifies the very
temperature-1 samples the reverse KL is measured on, each against its own prompt's answer."""
from __future__ import annotations

import pytest
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
    student, teacher = build_llama(spec, tok, 64, seed=0), _peaked(build_llama(spec, tok, 64, seed=1))
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


def _peaked(teacher):
    """Two untrained models are both near uniform: their reverse KL is so small that a few samples' estimate
    falls either side of 0. A teacher with a 30x LM head is sure of its tokens, the student is not: KL >> 0."""
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)
    return teacher


def _tiny_pair():
    tok = build_char_tokenizer()
    spec = ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128)
    return tok, build_llama(spec, tok, 64, seed=0), _peaked(build_llama(spec, tok, 64, seed=1))


def test_eval_without_answers_measures_kl_and_reports_no_accuracy():
    """``answer`` is optional: no answers -> both accuracies None, the reverse KL as usual; a row without
    an answer is left out of the accuracy rather than crashing it or counting as wrong."""
    torch.set_num_threads(1)
    tok, student, teacher = _tiny_pair()
    prompts = ["12+34=", "7+8=", "100+1=", "5+5+5="]
    r = evaluate(student, teacher, tok, prompts, None, 12, 3, kl_samples=2)
    assert r.accuracy is None and r.sampled_accuracy is None and r.reverse_kl > 0 and r.n == 4
    assert r.as_dict()["n_answered"] == 0 and r.model_tokens > 0
    assert evaluate(teacher, teacher, tok, prompts, [None] * 4, 12, 3).accuracy is None

    # answers on every other prompt, taken from its first temperature-1 sample so some samples are right:
    # the sampled accuracy is over the answered prompts' samples only (unanswered ones are not "wrong")
    prompts = ["12+34=", "7+8=", "100+1=", "5+5+5=", "9+9=", "3+4=", "1+1=", "20+2="]
    k, seed = 4, 3
    ids = [tok(p).input_ids for p in prompts]
    samples = tok.batch_decode(generate(student, ids, tok.eos_token_id, tok.pad_token_id, 12, temperature=1.0,
                                        n=k, seed=seed), skip_special_tokens=True)
    answers = [(extract_answer(samples[i * k]) or "none") if i % 2 == 0 else None for i in range(len(prompts))]
    checked = [is_correct(s, answers[j // k]) for j, s in enumerate(samples) if answers[j // k] is not None]
    expected = sum(checked) / len(checked)
    assert 0 < expected and len(checked) < len(samples)
    part = evaluate(student, teacher, tok, prompts, answers, 12, seed, kl_samples=k)
    assert part.sampled_accuracy == expected and part.as_dict()["n_answered"] == 4 and part.accuracy is not None
    unanswered = evaluate(student, teacher, tok, prompts, None, 12, seed, kl_samples=k)
    assert part.reverse_kl == unanswered.reverse_kl  # the same samples, whatever the answers


def test_gates_that_need_accuracy_are_skipped_by_name_without_answers():
    from opd.config import GateConfig
    from opd.errors import PermanentError
    from opd_ops.gates import AnswersRequired, check, require_answers

    res = {"opd_student": {"accuracy": None, "reverse_kl": 0.5}, "sft_student": {"accuracy": None, "reverse_kl": 0.6},
           "incumbent": {"accuracy": None, "reverse_kl": 0.7, "version": 1}}
    g = check(GateConfig(min_accuracy=0.0), res)
    assert g.passed
    assert "- SKIP min_accuracy: skipped: no answers in the eval split" in g.message()
    assert "- SKIP no_regression: skipped: no answers in the eval split" in g.message()
    assert "- PASS opd_beats_sft_kl" in g.message() and "| min_accuracy | SKIP |" in g.markdown("Gates")
    # the KL gates still decide
    assert not check(GateConfig(max_reverse_kl=0.1), res).passed
    # a positive threshold without answers is a failure (never a silent pass), and refused up front
    bad = check(GateConfig(min_accuracy=0.5), res)
    assert not bad.passed and "- FAIL min_accuracy: no answers in the eval split" in bad.message()
    with pytest.raises(AnswersRequired, match=r"eval.gates.min_accuracy: 0.5 needs answers, but eval.jsonl has no "
                                              r"'answer' values.*set eval.gates.min_accuracy: 0") as e:
        require_answers(GateConfig(min_accuracy=0.5), False, "eval.jsonl")
    assert isinstance(e.value, PermanentError)
    require_answers(GateConfig(min_accuracy=0.5), True)
    require_answers(GateConfig(min_accuracy=0.0), False)
    # with answers, nothing changes
    ok = check(GateConfig(min_accuracy=0.5), {"opd_student": {"accuracy": 0.6, "reverse_kl": 0.5}}, baseline=None)
    assert ok.passed and "PASS min_accuracy: accuracy 0.600" in ok.message()


def test_evaluation_is_persisted_and_reused_for_the_same_models(tmp_path):
    """evaluate_all on an eval split without answers, twice with the same models: the second call returns
    the stored results without evaluating (evaluation.json untouched); a rewritten final checkpoint or
    other eval settings evaluate again."""
    import json
    import time

    from opd.config import load_config
    from opd.data import dataset as ds
    from opd.engines import Engines
    from opd.evaluation import evaluate_all
    from opd.models import save_model
    from opd.records import ModelRef, RunLayout

    torch.set_num_threads(1)
    tok, student, teacher = _tiny_pair()
    for name, m in (("teacher", teacher), ("sft", student), ("final", student)):
        save_model(m, tok, tmp_path / name)
    cfg = load_config("configs/ci.yaml", [f"home={tmp_path}", "data.synthetic.n_train=32", "data.synthetic.n_eval=8",
                                          "eval.max_examples=6", "eval.kl_samples_per_prompt=2", "device=cpu"])
    d = ds.synthetic(cfg.data, cfg.seed)
    d["eval"] = d["eval"].remove_columns(["answer", "completion"])  # a user eval file without answers
    data = ds.save(d, tmp_path / "data")
    ref = lambda n: ModelRef(str(tmp_path / n), 1)  # noqa: E731
    layout, logs = RunLayout(tmp_path / "run"), []
    layout.root.mkdir()

    def run(c=cfg):
        t = time.perf_counter()
        with Engines(c) as engines:
            out = evaluate_all(c, data, ref("teacher"), ref("sft"), ref("final"), engines, store=layout.evaluation,
                               log=logs.append)
        return out, time.perf_counter() - t, layout.evaluation.stat().st_mtime_ns

    first, t_first, m_first = run()
    assert first["teacher"]["accuracy"] is None and first["opd_student"]["sampled_accuracy"] is None
    assert first["opd_student"]["reverse_kl"] > 0 and first["opd_student"]["n"] == 6
    assert json.loads(layout.evaluation.read_text())["results"] == first and not logs

    again, t_again, m_again = run()
    assert again == first and m_again == m_first and t_again < t_first / 5, (t_again, t_first)
    assert logs == [f"evaluation reused from {layout.evaluation} (same models, data and eval settings)"]

    save_model(student, tok, tmp_path / "final")  # a redone final round: same values, new files
    _, _, m_redo = run()
    assert m_redo != m_first and len(logs) == 1
    other, _, _ = run(load_config("configs/ci.yaml", [f"home={tmp_path}", "eval.max_examples=4",
                                                      "eval.kl_samples_per_prompt=2", "device=cpu"]))
    assert other["opd_student"]["n"] == 4 and len(logs) == 1


def test_decoding_batches_are_sized_to_the_free_gpu_memory():
    """A real student's evaluation samples do not fit one batch on a card (Qwen3-8B: 4 samples of 30 AIME prompts
    x 6,144 positions = 101 GiB of KV cache); ``generate`` cuts its batch to what fits on a GPU, and greedy
    completions do not depend on the cut."""
    from transformers import Qwen3Config

    from opd.generation import BATCH_PROMPTS, bytes_per_row, prompts_that_fit

    q8 = Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936)
    gib = 2**30
    per_row = bytes_per_row(q8, 2, 2048, 6144)
    assert 2 * 36 * 8 * 128 * 2 * 6144 == 864 * 2**20 and gib < per_row < 1.1 * gib  # KV + prefill + logits
    assert 120 * per_row > 80 * gib  # the evaluation's 30 x 4 rows in one batch: over an 80 GiB card
    fit = prompts_that_fit(q8, 2, 2048, 6144, 4, 64 * gib)  # 80 GiB card less the bf16 weights
    assert fit == int(64 * gib * 0.7) // per_row // 4 == 10 and fit * 4 * per_row <= 0.7 * 64 * gib
    assert prompts_that_fit(q8, 2, 2048, 6144, 4, gib) == 1  # at least one prompt, whatever is free
    assert prompts_that_fit(q8, 2, 16, 32, 1, 1024 * gib) == BATCH_PROMPTS  # never more than the cap

    tok, student, _ = _tiny_pair()
    ids = [tok(p).input_ids for p in ["12+34=", "7+8=", "100+1=", "5+5+5=", "9+9="]]
    whole = generate(student, ids, tok.eos_token_id, tok.pad_token_id, 12)
    assert generate(student, ids, tok.eos_token_id, tok.pad_token_id, 12, batch_size=2) == whole


def test_sampled_completions_do_not_depend_on_the_batch():
    """Each sampled row draws from its own stream keyed by (seed, row), as vLLM's per-request seed does: the
    completions are the same whatever batch the free GPU memory allows, and another seed draws others."""
    torch.set_num_threads(1)
    tok, student, _ = _tiny_pair()
    ids = [tok(p).input_ids for p in ["12+34=", "7+8=", "100+1=", "5+5+5=", "9+9="]]  # uneven left padding
    draw = lambda **kw: generate(student, ids, tok.eos_token_id, tok.pad_token_id, 12, temperature=1.0,  # noqa: E731
                                 n=3, seed=7, **kw)
    whole = draw()
    assert len(whole) == 15 and len({tuple(c) for c in whole}) > 10  # an untrained model: varied samples
    assert draw(batch_size=1) == whole and draw(batch_size=2) == whole
    assert draw(top_p=1.0) == whole
    assert generate(student, ids, tok.eos_token_id, tok.pad_token_id, 12, temperature=1.0, n=3, seed=8) != whole
    # one prompt alone draws what it drew as row 1 of the batch only if it is row 1: rows, not prompts, are keyed
    assert generate(student, ids[1:2] * 2, tok.eos_token_id, tok.pad_token_id, 12, temperature=1.0, n=3,
                    seed=7)[3:] == whole[3:6]


def test_seeded_sampling_draws_from_the_tempered_nucleus():
    """The Gumbel-max draw of ``SeededSampling`` follows softmax(logits / T) restricted to the top-p nucleus:
    frequencies over 40,000 keyed rows within 0.01 of the probabilities, tokens outside the nucleus never drawn."""
    from opd.generation import SeededSampling

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    rows = 40_000
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (1.5, 0.8)):
        proc = SeededSampling(11, torch.arange(rows), 4, temperature, top_p)
        picks = proc(torch.zeros(rows, 9, dtype=torch.long), logits.expand(rows, -1).clone()).argmax(-1)
        freq = torch.bincount(picks, minlength=6).double() / rows
        p = torch.softmax(logits[0].double() / temperature, -1)
        if top_p < 1.0:  # the smallest set of top tokens whose mass reaches top_p
            keep = (p.cumsum(-1) - p) < top_p
            p = torch.where(keep, p, 0.0)
            p = p / p.sum()
            assert freq[~keep].sum() == 0
        assert (freq - p).abs().max() < 0.01, (temperature, top_p, freq, p)


def test_a_checkpoints_generation_defaults_do_not_bend_decoding():
    """transformers fills every setting ``generate`` is not given from the model's generation_config.json; a
    user checkpoint's repetition_penalty (Qwen2.5-Instruct ships 1.05) would change the greedy accuracy and the
    KL samples, whose logprobs are the plain model's. ``generate`` decodes the plain model whatever it ships."""
    from transformers import GenerationConfig

    torch.set_num_threads(1)
    tok, student, _ = _tiny_pair()
    ids = [tok(p).input_ids for p in ["12+34=", "7+8=", "100+1=", "5+5+5=", "9+9="]]
    plain = generate(student, ids, tok.eos_token_id, tok.pad_token_id, 12)
    sampled = generate(student, ids, tok.eos_token_id, tok.pad_token_id, 12, temperature=1.0, n=2, seed=5)
    shipped = GenerationConfig(repetition_penalty=5.0, no_repeat_ngram_size=1, do_sample=True, temperature=0.3)
    student.generation_config = shipped
    assert generate(student, ids, tok.eos_token_id, tok.pad_token_id, 12) == plain
    assert generate(student, ids, tok.eos_token_id, tok.pad_token_id, 12, temperature=1.0, n=2, seed=5) == sampled
    assert student.generation_config is shipped  # given back
    # the same call straight to transformers takes the shipped defaults: the completions change
    from opd.generation import _left_pad

    x, attn = _left_pad(ids, tok.pad_token_id, "cpu")
    raw = student.generate(input_ids=x, attention_mask=attn, max_new_tokens=12, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, x.shape[1]:].tolist()
    assert [r[: r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r for r in raw] != plain
