"""The CPU shim's device-remapping mode is off inside the model's forward and on everywhere else,
and the mask builders it patches for the forward give Megatron's masks."""

import pytest
import torch

from carft_mega import parallel
from carft_mega.config import ParallelConfig

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is for CPU-only machines")


@pytest.fixture(scope="module")
def shim():
    parallel.init_distributed(ParallelConfig(tp=1), seed=0)
    from carft_mega import _cpu_shim

    assert _cpu_shim.is_applied()
    yield _cpu_shim
    parallel.destroy()


def test_suspended_takes_the_mode_off_and_puts_it_back(shim):
    assert torch.zeros(1, device="cuda").device.type == "cpu"  # the mode rewrites the device
    with shim.suspended():
        assert torch.overrides._get_current_function_mode() is not shim._MODE
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")
    assert torch.overrides._get_current_function_mode() is shim._MODE
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def test_suspended_leaves_a_mode_on_top_alone(shim):
    with torch.device("cpu"):  # pushes its own TorchFunctionMode above the shim's
        top = torch.overrides._get_current_function_mode()
        with shim.suspended():
            assert torch.overrides._get_current_function_mode() is top
            assert torch.zeros(1, device="cuda").device.type == "cpu"  # the shim's mode still below


def test_forward_runs_without_the_mode(shim):
    from carft_mega.models.build import build_policy
    from carft_mega.config import ModelConfig, TinyModelConfig

    cfg = ModelConfig(source="tiny", tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4,
                                                          num_kv_heads=2, ffn_hidden_size=64))
    policy = build_policy(cfg, vocab_size=40).eval()
    seen = []
    hook = policy.gpt.decoder.register_forward_pre_hook(
        lambda *_: seen.append(torch.overrides._get_current_function_mode()))
    try:
        with torch.no_grad():
            out = policy(torch.randint(0, 40, (2, 6)))  # no attention mask: Megatron's default causal mask
    finally:
        hook.remove()
    assert seen and all(m is not shim._MODE for m in seen)
    assert torch.isfinite(out.logp).all()
    assert torch.overrides._get_current_function_mode() is shim._MODE


@pytest.mark.parametrize("sq,skv", [(1, 1), (5, 5), (3, 8)])
def test_patched_masks_equal_their_definition(shim, sq, skv):
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    want = torch.tensor([[j > i for j in range(sq)] for i in range(sq)])
    for mod in (tutils, fused_softmax):
        assert torch.equal(mod.get_default_causal_mask(sq), want)
    for w0, w1 in [(0, 0), (2, 0), (4, 1)]:
        # Megatron's SWA band: query i sees key j iff skv - sq - w0 <= j - i <= skv - sq + w1.
        want = torch.tensor([[not (skv - sq - w0 <= j - i <= skv - sq + w1) for j in range(skv)]
                             for i in range(sq)])
        assert torch.equal(tutils.get_sliding_window_causal_mask(sq, skv, (w0, w1)), want)
