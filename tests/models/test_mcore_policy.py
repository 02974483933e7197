"""PolicyModel at TP=1 against an independent HF + plain-torch reference: log-probs, values, pooled
CoT embeddings, entropy and all gradients; left padding; the skipped output layer; KV-cache calls;
the builders."""

import os

import pytest
import torch

from carft_mega.models import convert
from carft_mega.models.build import build_policy, frozen_copy, policy_from_hf_source
from tests.models.mcore_helpers import (assert_fp32_close, hf_reference, model_cfg, policy_inputs, policy_loss,
                                        random_head_, tiny_arch, tiny_hf_model, tp1)  # noqa: F401
from carft_mega.config import TinyModelConfig


def _policy(arch, seed=0):
    hf = tiny_hf_model(arch, seed)
    pol = policy_from_hf_source(convert.HFSource.from_model(hf), model_cfg())
    random_head_(pol)
    return hf, pol


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("llama", True)])
def test_outputs_and_gradients_match_hf_reference(tp1, family, tied):
    arch = tiny_arch(family, tied=tied)
    hf, pol = _policy(arch, seed=1)
    tokens, mask, spans, weights = policy_inputs(seed=2)
    out = pol(tokens, attention_mask=mask, span_masks=spans, need_entropy=True)
    head = {k: v.detach().clone().requires_grad_(True) for k, v in pol.cot_head.state_dict().items()}
    ref = hf_reference(hf, head, tokens, mask, spans)
    for k in ("logp", "values", "entropy"):
        assert_fp32_close(k, getattr(out, k)[mask], ref[k][mask])
    assert_fp32_close("z", out.z, ref["z"])
    assert torch.equal(out.z_valid, ref["valid"]) and not out.z_valid[2, 0] and out.z_valid[0].all()
    assert out.logp.dtype == out.values.dtype == out.z.dtype == torch.float32
    assert (out.logp[:, -1] == 0).all()

    from types import SimpleNamespace

    policy_loss(out, weights, mask).backward()
    ref_out = SimpleNamespace(logp=ref["logp"], values=ref["values"], z=ref["z"], entropy=ref["entropy"])
    policy_loss(ref_out, weights, mask).backward()
    # HF gradients in Megatron's layout: the conversion is a re-layout, so gradients map the same way.
    hf_params = dict(hf.named_parameters())
    grads = convert.HFSource(hf.config, lambda n: hf_params[n].grad, set(hf_params), "<hf grads>")
    meg = dict(pol.gpt.named_parameters())
    for tmpl, name in convert.megatron_keys(arch):
        want = convert.hf_to_megatron_tensor(grads, tmpl, name, arch, pol.padded_vocab_size)
        assert_fp32_close(f"grad {name}", meg[name].grad, want)
    for k, p in pol.cot_head.named_parameters():
        assert_fp32_close(f"head grad {k}", p.grad, head[k].grad)


def test_left_padding_equals_unpadded_rows(tp1):
    _, pol = _policy(tiny_arch("qwen2", tied=True), seed=3)
    tokens, mask, spans, _ = policy_inputs(seed=5)
    with torch.no_grad():
        out = pol(tokens, attention_mask=mask, span_masks=spans, need_entropy=True)
        for b in range(tokens.shape[0]):
            real = mask[b]
            alone = pol(tokens[b:b + 1, real], span_masks=spans[:, b:b + 1, real], need_entropy=True)
            for k in ("logp", "values", "entropy"):
                assert_fp32_close(f"row {b} {k}", getattr(out, k)[b, real], getattr(alone, k)[0])
            assert_fp32_close(f"row {b} z", out.z[:, b], alone.z[:, 0])


def test_need_logp_false_skips_the_output_layer(tp1):
    _, pol = _policy(tiny_arch("llama", tied=False), seed=4)
    tokens, mask, spans, _ = policy_inputs(seed=6)
    with torch.no_grad():
        full = pol(tokens, attention_mask=mask, span_masks=spans)
        handle = pol.gpt.output_layer.register_forward_pre_hook(
            lambda *_: (_ for _ in ()).throw(AssertionError("output layer ran")))
        try:
            lean = pol(tokens, attention_mask=mask, span_masks=spans, need_logp=False)
        finally:
            handle.remove()
    assert lean.logp is None and lean.entropy is None
    assert torch.equal(lean.values, full.values) and torch.equal(lean.z, full.z)


def test_edge_cases_and_errors(tp1):
    _, pol = _policy(tiny_arch("llama"), seed=5)
    with torch.no_grad():
        one = pol(torch.tensor([[7], [9]]), need_entropy=True)
        assert one.logp.shape == (2, 1) and (one.logp == 0).all() and one.z is None and one.z_valid is None
        assert torch.isfinite(one.entropy).all()
        empty = pol(torch.tensor([[1, 2, 3]]), span_masks=torch.zeros(2, 1, 3, dtype=torch.bool))
        assert not empty.z_valid.any() and not empty.z.any()
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\]"):
        pol(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask"):
        pol(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="span_masks must be"):
        pol(torch.zeros(2, 3, dtype=torch.long), span_masks=torch.ones(1, 3, 2, dtype=torch.bool))


def test_gptmodel_with_static_inference_context(tp1):
    """Megatron's own GPTModel.forward with a StaticInferenceContext (KV cache) on CPU."""
    from megatron.core.inference.contexts import StaticInferenceContext

    _, pol = _policy(tiny_arch("qwen2", tied=False), seed=6)
    pol.eval()
    tokens, _, _, _ = policy_inputs(seed=7)
    B, T = tokens.shape
    P = 8
    with torch.no_grad():
        full = pol.lm_logits(pol.trunk(tokens), gather=True).transpose(0, 1)  # (B, T, V)
        ctx = StaticInferenceContext(B, T)
        pos = torch.arange(T).expand(B, T)
        steps = [pol.gpt(tokens[:, :P], pos[:, :P], None, inference_context=ctx, runtime_gather_output=True)[:, -1]]
        ctx.sequence_len_offset += P
        for t in range(P, T):
            steps.append(pol.gpt(tokens[:, t:t + 1], pos[:, t:t + 1], None, inference_context=ctx,
                                 runtime_gather_output=True)[:, -1])
            ctx.sequence_len_offset += 1
    assert_fp32_close("kv-cache logits", torch.stack(steps, 1), full[:, P - 1:])


def test_cot_head_init_is_seeded_and_named(tp1):
    from carft_mega.models.policy import CoTHead

    torch.manual_seed(1)
    a = CoTHead(32, 8, seed=3, dtype=torch.float32)
    torch.manual_seed(2)
    b = CoTHead(32, 8, seed=3, dtype=torch.float32)
    assert list(a.state_dict()) == ["proj.weight", "proj.bias", "summary.weight", "summary.bias"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = CoTHead(32, 8, seed=4, dtype=torch.float32)
    assert not torch.equal(a.proj.weight, c.proj.weight)
    bound = 1 / 32 ** 0.5  # nn.Linear's default init range
    assert a.proj.weight.abs().max() <= bound and a.proj.bias.abs().max() <= bound


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_fused_cot_head_inside_the_policy(tp1):
    """The policy's head through the Triton kernel (interpreter) equals the reference path."""
    _, pol = _policy(tiny_arch("llama"), seed=7)
    tokens, mask, spans, _ = policy_inputs(seed=8, B=2, T=9)
    with torch.no_grad():
        ref = pol(tokens, attention_mask=mask, span_masks=spans, need_logp=False)
        pol.kernels = "triton"
        fused = pol(tokens, attention_mask=mask, span_masks=spans, need_logp=False)
    assert_fp32_close("values", fused.values, ref.values)
    assert_fp32_close("z", fused.z, ref.z)


def test_build_policy_tiny_and_reference(tp1):
    cfg = model_cfg(tiny=TinyModelConfig(arch="qwen2", hidden_size=32, num_heads=4, num_kv_heads=2,
                                         ffn_hidden_size=48))
    a = build_policy(cfg, vocab_size=50)
    b = build_policy(cfg, vocab_size=50)
    assert a.training and a.arch.vocab_size == 50 and a.padded_vocab_size == 128
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
               if torch.is_tensor(x))
    ref = frozen_copy(a, cfg)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert a.training and all(p.requires_grad for p in a.parameters())
    tokens = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        assert torch.equal(ref(tokens).logp, a.eval()(tokens).logp)
        next(a.parameters()).add_(1.0)  # a copy, not a view of the policy's weights
        assert not torch.equal(ref(tokens).logp, a(tokens).logp)
    with pytest.raises(ValueError, match="needs vocab_size"):
        build_policy(cfg)


def test_build_policy_from_hf_dir_loads_v_head(tp1, tmp_path):
    from safetensors.torch import save_file

    arch = tiny_arch("llama", tied=True)
    hf = tiny_hf_model(arch, seed=9)
    hf.save_pretrained(tmp_path)
    head = {"proj.weight": torch.randn(16, 64), "proj.bias": torch.randn(16), "summary.weight": torch.randn(1, 16),
            "summary.bias": torch.randn(1)}
    save_file(convert.v_head_to_hf(head), str(tmp_path / convert.V_HEAD_FILE))
    pol = build_policy(model_cfg(source="hf", path=str(tmp_path)), vocab_size=arch.vocab_size)
    assert all(torch.equal(pol.cot_head.state_dict()[k], head[k]) for k in head)
    with pytest.raises(ValueError, match="exceeds the model's vocabulary"):
        build_policy(model_cfg(source="hf", path=str(tmp_path)), vocab_size=arch.vocab_size + 1)
    with pytest.raises(FileNotFoundError, match="not a directory or a .gguf file"):
        build_policy(model_cfg(source="hf", path=str(tmp_path / "nope")))


def test_v_head_shape_is_checked(tp1, tmp_path):
    """A saved head of another d (or hidden size) is refused, naming model.cot_proj_dim and the file;
    before, a d=1 head broadcast silently into every row of a d=16 head."""
    from safetensors.torch import save_file

    arch = tiny_arch("llama", tied=True)
    tiny_hf_model(arch, seed=9).save_pretrained(tmp_path)
    for d, hidden in ((1, 64), (8, 64), (16, 32)):
        head = {"proj.weight": torch.randn(d, hidden), "proj.bias": torch.randn(d),
                "summary.weight": torch.randn(1, d), "summary.bias": torch.randn(1)}
        save_file(convert.v_head_to_hf(head), str(tmp_path / convert.V_HEAD_FILE))
        with pytest.raises(ValueError, match=r"v_head\.safetensors: CoT head tensor proj\.weight has shape .*"
                                             r"'model\.cot_proj_dim' = 16"):
            build_policy(model_cfg(source="hf", path=str(tmp_path)))


def test_v_head_inside_the_weight_files(tp1, tmp_path):
    """TRL-style v_head.* tensors stored in model.safetensors: read when the whole head is there,
    ignored with a warning when not (TRL's own value head has no proj)."""
    from safetensors.torch import load_file, save_file

    arch = tiny_arch("llama", tied=True)
    tiny_hf_model(arch, seed=9).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    head = {"proj.weight": torch.randn(16, 64), "proj.bias": torch.randn(16), "summary.weight": torch.randn(1, 16),
            "summary.bias": torch.randn(1)}
    save_file({**weights, **convert.v_head_to_hf(head)}, str(tmp_path / "model.safetensors"))
    pol = build_policy(model_cfg(source="hf", path=str(tmp_path)))
    assert all(torch.equal(pol.cot_head.state_dict()[k], head[k]) for k in head)
    trl = {"v_head.summary.weight": torch.randn(1, 64), "v_head.summary.bias": torch.randn(1)}
    save_file({**weights, **trl}, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="not the full CoT head"):
        assert convert.read_v_head(tmp_path) is None


def test_full_recompute_gives_the_same_gradients(tp1):
    """model.recompute_activations=True (Megatron full recompute, CPU RNG tracker) changes nothing."""
    arch = tiny_arch("llama", tied=False)
    hf = tiny_hf_model(arch, seed=12)
    tokens, mask, spans, weights = policy_inputs(seed=9)
    grads = []
    for recompute in (False, True):
        pol = policy_from_hf_source(convert.HFSource.from_model(hf), model_cfg(recompute_activations=recompute))
        assert (pol.config.recompute_granularity == "full") == recompute
        policy_loss(pol(tokens, attention_mask=mask, span_masks=spans, need_entropy=True), weights, mask).backward()
        grads.append({k: p.grad.clone() for k, p in pol.named_parameters()})
    for k in grads[0]:
        assert_fp32_close(f"recompute grad {k}", grads[1][k], grads[0][k])
