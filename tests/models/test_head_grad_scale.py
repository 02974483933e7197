"""``model.head_trunk_grad_scale``: the CoT/value head's gradient into the trunk is scaled, its own
gradient and every output value are unchanged, and the LM loss's gradient is untouched."""

import pytest
import torch

from tests.models.mcore_helpers import model_cfg, tp1  # noqa: F401


def grads(scale, lm_weight, head_weight):
    from carft_mega.config import TinyModelConfig
    from carft_mega.models.build import build_policy

    pol = build_policy(model_cfg(head_trunk_grad_scale=scale, tiny=TinyModelConfig(hidden_size=32, num_heads=4,
                                                                                 num_kv_heads=2, ffn_hidden_size=64)),
                       vocab_size=40)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (3, 9), generator=g)
    spans = torch.rand(1, 3, 9, generator=g) < 0.5
    out = pol(tokens, span_masks=spans)
    loss = lm_weight * out.logp.sum() + head_weight * (out.values.pow(2).sum() + out.z.sum())
    loss.backward()
    trunk = {n: p.grad.clone() for n, p in pol.gpt.named_parameters() if p.grad is not None}
    head = {n: p.grad.clone() for n, p in pol.cot_head.named_parameters()}
    return out, trunk, head


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_scale_multiplies_the_head_gradient_into_the_trunk(tp1, scale):  # noqa: F811
    out1, trunk1, head1 = grads(1.0, 0.0, 1.0)
    out_s, trunk_s, head_s = grads(scale, 0.0, 1.0)
    torch.testing.assert_close(out_s.values, out1.values)
    torch.testing.assert_close(out_s.z, out1.z)
    for n in head1:  # the head itself learns as before
        torch.testing.assert_close(head_s[n], head1[n])
    assert trunk1 and any(g.abs().sum() > 0 for g in trunk1.values())
    for n, g in trunk1.items():
        torch.testing.assert_close(trunk_s.get(n, torch.zeros_like(g)), scale * g, atol=1e-7, rtol=1e-5)
    # The policy's own (LM) gradient does not depend on the knob.
    _, lm1, _ = grads(1.0, 1.0, 0.0)
    _, lm_s, _ = grads(scale, 1.0, 0.0)
    for n in lm1:
        torch.testing.assert_close(lm_s[n], lm1[n])
