"""The one update path (opd.trainer.StudentTrainer): gradient accumulation and precision refusals. No mocks."""
import pytest
import torch

from opd.config import ModelSpec
from dp_sft import make_global_batches
from opd.models import build_char_tokenizer, build_llama
from opd.trainer import StudentTrainer
from opd.sft import sft_step

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
    from opd.logprobs import token_logprobs

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


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_non_finite_step_is_refused_before_the_weights_move():
    """lr 1e30: the first Adam step throws the weights to ~1e30 (still finite), the second step's loss is
    non-finite. That step fails permanently, names itself, the value and the fix, and changes nothing."""
    from opd.errors import PermanentError
    from opd.trainer import NonFiniteUpdate

    tok = build_char_tokenizer()
    batch = make_global_batches(tok, 1, 8, seed=0)[0]
    trainer = StudentTrainer(build_llama(SPEC, tok, 64, seed=0), 1e30, stage="SFT warmup", lr_field="sft.train.lr")
    sft_step(trainer, batch, tok.pad_token_id)
    before = _weights(trainer.model)
    assert all(bool(torch.isfinite(w).all()) for w in before) and max(float(w.abs().max()) for w in before) > 1e20
    with pytest.raises(NonFiniteUpdate, match=r"SFT warmup step 2: loss is (nan|inf).*Lower sft\.train\.lr") as e:
        sft_step(trainer, batch, tok.pad_token_id)
    assert isinstance(e.value, PermanentError) and "learning rate 1e+30" in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(trainer.model)))  # optimizer.step() never ran


def test_poisoned_weights_fail_the_first_step():
    """One NaN weight (a broken starting checkpoint) at an ordinary learning rate: step 1 is refused."""
    from opd.trainer import NonFiniteUpdate

    tok = build_char_tokenizer()
    model = build_llama(SPEC, tok, 64, seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    before = _weights(model)
    trainer = StudentTrainer(model, 1e-3, stage="OPD update", lr_field="opd.lr")
    with pytest.raises(NonFiniteUpdate, match="OPD update step 1: loss is nan and gradient norm is nan"):
        sft_step(trainer, make_global_batches(tok, 1, 8, seed=0)[0], tok.pad_token_id)
    assert all(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
               for a, b in zip(before, _weights(trainer.model)))


def test_a_checkpoint_with_non_finite_weights_is_never_published(tmp_path):
    """The one publish path of every stage (records.publish_dir) scans the weights: a NaN anywhere
    removes the temp dir and writes no done.json; finite weights publish as before."""
    from opd.checkpoints import NonFiniteWeights
    from opd.models import save_model
    from opd.records import fresh, publish_dir

    tok = build_char_tokenizer()
    model = build_llama(SPEC, tok, 64, seed=0)
    good = fresh(tmp_path / "round_001")
    save_model(model, tok, good)
    publish_dir(good, tmp_path / "round_001", {"params": 1})
    assert (tmp_path / "round_001" / "done.json").is_file()

    with torch.no_grad():
        model.lm_head.weight[3, 5] = float("inf")
    final = tmp_path / "round_002"
    tmp = fresh(final)
    save_model(model, tok, tmp)
    with pytest.raises(NonFiniteWeights, match=r"round_002: weight 'lm_head.weight' .* 1 non-finite value"):
        publish_dir(tmp, final, {"params": 1})
    assert not final.exists() and not tmp.exists()


def test_sft_warmup_with_a_poisoned_student_writes_nothing(tmp_path):
    """The stage, end to end: a student checkpoint with a NaN fails SFT permanently; no sft/ dir, no done.json."""
    from opd.config import load_config
    from opd.data import dataset as ds
    from opd.errors import PermanentError
    from opd.models import save_model
    from opd.records import ModelRef
    from opd.warmup import sft_warmup

    tok = build_char_tokenizer()
    teacher, student = build_llama(SPEC, tok, 64, seed=1), build_llama(SPEC, tok, 64, seed=2)
    with torch.no_grad():
        student.model.embed_tokens.weight[5, 0] = float("nan")
    save_model(teacher, tok, tmp_path / "teacher")
    save_model(student, tok, tmp_path / "student")
    cfg = load_config("configs/ci.yaml", [f"home={tmp_path}", "student.model=null", f"student.path={tmp_path / 'student'}",
                                          "sft.num_prompts=16", "sft.train.steps=3", "sft.train.batch_size=8",
                                          "data.synthetic.n_train=64", "data.synthetic.n_eval=8", "device=cpu"])
    data = ds.save(ds.synthetic(cfg.data, cfg.seed), tmp_path / "data")
    out = tmp_path / "runs" / "k" / "sft"
    with pytest.raises(PermanentError, match="SFT warmup step 1: loss is nan"):
        sft_warmup(cfg, data, ModelRef(str(tmp_path / "teacher"), 1), out)
    assert not out.exists() and not out.with_name("sft.tmp").exists()
