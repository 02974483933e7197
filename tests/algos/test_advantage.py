"""GAE, KL-shaped rewards and whitening against plain-Python loops over each row's action positions."""

import math

import pytest
import torch

from carft_mega.algos.advantage import (
    compute_gae, kl_shaped_rewards, last_action_index, masked_moments, masked_whiten)


def loop_rewards_and_gae(scores, logp_old, logp_ref, values, mask, beta, gamma, lam):
    """Scalar reference: per row, list the action positions and run the recursion backwards."""
    B, T = len(mask), len(mask[0])
    rew = [[0.0] * T for _ in range(B)]
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        pos = [t for t in range(T) if mask[b][t]]
        for t in pos:
            rew[b][t] = -beta * (logp_old[b][t] - logp_ref[b][t])
        if pos:
            rew[b][pos[-1]] += scores[b]
        a_next, v_next = 0.0, 0.0
        for t in reversed(pos):
            delta = rew[b][t] + gamma * v_next - values[b][t]
            a = delta + gamma * lam * a_next
            adv[b][t], ret[b][t] = a, a + values[b][t]
            a_next, v_next = a, values[b][t]
    return rew, adv, ret


def random_mask(B, T, kind, gen):
    if kind == "contiguous":
        m = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):
            s = int(torch.randint(0, T, (1,), generator=gen))
            e = int(torch.randint(s, T + 1, (1,), generator=gen))
            m[b, s:e] = True
        return m
    if kind == "gaps":
        return torch.rand(B, T, generator=gen) < 0.6
    if kind == "empty":
        return torch.zeros(B, T, dtype=torch.bool)
    raise ValueError(kind)


@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (4, 64), (2, 5)])
@pytest.mark.parametrize("kind", ["contiguous", "gaps", "empty"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_and_rewards_match_loop(B, T, kind, gamma, lam):
    gen = torch.Generator().manual_seed(B * 1000 + T)
    mask = random_mask(B, T, kind, gen)
    scores = torch.rand(B, generator=gen)
    lo, lr, v = (torch.randn(B, T, generator=gen) for _ in range(3))
    beta = 0.05
    rew = kl_shaped_rewards(scores, lo, lr, mask, beta)
    adv, ret = compute_gae(rew, v, mask, gamma, lam)
    r_ref, a_ref, ret_ref = loop_rewards_and_gae(
        scores.tolist(), lo.tolist(), lr.tolist(), v.tolist(), mask.tolist(), beta, gamma, lam)
    torch.testing.assert_close(rew, torch.tensor(r_ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adv, torch.tensor(a_ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, torch.tensor(ret_ref), atol=1e-5, rtol=1e-5)
    assert not adv[~mask].any() and not ret[~mask].any()


def test_last_action_index():
    m = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert last_action_index(m).tolist() == [2, -1, 3]


def test_score_lands_on_last_action_token():
    m = torch.tensor([[0, 1, 1, 0, 0]], dtype=torch.bool)
    zeros = torch.zeros(1, 5)
    r = kl_shaped_rewards(torch.tensor([0.7]), zeros, zeros, m, beta=0.05)
    assert r.tolist() == [[0.0, 0.0, pytest.approx(0.7), 0.0, 0.0]]


def loop_moments(x, m):
    vals = [xi for xi, mi in zip(x.flatten().tolist(), m.flatten().tolist()) if mi]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return n, mean, var


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(shift_mean):
    x = torch.randn(5, 23) * 3 + 1
    m = torch.rand(5, 23) < 0.5
    n, mean, var = loop_moments(x, m)
    c, mu, v = masked_moments(x, m)
    assert c.item() == n
    assert mu.item() == pytest.approx(mean, rel=1e-5)
    assert v.item() == pytest.approx(var, rel=1e-5)
    w = masked_whiten(x, m, shift_mean=shift_mean)
    expect = (x - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    torch.testing.assert_close(w[m], expect[m], atol=1e-5, rtol=1e-5)
    assert not w[~m].any()


def test_non_finite_values_outside_the_mask_do_not_leak():
    """Padding positions may hold -inf log-probs or NaN values; the rewards, advantages and returns
    at action positions (and the zeros elsewhere) must be those of clean inputs."""
    g = torch.Generator().manual_seed(11)
    B, T = 4, 9
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[3] = False  # a row without actions
    lo, lr_, v = (torch.randn(B, T, generator=g) for _ in range(3))
    scores = torch.randn(B, generator=g)
    dirty = [x.clone() for x in (lo, lr_, v)]
    for x, bad in zip(dirty, (float("-inf"), float("nan"), float("nan"))):
        x[~mask] = bad
    clean_r = kl_shaped_rewards(scores, lo, lr_, mask, 0.05)
    dirty_r = kl_shaped_rewards(scores, dirty[0], dirty[1], mask, 0.05)
    assert torch.equal(clean_r, dirty_r)
    a0, r0 = compute_gae(clean_r, v, mask, 1.0, 0.95)
    a1, r1 = compute_gae(dirty_r, dirty[2], mask, 1.0, 0.95)
    assert torch.equal(a0, a1) and torch.equal(r0, r1) and torch.isfinite(r1).all()


def test_zero_length_rows():
    mask = torch.zeros(3, 0, dtype=torch.bool)
    assert last_action_index(mask).tolist() == [-1, -1, -1]
    r = kl_shaped_rewards(torch.ones(3), torch.zeros(3, 0), torch.zeros(3, 0), mask, 0.1)
    adv, ret = compute_gae(r, torch.zeros(3, 0), mask, 1.0, 0.95)
    assert r.shape == adv.shape == ret.shape == (3, 0)
