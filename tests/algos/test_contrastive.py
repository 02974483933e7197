"""Contrastive signals (Eqs. 7-8) against per-anchor loops over the whole batch, micro-batch and
data-parallel invariance of loss and gradient, and the partial reward."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from carft_mega.algos.contrastive import (
    build_bank, contrastive_negative, contrastive_positive, partial_reward_embedding)


def cos(a, b):
    return (a @ b) / (a.norm() * b.norm())


def loop_infonce(anchor, positive, cand, select, cand_valid, tau, clamp=None, groups=None):
    """DESIGN.md Sec. 4 (paper Eqs. 7-8) as a loop:
    sum_i select_i * -log(exp(s(a_i, p_i)) / sum_{j in D_i} exp(s(a_i, c_j))) / #{selected i with D_i non-empty},
    D_i = valid candidates j that are i itself or of another prompt (groups[j] != groups[i])."""
    N = anchor.shape[0]
    groups = list(range(N)) if groups is None else list(groups)
    terms = []
    for i in range(N):
        if not select[i]:
            continue
        D = [j for j in range(N) if cand_valid[j] and (j == i or groups[j] != groups[i])]
        if not D:
            continue
        pos = cos(anchor[i], positive[i])
        if clamp is not None:
            pos = torch.clamp(pos, max=clamp)
        den = sum(torch.exp(cos(anchor[i], cand[j]) / tau) for j in D)
        terms.append(-(pos / tau - torch.log(den)))
    return sum(terms) / len(terms) if terms else torch.zeros(())


def data(N, d, seed):
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(N, d, generator=g)
    zr = torch.randn(N, d, generator=g).requires_grad_()
    zx = torch.randn(N, d, generator=g).requires_grad_()
    sel = torch.rand(N, generator=g) < 0.6
    valid = torch.rand(N, generator=g) < 0.85
    return za, zr, zx, sel, valid


@pytest.mark.parametrize("N,d", [(1, 4), (5, 8), (16, 64)])
@pytest.mark.parametrize("clamp", [None, 0.9])
def test_positive_matches_loop(N, d, clamp):
    za, zr, _, sel, valid = data(N, d, N + d)
    sel = sel & valid
    loss, m = contrastive_positive(za, zr, sel, valid, tau=0.2, clamp_pos_cos=clamp)
    ref = loop_infonce(za, zr, zr, sel, valid, 0.2, clamp)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    if sel.any():
        torch.testing.assert_close(torch.autograd.grad(loss, zr)[0], torch.autograd.grad(ref, zr)[0],
                                   atol=1e-5, rtol=1e-4)
    assert m["contrastive/pos_count"].item() == sel.sum().item()


@pytest.mark.parametrize("N,d", [(1, 4), (6, 8), (13, 64)])
def test_negative_matches_loop(N, d):
    za, zr, zx, sel, valid = data(N, d, 3 * N + d)
    loss, m = contrastive_negative(zr, za, zx, sel, valid, tau=0.2)
    ref = loop_infonce(zr, za, zx, sel, valid, 0.2)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    if sel.any() and valid.any():
        g = torch.autograd.grad(loss, (zr, zx))
        g_ref = torch.autograd.grad(ref, (zr, zx))
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_nothing_selected_is_zero_with_zero_grad():
    za, zr, zx, _, valid = data(4, 8, 0)
    none = torch.zeros(4, dtype=torch.bool)
    loss, _ = contrastive_positive(za, zr, none, valid)
    assert loss.item() == 0.0
    assert not torch.autograd.grad(loss, zr)[0].any()
    loss, _ = contrastive_negative(zr, za, zx, torch.ones(4, dtype=torch.bool), none)
    assert loss.item() == 0.0  # no candidate at all: no denominator, no term


@pytest.mark.parametrize("signal", ["positive", "negative"])
@pytest.mark.parametrize("splits", [[2, 5], [1, 1, 1, 4], [7]])
def test_micro_batch_invariance(signal, splits):
    """Sum over micro-batches (each with the detached bank) == full-batch loss and gradient."""
    za, zr, zx, sel, valid = data(7, 16, 11)
    if signal == "positive":
        sel = sel & valid
        full = loop_infonce(za, zr, zr, sel, valid, 0.2)
        bank, _ = build_bank(za, zr, zr, sel, valid)
    else:
        full = loop_infonce(zr, za, zx, sel, valid, 0.2)
        bank, _ = build_bank(zr, za, zx, sel, valid)
    g_full = torch.autograd.grad(full, (zr, zx), allow_unused=True, materialize_grads=True)
    total, start = 0.0, 0
    for n in splits:
        idx = torch.arange(start, start + n)
        if signal == "positive":
            loss, _ = contrastive_positive(za[idx], zr[idx], sel[idx], valid[idx], bank=bank, local_index=idx)
        else:
            loss, _ = contrastive_negative(zr[idx], za[idx], zx[idx], sel[idx], valid[idx], bank=bank,
                                           local_index=idx)
        total = total + loss
        start += n
    g_split = torch.autograd.grad(total, (zr, zx), allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(total, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_split, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("signal", ["positive", "negative"])
@pytest.mark.parametrize("G", [2, 3])
def test_other_samples_of_a_prompt_are_not_negatives(signal, G):
    """G samples per prompt: the denominators leave out the other samples of the same prompt, in the
    full batch and summed over micro-batches (loss and gradient)."""
    N = 4 * G
    za, zr, zx, sel, valid = data(N, 16, 20 + G)
    groups = torch.arange(N) // G
    if signal == "positive":
        sel = sel & valid
        full = loop_infonce(za, zr, zr, sel, valid, 0.2, groups=groups)
        bank, _ = build_bank(za, zr, zr, sel, valid, prompt_ids=groups)
        fn = lambda idx: contrastive_positive(za[idx], zr[idx], sel[idx], valid[idx], bank=bank, local_index=idx)
    else:
        full = loop_infonce(zr, za, zx, sel, valid, 0.2, groups=groups)
        bank, _ = build_bank(zr, za, zx, sel, valid, prompt_ids=groups)
        fn = lambda idx: contrastive_negative(zr[idx], za[idx], zx[idx], sel[idx], valid[idx], bank=bank,
                                              local_index=idx)
    ungrouped = loop_infonce(*((za, zr, zr) if signal == "positive" else (zr, za, zx)), sel, valid, 0.2)
    assert abs(full.item() - ungrouped.item()) > 1e-4  # the masking matters on this data
    g_full = torch.autograd.grad(full, (zr, zx), allow_unused=True, materialize_grads=True)
    total = sum(fn(torch.arange(s, min(N, s + 3)))[0] for s in range(0, N, 3))
    torch.testing.assert_close(total, full, atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(total, (zr, zx), allow_unused=True, materialize_grads=True)
    for a, b in zip(g, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # The standalone entry points (no bank) take the same prompt ids.
    args = (za, zr, sel, valid) if signal == "positive" else (zr, za, zx, sel, valid)
    f = contrastive_positive if signal == "positive" else contrastive_negative
    torch.testing.assert_close(f(*args, prompt_ids=groups)[0], full, atol=1e-5, rtol=1e-5)


def loop_metrics(anchor, positive, cand, select, cand_valid, tau, positive_is_candidate):
    """Mean positive cosine and accuracy over the selected anchors: an anchor is right when its
    positive's similarity beats every other candidate's (the positive itself excluded when it is
    one of the candidates)."""
    coss, wins = [], []
    for i in range(anchor.shape[0]):
        if not select[i]:
            continue
        c = cos(anchor[i], positive[i]).item()
        others = [cos(anchor[i], cand[j]).item() for j in range(cand.shape[0])
                  if cand_valid[j] and not (positive_is_candidate and j == i)]
        coss.append(c)
        wins.append(all(c > o for o in others))
    return sum(coss) / len(coss), sum(wins) / len(wins)


@pytest.mark.parametrize("clamp", [None, 0.9])
def test_positive_metrics_are_over_selected_anchors(clamp):
    """Near-duplicate positives: accuracy is 1 (the positive is never compared with itself) and the
    cosine is the mean over the selected anchors; summed over micro-batches the shares give the
    global values."""
    g = torch.Generator().manual_seed(3)
    N, d = 10, 32
    za = torch.randn(N, d, generator=g)
    zr = za + 0.05 * torch.randn(N, d, generator=g)
    sel = torch.ones(N, dtype=torch.bool)
    sel[[2, 7]] = False
    valid = torch.ones(N, dtype=torch.bool)
    bank, _ = build_bank(za, zr, zr, sel, valid)
    cos_ref, acc_ref = loop_metrics(za, zr, zr, sel, valid, 0.2, True)
    assert acc_ref == 1.0
    sums = {}
    for idx in (torch.arange(0, 4), torch.arange(4, 10)):
        _, m = contrastive_positive(za[idx], zr[idx], sel[idx], valid[idx], bank=bank, local_index=idx,
                                    clamp_pos_cos=clamp)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v.item()
    assert sums["contrastive/pos_acc"] == pytest.approx(1.0)
    assert sums["contrastive/pos_cos"] == pytest.approx(cos_ref, rel=1e-5)
    assert sums["contrastive/pos_count"] == 8


def test_negative_metrics_match_loop():
    za, zr, zx, sel, valid = data(9, 8, 17)
    _, m = contrastive_negative(zr, za, zx, sel, valid)
    cos_ref, acc_ref = loop_metrics(zr, za, zx, sel, valid, 0.2, False)
    assert m["contrastive/neg_cos"].item() == pytest.approx(cos_ref, rel=1e-5)
    assert m["contrastive/neg_acc"].item() == pytest.approx(acc_ref)


def test_partial_reward_embedding_range_and_value():
    za, zr = torch.randn(9, 5), torch.randn(9, 5)
    r = partial_reward_embedding(za, zr)
    ref = torch.tensor([0.1 * float(cos(za[i], zr[i])) + 0.2 for i in range(9)])
    torch.testing.assert_close(r, ref)
    assert (r >= 0.1 - 1e-6).all() and (r <= 0.3 + 1e-6).all()
    assert partial_reward_embedding(za[:1], za[:1]).item() == pytest.approx(0.3)
    assert partial_reward_embedding(za[:1], -za[:1]).item() == pytest.approx(0.1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        za, zr, zx, sel, valid = data(8, 16, 5)
        rows = slice(rank * 4, rank * 4 + 4)
        zr_l = zr.detach()[rows].clone().requires_grad_()
        zx_l = zx.detach()[rows].clone().requires_grad_()
        sel_p = (sel & valid)[rows]
        lp, _ = contrastive_positive(za[rows], zr_l, sel_p, valid[rows], group=dist.group.WORLD)
        ln, _ = contrastive_negative(zr_l, za[rows], zx_l, sel[rows], valid[rows], group=dist.group.WORLD)
        loss = lp + ln
        loss.backward()
        from carft_mega.algos.advantage import masked_whiten
        x = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
        m = torch.rand(8, 10, generator=torch.Generator().manual_seed(2)) < 0.5
        w = masked_whiten(x[rows], m[rows], group=dist.group.WORLD)
        torch.save({"loss": loss.detach(), "g_zr": zr_l.grad, "g_zx": zx_l.grad, "w": w},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_equals_full_batch(tmp_path):
    """Two gloo ranks with half the batch each: summed losses and per-row gradients equal the
    single-process full batch; global whitening equals whitening the concatenated batch."""
    mp.spawn(_dp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    za, zr, zx, sel, valid = data(8, 16, 5)
    full = loop_infonce(za, zr, zr, sel & valid, valid, 0.2) + loop_infonce(zr, za, zx, sel, valid, 0.2)
    g_zr, g_zx = torch.autograd.grad(full, (zr, zx))
    torch.testing.assert_close(r[0]["loss"] + r[1]["loss"], full.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r[0]["g_zr"], r[1]["g_zr"]]), g_zr, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([r[0]["g_zx"], r[1]["g_zx"]]), g_zx, atol=1e-5, rtol=1e-4)
    from carft_mega.algos.advantage import masked_whiten
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    m = torch.rand(8, 10, generator=torch.Generator().manual_seed(2)) < 0.5
    torch.testing.assert_close(torch.cat([r[0]["w"], r[1]["w"]]), masked_whiten(x, m), atol=1e-5, rtol=1e-5)
    assert math.isfinite(full.item())
