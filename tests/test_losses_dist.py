"""Distribution-level OPD losses (opd.losses) and their use in the learner step (opd.learner.learn_step). No mocks."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from opd.losses import entropy_from_logits, forward_kl_full, gkd_jsd, reverse_kl_full, reverse_kl_topk
from opd.trainer import StudentTrainer

REQUIRED_METRICS = {"loss", "reverse_kl", "ratio_mean", "ratio_max", "sampler_trainer_absdiff_max", "grad_norm",
                    "student_entropy"}


def _random(b=2, t=5, v=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g, dtype=dtype) * 2
    te = torch.randn(b, t, v, generator=g, dtype=dtype) * 2
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    mask[0, 0] = 1.0
    return s, te, mask


def _kl(la, lb):  # independent per-row KL(a || b) via torch's kl_div (input = log b, target = log a)
    return F.kl_div(lb, la, reduction="none", log_target=True).sum(-1)


# ------------------------------------------------------------------ reverse_kl_full


def test_reverse_kl_full_matches_hand_computation_and_masks():
    p1, q2 = [0.5, 0.25, 0.25], [0.5, 0.25, 0.25]
    student = torch.tensor([[[0.0, 0.0, 0.0], [math.log(q) for q in q2], [9.0, -9.0, 0.0]]])
    teacher = torch.tensor([[[math.log(p) for p in p1], [1.0, 1.0, 1.0], [-9.0, 9.0, 0.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # third position (wildly different) is padding
    # position 1: q uniform, p = (1/2, 1/4, 1/4): sum_v 1/3 (log 1/3 - log p_v)
    kl1 = sum(1 / 3 * (math.log(1 / 3) - math.log(p)) for p in p1)
    # position 2: q = (1/2, 1/4, 1/4), p uniform: sum_v q_v (log q_v - log 1/3)
    kl2 = sum(q * (math.log(q) - math.log(1 / 3)) for q in q2)
    assert abs(reverse_kl_full(student, teacher, mask).item() - (kl1 + kl2) / 2) < 1e-6
    assert abs(kl1 - (math.log(1 / 3) - (math.log(0.5) + 2 * math.log(0.25)) / 3)) < 1e-12
    assert reverse_kl_full(student, student.clone(), torch.ones(1, 3)).abs().item() < 1e-7


def test_reverse_kl_full_gradient_matches_independent_formula():
    s, t, mask = _random()
    s1 = s.clone().requires_grad_()
    reverse_kl_full(s1, t, mask).backward()
    # independent: autograd of torch's kl_div-based KL ...
    s2 = s.clone().requires_grad_()
    n = mask.sum()
    ref = (_kl(F.log_softmax(s2, -1), F.log_softmax(t, -1)) * mask).sum() / n
    ref.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-12)
    # ... and the closed form dKL/ds_v = q_v (log q_v - log p_v - KL) / N on completion rows
    lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    kl = _kl(lq, lp).unsqueeze(-1)
    analytic = lq.exp() * (lq - lp - kl) * mask.unsqueeze(-1) / n
    assert torch.allclose(s1.grad, analytic, atol=1e-12)


def test_forward_kl_coef_adds_exact_forward_kl():
    s, t, mask = _random(seed=1)
    expected = reverse_kl_full(s, t, mask) + 0.3 * forward_kl_full(s, t, mask)
    assert torch.allclose(reverse_kl_full(s, t, mask, forward_kl_coef=0.3), expected, atol=1e-12)
    fwd = (_kl(F.log_softmax(t, -1), F.log_softmax(s, -1)) * mask).sum() / mask.sum()
    assert torch.allclose(forward_kl_full(s, t, mask), fwd, atol=1e-12)


def test_entropy_from_logits():
    s, _, mask = _random(seed=2)
    lq = F.log_softmax(s, -1)
    expected = (-(lq.exp() * lq).sum(-1) * mask).sum() / mask.sum()
    assert torch.allclose(entropy_from_logits(s, mask), expected, atol=1e-12)
    assert abs(entropy_from_logits(torch.zeros(1, 1, 7), torch.ones(1, 1)).item() - math.log(7)) < 1e-6


# ------------------------------------------------------------------ reverse_kl_topk


def _teacher_topk(t, k):
    lp = F.log_softmax(t, -1)
    vals, ids = lp.topk(k, dim=-1)
    return ids, vals


def test_topk_with_k_equal_vocab_equals_full():
    s, t, mask = _random(v=9, seed=3)
    ids, lps = _teacher_topk(t, 9)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    full, topk = reverse_kl_full(s1, t, mask), reverse_kl_topk(s2, ids, lps, mask, k=9)
    assert torch.allclose(full, topk, atol=1e-12)
    full.backward(), topk.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-12)


def test_topk_is_renormalised_reverse_kl_on_teacher_support():
    s, t, mask = _random(v=12, seed=4)
    ids, lps = _teacher_topk(t, 6)  # teacher gives 6 candidates; the loss keeps the top 4
    got = reverse_kl_topk(s, ids, lps, mask, k=4)
    per_tok = []
    for bi in range(s.shape[0]):
        for ti in range(s.shape[1]):
            keep = ids[bi, ti, :4]
            lq = F.log_softmax(s[bi, ti, keep], -1)
            lp = F.log_softmax(F.log_softmax(t[bi, ti], -1)[keep], -1)
            per_tok.append(float((lq.exp() * (lq - lp)).sum()) * float(mask[bi, ti]))
    assert abs(got.item() - sum(per_tok) / mask.sum().item()) < 1e-10


def test_topk_is_blind_to_mass_off_support_unless_forward_kl_coef():
    s, t, mask = _random(v=10, seed=5)
    ids, lps = _teacher_topk(t, 3)
    off = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
    s_off = s + 5.0 * off  # move student mass off the teacher's top-3
    a, b = reverse_kl_topk(s, ids, lps, mask, 3), reverse_kl_topk(s_off, ids, lps, mask, 3)
    assert torch.allclose(a, b, atol=1e-12)  # the documented blind spot (cf. verl PR #5041)
    a, b = (reverse_kl_topk(x, ids, lps, mask, 3, forward_kl_coef=0.5) for x in (s, s_off))
    assert b > a + 1.0  # the forward term with the student's true log-probs penalises it


# ------------------------------------------------------------------ gkd_jsd (TRL convention)


def test_gkd_jsd_endpoints_and_limits():
    s, t, mask = _random(seed=6)
    fwd, rev = forward_kl_full(s, t, mask), reverse_kl_full(s, t, mask)
    assert torch.allclose(gkd_jsd(s, t, mask, beta=0.0), fwd, atol=1e-12)  # TRL: beta=0 -> KL(teacher||student)
    assert torch.allclose(gkd_jsd(s, t, mask, beta=1.0), rev, atol=1e-12)  # TRL: beta=1 -> KL(student||teacher)
    # interior: M = beta P_T + (1-beta) P_S, so as beta -> 0 the loss ~ beta * forward KL, -> 1 ~ (1-beta) * reverse
    eps = 1e-4
    assert abs(gkd_jsd(s, t, mask, beta=eps).item() / eps - fwd.item()) < 1e-2 * fwd.item()
    assert abs(gkd_jsd(s, t, mask, beta=1 - eps).item() / eps - rev.item()) < 1e-2 * rev.item()
    assert gkd_jsd(s, s.clone(), mask, beta=0.5).abs().item() < 1e-12
    with pytest.raises(ValueError):
        gkd_jsd(s, t, mask, beta=1.5)


def _trl_generalized_jsd():
    pytest.importorskip("trl", reason="trl (dev extra) is needed to cross-check gkd_jsd against TRL")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:  # trl >= 1.0 moved GKD to trl.experimental
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss  # a staticmethod: no trainer constructed


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gkd_jsd_matches_trl(beta, temperature):
    trl_jsd = _trl_generalized_jsd()
    s, t, mask = _random(b=3, t=7, v=32, seed=7, dtype=torch.float32)
    labels = torch.where(mask.bool(), torch.zeros_like(mask, dtype=torch.long), torch.full_like(mask, -100).long())
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = gkd_jsd(s1, t, mask, beta=beta, temperature=temperature)
    ref = trl_jsd(s2, t, labels=labels, beta=beta, temperature=temperature, reduction="batchmean")
    assert abs(ours.item() - ref.item()) < 1e-5
    ours.backward(), ref.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


# ------------------------------------------------------------------ the learner step end to end


def _update(trainer, rollouts, teacher, pad_id, micro_batch, spec):
    """One step as a round runs it with an in-process (hf) teacher: the teacher signal the spec asks for
    (opd.objectives.score), then the learner's step; the step's metrics."""
    from opd.learner import learn_step
    from opd.objectives import score, signal_for
    from opd.teachers import HFTeacher

    signal = signal_for(spec, "hf")
    batch, score_metrics = score(spec, HFTeacher(None, model=teacher, pad_id=pad_id), rollouts, signal)
    return {**learn_step(trainer, batch, spec, pad_id, micro_batch,
                         teacher_model=teacher if signal == "logits" else None), **score_metrics}


@pytest.fixture(scope="module")
def tiny():
    from opd.config import ModelSpec
    from opd.models import build_char_tokenizer, build_llama
    from opd.logprobs import score_completions
    from opd.rollouts import Rollout

    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    spec = ModelSpec(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128)
    student, teacher = build_llama(spec, tok, 64, seed=0), build_llama(spec, tok, 64, seed=1)
    with torch.no_grad():  # a fresh model is near-uniform: sharpen the teacher so the KL is far from 0
        teacher.lm_head.weight.mul_(30.0)
    texts = [("12+34=", "46"), ("7+8=", "15"), ("100+1=", "101"), ("5+5+5=", "15"), ("9+9=", "18"), ("3+4=", "7")]
    prompts = [tok(p)["input_ids"] for p, _ in texts]
    completions = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, c in texts]
    sampler_lp = score_completions(student, prompts, completions, tok.pad_token_id)
    teacher_lp = score_completions(teacher, prompts, completions, tok.pad_token_id)
    rollouts = [Rollout(i, p, c, lp, True) for i, (p, c, lp) in enumerate(zip(prompts, completions, sampler_lp))]
    return student, teacher, tok, rollouts, teacher_lp


def _exact_reverse_kl(student, teacher, rollouts, pad_id):
    from opd.batching import pack

    b = pack([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], pad_id)
    with torch.no_grad():
        s, t = b.logits(student), b.logits(teacher)
    return reverse_kl_full(s, t, b.loss_mask).item()


def test_reverse_kl_is_path_is_advantages_then_importance_sampled_pg(tiny):
    """The sampled-token loss through score + learn_step equals its formula written out: advantages over the
    whole batch (so the mean baseline is the batch's, whatever the micro-batch), then the importance-sampled
    policy gradient per micro-batch of 4, token-weighted, clipped at 5."""
    from opd.batching import length_buckets, pack, scatter_completion
    from opd.config import ReverseKLIS
    from opd.logprobs import token_logprobs
    from opd.losses import importance_sampled_pg, kl_advantages

    student, teacher, tok, rollouts, teacher_lp = tiny
    new, old = copy.deepcopy(student), copy.deepcopy(student)
    opt_new, opt_old = torch.optim.SGD(new.parameters(), lr=0.1), torch.optim.SGD(old.parameters(), lr=0.1)
    trainer = StudentTrainer(new, 0.1, optimizer=opt_new)
    m = _update(trainer, rollouts, teacher, tok.pad_token_id, 4, ReverseKLIS(clip_ratio=5.0, baseline="mean"))
    assert REQUIRED_METRICS <= m.keys()
    # the formula, inlined
    width = max(len(r.completion_ids) for r in rollouts)
    grid = lambda rows: torch.tensor([row + [0.0] * (width - len(row)) for row in rows])  # noqa: E731
    mask = grid([[1.0] * len(r.completion_ids) for r in rollouts])
    adv = kl_advantages(grid([r.sampler_logprobs for r in rollouts]), grid(teacher_lp), mask, 1.0, "mean")
    opt_old.zero_grad(set_to_none=True)
    total = sum(len(r.completion_ids) for r in rollouts)
    # micro-batches of 4 cut from the length-sorted rows, as learn_step cuts them
    order = length_buckets([len(r.prompt_ids) + len(r.completion_ids) for r in rollouts], 1, 4)
    for s in range(0, len(rollouts), 4):
        rows = order[s : s + 4]
        chunk = [rollouts[i] for i in rows]
        b = pack([r.prompt_ids for r in chunk], [r.completion_ids for r in chunk], tok.pad_token_id)
        adv_b = scatter_completion([adv[i, : len(rollouts[i].completion_ids)].tolist() for i in rows], b)
        loss, _ = importance_sampled_pg(token_logprobs(old, b), scatter_completion([r.sampler_logprobs for r in chunk], b),
                                        adv_b, b.loss_mask, 5.0)
        (loss * float(b.loss_mask.sum()) / total).backward()
    torch.nn.utils.clip_grad_norm_(old.parameters(), 1.0)
    opt_old.step()
    for p_new, p_old in zip(new.parameters(), old.parameters()):
        assert torch.equal(p_new, p_old)


@pytest.mark.parametrize("loss", ["reverse_kl_full", "reverse_kl_topk", "gkd_jsd"])
def test_opd_update_logit_losses_report_metrics(tiny, loss):
    from opd.config import LOSS_SPEC

    student, teacher, tok, rollouts, _ = tiny
    model = copy.deepcopy(student)
    trainer = StudentTrainer(model, 0.0, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    spec = LOSS_SPEC.validate_python({"kind": loss, "forward_kl_coef": 0.1, **({"topk": 5} if "topk" in loss else {})})
    m = _update(trainer, rollouts, teacher, tok.pad_token_id, 4, spec)
    assert REQUIRED_METRICS <= m.keys() and all(math.isfinite(v) for v in m.values())
    exact = _exact_reverse_kl(model, teacher, rollouts, tok.pad_token_id)
    assert abs(m["reverse_kl"] - exact) < 1e-5  # token-weighted over micro-batches == exact on the batch
    assert abs(m["ratio_mean"] - 1.0) < 1e-4 and m["sampler_trainer_absdiff_max"] < 1e-4  # sampler == trainer
    if loss == "reverse_kl_topk":
        assert 0.0 < m["student_topk_mass"] < 1.0


def test_reverse_kl_full_training_reduces_exact_reverse_kl(tiny):
    from opd.config import ReverseKLFull

    student, teacher, tok, rollouts, _ = tiny
    model = copy.deepcopy(student)
    trainer = StudentTrainer(model, lr=3e-3)
    before = _exact_reverse_kl(model, teacher, rollouts, tok.pad_token_id)
    for _ in range(30):
        _update(trainer, rollouts, teacher, tok.pad_token_id, 3, ReverseKLFull())
    after = _exact_reverse_kl(model, teacher, rollouts, tok.pad_token_id)
    assert after < 0.5 * before, (before, after)


def test_opd_config_loss_fields():
    from pydantic import ValidationError

    from opd.config import OPDConfig

    base = dict(rounds=1, prompts_per_step=1, max_tokens=4, lr=1e-3)
    c = OPDConfig(**base)
    assert c.loss.kind == "reverse_kl_is" and c.loss.signal == "logprobs"
    topk = OPDConfig(**base, loss="reverse_kl_topk").loss
    gkd = OPDConfig(**base, loss="gkd_jsd").loss
    assert (topk.topk, gkd.beta, gkd.forward_kl_coef) == (20, 0.5, 0.0)
    assert OPDConfig(**base, loss={"kind": "gkd_jsd", "beta": 1.0}).loss.beta == 1.0
    for bad in (dict(loss="forward_kl"), dict(loss={"kind": "gkd_jsd", "beta": 1.5}),
                dict(loss={"kind": "gkd_jsd", "forward_kl_coef": -0.1}), dict(loss={"kind": "reverse_kl_topk", "topk": 0}),
                dict(loss={"kind": "gkd_jsd", "topk": 5})):  # a setting of another loss
        with pytest.raises(ValidationError):
            OPDConfig(**base, **bad)


def test_row_chunking_changes_nothing(monkeypatch):
    import opd.losses as L

    s, t, mask = _random(b=3, t=6, v=13, seed=8)
    fns = [lambda x: L.reverse_kl_full(x, t, mask, 0.2), lambda x: L.gkd_jsd(x, t, mask, 0.3),
           lambda x: L.entropy_from_logits(x, mask)]
    outs = []
    for rows in (2048, 4):  # 4 rows at a time: several chunks and a ragged last one
        monkeypatch.setattr(L, "CHUNK_ROWS", rows)
        x = s.clone().requires_grad_()
        vals = [f(x) for f in fns]
        sum(vals).backward()
        outs.append((torch.stack(vals), x.grad))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-12) and torch.allclose(outs[0][1], outs[1][1], atol=1e-12)
