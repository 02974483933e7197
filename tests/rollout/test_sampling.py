"""Sampling filters against sort-and-loop references; reproducibility by generator seed."""

import math

import pytest
import torch

from carft_mega.rollout.sampling import filter_logits, select_next


def loop_filter(row, top_k, top_p):
    vals = row.tolist()
    order = sorted(range(len(vals)), key=lambda i: -vals[i])
    keep = set(order[:top_k]) if 0 < top_k < len(vals) else set(order)
    kept = [i for i in order if i in keep]
    if top_p < 1.0:
        m = max(vals[i] for i in kept)
        z = sum(math.exp(vals[i] - m) for i in kept)
        mass, nucleus = 0.0, []
        for i in kept:
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += math.exp(vals[i] - m) / z
        keep = set(nucleus)
    return [v if i in keep else float("-inf") for i, v in enumerate(vals)]


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (7, 0.8), (100, 0.3)])
@pytest.mark.parametrize("V", [1, 13, 50])
def test_filter_matches_loop(top_k, top_p, V):
    logits = torch.randn(4, V) * 2
    out = filter_logits(logits, top_k, top_p)
    ref = torch.tensor([loop_filter(r, top_k, top_p) for r in logits])
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    torch.testing.assert_close(out[~torch.isinf(out)], ref[~torch.isinf(ref)])
    assert (~torch.isinf(out)).any(dim=-1).all()  # never empties a row


def test_greedy_and_logp():
    logits = torch.randn(3, 11)
    tok, logp = select_next(logits, greedy=True)
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1)[torch.arange(3), tok])


def test_sampling_reproducible_and_respects_filters():
    logits = torch.randn(64, 20)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, _ = select_next(logits, greedy=False, top_k=3, generator=g1)
    b, _ = select_next(logits, greedy=False, top_k=3, generator=g2)
    assert torch.equal(a, b)
    top3 = torch.topk(logits, 3, -1).indices
    assert (top3 == a[:, None]).any(-1).all()


def test_temperature_one_matches_softmax_frequencies():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    tok, _ = select_next(logits, greedy=False, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=3).float() / tok.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)


@pytest.mark.parametrize("temperature", [0.6, 1.5])
def test_temperature_frequencies_and_reported_logp(temperature):
    """At temperature T tokens follow softmax(logits / T), and the reported log-prob is that
    distribution's (the behaviour policy the PPO ratio must refer to), not the T = 1 one."""
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    tok, logp = select_next(logits, greedy=False, temperature=temperature,
                            generator=torch.Generator().manual_seed(1))
    behaviour = torch.softmax(logits[0] / temperature, -1)
    freq = torch.bincount(tok, minlength=3).float() / tok.numel()
    torch.testing.assert_close(freq, behaviour, atol=0.015, rtol=0)
    torch.testing.assert_close(logp, behaviour.log()[tok])
    assert not torch.allclose(logp, torch.log_softmax(logits[0], -1)[tok])


def loop_inverse_cdf(p_row, u):
    """Walk the CDF: the first token whose running mass reaches u * total."""
    total, run = sum(p_row), 0.0
    for i, p in enumerate(p_row):
        run += p
        if run >= u * total:
            return i
    return len(p_row) - 1


def test_inverse_cdf_matches_loop_and_skips_zero_mass():
    from carft_mega.rollout.sampling import sample_inverse_cdf

    g = torch.Generator().manual_seed(2)
    probs = torch.rand(50, 13, generator=g) * (torch.rand(50, 13, generator=g) > 0.4)
    probs[:, 5] += 0.1  # no empty row
    u = 1.0 - torch.rand(50, generator=g, dtype=torch.float64)
    u[0], u[1] = 1.0, 1e-12  # the ends of (0, 1]
    tok = sample_inverse_cdf(probs, u)
    assert tok.tolist() == [loop_inverse_cdf(probs[b].double().tolist(), u[b].item()) for b in range(50)]
    assert (probs[torch.arange(50), tok] > 0).all()


def test_row_noise_is_independent_of_the_batch_layout():
    """A row's uniforms depend on (seed, its global id, step) only: the same for the whole batch,
    for one rank's half, for a permutation, and for a subset after rows drop out."""
    from carft_mega.rollout.sampling import RowNoise

    full = RowNoise(7, torch.arange(8))
    half = RowNoise(7, torch.arange(4, 8))
    perm = RowNoise(7, torch.tensor([6, 1, 3]))
    for _ in range(3):
        a, b, c = full.next(), half.next(), perm.next()
        assert torch.equal(a[4:], b) and torch.equal(a[[6, 1, 3]], c)
        assert ((a > 0) & (a <= 1)).all()
    later = RowNoise(7, torch.arange(8))
    later.next(), later.next(), later.next()
    d, e = full.next(rows=torch.tensor([2, 5])), later.next()
    assert torch.equal(d, e[[2, 5]])
    assert not torch.equal(RowNoise(8, torch.arange(8)).next(), RowNoise(7, torch.arange(8)).next())


def test_row_noise_lag_takes_an_earlier_step():
    """``next(rows, lag)``: row i gets the uniform of step ``step - lag[i]`` (host list rows too)."""
    from carft_mega.rollout.sampling import RowNoise

    plain = RowNoise(5, torch.arange(3, 9))
    per_step = [plain.next() for _ in range(4)]  # (6,) each
    lagged = RowNoise(5, torch.arange(3, 9))
    for _ in range(3):
        lagged.next()
    got = lagged.next(rows=[4, 0, 2], lag=[0, 3, 1])  # at step 3
    want = torch.stack([per_step[3][4], per_step[0][0], per_step[2][2]])
    assert torch.equal(got, want)
    assert lagged.step == 4


def test_row_noise_sampling_frequencies_and_temperature():
    from carft_mega.rollout.sampling import RowNoise

    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    noise = RowNoise(3, torch.arange(20000))
    tok, logp = select_next(logits, greedy=False, temperature=0.8, generator=noise)
    behaviour = torch.softmax(logits[0] / 0.8, -1)
    freq = torch.bincount(tok, minlength=3).float() / tok.numel()
    torch.testing.assert_close(freq, behaviour, atol=0.015, rtol=0)
    torch.testing.assert_close(logp, behaviour.log()[tok])
    top1, _ = select_next(logits[:50], greedy=False, top_k=1, generator=RowNoise(3, torch.arange(50)))
    assert (top1 == 2).all()
