"""CoT pooling (Eq. 6) against a per-row loop."""

import math

import pytest
import torch

from carft_mega.algos.embeddings import cot_embeddings


def loop_pool(e, v, masks):
    K, N, T = masks.shape
    d = e.shape[-1]
    z = torch.zeros(K, N, d, dtype=torch.float64)
    valid = torch.zeros(K, N, dtype=torch.bool)
    for k in range(K):
        for n in range(N):
            ts = [t for t in range(T) if masks[k, n, t]]
            if not ts:
                continue
            valid[k, n] = True
            mx = max(float(v[n, t]) for t in ts)
            w = [math.exp(float(v[n, t]) - mx) for t in ts]
            s = sum(w)
            for wt, t in zip(w, ts):
                z[k, n] += (wt / s) * e[n, t].double()
    return z.float(), valid


@pytest.mark.parametrize("K,N,T,d", [(1, 1, 1, 4), (3, 2, 17, 8), (2, 4, 33, 64)])
def test_matches_loop(K, N, T, d):
    e = torch.randn(N, T, d)
    v = torch.randn(N, T) * 3
    masks = torch.rand(K, N, T) < 0.4
    masks[0, 0] = False  # an empty span
    z, valid = cot_embeddings(e, v, masks)
    z_ref, valid_ref = loop_pool(e, v, masks)
    assert torch.equal(valid, valid_ref)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    assert not z[0, 0].any()


def test_2d_masks_and_gradient_flows_through_values_and_embeddings():
    e = torch.randn(2, 5, 3, requires_grad=True)
    v = torch.randn(2, 5, requires_grad=True)
    m = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    z, valid = cot_embeddings(e, v, m)
    assert z.shape == (2, 3) and valid.tolist() == [True, False]
    z.sum().backward()
    assert torch.isfinite(e.grad).all() and torch.isfinite(v.grad).all()
    assert e.grad[0, 0].abs().sum() > 0 and not e.grad[1].any() and not e.grad[0, 2].any()


def test_bf16_input_upcasts():
    e = torch.randn(1, 4, 2).bfloat16()
    v = torch.randn(1, 4).bfloat16()
    z, _ = cot_embeddings(e, v, torch.ones(1, 4, dtype=torch.bool))
    assert z.dtype == torch.float32
