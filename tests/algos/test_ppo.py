"""PPO losses against CleanRL-style loops, and micro-batch invariance with global counts."""

import math

import pytest
import torch

from carft_mega.algos.ppo import agg_loss, kl_loss, ppo_policy_loss, ppo_value_loss


def loop_policy_terms(logp, old, adv, mask, eps):
    out = torch.zeros_like(logp)
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t]:
                r = torch.exp(logp[b, t] - old[b, t])
                out[b, t] = torch.maximum(-adv[b, t] * r, -adv[b, t] * torch.clamp(r, 1 - eps, 1 + eps))
    return out


def loop_value_terms(v, v_old, ret, mask, c):
    out = torch.zeros_like(v)
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            if mask[b, t]:
                vc = torch.clamp(v[b, t], v_old[b, t] - c, v_old[b, t] + c)
                out[b, t] = 0.5 * torch.maximum((v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2)
    return out


def loop_reduce(terms, mask, agg, budget=None):
    if agg == "token-mean":
        return terms.sum() / mask.sum()
    if agg == "seq-mean-token-sum-norm":
        # Dr.GRPO (Liu et al. 2025, Sec. 3.2): the token sum over all sequences, over a constant
        # (the generation budget) times the number of sequences, never a sequence's own length.
        return sum(terms[b, t] for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]) \
            / (mask.shape[0] * budget)
    rows = [terms[b].sum() / mask[b].sum() for b in range(mask.shape[0]) if mask[b].any()]
    return sum(rows) / len(rows)


def make(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    old = torch.randn(B, T, generator=g) * 0.5 - 2
    logp = (old + 0.3 * torch.randn(B, T, generator=g)).requires_grad_()
    adv = torch.randn(B, T, generator=g)
    v_old = torch.randn(B, T, generator=g)
    v = (v_old + 0.4 * torch.randn(B, T, generator=g)).requires_grad_()
    ret = torch.randn(B, T, generator=g)
    return logp, old, adv, mask, v, v_old, ret


AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
BUDGET = 40


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 11), (4, 32)])
def test_losses_match_loops(agg, B, T):
    logp, old, adv, mask, v, v_old, ret = make(B, T, B * 31 + T)
    loss, metrics = ppo_policy_loss(logp, old, adv, mask, 0.2, agg, token_budget=BUDGET)
    ref = loop_reduce(loop_policy_terms(logp, old, adv, mask, 0.2), mask, agg, BUDGET)
    torch.testing.assert_close(loss, ref)
    g, = torch.autograd.grad(loss, logp)
    g_ref, = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(g, g_ref)
    vloss, vmetrics = ppo_value_loss(v, v_old, ret, mask, 0.2, agg, token_budget=BUDGET)
    vref = loop_reduce(loop_value_terms(v, v_old, ret, mask, 0.2), mask, agg, BUDGET)
    torch.testing.assert_close(vloss, vref)
    torch.testing.assert_close(torch.autograd.grad(vloss, v)[0], torch.autograd.grad(vref, v)[0])
    assert 0.0 <= metrics["actor/clipfrac"].item() <= 1.0
    assert metrics["actor/approx_kl"].item() >= 0.0
    assert not any(m.requires_grad for m in {**metrics, **vmetrics}.values())


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batch_invariance(agg):
    """Losses, gradients and metrics (shares of global means) summed over micro-batches equal the
    full batch's."""
    logp, old, adv, mask, v, v_old, ret = make(6, 9, 7)
    n_tok = mask.sum()
    n_seq = mask.shape[0] if agg == "seq-mean-token-sum-norm" else mask.any(-1).sum()
    kw = dict(num_tokens=n_tok, num_seqs=n_seq, token_budget=BUDGET)

    def losses(sl):
        pg, m1 = ppo_policy_loss(logp[sl], old[sl], adv[sl], mask[sl], 0.2, agg, **kw)
        vf, m2 = ppo_value_loss(v[sl], v_old[sl], ret[sl], mask[sl], 0.2, agg, **kw)
        return pg + vf, {**m1, **m2}

    full, m_full = losses(slice(0, 6))
    g_full = torch.autograd.grad(full, (logp, v))
    (a, ma), (b, mb) = losses(slice(0, 2)), losses(slice(2, 6))
    split = a + b
    g_split = torch.autograd.grad(split, (logp, v))
    torch.testing.assert_close(split, full)
    for x, y in zip(g_split, g_full):
        torch.testing.assert_close(x, y)
    for k in m_full:
        torch.testing.assert_close(ma[k] + mb[k], m_full[k], msg=k)


def test_all_masked_rows_give_zero_loss():
    logp, old, adv, mask, v, v_old, ret = make(2, 4, 0)
    mask = torch.zeros_like(mask)
    for agg in AGGS:
        assert ppo_policy_loss(logp, old, adv, mask, 0.2, agg, token_budget=BUDGET)[0].item() == 0.0
        assert ppo_value_loss(v, v_old, ret, mask, 0.2, agg, token_budget=BUDGET)[0].item() == 0.0
        assert kl_loss(logp, old, mask, agg, token_budget=BUDGET)[0].item() == 0.0


def test_bad_agg_raises():
    with pytest.raises(ValueError, match="agg"):
        agg_loss(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "mean")
    with pytest.raises(ValueError, match="token_budget"):
        agg_loss(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "seq-mean-token-sum-norm")


def verl_low_var_kl(logprob, ref_logprob):
    """volcengine/verl @ b178a3c, verl/trainer/ppo/core_algos.py:1890-1896 (``kl_penalty`` with
    ``low_var_kl`` / ``k3``), per token: kl = clamp(ref - logp, -20, 20); clamp(exp(kl) - kl - 1, -10, 10)."""
    kl = min(max(ref_logprob - logprob, -20.0), 20.0)
    return min(max(math.exp(kl) - kl - 1.0, -10.0), 10.0)


@pytest.mark.parametrize("agg", AGGS)
def test_kl_loss_matches_verl_k3(agg):
    logp, old, _, mask, *_ = make(4, 13, 3)
    ref = old + 0.7 * torch.randn(4, 13, generator=torch.Generator().manual_seed(4))
    ref[0, 0] = logp[0, 0].detach() + 30.0  # exercises both clamps
    loss, m = kl_loss(logp, ref, mask, agg, token_budget=BUDGET)
    terms = torch.zeros(4, 13)
    for b in range(4):
        for t in range(13):
            if mask[b, t]:
                terms[b, t] = verl_low_var_kl(logp[b, t].item(), ref[b, t].item())
    torch.testing.assert_close(loss.detach(), loop_reduce(terms, mask, agg, BUDGET), atol=1e-5, rtol=1e-5)
    assert m["actor/kl_loss"].item() == pytest.approx(loss.item())
    assert kl_loss(logp, logp.detach(), mask, agg, token_budget=BUDGET)[0].item() == pytest.approx(0.0, abs=1e-7)


def test_policy_loss_survives_a_huge_log_ratio_and_dirty_padding():
    """A token whose log-prob moved by 100 nats gives a finite loss (ratio clamped at exp(20), as
    verl does); -inf/NaN at non-action positions changes nothing."""
    g = torch.Generator().manual_seed(5)
    B, T = 3, 7
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    logp = torch.randn(B, T, generator=g, requires_grad=True)
    old = torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    adv[0, 0] = -1.0
    old_far = old.clone()
    old_far[0, 0] = logp[0, 0].detach() - 100.0
    loss, _ = ppo_policy_loss(logp, old_far, adv, mask, 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    clean, _ = ppo_policy_loss(logp.detach(), old, adv, mask, 0.2)
    dirty_old, dirty_adv = old.clone(), adv.clone()
    dirty_old[~mask], dirty_adv[~mask] = float("-inf"), float("nan")
    dirty, m = ppo_policy_loss(logp.detach(), dirty_old, dirty_adv, mask, 0.2)
    assert torch.equal(clean, dirty) and all(torch.isfinite(v) for v in m.values())
