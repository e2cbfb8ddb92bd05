import math

import pytest
import torch

from opd.losses import importance_sampled_pg, kl_advantages


def reverse_kl_is(logp_new, logp_sampler, logp_teacher, mask, kl_coef=1.0, clip_ratio=None, baseline="none",
                  discount=0.0):
    """The sampled-token OPD loss as the engine composes it: advantages fixed at scoring time, then the
    importance-sampled policy gradient (opd.objectives.score, then opd.objectives._is_loss)."""
    adv = kl_advantages(logp_sampler, logp_teacher, mask, kl_coef, baseline, discount)
    return importance_sampled_pg(logp_new, logp_sampler, adv, mask, clip_ratio)


def test_reverse_kl_is_matches_hand_computed_two_token_example():
    from opd.config import ReverseKLIS
    from opd.objectives import advantages

    logp_sampler = torch.tensor([[-1.0, -2.0]])
    logp_teacher = torch.tensor([[-1.5, -1.0]])
    logp_new = (logp_sampler + torch.tensor([[0.1, -0.2]])).requires_grad_()
    mask = torch.ones(1, 2)
    loss, m = reverse_kl_is(logp_new, logp_sampler, logp_teacher, mask)
    # advantages: -(-1 - -1.5) = -0.5 and -(-2 - -1) = +1.0; ratios e^0.1 and e^-0.2
    expected = -(math.exp(0.1) * -0.5 + math.exp(-0.2) * 1.0) / 2
    assert abs(loss.item() - expected) < 1e-6
    adv, reverse_kl = advantages(ReverseKLIS(), logp_sampler.tolist(), logp_teacher.tolist())
    assert adv == [[-0.5, 1.0]]
    assert abs(reverse_kl - ((-1.0 + 1.5) + (-2.0 + 1.0)) / 2) < 1e-6
    loss.backward()
    # d loss / d logp_new_t = -ratio_t * adv_t / T: the token the teacher prefers is pushed up
    assert torch.allclose(logp_new.grad, torch.tensor([[math.exp(0.1) * 0.5 / 2, -math.exp(-0.2) / 2]]), atol=1e-6)


def test_mask_excludes_prompt_and_padding_tokens():
    lp_s = torch.tensor([[-1.0, -2.0, -3.0]])
    lp_t = torch.tensor([[-9.0, -1.0, -9.0]])
    mask = torch.tensor([[0.0, 1.0, 0.0]])
    loss, _ = reverse_kl_is(lp_s.clone(), lp_s, lp_t, mask)
    assert abs(loss.item() - (-1.0)) < 1e-6  # only the middle token: -(1 * (-(−2 − −1)))


def test_clip_ratio_caps_importance_weight():
    lp_s = torch.tensor([[-3.0]])
    lp_new = torch.tensor([[-1.0]])  # ratio e^2 ~ 7.4
    loss, m = reverse_kl_is(lp_new, lp_s, torch.tensor([[-2.0]]), torch.ones(1, 1), clip_ratio=2.0)
    assert abs(loss.item() - (-2.0 * 1.0)) < 1e-6
    assert m["ratio_max"] == 2.0


def test_mean_baseline_centres_advantages():
    lp_s = torch.tensor([[-1.0, -2.0]])
    lp_t = torch.tensor([[-2.0, -2.0]])  # advantages -1, 0 -> centred -0.5, +0.5
    loss, _ = reverse_kl_is(lp_s.clone(), lp_s, lp_t, torch.ones(1, 2), baseline="mean")
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("chunk", [2048, 4])
def test_sampled_logprobs_match_autograd(monkeypatch, chunk):
    """The fused log-prob/entropy (hand-written backward, row blocks) equals log_softmax + autograd."""
    import opd.losses as L

    monkeypatch.setattr(L, "CHUNK_ROWS", chunk)  # 4: the 15 rows run in 4 blocks, the last one short
    torch.manual_seed(0)
    z = (3 * torch.randn(3, 5, 11, dtype=torch.float64)).requires_grad_()
    tgt = torch.randint(0, 11, (3, 5))
    w = torch.randn(3, 5, dtype=torch.float64)
    logp, ent = L.sampled_logprobs(z, tgt)
    (logp * w).sum().backward()
    got = z.grad.clone()
    z.grad = None
    ref_lq = torch.log_softmax(z, -1)
    ref = ref_lq.gather(-1, tgt[..., None])[..., 0]
    (ref * w).sum().backward()
    assert torch.allclose(logp.double(), ref, atol=1e-6)
    assert torch.allclose(ent.double(), -(ref_lq.exp() * ref_lq).sum(-1), atol=1e-5)
    assert torch.allclose(got, z.grad, atol=1e-6)
    assert not ent.requires_grad


def test_sampled_logprobs_upcast_bf16_logits():
    import opd.losses as L

    torch.manual_seed(1)
    z = torch.randn(2, 4, 50).to(torch.bfloat16).requires_grad_()
    tgt = torch.randint(0, 50, (2, 4))
    logp, _ = L.sampled_logprobs(z, tgt)
    assert logp.dtype == torch.float32
    logp.sum().backward()
    assert z.grad.dtype == torch.bfloat16
    ref = torch.log_softmax(z.float(), -1).gather(-1, tgt[..., None])[..., 0]
    assert torch.allclose(logp, ref, atol=1e-5)


def test_reward_to_go_discounts_later_tokens_within_each_completion():
    from opd.losses import reward_to_go

    r = torch.tensor([[1.0, 2.0, 4.0, 8.0], [5.0, 1.0, 1.0, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])  # prompt tail / padding are 0
    assert torch.equal(reward_to_go(r, mask, 0.0), r * mask)
    assert torch.allclose(reward_to_go(r, mask, 0.5), torch.tensor([[0.0, 2 + 2 + 2, 4 + 4, 8.0],
                                                                   [5 + 0.5, 1.0, 0.0, 0.0]]))


def test_discounted_advantage_reaches_earlier_tokens():
    """With discount 1 the first token's gradient carries the reverse KL of the whole completion."""
    lp_s = torch.tensor([[-1.0, -1.0, -1.0]])
    lp_t = torch.tensor([[-1.0, -1.0, -6.0]])  # only the last token is bad for the teacher
    mask = torch.ones(1, 3)
    grads = []
    for discount in (0.0, 1.0):
        lp_new = lp_s.clone().requires_grad_()
        loss, _ = reverse_kl_is(lp_new, lp_s, lp_t, mask, discount=discount)
        loss.backward()
        grads.append(lp_new.grad)
    g0, g1 = grads
    assert g0[0, 0] == 0 and g0[0, 2] > 0  # per-token: only the bad token is pushed down
    assert torch.allclose(g1, torch.full((1, 3), 5.0 / 3))  # reward-to-go: every token that led there
