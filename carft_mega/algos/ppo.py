"""PPO policy and value losses as pure functions (ReFT's PPO, DESIGN.md Sec. 6).

All tensors are ``(B, T)`` and state-aligned (see ``carft_mega.algos.advantage``). Reductions
go through ``agg_loss`` and are normalised by counts the caller passes in: the global number of
action tokens (or sequences) of the whole rollout batch, so that the sum of the micro-batch losses
equals the full-batch loss whatever the micro-batch or data-parallel size.
"""

from __future__ import annotations

from typing import Literal

import torch

Agg = Literal["token-mean", "seq-mean-token-mean"]


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    agg: Agg = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a ``(B, T)`` loss matrix over ``mask``.

    Args:
        loss_mat: ``(B, T)`` per-token losses.
        mask: ``(B, T)`` bool.
        agg: ``token-mean``: ``sum(loss * mask) / num_tokens``;
            ``seq-mean-token-mean``: ``sum_b mean_t(loss_b) / num_seqs`` (ReFT's reduction).
        num_tokens: normaliser for token-mean (default: the local ``mask.sum()``, at least 1).
        num_seqs: normaliser for seq-mean (default: the local number of rows with any token).

    Returns:
        Scalar loss.
    """
    m = mask.to(loss_mat.dtype)
    masked = torch.where(mask.bool(), loss_mat, 0.0)  # not loss * m: inf * 0 outside the mask is NaN
    if agg == "token-mean":
        denom = m.sum().clamp(min=1.0) if num_tokens is None else num_tokens
        return masked.sum() / denom
    if agg == "seq-mean-token-mean":
        per_seq_tokens = m.sum(dim=-1)
        seq_loss = masked.sum(dim=-1) / per_seq_tokens.clamp(min=1.0)
        denom = (per_seq_tokens > 0).sum().clamp(min=1) if num_seqs is None else num_seqs
        return seq_loss.sum() / denom
    raise ValueError(f"agg must be 'token-mean' or 'seq-mean-token-mean', got {agg!r}")


def _masked_local_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (torch.where(mask.bool(), x, 0.0).sum() / m.sum().clamp(min=1.0)).detach()


def ppo_policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float = 0.2,
    agg: Agg = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio policy loss ``max(-A r, -A clip(r, 1-eps, 1+eps))`` (Schulman et al. 2017).

    Args:
        logp: ``(B, T)`` log-probs under the current policy (with grad).
        logp_old: ``(B, T)`` rollout-time log-probs.
        advantages: ``(B, T)`` (whitened) advantages.
        action_mask: ``(B, T)`` bool.
        clip_eps: ratio clip.
        agg, num_tokens, num_seqs: see ``agg_loss``.

    Returns:
        loss: scalar.
        metrics: ``actor/pg_loss``, ``actor/clipfrac``, ``actor/approx_kl`` (k3, local token
            mean), ``actor/ratio_mean``; detached.
    """
    mask = action_mask.bool()
    # Clamped as verl does (core_algos.compute_policy_loss): exp() of a stale token's log-ratio
    # cannot overflow to inf and cost the whole update.
    log_ratio = torch.where(mask, logp.float() - logp_old.float(), 0.0).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = agg_loss(torch.maximum(pg1, pg2), mask, agg, num_tokens, num_seqs)
    metrics = {
        "actor/pg_loss": loss.detach(),
        "actor/clipfrac": _masked_local_mean((pg2 > pg1).float(), mask),
        # k3 estimator of KL(old || new): (r - 1) - log r (Schulman 2020, "Approximating KL")
        "actor/approx_kl": _masked_local_mean((ratio - 1.0) - log_ratio, mask),
        "actor/ratio_mean": _masked_local_mean(ratio, mask),
    }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    values_old: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    value_clip: float = 0.2,
    agg: Agg = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2)``.

    Args:
        values: ``(B, T)`` current value predictions (with grad).
        values_old: ``(B, T)`` rollout-time values.
        returns: ``(B, T)`` GAE returns.
        action_mask: ``(B, T)`` bool.
        value_clip: clip range around ``values_old``.
        agg, num_tokens, num_seqs: see ``agg_loss``.

    Returns:
        loss: scalar.
        metrics: ``critic/vf_loss``, ``critic/vf_clipfrac``, ``critic/vpred_mean``; detached.
    """
    mask = action_mask.bool()
    v, v_old, ret = values.float(), values_old.float(), returns.float()
    v_clipped = v_old + torch.clamp(v - v_old, -value_clip, value_clip)
    l1 = (v - ret) ** 2
    l2 = (v_clipped - ret) ** 2
    loss = 0.5 * agg_loss(torch.maximum(l1, l2), mask, agg, num_tokens, num_seqs)
    metrics = {
        "critic/vf_loss": loss.detach(),
        "critic/vf_clipfrac": _masked_local_mean((l2 > l1).float(), mask),
        "critic/vpred_mean": _masked_local_mean(v, mask),
    }
    return loss, metrics
