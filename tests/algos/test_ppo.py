"""PPO losses against CleanRL-style loops, and micro-batch invariance with global counts."""

import pytest
import torch

from carft_mega.algos.ppo import agg_loss, ppo_policy_loss, ppo_value_loss


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


def loop_reduce(terms, mask, agg):
    if agg == "token-mean":
        return terms.sum() / mask.sum()
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


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 11), (4, 32)])
def test_losses_match_loops(agg, B, T):
    logp, old, adv, mask, v, v_old, ret = make(B, T, B * 31 + T)
    loss, metrics = ppo_policy_loss(logp, old, adv, mask, 0.2, agg)
    ref = loop_reduce(loop_policy_terms(logp, old, adv, mask, 0.2), mask, agg)
    torch.testing.assert_close(loss, ref)
    g, = torch.autograd.grad(loss, logp)
    g_ref, = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(g, g_ref)
    vloss, vmetrics = ppo_value_loss(v, v_old, ret, mask, 0.2, agg)
    vref = loop_reduce(loop_value_terms(v, v_old, ret, mask, 0.2), mask, agg)
    torch.testing.assert_close(vloss, vref)
    torch.testing.assert_close(torch.autograd.grad(vloss, v)[0], torch.autograd.grad(vref, v)[0])
    assert 0.0 <= metrics["actor/clipfrac"].item() <= 1.0
    assert metrics["actor/approx_kl"].item() >= 0.0
    assert not any(m.requires_grad for m in {**metrics, **vmetrics}.values())


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_invariance(agg):
    logp, old, adv, mask, v, v_old, ret = make(6, 9, 7)
    n_tok = mask.sum()
    n_seq = mask.any(-1).sum()
    full = ppo_policy_loss(logp, old, adv, mask, 0.2, agg, n_tok, n_seq)[0] + \
        ppo_value_loss(v, v_old, ret, mask, 0.2, agg, n_tok, n_seq)[0]
    g_full = torch.autograd.grad(full, (logp, v))
    parts = []
    for sl in (slice(0, 2), slice(2, 6)):
        parts.append(ppo_policy_loss(logp[sl], old[sl], adv[sl], mask[sl], 0.2, agg, n_tok, n_seq)[0]
                     + ppo_value_loss(v[sl], v_old[sl], ret[sl], mask[sl], 0.2, agg, n_tok, n_seq)[0])
    split = parts[0] + parts[1]
    g_split = torch.autograd.grad(split, (logp, v))
    torch.testing.assert_close(split, full)
    for a, b in zip(g_split, g_full):
        torch.testing.assert_close(a, b)


def test_all_masked_rows_give_zero_loss():
    logp, old, adv, mask, v, v_old, ret = make(2, 4, 0)
    mask = torch.zeros_like(mask)
    for agg in ("token-mean", "seq-mean-token-mean"):
        assert ppo_policy_loss(logp, old, adv, mask, 0.2, agg)[0].item() == 0.0
        assert ppo_value_loss(v, v_old, ret, mask, 0.2, agg)[0].item() == 0.0


def test_bad_agg_raises():
    with pytest.raises(ValueError, match="agg"):
        agg_loss(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "mean")


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
