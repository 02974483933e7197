"""Fused CoT head (DESIGN.md Sec. 2-3, the authors' ValueHeadV2 on the final hidden state).

For hidden states ``h`` and K token sets S_k per sequence::

    e_t = W_p h_t + b_p                      # (d = 64) CoT token embedding, no activation
    V_t = w_v . relu(e_t) + b_v              # PPO value
    z_k = sum_{t in S_k} softmax_{t in S_k}(V_t) e_t      # CoT embedding (paper Eq. 6)

``cot_head(...)`` runs the Triton kernel (``kernels/triton/cot_head.py``) on CUDA tensors and
``cot_head_ref`` otherwise (``impl='triton'`` runs the kernel in the Triton interpreter on CPU
tensors when ``TRITON_INTERPRET=1``; the rule is ``carft_mega.ops.dispatch``)::

    V, z, valid = cot_head(h_sbh.transpose(0, 1), W_p, b_p, w_v, b_v, span_masks)  # no copy of h

An empty S_k gives ``z_k = 0`` and ``valid = False`` (never a uniform softmax over padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from carft_mega.algos.embeddings import cot_embeddings
from carft_mega.ops.dispatch import choose_impl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_D = 128  # the Triton kernel keeps a (BLOCK_T, d) tile of e in registers


def cot_head_ref(
    h: torch.Tensor,
    W_p: torch.Tensor,
    b_p: torch.Tensor,
    w_v: torch.Tensor,
    b_v: torch.Tensor,
    span_masks: torch.Tensor,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference CoT head in plain PyTorch (the readable specification and the CPU fallback).

    Without ``upcast`` the projection, value and pooling run in h's dtype (the parameters are cast
    to it, as autocast would); with it everything runs in fp32.

    Args:
        h: ``(N, T, H)`` final hidden states, any strides.
        W_p: ``(d, H)`` projection weight; b_p: ``(d,)`` its bias.
        w_v: ``(d,)`` value weight; b_v: 0-d or ``(1,)`` value bias.
        span_masks: ``(K, N, T)`` bool token sets, K >= 0.
        upcast: compute in fp32.

    Returns:
        V: ``(N, T)`` fp32 values.
        z: ``(K, N, d)`` fp32 pooled embeddings, 0 for empty sets.
        valid: ``(K, N)`` bool, False where the set is empty.
    """
    dtype = torch.float32 if upcast else h.dtype
    e = F.linear(h.to(dtype), W_p.to(dtype), b_p.to(dtype))  # (N, T, d)
    V = F.linear(torch.relu(e), w_v.to(dtype).unsqueeze(0)).squeeze(-1) + b_v.to(dtype).reshape(())  # (N, T)
    z, valid = cot_embeddings(e, V, span_masks, upcast=upcast)  # (K, N, d), (K, N)
    return V.float(), z.float(), valid


def _kernels():
    """``carft_mega._kernels.cot_head`` (see ``carft_mega._ext.triton_kernels``)."""
    from carft_mega._ext import triton_kernels

    return triton_kernels("cot_head")


class CoTHeadFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton forward/backward; returns ``(V, z, valid)``.

    Saved for backward: the inputs plus z and the per-span log-sum-exp (``(K, N)``), which is all the
    softmax needs; e is recomputed from h (issue 3) rather than kept alive as an ``(N, T, d)`` fp32 tensor
    per micro-batch until backward. The price is one more read of h: at N=64, T=1024, H=4096 bf16 that is
    512 MiB of traffic (a quarter of the fused fwd+bwd) against 16 MiB of saved e.
    """

    @staticmethod
    def forward(ctx, h, W_p, b_p, w_v, b_v, span_masks):
        V, z, valid, lse = _kernels().cot_head_fwd(h, W_p, b_p, w_v, b_v, span_masks)
        ctx.save_for_backward(h, W_p, b_p, w_v, b_v, span_masks, lse, z)
        ctx.mark_non_differentiable(valid)
        ctx.set_materialize_grads(False)  # an unused output sends None: its kernel branch is skipped
        return V, z, valid

    @staticmethod
    def backward(ctx, dV, dz, _dvalid):
        h, W_p, b_p, w_v, b_v, span_masks, lse, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not any(need[:5]) or (dV is None and dz is None):
            return (None,) * 6
        dh, dW_p, db_p, dw_v, db_v = _kernels().cot_head_bwd(
            h, W_p, b_p, w_v, b_v, span_masks, lse, z, dz, dV, need_dh=need[0], need_dw=need[1])
        return (dh, dW_p, db_p if need[2] else None, dw_v if need[3] else None,
                db_v if need[4] else None, None)


def _check_inputs(h, W_p, b_p, w_v, b_v, span_masks) -> None:
    where = "carft_mega.ops.cot_head"
    if h.dim() != 3:
        raise ValueError(f"{where}: h must be (N, T, H), got shape {tuple(h.shape)}")
    N, T, H = h.shape
    if W_p.dim() != 2 or W_p.shape[1] != H:
        raise ValueError(f"{where}: W_p must be (d, H={H}), got shape {tuple(W_p.shape)}")
    d = W_p.shape[0]
    for name, x in (("b_p", b_p), ("w_v", w_v)):
        if tuple(x.shape) != (d,):
            raise ValueError(f"{where}: {name} must be ({d},) like W_p's rows, got shape {tuple(x.shape)}")
    if b_v.numel() != 1 or b_v.dim() > 1:
        raise ValueError(f"{where}: b_v must be 0-d or (1,), got shape {tuple(b_v.shape)}")
    if span_masks.dtype != torch.bool:
        raise TypeError(f"{where}: span_masks must be bool, got {span_masks.dtype}")
    if span_masks.dim() != 3 or tuple(span_masks.shape[1:]) != (N, T):
        raise ValueError(f"{where}: span_masks must be (K, N={N}, T={T}), got shape {tuple(span_masks.shape)}")
    for name, x in (("h", h), ("W_p", W_p), ("b_p", b_p), ("w_v", w_v), ("b_v", b_v)):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{where}: {name} has dtype {x.dtype}; expected fp32, fp16 or bf16")
    for name, x in (("W_p", W_p), ("b_p", b_p), ("w_v", w_v), ("b_v", b_v), ("span_masks", span_masks)):
        if x.device != h.device:
            raise ValueError(f"{where}: {name} is on {x.device}, h on {h.device}")


def cot_head(
    h: torch.Tensor,
    W_p: torch.Tensor,
    b_p: torch.Tensor,
    w_v: torch.Tensor,
    b_v: torch.Tensor,
    span_masks: torch.Tensor,
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values and K pooled CoT embeddings from the final hidden states, differentiable in h and the head.

    Args:
        h: ``(N, T, H)`` bf16, fp16 or fp32 hidden states. N and T may have any strides (pass Megatron's
            ``[s, b, h]`` output as ``h.transpose(0, 1)`` without a copy); the last dim should be contiguous.
        W_p: ``(d, H)`` projection weight, d <= 128 for the kernel; b_p: ``(d,)``.
        w_v: ``(d,)`` value weight; b_v: 0-d or ``(1,)`` value bias.
        span_masks: ``(K, N, T)`` bool token sets (K may be 0).
        impl: ``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` or ``"ref"``
            (``carft_mega.ops.dispatch.choose_impl``).

    Returns:
        V: ``(N, T)`` fp32 values.
        z: ``(K, N, d)`` fp32 pooled embeddings, 0 where the set is empty.
        valid: ``(K, N)`` bool, False where the set is empty (drop those pairs from every loss).
    """
    _check_inputs(h, W_p, b_p, w_v, b_v, span_masks)
    d = W_p.shape[0]
    unsupported = f"d={d} > {_MAX_D} (the kernel keeps a (BLOCK_T, d) tile in registers); d <= {_MAX_D}" \
        if d > _MAX_D else None
    if choose_impl("cot_head", impl, h.device, unsupported=unsupported) == "ref":
        # fp32 like the kernel's accumulators: a bf16 reference would feed the critic values ~1e-2 off.
        return cot_head_ref(h, W_p, b_p, w_v, b_v, span_masks, upcast=True)
    return CoTHeadFunction.apply(h, W_p, b_p, w_v, b_v, span_masks)
