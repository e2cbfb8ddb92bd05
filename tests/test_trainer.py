"""The one update path (opd.trainer.StudentTrainer): gradient accumulation and precision refusals. No mocks."""
import pytest
import torch

from opd.config import ModelSpec
from opd.distributed import make_global_batches
from opd.models import build_char_tokenizer, build_llama
from opd.trainer import StudentTrainer
from opd.training import sft_step

SPEC = ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128)


def test_micro_batches_give_the_whole_batch_step():
    """8 rows of unequal lengths in micro-batches of 3 (3+3+2 rows): the step and the reported loss equal
    one whole-batch step, because each micro-batch is weighted by its share of the batch's tokens."""
    tok = build_char_tokenizer()
    batches = make_global_batches(tok, 3, 8, seed=0)
    runs = []
    for micro in (None, 3):
        trainer = StudentTrainer(build_llama(SPEC, tok, 64, seed=0), 3e-3)
        runs.append(([sft_step(trainer, b, tok.pad_token_id, micro) for b in batches], trainer.model))
    (la, ma), (lb, mb) = runs
    start = build_llama(SPEC, tok, 64, seed=0)
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(start.parameters(), ma.parameters()))
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(ma.parameters(), mb.parameters()))
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5, (la, lb)
    # a plain mean of micro-batch means would differ: the rows' token counts are unequal
    b = batches[0]
    per = [sum(len(c) for _, c in b[s:s + 3]) / len(b[s:s + 3]) for s in (0, 3, 6)]
    assert len(set(per)) > 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_fp16_on_cpu_is_refused_by_name():
    tok = build_char_tokenizer()
    with pytest.raises(ValueError, match="training.mixed_precision=fp16 needs a GPU"):
        StudentTrainer(build_llama(SPEC, tok, 64, seed=0), 1e-3, mixed_precision="fp16")


def test_lm_head_runs_on_the_completion_window_only():
    """pack keeps target positions from the earliest completion start on; the window's logits equal the
    full forward's at those positions, and the prompt rows before it never reach the LM head."""
    from opd.batching import pack
    from opd.scoring import token_logprobs

    tok = build_char_tokenizer()
    model = build_llama(SPEC, tok, 64, seed=0).eval()
    prompts = [tok("12+345=").input_ids, tok("7+8=").input_ids]
    comps = [tok("357", add_special_tokens=False).input_ids, tok("15", add_special_tokens=False).input_ids]
    b = pack(prompts, comps, tok.pad_token_id)
    assert b.start == min(map(len, prompts)) - 1 > 0
    with torch.no_grad():
        full = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
        window = b.logits(model)
        logp = token_logprobs(model, b)
    assert window.shape == (2, full.shape[1] - b.start, len(tok))
    assert torch.allclose(window, full[:, b.start:], atol=1e-5)
    ref = torch.log_softmax(full, -1).gather(-1, b.input_ids[:, 1:, None])[..., 0][:, b.start:]
    mask = b.loss_mask.bool()
    assert mask.sum() == sum(map(len, comps))
    assert torch.allclose(logp[mask], ref[mask], atol=1e-5)
