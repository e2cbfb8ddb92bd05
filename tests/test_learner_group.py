"""The learner on a torchrun group (opd.learner_group) equals the one-process learner step.

Real subprocesses: torchrun launches 2 gloo ranks (DDP, then FSDP2), fed the same train batches as an
in-process ``learn_step``; per-step losses and the final weights must agree. No mocks.
"""
import random

import pytest
import torch

from opd.checkpoints import load_optimizer, save_optimizer
from opd.config import LOSS_SPEC, ModelSpec, ReverseKLIS
from opd.generation import generate
from opd.learner import learn_step
from opd.learner_group import GroupLearner, GroupSpec
from opd.logprobs import score_completions
from opd.models import build_char_tokenizer, build_llama, load_model, save_model
from opd.objectives import advantages
from opd.rollouts import Rollout, TrainBatch
from opd.teachers import HFTeacher
from opd.trainer import StudentTrainer, make_optimizer

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


def _spec(loss):
    return LOSS_SPEC.validate_python({"kind": loss, **({"topk": TOPK} if loss == "reverse_kl_topk" else {})})


def _batch(spec, rollouts, teacher_lp, scorer=None) -> tuple[TrainBatch, dict]:
    """What the driver hands a learner: advantages (sampled-token loss), a scorer's top-k, or nothing (the
    teacher's logits beside the learner); plus the driver's own scoring metrics."""
    if spec.signal == "logprobs":
        adv, reverse_kl = advantages(spec, [r.sampler_logprobs for r in rollouts], teacher_lp)
        return TrainBatch(rollouts, advantages=adv), {"reverse_kl": reverse_kl}
    if scorer is not None:
        topk = scorer.score_topk([x.prompt_ids for x in rollouts], [x.completion_ids for x in rollouts], TOPK)
        return TrainBatch(rollouts, teacher_topk=topk), {}
    return TrainBatch(rollouts), {}


def _one_process(root, tok, batches, loss):
    model = load_model(root / "student")
    teacher = load_model(root / "teacher")
    trainer = StudentTrainer(model, LR)
    spec, metrics = _spec(loss), []
    for r, t in batches:
        batch, scored = _batch(spec, r, t)
        metrics.append({**learn_step(trainer, batch, spec, tok.pad_token_id, 5, teacher_model=teacher), **scored})
    return model, trainer, metrics


def _group_spec(root_student, tok, out, loss="reverse_kl_is", strategy="ddp", teacher_dir=None) -> GroupSpec:
    return GroupSpec(num_processes=2, strategy=strategy, device="cpu", student_dir=str(root_student),
                     optimizer_path=None, teacher_dir=teacher_dir, sync_dir=str(out / "sync"),
                     final_dir=str(out / "final"), lr=LR, pad_id=tok.pad_token_id, micro_batch=5,
                     loss=_spec(loss).model_dump_json(), driver_pid=__import__("os").getpid())


def _group(root, tok, batches, strategy, loss, out, scorer_topk=False):
    """``scorer_topk``: ship the teacher's top-k with each step (as a vLLM teacher does); no teacher on the ranks."""
    spec = _spec(loss)
    teacher_dir = str(root / "teacher") if spec.signal == "logits" else None
    group = GroupLearner(_group_spec(root / "student", tok, out, loss, strategy, teacher_dir), out / "work")
    scorer = HFTeacher(str(root / "teacher"), device="cpu") if scorer_topk else None
    try:
        metrics = []
        for r, t in batches:
            batch, scored = _batch(spec, r, t, scorer)
            metrics.append({**group.update(batch, LR), **scored})
            synced = load_model(out / "sync")  # rank 0 wrote this step's weights for the sampler
            metrics[-1]["_sync_weight_sum"] = float(sum(p.detach().double().sum() for p in synced.parameters()))
        model = group.finish(out / "final_copy")
    finally:
        group.close()
    return model, out / "final_copy", metrics


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
    spec = _spec(loss)
    batch, _ = _batch(spec, r, t)
    a = learn_step(ref_trainer, batch, spec, tok.pad_token_id, 5, teacher_model=teacher)
    b = learn_step(resumed, batch, spec, tok.pad_token_id, 5, teacher_model=teacher)
    assert abs(a["loss"] - b["loss"]) < 1e-4
    # the two start within the 1-vs-2-process diff above (<5e-5; the ranks' length-sorted micro-batches
    # group rows differently from one process's), and one more Adam step keeps them there
    assert max(float((p - q).detach().abs().max())
               for p, q in zip(ref_model.parameters(), resumed.model.parameters())) < 5e-5


def _failing_group(tmp_path, tok, student_dir):
    return GroupLearner(_group_spec(student_dir, tok, tmp_path), tmp_path / "work")


def _is_batch(rollouts, teacher_lp) -> TrainBatch:
    return _batch(ReverseKLIS(), rollouts, teacher_lp)[0]


def test_group_failure_is_reported_with_its_log(setup, tmp_path):
    root, tok, batches = setup
    group = _failing_group(tmp_path, tok, tmp_path / "missing")
    try:
        with pytest.raises(RuntimeError, match="no model at"):
            group.update(_is_batch(*batches[0]), LR)
    finally:
        group.close()


def test_uneven_split_is_refused(setup, tmp_path):
    """15 rollouts on 2 ranks: the ranks refuse the step (and say which knobs to change)."""
    root, tok, batches = setup
    group = _failing_group(tmp_path, tok, root / "student")
    try:
        with pytest.raises(RuntimeError, match="multiple of training.num_processes"):
            group.update(_is_batch(batches[0][0][:15], batches[0][1][:15]), LR)
    finally:
        group.close()


def test_optimizer_state_roundtrip_in_one_process(tmp_path, setup):
    root, tok, batches = setup
    trainer = StudentTrainer(load_model(root / "student"), LR)
    learn_step(trainer, _is_batch(*batches[0]), ReverseKLIS(), tok.pad_token_id, 5)
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
        group.update(_is_batch(*batches[0]), 1e30)
        with pytest.raises(PermanentError, match=r"OPD update step 2: loss is (nan|inf).*Lower opd\.lr"):
            group.update(_is_batch(*batches[1]), 1e30)
    finally:
        group.close()
    assert not (tmp_path / "final").exists()
