import math

import torch

from opd.losses import reverse_kl_is


def test_reverse_kl_is_matches_hand_computed_two_token_example():
    logp_sampler = torch.tensor([[-1.0, -2.0]])
    logp_teacher = torch.tensor([[-1.5, -1.0]])
    logp_new = (logp_sampler + torch.tensor([[0.1, -0.2]])).requires_grad_()
    mask = torch.ones(1, 2)
    loss, m = reverse_kl_is(logp_new, logp_sampler, logp_teacher, mask)
    # advantages: -(-1 - -1.5) = -0.5 and -(-2 - -1) = +1.0; ratios e^0.1 and e^-0.2
    expected = -(math.exp(0.1) * -0.5 + math.exp(-0.2) * 1.0) / 2
    assert abs(loss.item() - expected) < 1e-6
    assert abs(m["reverse_kl"] - ((-1.0 + 1.5) + (-2.0 + 1.0)) / 2) < 1e-6
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
