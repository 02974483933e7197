"""Independent references, tiny HF models and shared fixtures-in-code for the Megatron model tests.

Imported by pytest (``tests.models.mcore_helpers``) and by the torchrun worker
(``tests/distributed/mcore_worker.py``), so both build bit-identical models and inputs.
"""

from __future__ import annotations

import pytest
import torch

from carft_mega.config import ModelConfig

VOCAB = 203  # odd on purpose: padded to 256 rows by Megatron, the padding must carry no probability


def cot_head_loop_ref(h, W_p, b_p, w_v, b_v, span_masks):
    """Plain loop reference of the CoT head (DESIGN.md Sec. 2-3), independent of carft_mega.ops.

    Args:
        h: ``[N, T, H]``; W_p ``[d, H]``; b_p ``[d]``; w_v ``[d]``; b_v ``[]``; span_masks ``[K, N, T]``.

    Returns:
        ``V [N, T]``, ``z [K, N, d]``, ``valid [K, N]`` (fp32; differentiable).
    """
    e = h.float() @ W_p.float().t() + b_p.float()  # (N, T, d)
    V = torch.relu(e) @ w_v.float() + b_v.float()  # (N, T)
    K, N, T = span_masks.shape
    d = W_p.shape[0]
    valid = torch.zeros(K, N, dtype=torch.bool, device=h.device)
    zs = []
    for k in range(K):
        rows = []
        for n in range(N):
            idx = span_masks[k, n].nonzero().flatten()
            if idx.numel() == 0:
                rows.append(e.new_zeros(d))
                continue
            valid[k, n] = True
            w = torch.softmax(V[n, idx], dim=0)
            rows.append((w[:, None] * e[n, idx]).sum(0))
        zs.append(torch.stack(rows))
    z = torch.stack(zs) if K else e.new_zeros(0, N, d)
    return V, z, valid


def tiny_arch(family: str = "llama", *, tied: bool = True, vocab: int = VOCAB, hidden: int = 64, layers: int = 2,
              heads: int = 4, kv_heads: int = 2, ffn: int = 96, theta: float = 10000.0, window=None):
    """A small :class:`ArchSpec` (GQA 4/2 heads by default; Qwen2 gets QKV bias)."""
    from carft_mega.models.arch import ArchSpec

    return ArchSpec(family=family, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                    head_dim=hidden // heads, ffn_hidden_size=ffn, vocab_size=vocab, max_position_embeddings=256,
                    rope_theta=theta, rms_norm_eps=1e-6, qkv_bias=family == "qwen2", tie_embeddings=tied,
                    sliding_window=window)


CONVERSION_CASES = [  # (name, arch kwargs): Llama and Qwen2, tied and untied, GQA, QKV bias
    ("llama_tied_gqa", dict(family="llama", tied=True)),
    ("llama_untied_mha", dict(family="llama", tied=False, kv_heads=4, theta=1e6)),  # CodeLlama theta
    ("qwen2_tied_gqa", dict(family="qwen2", tied=True)),
    ("qwen2_untied_gqa", dict(family="qwen2", tied=False)),
]


def tiny_hf_model(arch, seed: int = 0, config=None):
    """A random HF model of ``arch`` (or of the HF ``config``) with *every* tensor random (norm weights
    and biases too), fp32, eager."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    config = arch.to_hf_config() if config is None else config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def model_cfg(**kw) -> ModelConfig:
    """ModelConfig for tests: fp32, reference CoT head, d = 16."""
    base = dict(source="tiny", dtype="fp32", kernels="ref", cot_proj_dim=16, seed=77)
    base.update(kw)
    return ModelConfig(**base)


def random_head_(policy, seed: int = 5) -> None:
    """Overwrite the CoT head with larger random weights (same on every rank) so V varies a lot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.cot_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def policy_inputs(seed: int = 0, B: int = 4, T: int = 13, K: int = 3, vocab: int = VOCAB):
    """Tokens, a left-padded attention mask and span masks with the edge cases.

    Row 0 is unpadded; rows 1-3 have 1, 5 and T-1 padding tokens (row 3 is length 1). Span 0 is
    every real token, span 1 is random, span 2 is empty for row 0.
    """
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    for b, pad in enumerate([0, 1, 5, T - 1][:B]):
        mask[b, :pad] = False
    spans = torch.zeros(K, B, T, dtype=torch.bool)
    spans[0] = mask
    spans[1] = (torch.rand(B, T, generator=g) > 0.5) & mask
    spans[2] = (torch.rand(B, T, generator=g) > 0.3) & mask
    spans[2, 0] = False
    weights = {k: torch.randn(shape, generator=g) for k, shape in
               (("logp", (B, T)), ("values", (B, T)), ("z", (K, B, 16)), ("entropy", (B, T)))}
    return tokens, mask, spans, weights


def policy_loss(out, weights, mask):
    """A scalar that touches every output (masked to real positions)."""
    m = mask.float()
    return ((out.logp * weights["logp"] * m).sum() + (out.values * weights["values"] * m).sum()
            + (out.z * weights["z"]).sum() + (out.entropy * weights["entropy"] * m).sum())


def hf_reference(model, head_sd, tokens, attention_mask=None, span_masks=None):
    """State-aligned logp / values / z / entropy from an HF model plus a plain-torch CoT head.

    Args:
        model: HF causal LM (fp32, eager attention).
        head_sd: ``proj.weight, proj.bias, summary.weight, summary.bias``.
        tokens: ``[B, T]``; attention_mask ``[B, T]`` bool (left padding) or None.
        span_masks: ``[K, B, T]`` or None.

    Returns:
        dict of ``logp [B, T]`` (0 at T-1), ``values``, ``z``, ``valid``, ``entropy``, ``logits``.
    """
    B, T = tokens.shape
    dev = tokens.device
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=tokens, attention_mask=attention_mask.long(), position_ids=pos, output_hidden_states=True)
    logits = out.logits.float()
    h = out.hidden_states[-1]
    lp = torch.log_softmax(logits, -1)
    logp = torch.zeros(B, T, device=dev)
    logp[:, :-1] = lp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    masks = span_masks if span_masks is not None else torch.zeros(0, B, T, dtype=torch.bool, device=dev)
    V, z, valid = cot_head_loop_ref(h, head_sd["proj.weight"], head_sd["proj.bias"],
                                    head_sd["summary.weight"].reshape(-1), head_sd["summary.bias"].reshape(()), masks)
    return {"logp": logp, "values": V, "z": z, "valid": valid, "entropy": entropy, "logits": logits}


def wrap_ddp(policy, *, distributed_optimizer: bool = False, lr: float = 1e-3):
    """Megatron DDP (+ optimizer when ``lr``) around the policy, the way the trainer does it.

    Returns:
        ``(ddp_model, optimizer or None)``.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = policy.config
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer), policy)
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = ddp.no_sync
    opt = None
    if lr:
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=lr, clip_grad=1.0,
                                                     use_distributed_optimizer=distributed_optimizer), [ddp])
    return ddp, opt


def forward_backward(policy, ddp, tokens, mask, spans, weights):
    """One forward/backward through Megatron DDP + finalize_model_grads.

    Returns:
        ``(outputs dict, full-layout GPT grads dict, head grads dict)`` (CPU, identical on TP ranks).
    """
    from megatron.core.distributed import finalize_model_grads

    from carft_mega.models.convert import gather_gpt_state_dict

    ddp.zero_grad_buffer()
    out = ddp(tokens, attention_mask=mask, span_masks=spans, need_entropy=True)
    policy_loss(out, weights, mask).backward()
    finalize_model_grads([ddp])
    grads = gather_gpt_state_dict(policy.gpt, policy.arch, policy.tp_group, tensor_fn=lambda p: p.main_grad)
    head = {k: p.main_grad.detach().cpu().clone() for k, p in policy.cot_head.named_parameters()}
    outs = {k: getattr(out, k).detach().cpu() for k in ("logp", "values", "z", "z_valid", "entropy")}
    return outs, grads, head


@pytest.fixture(scope="module")
def tp1():
    """A 1-rank gloo group + Megatron parallel state (TP=1, DP=1) for one test module."""
    from carft_mega import parallel
    from carft_mega.config import ParallelConfig

    parallel.init_distributed(ParallelConfig(tp=1), seed=0)
    yield
    parallel.destroy()


def assert_fp32_close(name: str, got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """fp32 agreement of two computations of the same quantity in different layouts (TP/DP/padding).

    The bound scales with the magnitude of ``want``: ``max|got - want| <= rel * max(1, max|want|)``.
    """
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not want.numel():
        return
    err = (got - want).abs()
    bound = rel * max(1.0, want.abs().max().item())
    if err.max().item() > bound:
        idx = (err > bound).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: max|got-want| = {err.max().item():.3e} > {bound:.3e}; "
                             f"{int((err > bound).sum())} of {err.numel()} off, first at {idx}")
