"""Vocab-parallel log-probs / entropy (one shard here; the 2-rank split runs in
tests/distributed) against a full-vocabulary ``log_softmax`` reference, forward and backward."""

import pytest
import torch

from carft_mega.models.logprobs import full_vocab_logprobs_ref, vocab_parallel_logprobs
from tests.utils import assert_close_to_ref


@pytest.mark.parametrize("B,T,V,vocab", [(2, 128, 32000, 32000), (3, 17, 151936, 151646), (1, 1, 50257, 50257),
                                         (4, 5, 256, 203)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_full_vocab_log_softmax(B, T, V, vocab, dtype):
    g = torch.Generator().manual_seed(B * T + V)
    logits = (torch.randn(B, T, V, generator=g) * 4).to(dtype)
    logits[..., vocab:] = 30.0  # padding columns: must carry no probability
    target = torch.randint(0, vocab, (B, T), generator=g)
    w_lp, w_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)

    x = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs(x, target, tp_group=None, vocab_start=0, vocab_size=vocab, need_entropy=True)
    (gx,) = torch.autograd.grad((lp * w_lp).sum() + (ent * w_ent).sum(), x)

    xr = logits.float().clone().requires_grad_(True)  # reference in fp32 on the same values
    lp_r, ent_r = full_vocab_logprobs_ref(xr, target, vocab, need_entropy=True)
    (gr,) = torch.autograd.grad((lp_r * w_lp).sum() + (ent_r * w_ent).sum(), xr)

    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and gx.dtype == dtype
    assert_close_to_ref(lp, lp_r, lp_r, atol=1e-4, name="logp")
    assert_close_to_ref(ent, ent_r, ent_r, atol=1e-4, name="entropy")
    gpt = gr.to(dtype)  # what a same-dtype PyTorch computation can at best return
    assert_close_to_ref(gx, gpt, gr, name="dlogits")
    assert not gx[..., vocab:].any()


def test_entropy_optional_and_logp_only_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g, requires_grad=True)
    target = torch.randint(0, 50, (3, 7), generator=g)
    lp, ent = vocab_parallel_logprobs(logits, target, tp_group=None, vocab_start=0, vocab_size=50)
    assert ent is None
    (gx,) = torch.autograd.grad(lp.sum(), logits)
    expect = torch.nn.functional.one_hot(target, 50).float() - torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(gx, expect, rtol=1e-5, atol=1e-6)


def test_shard_without_real_columns_and_bad_shapes():
    """A rank whose whole slice is padding contributes nothing (single-rank view: all zero grads)."""
    logits = torch.randn(4, 8, requires_grad=True)
    lp, ent = vocab_parallel_logprobs(logits, torch.zeros(4, dtype=torch.long), tp_group=None, vocab_start=16,
                                      vocab_size=10, need_entropy=True)
    # Alone, such a rank sees an empty distribution; what matters is that it neither crashes nor
    # sends gradient into padding (the 2-rank case with an all-padding rank runs in tests/distributed).
    (gx,) = torch.autograd.grad(torch.where(torch.isfinite(lp), lp, 0).sum(), logits)
    assert not gx.any()
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_logprobs(torch.randn(2, 3, 8), torch.zeros(3, 2, dtype=torch.long), tp_group=None,
                                vocab_start=0, vocab_size=8)


def test_row_chunking_gives_the_same_result(monkeypatch):
    """Tiny chunks (one or a few rows at a time) must not change values or gradients."""
    import carft_mega.models.logprobs as lp_mod

    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 203, generator=g)
    t = torch.randint(0, 190, (37,), generator=g)
    outs = []
    for elements in (1 << 25, 400, 100):
        monkeypatch.setattr(lp_mod, "_CHUNK_ELEMENTS", elements)
        xi = x.clone().requires_grad_(True)
        lp, ent = vocab_parallel_logprobs(xi, t, tp_group=None, vocab_start=0, vocab_size=190, need_entropy=True)
        (gx,) = torch.autograd.grad(lp.sum() + 2 * ent.sum(), xi)
        outs.append((lp, ent, gx))
    assert len(lp_mod._row_chunks(37, 190)) == 37
    for lp, ent, gx in outs[1:]:
        assert torch.equal(lp, outs[0][0]) and torch.equal(ent, outs[0][1]) and torch.equal(gx, outs[0][2])


@pytest.mark.parametrize("temperature", [0.5, 0.7, 1.0, 1.6])
def test_temperature_scales_the_distribution(temperature):
    """log-probs and entropy of softmax(logits / T), the distribution a rollout at temperature T
    samples from, forward and backward, with padding columns past the real vocabulary."""
    g = torch.Generator().manual_seed(int(temperature * 10))
    V, vocab = 97, 90
    logits = (torch.randn(3, 11, V, generator=g) * 3).requires_grad_(True)
    target = torch.randint(0, vocab, (3, 11), generator=g)
    lp, ent = vocab_parallel_logprobs(logits, target, tp_group=None, vocab_start=0, vocab_size=vocab,
                                      need_entropy=True, temperature=temperature)
    ref_all = torch.log_softmax(logits[..., :vocab] / temperature, dim=-1)
    lp_ref = ref_all.gather(-1, target[..., None]).squeeze(-1)
    ent_ref = -(ref_all.exp() * ref_all).sum(-1)
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(3, 11, generator=g)
    (gx,) = torch.autograd.grad((lp * w).sum() + ent.sum(), logits)
    (gr,) = torch.autograd.grad((lp_ref * w).sum() + ent_ref.sum(), logits)
    torch.testing.assert_close(gx, gr, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(logits, target, tp_group=None, vocab_start=0, vocab_size=vocab, temperature=0.0)
