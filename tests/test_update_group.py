"""The OPD update step on a torchrun group (opd.update_group) equals the one-process step.

Real subprocesses: torchrun launches 2 gloo ranks (DDP, then FSDP2), fed the same rollouts as an
in-process ``opd_update``; per-step losses and the final weights must agree. No mocks.
"""
import random

import pytest
import torch

from opd.config import ModelSpec
from opd.generation import generate
from opd.models import build_char_tokenizer, build_llama, load_model, save_model
from opd.sampling.base import Rollout
from opd.scoring import score_completions
from opd.teachers import HFTeacher
from opd.trainer import StudentTrainer, make_optimizer
from opd.training import load_optimizer, opd_update, save_optimizer
from opd.update_group import GroupSpec, UpdateGroup

STEPS, PROMPTS, SAMPLES, LR = 3, 8, 2, 3e-3
SPEC = ModelSpec(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A student checkpoint, a (random, different) teacher, and STEPS batches of real student rollouts."""
    root = tmp_path_factory.mktemp("group")
    tok = build_char_tokenizer()
    student = build_llama(SPEC, tok, max_positions=32, seed=1)
    teacher = build_llama(SPEC, tok, max_positions=32, seed=7)
    save_model(student, tok, root / "student")
    save_model(teacher, tok, root / "teacher")
    rng = random.Random(0)
    batches = []
    for step in range(STEPS):
        prompts = [tok(f"{rng.randrange(100)}+{rng.randrange(100)}=").input_ids for _ in range(PROMPTS)]
        prompts = [p for p in prompts for _ in range(SAMPLES)]
        comps = generate(student, prompts, tok.eos_token_id, tok.pad_token_id, 8, temperature=1.0, seed=step)
        s_lp = score_completions(student, prompts, comps, tok.pad_token_id)
        t_lp = score_completions(teacher, prompts, comps, tok.pad_token_id)
        rollouts = [Rollout(i, p, c, lp, bool(c) and c[-1] == tok.eos_token_id)
                    for i, (p, c, lp) in enumerate(zip(prompts, comps, s_lp))]
        batches.append((rollouts, t_lp))
    return root, tok, batches


TOPK = 8


def _one_process(root, tok, batches, loss):
    model = load_model(root / "student")
    teacher = load_model(root / "teacher")
    trainer = StudentTrainer(model, LR)
    metrics = [opd_update(trainer, r, t, tok.pad_token_id, micro_batch=5, loss=loss, teacher_model=teacher,
                          topk=TOPK) for r, t in batches]
    return model, trainer, metrics


def _group(root, tok, batches, strategy, loss, out, scorer_topk=False):
    """``scorer_topk``: ship the teacher's top-k with each step (as a vLLM teacher does); no teacher on the ranks."""
    spec = GroupSpec(num_processes=2, strategy=strategy, device="cpu", student_dir=str(root / "student"),
                     optimizer_path=None, teacher_dir=None if scorer_topk else str(root / "teacher"),
                     sync_dir=str(out / "sync"), final_dir=str(out / "final"), lr=LR, pad_id=tok.pad_token_id,
                     micro_batch=5, kl_coef=1.0, clip_ratio=None, baseline="none", loss=loss, topk=TOPK,
                     gkd_beta=0.5, forward_kl_coef=0.0, driver_pid=__import__("os").getpid())
    scorer = HFTeacher(str(root / "teacher"), device="cpu") if scorer_topk else None
    group = UpdateGroup(spec, out / "work")
    try:
        metrics = []
        for r, t in batches:
            topk = (scorer.score_topk([x.prompt_ids for x in r], [x.completion_ids for x in r], TOPK)
                    if scorer else None)
            metrics.append(group.update(r, t, LR, topk))
            synced = load_model(out / "sync")  # rank 0 wrote this step's weights for the sampler
            metrics[-1]["_sync_weight_sum"] = float(sum(p.detach().double().sum() for p in synced.parameters()))
        final = group.finish()
    finally:
        group.close()
    return load_model(final), final, metrics


@pytest.mark.parametrize("strategy,loss,scorer_topk", [("ddp", "reverse_kl_is", False),
                                                       ("fsdp", "reverse_kl_full", False),
                                                       ("ddp", "reverse_kl_topk", True)])
def test_two_rank_update_matches_one_process(setup, tmp_path, strategy, loss, scorer_topk):
    root, tok, batches = setup
    ref_model, ref_trainer, ref = _one_process(root, tok, batches, loss)
    model, final, got = _group(root, tok, batches, strategy, loss, tmp_path, scorer_topk)
    assert [m["num_processes"] for m in got] == [2] * STEPS
    # with a scorer's top-k the KL metric is the sampled-token estimate, not the exact one
    keys = ("loss", "ratio_max", "student_entropy", "grad_norm") + (() if scorer_topk else ("reverse_kl",))
    for a, b in zip(ref, got):
        for key in keys:
            assert abs(a[key] - b[key]) < 1e-4, (strategy, key, a[key], b[key])
    # the update moved the student, so agreeing weights are not a trivial outcome
    start = load_model(root / "student")
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(start.parameters(), ref_model.parameters()))
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(ref_model.parameters(), model.parameters()))
    print(f"{strategy}/{loss}: weights moved {moved:.3g}, 1-vs-2-process max |diff| {diff:.3g}")
    assert moved > 1e-3 and diff < 5e-5  # Adam magnifies float-order noise on near-zero grads
    assert abs(got[-1]["_sync_weight_sum"] - float(sum(p.detach().double().sum() for p in model.parameters()))) < 1e-6
    # the group's optimizer state resumes in one process: the next step matches a never-split run
    resumed = StudentTrainer(load_model(final), LR)
    load_optimizer(resumed.model, resumed.torch_optimizer, final / "optimizer.pt")
    r, t = batches[0]
    teacher = load_model(root / "teacher")
    a = opd_update(ref_trainer, r, t, tok.pad_token_id, 5, loss=loss, teacher_model=teacher)
    b = opd_update(resumed, r, t, tok.pad_token_id, 5, loss=loss, teacher_model=teacher)
    assert abs(a["loss"] - b["loss"]) < 1e-4
    assert max(float((p - q).detach().abs().max())
               for p, q in zip(ref_model.parameters(), resumed.model.parameters())) < 1e-5


def _failing_group(tmp_path, tok, student_dir):
    spec = GroupSpec(num_processes=2, strategy="ddp", device="cpu", student_dir=str(student_dir),
                     optimizer_path=None, teacher_dir=None, sync_dir=str(tmp_path / "sync"),
                     final_dir=str(tmp_path / "final"), lr=LR, pad_id=tok.pad_token_id, micro_batch=5, kl_coef=1.0,
                     clip_ratio=None, baseline="none", loss="reverse_kl_is", topk=20, gkd_beta=0.5,
                     forward_kl_coef=0.0, driver_pid=__import__("os").getpid())
    return UpdateGroup(spec, tmp_path / "work")


def test_group_failure_is_reported_with_its_log(setup, tmp_path):
    root, tok, batches = setup
    group = _failing_group(tmp_path, tok, tmp_path / "missing")
    try:
        with pytest.raises(RuntimeError, match="no model at"):
            group.update(*batches[0], LR)
    finally:
        group.close()


def test_uneven_split_is_refused(setup, tmp_path):
    """15 rollouts on 2 ranks: the ranks refuse the step (and say which knobs to change)."""
    root, tok, batches = setup
    group = _failing_group(tmp_path, tok, root / "student")
    try:
        with pytest.raises(RuntimeError, match="multiple of training.num_processes"):
            group.update(batches[0][0][:15], batches[0][1][:15], LR)
    finally:
        group.close()


def test_optimizer_state_roundtrip_in_one_process(tmp_path, setup):
    root, tok, batches = setup
    trainer = StudentTrainer(load_model(root / "student"), LR)
    opd_update(trainer, *batches[0], tok.pad_token_id, 5)
    save_optimizer(trainer.model, trainer.torch_optimizer, tmp_path / "o.pt")
    again = make_optimizer(trainer.model, LR)
    load_optimizer(trainer.model, again, tmp_path / "o.pt")
    a, b = trainer.torch_optimizer.state_dict()["state"], again.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg_sq"], b[k]["exp_avg_sq"]) for k in a)


def test_non_finite_step_fails_the_group_permanently(setup, tmp_path):
    """lr 1e30 on 2 ranks: step 1 throws the weights far out, step 2's loss is non-finite on every rank.
    The driver gets a PermanentError (not retried) naming the step and opd.lr; no final checkpoint."""
    from opd.errors import PermanentError

    root, tok, batches = setup
    group = _failing_group(tmp_path, tok, root / "student")
    try:
        group.update(*batches[0], 1e30)
        with pytest.raises(PermanentError, match=r"OPD update step 2: loss is (nan|inf).*Lower opd\.lr"):
            group.update(*batches[1], 1e30)
    finally:
        group.close()
    assert not (tmp_path / "final").exists()
