"""Fused advantage pass (DESIGN.md Sec. 6-7): KL-shaped rewards, GAE, returns and whitening moments.

``advantages(...)`` runs the Triton kernel (``kernels/triton/advantages.py``) on CUDA tensors and
``advantages_ref`` otherwise (the rule: ``carft_mega.ops.dispatch``; ``impl='triton'`` runs the
kernel in the interpreter on CPU tensors under ``TRITON_INTERPRET=1``). The per-row
moments it returns make global whitening one all-reduce of three numbers::

    out = advantages(scores, logp_old, logp_ref, values, mask, beta, gamma, lam)
    moments = global_moments(out.row_sum, out.row_sumsq, out.row_count, group=dp_group)
    adv = whiten_from_moments(out.advantages, mask, *moments)   # centred, as ReFT

Everything here is a no-grad quantity, so there is no autograd Function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from carft_mega.algos.advantage import compute_gae, kl_shaped_rewards
from carft_mega.ops.dispatch import choose_impl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class AdvantageOutput(NamedTuple):
    """Result of one advantage pass; all fp32 except ``row_count`` (int64).

    Attributes:
        advantages: ``(B, T)`` GAE advantages, 0 outside the action mask (not whitened).
        returns: ``(B, T)`` ``advantages + values``, 0 outside the mask.
        rewards: ``(B, T)`` KL-shaped token rewards, 0 outside the mask.
        row_sum: ``(B,)`` masked sum of the advantages of each row.
        row_sumsq: ``(B,)`` masked sum of their squares.
        row_count: ``(B,)`` number of action positions of each row.
    """

    advantages: torch.Tensor
    returns: torch.Tensor
    rewards: torch.Tensor
    row_sum: torch.Tensor
    row_sumsq: torch.Tensor
    row_count: torch.Tensor


def advantages_ref(
    scores: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    beta: float,
    gamma: float,
    lam: float,
) -> AdvantageOutput:
    """Reference: ``kl_shaped_rewards`` then ``compute_gae`` (``carft_mega.algos.advantage``).

    The algos functions always compute in fp32, so there is no ``upcast`` switch: inputs of any
    float dtype are upcast on entry, exactly as the kernel does.

    Args:
        scores: ``(B,)`` terminal scores, paid at each row's last action position.
        logp_old: ``(B, T)`` rollout-time log-probs of the chosen tokens.
        logp_ref: ``(B, T)`` reference-model log-probs.
        values: ``(B, T)`` value predictions.
        action_mask: ``(B, T)`` bool; gaps are skipped (see ``compute_gae``).
        beta: k1 KL coefficient.
        gamma: GAE discount.
        lam: GAE lambda.

    Returns:
        AdvantageOutput with fp32 tensors (``row_count`` int64).
    """
    mask = action_mask.bool()
    rewards = kl_shaped_rewards(scores, logp_old, logp_ref, mask, beta)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    adv_m = adv * mask
    return AdvantageOutput(adv, ret, rewards, adv_m.sum(-1), (adv_m * adv_m).sum(-1),
                           mask.sum(-1, dtype=torch.int64))


def _check_inputs(scores, logp_old, logp_ref, values, action_mask, gamma, lam) -> None:
    where = "carft_mega.ops.advantages"
    if logp_old.dim() != 2:
        raise ValueError(f"{where}: logp_old must be (B, T), got shape {tuple(logp_old.shape)}")
    B, T = logp_old.shape
    for name, x in (("logp_ref", logp_ref), ("values", values), ("action_mask", action_mask)):
        if tuple(x.shape) != (B, T):
            raise ValueError(f"{where}: {name} has shape {tuple(x.shape)}, expected {(B, T)} like logp_old")
    if tuple(scores.shape) != (B,):
        raise ValueError(f"{where}: scores has shape {tuple(scores.shape)}, expected ({B},)")
    if action_mask.dtype != torch.bool:
        raise TypeError(f"{where}: action_mask must be bool, got {action_mask.dtype}")
    for name, x in (("scores", scores), ("logp_old", logp_old), ("logp_ref", logp_ref), ("values", values)):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{where}: {name} has dtype {x.dtype}; expected fp32, fp16, bf16 or fp64")
        if x.device != logp_old.device:
            raise ValueError(f"{where}: {name} is on {x.device}, logp_old on {logp_old.device}")
    if action_mask.device != logp_old.device:
        raise ValueError(f"{where}: action_mask is on {action_mask.device}, logp_old on {logp_old.device}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"{where}: gamma={gamma} must be in [0, 1]")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"{where}: lam={lam} must be in [0, 1]")


def _kernels():
    """``carft_mega._kernels.advantages`` (see ``carft_mega._ext.triton_kernels``)."""
    from carft_mega._ext import triton_kernels

    return triton_kernels("advantages")


@torch.no_grad()
def advantages(
    scores: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    beta: float,
    gamma: float,
    lam: float,
    impl: str = "auto",
    block_t: int | None = None,
) -> AdvantageOutput:
    """KL-shaped rewards, GAE advantages, returns and per-row moments in one pass per row.

    Args:
        scores: ``(B,)`` terminal scores, paid at each row's last action position.
        logp_old: ``(B, T)`` rollout-time log-probs (fp32, fp16 or bf16).
        logp_ref: ``(B, T)`` reference-model log-probs.
        values: ``(B, T)`` value predictions (``V(h_t)``, state-aligned like the mask).
        action_mask: ``(B, T)`` bool; may have gaps, rows may be empty.
        beta: k1 KL coefficient.
        gamma: GAE discount in [0, 1].
        lam: GAE lambda in [0, 1].
        impl: ``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` or ``"ref"``
            (``carft_mega.ops.dispatch.choose_impl``).
        block_t: Triton block length along T (power of two); None picks min(1024, next_pow2(T)).

    Returns:
        AdvantageOutput, fp32 (``row_count`` int64), same device as the inputs.
    """
    _check_inputs(scores, logp_old, logp_ref, values, action_mask, gamma, lam)
    if choose_impl("advantages", impl, logp_old.device) == "ref":
        return advantages_ref(scores, logp_old, logp_ref, values, action_mask, beta, gamma, lam)
    scores, logp_old, logp_ref, values, action_mask = (
        x.contiguous() for x in (scores, logp_old, logp_ref, values, action_mask))
    out = _kernels().advantages_fwd(
        scores, logp_old, logp_ref, values, action_mask.view(torch.uint8), beta, gamma, lam, block_t=block_t)
    return AdvantageOutput(*out)


def global_moments(
    row_sum: torch.Tensor,
    row_sumsq: torch.Tensor,
    row_count: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum the per-row moments over the rows and, with ``group``, over its ranks (one all-reduce).

    The sums are taken in fp64, which keeps ``sumsq - sum^2 / count`` accurate for large batches.
    ``group=None`` means the local batch only (the ``masked_moments`` convention).

    Args:
        row_sum: ``(B,)`` masked sums.
        row_sumsq: ``(B,)`` masked sums of squares.
        row_count: ``(B,)`` action counts.
        group: process group to reduce over, or None.

    Returns:
        total_sum, total_sumsq, total_count: fp64 scalars.
    """
    stats = torch.stack([row_sum.double().sum(), row_sumsq.double().sum(), row_count.double().sum()])
    if group is not None:
        dist.all_reduce(stats, group=group)
    return stats[0], stats[1], stats[2]


def whiten_from_moments(
    x: torch.Tensor,
    mask: torch.Tensor,
    total_sum: torch.Tensor | float,
    total_sumsq: torch.Tensor | float,
    total_count: torch.Tensor | float,
    add_mean_back: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Whiten ``x`` with precomputed (e.g. globally all-reduced) moments, like ``masked_whiten``.

    ``mean = S / N``, unbiased ``var = (Q - S * mean) / (N - 1)`` (clamped at 0 against rounding),
    ``(x - mean) * rsqrt(var + eps)``, centred (ReFT's default, see ``masked_whiten``); ``add_mean_back``
    adds ``mean`` again.
    The one-pass variance loses relative accuracy ~ eps_fp32 * (1 + mean^2 / var) against the
    two-pass ``masked_moments``; negligible for advantages, whose mean is small against their spread.

    Args:
        x: ``(B, T)`` values (the advantages).
        mask: ``(B, T)`` bool.
        total_sum: sum of ``x`` over the mask (global).
        total_sumsq: sum of ``x**2`` over the mask (global).
        total_count: number of masked elements (global).
        add_mean_back: add the mean back after scaling (ReFT's non-default ``shift_mean=True``).
        eps: variance floor.

    Returns:
        ``(B, T)`` fp32, 0 outside the mask.
    """
    s, q, n = (torch.as_tensor(v, dtype=torch.float64, device=x.device) for v in (total_sum, total_sumsq, total_count))
    mean = s / n.clamp(min=1.0)
    var = (q - s * mean).clamp(min=0.0) / (n - 1.0).clamp(min=1.0)
    mean32, var32 = mean.float(), var.float()
    out = (x.float() - mean32) * torch.rsqrt(var32 + eps)
    if add_mean_back:
        out = out + mean32
    return torch.where(mask.bool(), out, 0.0)
