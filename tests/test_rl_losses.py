"""The RL math in jobs.posttrain.losses against cases worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from jobs.posttrain.losses import (
    AdaptiveKLController,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_estimate,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_mean,
    token_logprobs,
    token_mean,
    whiten,
)

T_ = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


def test_gae_with_gamma_and_lambda_below_one():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = T_([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = T_([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])
    mask = T_([[1, 1, 1], [1, 1, 0]])  # row 2's third token is padding: its 9s must not count
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 1: the episode ends after t=2, so V_3 = 0
    d2 = 1.0 + 0.9 * 0.0 - 0.7  # 0.3
    d1 = 0.0 + 0.9 * 0.7 - 0.6  # 0.03
    d0 = 0.0 + 0.9 * 0.6 - 0.5  # 0.04
    a2 = d2  # 0.3
    a1 = d1 + 0.72 * a2  # 0.246
    a0 = d0 + 0.72 * a1  # 0.21712
    assert close(adv[0], [a0, a1, a2]) and close(adv[0], [0.21712, 0.246, 0.3])
    assert close(ret[0], [a0 + 0.5, a1 + 0.6, a2 + 0.7])  # 0.71712, 0.846, 1.0
    # row 2: it ends after t=1
    b1 = 2.0 + 0.9 * 0.0 - 0.5  # 1.5
    b0 = (0.0 + 0.9 * 0.5 - 1.0) + 0.72 * b1  # -0.55 + 1.08 = 0.53
    assert close(adv[1], [b0, b1, 0.0]) and close(ret[1], [1.53, 2.0, 0.0])
    # gamma = lam = 1 with a single final reward: every advantage is that reward minus the value
    adv1, _ = gae(rewards[:1], values[:1], mask[:1], 1.0, 1.0)
    assert close(adv1[0], [0.5, 0.4, 0.3])


def test_ppo_policy_loss_clipped_and_unclipped():
    eps = 0.2
    ratio = T_([1.1, 1.5, 0.5, 1.5])
    adv = T_([2.0, 2.0, -1.0, -1.0])
    old = T_([-1.0, -1.0, -1.0, -1.0])
    logp = (old + ratio.log()).requires_grad_()
    loss, clipped = ppo_policy_loss(logp, old, adv, eps)
    # 1: r inside [0.8, 1.2]: both terms are -2 * 1.1 = -2.2; not clipped
    # 2: A > 0, r = 1.5 > 1.2: max(-3.0, -2 * 1.2 = -2.4) = -2.4; clipped, no gradient
    # 3: A < 0, r = 0.5 < 0.8: max(0.5, 0.8) = 0.8; clipped, no gradient
    # 4: A < 0, r = 1.5 > 1.2: max(1.5, 1.2) = 1.5; the pessimistic bound keeps the unclipped term
    assert close(loss, [-2.2, -2.4, 0.8, 1.5])
    assert clipped.tolist() == [False, True, True, False]
    loss.sum().backward()
    # d(-A r)/d logp = -A r where unclipped, 0 where clipped
    assert close(logp.grad, [-2.2, 0.0, 0.0, 1.5], tol=1e-5)


def test_ppo_value_loss_clipped_and_unclipped():
    eps = 0.2
    old = T_([1.0, 1.0, 1.0])
    values = T_([1.5, 1.1, 1.5])
    returns = T_([2.0, 2.0, 1.0])
    loss, clipped = ppo_value_loss(values, old, returns, eps)
    # 1: (1.5 - 2)^2 = 0.25; V_clip = 1.2, (1.2 - 2)^2 = 0.64 -> 0.5 * 0.64 = 0.32, clipped
    # 2: |V - V_old| = 0.1 < 0.2: both (1.1 - 2)^2 = 0.81 -> 0.405
    # 3: (1.5 - 1)^2 = 0.25; V_clip = 1.2, (0.2)^2 = 0.04 -> 0.5 * 0.25 = 0.125, unclipped
    assert close(loss, [0.32, 0.405, 0.125])
    assert clipped.tolist() == [True, False, False]


def test_kl_estimators_by_hand_and_in_expectation():
    logp, ref = T_([math.log(0.5)]), T_([math.log(0.25)])  # log r = log(0.25 / 0.5) = -log 2
    assert close(kl_estimate(logp, ref, "k1"), [math.log(2)])  # 0.6931
    assert close(kl_estimate(logp, ref, "k2"), [0.5 * math.log(2) ** 2])  # 0.2402
    assert close(kl_estimate(logp, ref, "k3"), [(0.5 - 1) + math.log(2)])  # 0.1931
    # E_p[k1] = E_p[k3] = KL(p || q) exactly (E_p[r] = 1): sum over the support, weighted by p
    p, q = T_([0.7, 0.2, 0.1], dtype=torch.float64), T_([0.2, 0.5, 0.3], dtype=torch.float64)
    kl = (p * (p / q).log()).sum()
    for k in ("k1", "k3"):
        assert close((p * kl_estimate(p.log(), q.log(), k)).sum(), kl, tol=1e-12)
    assert (kl_estimate(p.log(), q.log(), "k3") >= 0).all()
    assert (kl_estimate(p.log(), q.log(), "k1") < 0).any()  # k1 alone can be negative
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_estimate(logp, ref, "k4")


def test_kl_penalized_rewards_put_the_score_on_the_last_token():
    logp = T_([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
    ref = T_([[-1.5, -2.0, -1.0], [-1.2, -0.9, -0.1]])
    mask = T_([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalized_rewards(T_([1.0, 2.0]), logp, ref, mask, kl_coef=0.1)
    # k1 = logp - ref: row 1 [0.5, 0, 0.5], row 2 [0.2, -0.1, (padding) 0]
    assert close(kl, [[0.5, 0.0, 0.5], [0.2, -0.1, 0.0]])
    # -0.1 * k1, plus the score on the last real token
    assert close(rewards, [[-0.05, 0.0, -0.05 + 1.0], [-0.02, 0.01 + 2.0, 0.0]])


def test_group_advantages_by_hand():
    rewards = T_([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 2.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(rewards, eps=0.0 + 1e-6)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866025
    s1 = math.sqrt(1 / 3)
    assert close(adv[0], [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1], tol=1e-5)
    assert close(adv[0], [0.866025, -0.866025, -0.866025, 0.866025], tol=1e-5)
    # group 2: mean 2, deviations -2 -1 0 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3
    s2 = math.sqrt(14 / 3)  # 2.160247
    assert close(adv[1], [-2 / s2, -1 / s2, 0.0, 3 / s2], tol=1e-5)
    assert close(adv[2], [0.0] * 4)  # all equal: nothing to learn
    assert close(group_advantages(rewards, scale_by_std=False)[1], [-2.0, -1.0, 0.0, 3.0])
    with pytest.raises(ValueError, match="samples >= 2"):
        group_advantages(T_([1.0, 0.0]))


def test_token_level_vs_sequence_level_normalisation_on_ragged_lengths():
    x = T_([[1.0, 1.0, 1.0, 1.0], [3.0, 7.0, 7.0, 7.0]])
    mask = T_([[1, 1, 1, 1], [1, 0, 0, 0]])  # lengths 4 and 1; the 7s are padding
    # token level: (1 + 1 + 1 + 1 + 3) / 5 = 1.4; sequence level: (4/4 + 3/1) / 2 = 2.0
    assert close(token_mean(x, mask), 1.4) and close(sequence_mean(x, mask), 2.0)
    # split into two micro-batches, each divided by the whole batch's 5 tokens: the parts add up
    parts = token_mean(x[:1], mask[:1], num_tokens=5) + token_mean(x[1:], mask[1:], num_tokens=5)
    assert close(parts, 1.4)
    # the per-micro-batch means would not: 1.0 + 3.0 != 2 * 1.4
    assert not close(token_mean(x[:1], mask[:1]) + token_mean(x[1:], mask[1:]), 2 * 1.4)


def test_whiten_over_masked_tokens():
    x = T_([[1.0, 3.0], [5.0, 100.0]])
    mask = T_([[1, 1], [1, 0]])
    w = whiten(x, mask)
    # mean 3, population variance (4 + 0 + 4) / 3 = 8/3
    s = math.sqrt(8 / 3)
    assert close(w, [[-2 / s, 0.0], [2 / s, 0.0]], tol=1e-5)
    assert close(whiten(x, mask, shift_mean=False), [[-2 / s + 3, 3.0], [2 / s + 3, 0.0]], tol=1e-5)


def test_entropy_and_token_logprobs():
    logits = T_([[[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), -math.inf]]])
    # uniform over 4: log 4; (0.5, 0.25, 0.25, 0): 0.5 log 2 + 2 * 0.25 log 4 = 1.5 log 2
    assert close(entropy_from_logits(logits), [[math.log(4), 1.5 * math.log(2)]], tol=1e-6)
    assert close(token_logprobs(logits, T_([[2, 0]])), [[math.log(0.25), math.log(0.5)]])
    # temperature 2 on (log 0.5, log 0.25, log 0.25): softmax of halved logits is (sqrt .5, .5, .5) / sum
    z = 0.5**0.5 + 0.5 + 0.5
    assert close(token_logprobs(logits[:, 1:, :3], T_([[0]]), temperature=2.0), [[math.log(0.5**0.5 / z)]])


def test_adaptive_kl_controller():
    c = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    # KL 9: error 9/6 - 1 = 0.5, clipped to 0.2 -> beta * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512
    assert math.isclose(c.update(9.0, 256), 0.100512)
    # KL 5.4: error -0.1 -> * (1 - 0.1 * 256 / 10000) = * 0.99744
    assert math.isclose(c.update(5.4, 256), 0.100512 * 0.99744)
    # KL far below target: error clipped to -0.2
    assert math.isclose(c.update(0.0, 10000), 0.100512 * 0.99744 * 0.8)
