"""The cost ledger's FLOP formulas on a model whose size we can count by hand."""
from __future__ import annotations

import pytest

from opd.config import ModelSpec
from opd.ledger import PhaseCost, eval_phase
from opd.models import build_char_tokenizer, build_llama, num_params


def llama_params(vocab: int, h: int, inter: int, layers: int) -> int:
    """Untied Llama with as many KV heads as query heads: embeddings + lm_head, per layer q/k/v/o,
    gate/up/down and two RMSNorms, plus the final norm."""
    return 2 * vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h


@pytest.mark.parametrize("spec", [ModelSpec(num_layers=2, hidden_size=32, num_heads=1, intermediate_size=128),
                                  ModelSpec(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512)])
def test_flops_on_a_known_model(spec):
    tok = build_char_tokenizer()
    model = build_llama(spec, tok, max_positions=32, seed=0)
    n = num_params(model)
    assert n == llama_params(len(tok), spec.hidden_size, spec.intermediate_size, spec.num_layers)

    c = PhaseCost("opd_round_1")
    c.train(n, 1000)
    c.sample(n, 400)
    c.teacher(10 * n, 1000)
    c.train(n, 24)  # accumulates
    assert c.student_train_tokens == 1024 and c.student_train_flops == 6 * n * 1024
    assert c.sample_tokens == 400 and c.sample_flops == 2 * n * 400
    assert c.teacher_tokens == 1000 and c.teacher_flops == 2 * 10 * n * 1000
    assert c.as_dict()["phase"] == "opd_round_1"


def test_eval_phase_charges_students_and_teacher():
    results = {
        "teacher": {"params": 1000, "model_tokens": 50, "teacher_tokens": 0, "wall_s": 1.0},
        "sft_student": {"params": 100, "model_tokens": 70, "teacher_tokens": 30, "wall_s": 2.0},
        "opd_student": {"params": 100, "model_tokens": 90, "teacher_tokens": 40, "wall_s": 3.0},
    }
    row = eval_phase(results)
    assert row["phase"] == "eval"
    assert row["sample_tokens"] == 160 and row["sample_flops"] == 2 * 100 * 160
    assert row["teacher_tokens"] == 50 + 30 + 40 and row["teacher_flops"] == 2 * 1000 * 120
    assert row["student_train_flops"] == 0 and row["wall_s"] == pytest.approx(6.0)
