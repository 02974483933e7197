"""GAE, KL-shaped rewards and whitening against plain-Python loops over each row's action positions."""

import math

import pytest
import torch

from carft_mega.algos.advantage import (
    compute_gae, group_relative_advantages, kl_shaped_rewards, last_action_index, masked_moments, masked_whiten)


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


def reft_allgather_masked_whiten(values, mask, shift_mean=False):
    """ReFT's whitening, transcribed as a loop over the flattened (already gathered) batch.

    lqtrung1998/mwp_ReFT @ bdc844e, src/utils.py:84-106 (``allgather_masked_whiten``):
        global_mean = masked_mean(values, mask); global_var = masked_var(values, mask)
        whitened = (values - global_mean) * torch.rsqrt(global_var + 1e-8)
        if shift_mean: whitened += global_mean
    with trl v0.7.2 trl/core.py:113-137: ``masked_mean = sum(v * m) / sum(m)``, ``masked_var`` =
    masked mean of the centred squares times ``n / (n - 1)`` (unbiased=True). ReFT calls it with
    the default ``shift_mean=False`` (train_rl_reft.py:421).
    """
    v, m = values.flatten().tolist(), mask.flatten().tolist()
    n = sum(m)
    mean = sum(a * b for a, b in zip(v, m)) / n
    var = sum(((a - mean) ** 2) * b for a, b in zip(v, m)) / n * (n / (n - 1))
    out = [(a - mean) / math.sqrt(var + 1e-8) + (mean if shift_mean else 0.0) for a in v]
    return torch.tensor(out).view(values.shape)


def test_whitening_is_centred_like_reft():
    """The issue's example: [[0, 2, 4]] whitens to [[-1, 0, 1]] (ReFT), not [[1, 2, 3]]."""
    x = torch.tensor([[0.0, 2.0, 4.0]])
    m = torch.ones_like(x, dtype=torch.bool)
    expect = reft_allgather_masked_whiten(x, m)
    torch.testing.assert_close(expect, torch.tensor([[-1.0, 0.0, 1.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_whiten(x, m), expect, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape,p", [((5, 23), 0.5), ((1, 2), 1.0), ((3, 1), 1.0), ((4, 64), 0.1)])
@pytest.mark.parametrize("add_mean_back", [False, True])
def test_masked_whiten_matches_reft(shape, p, add_mean_back):
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    x = torch.randn(*shape, generator=g) * 3 + 1
    m = torch.rand(*shape, generator=g) < p
    m.view(-1)[:2] = True  # at least two elements (the unbiased variance)
    n, mean, var = loop_moments(x, m)
    c, mu, v = masked_moments(x, m)
    assert c.item() == n
    assert mu.item() == pytest.approx(mean, rel=1e-5)
    assert v.item() == pytest.approx(var, rel=1e-5)
    w = masked_whiten(x, m, add_mean_back=add_mean_back)
    # add_mean_back=True is ReFT's shift_mean=True (never its default).
    expect = reft_allgather_masked_whiten(x, m, shift_mean=add_mean_back)
    torch.testing.assert_close(w[m], expect[m], atol=1e-5, rtol=1e-5)
    assert not w[~m].any()
    if not add_mean_back:
        assert abs(w[m].mean().item()) < 1e-5


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


def paper_group_advantages(scores, G):
    """Dr.GRPO (Liu et al. 2025, arXiv 2503.20783, Sec. 3.2): A_i = R(q, o_i) - mean({R(q, o_1..G)})."""
    out = []
    for k in range(0, len(scores), G):
        grp = scores[k:k + G]
        mu = sum(grp) / len(grp)
        out += [r - mu for r in grp]
    return out


def verl_grpo_outcome_advantage(scores, index, norm_adv_by_std_in_grpo):
    """verl's ``compute_grpo_outcome_advantage`` as a loop (volcengine/verl @ b178a3c,
    verl/trainer/ppo/core_algos.py:303-330): scores grouped by prompt ``index``; a group of one
    gets mean 0 and std 1; otherwise mean and ``torch.std`` (unbiased) of the group;
    ``(s - mean) / (std + 1e-6)`` with ``norm_adv_by_std_in_grpo``, else ``s - mean`` (Dr.GRPO)."""
    groups = {}
    for s, i in zip(scores, index):
        groups.setdefault(i, []).append(s)
    stats = {}
    for i, grp in groups.items():
        if len(grp) == 1:
            stats[i] = (0.0, 1.0)
        else:
            mu = sum(grp) / len(grp)
            stats[i] = (mu, math.sqrt(sum((x - mu) ** 2 for x in grp) / (len(grp) - 1)))
    return [(s - stats[i][0]) / (stats[i][1] + 1e-6) if norm_adv_by_std_in_grpo else s - stats[i][0]
            for s, i in zip(scores, index)]


@pytest.mark.parametrize("n_prompts,G", [(1, 2), (5, 2), (3, 4), (7, 3), (2, 8)])
def test_group_relative_advantages_match_paper_and_verl(n_prompts, G):
    g = torch.Generator().manual_seed(n_prompts * 10 + G)
    # ReFT-like rewards: 0, 0.1 (partial) or 1, so ties within a group happen.
    scores = torch.tensor([0.0, 0.1, 1.0])[torch.randint(0, 3, (n_prompts * G,), generator=g)]
    index = [k // G for k in range(n_prompts * G)]
    got = group_relative_advantages(scores, G)
    torch.testing.assert_close(got, torch.tensor(paper_group_advantages(scores.tolist(), G)), atol=1e-6, rtol=0)
    torch.testing.assert_close(got, torch.tensor(verl_grpo_outcome_advantage(scores.tolist(), index, False)),
                               atol=1e-6, rtol=0)
    std_ref = torch.tensor(verl_grpo_outcome_advantage(scores.tolist(), index, True))
    torch.testing.assert_close(group_relative_advantages(scores, G, normalize_std=True), std_ref,
                               atol=1e-4, rtol=1e-5)
    # Per group the advantages sum to zero: a constant shift of a group's rewards changes nothing.
    assert got.view(n_prompts, G).sum(-1).abs().max().item() < 1e-6


def test_group_relative_advantages_edge_cases():
    s = torch.tensor([0.3, 1.0, 0.0])
    assert group_relative_advantages(s, 1).tolist() == [0.0, 0.0, 0.0]  # the formula: r - r
    with pytest.raises(ValueError, match="multiple"):
        group_relative_advantages(s, 2)
    with pytest.raises(ValueError, match="group_size"):
        group_relative_advantages(s, 0)
    assert group_relative_advantages(torch.zeros(0), 2).shape == (0,)
