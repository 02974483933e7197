"""PPO policy, value and KL losses as pure functions (ReFT's PPO and Dr.GRPO, DESIGN.md Sec. 6).

All tensors are ``(B, T)`` and state-aligned (see ``carft_mega.algos.advantage``). Reductions
go through ``agg_loss`` and are normalised by counts the caller passes in: the global number of
action tokens (or sequences) of the whole rollout batch, so that the sum of the micro-batch losses
equals the full-batch loss whatever the micro-batch or data-parallel size.

Metrics follow the same rule: each is this micro-batch's **share** of a global token mean
(a masked sum over ``num_tokens``, the global action-token count), so summing them over
micro-batches and ranks gives the global mean exactly. Without ``num_tokens`` they are local means.
"""

from __future__ import annotations

from typing import Literal

import torch

Agg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    agg: Agg = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    token_budget: int | None = None,
) -> torch.Tensor:
    """Reduce a ``(B, T)`` loss matrix over ``mask``.

    Args:
        loss_mat: ``(B, T)`` per-token losses.
        mask: ``(B, T)`` bool.
        agg: ``token-mean``: ``sum(loss * mask) / num_tokens``;
            ``seq-mean-token-mean``: ``sum_b mean_t(loss_b) / num_seqs`` (ReFT's reduction);
            ``seq-mean-token-sum-norm``: ``sum(loss * mask) / (num_seqs * token_budget)``, a
            constant normaliser that does not depend on any sequence's length (Dr.GRPO, Liu et al.
            2025 Sec. 3.2; verl's mode of the same name with ``loss_scale_factor``).
        num_tokens: normaliser for token-mean (default: the local ``mask.sum()``, at least 1).
        num_seqs: number of sequences (default: the local number of rows; for the seq-mean
            modes, rows with any token).
        token_budget: the generation budget (``rollout.max_new_tokens``), for
            ``seq-mean-token-sum-norm``.

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
    if agg == "seq-mean-token-sum-norm":
        if token_budget is None or token_budget < 1:
            raise ValueError(f"agg='seq-mean-token-sum-norm' needs token_budget >= 1, got {token_budget}")
        seqs = mask.shape[0] if num_seqs is None else num_seqs
        return masked.sum() / (seqs * token_budget)
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def token_share(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """``sum(x * mask) / num_tokens`` (this micro-batch's share of a global token mean), detached.

    Without ``num_tokens`` it is the local masked mean.
    """
    denom = mask.sum().clamp(min=1).to(torch.float32) if num_tokens is None else num_tokens
    return (torch.where(mask.bool(), x.float(), 0.0).sum() / denom).detach()


def ppo_policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float = 0.2,
    agg: Agg = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    token_budget: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio policy loss ``max(-A r, -A clip(r, 1-eps, 1+eps))`` (Schulman et al. 2017).

    Args:
        logp: ``(B, T)`` log-probs under the current policy (with grad).
        logp_old: ``(B, T)`` rollout-time log-probs.
        advantages: ``(B, T)`` advantages (whitened GAE, or Dr.GRPO's broadcast outcome advantage).
        action_mask: ``(B, T)`` bool.
        clip_eps: ratio clip.
        agg, num_tokens, num_seqs, token_budget: see ``agg_loss``; ``num_tokens`` also normalises
            the metrics.

    Returns:
        loss: scalar.
        metrics (shares of global token means, see module docstring): ``actor/pg_loss``,
            ``actor/clipfrac``, ``actor/approx_kl`` (k3 of KL(old || new)), ``actor/ratio_mean``.
    """
    mask = action_mask.bool()
    # Clamped as verl does (core_algos.compute_policy_loss): exp() of a stale token's log-ratio
    # cannot overflow to inf and cost the whole update.
    log_ratio = torch.where(mask, logp.float() - logp_old.float(), 0.0).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = agg_loss(torch.maximum(pg1, pg2), mask, agg, num_tokens, num_seqs, token_budget)
    metrics = {
        "actor/pg_loss": loss.detach(),
        "actor/clipfrac": token_share((pg2 > pg1).float(), mask, num_tokens),
        # k3 estimator of KL(old || new): (r - 1) - log r (Schulman 2020, "Approximating KL")
        "actor/approx_kl": token_share((ratio - 1.0) - log_ratio, mask, num_tokens),
        "actor/ratio_mean": token_share(ratio, mask, num_tokens),
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
    token_budget: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2)``.

    Args:
        values: ``(B, T)`` current value predictions (with grad).
        values_old: ``(B, T)`` rollout-time values.
        returns: ``(B, T)`` GAE returns.
        action_mask: ``(B, T)`` bool.
        value_clip: clip range around ``values_old``.
        agg, num_tokens, num_seqs, token_budget: see ``agg_loss``.

    Returns:
        loss: scalar.
        metrics (shares): ``critic/vf_loss``, ``critic/vf_clipfrac``, ``critic/vpred_mean``.
    """
    mask = action_mask.bool()
    v, v_old, ret = values.float(), values_old.float(), returns.float()
    v_clipped = v_old + torch.clamp(v - v_old, -value_clip, value_clip)
    l1 = (v - ret) ** 2
    l2 = (v_clipped - ret) ** 2
    loss = 0.5 * agg_loss(torch.maximum(l1, l2), mask, agg, num_tokens, num_seqs, token_budget)
    metrics = {
        "critic/vf_loss": loss.detach(),
        "critic/vf_clipfrac": token_share((l2 > l1).float(), mask, num_tokens),
        "critic/vpred_mean": token_share(v, mask, num_tokens),
    }
    return loss, metrics


def kl_loss(
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    action_mask: torch.Tensor,
    agg: Agg = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    token_budget: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(pi || pi_ref) as a loss term, k3 estimator ``exp(l_ref - l) - (l_ref - l) - 1``.

    GRPO's KL (Shao et al. 2024, DeepSeekMath Eq. 4; verl ``kl_penalty('low_var_kl')``, which
    clamps the log-ratio to [-20, 20] and the result to [-10, 10]). Used by Dr.GRPO, which has no
    per-token rewards to shape; ReFT/CARFT put a k1 penalty into the rewards instead.

    Args:
        logp: ``(B, T)`` current log-probs (with grad).
        logp_ref: ``(B, T)`` reference-model log-probs.
        action_mask: ``(B, T)`` bool.
        agg, num_tokens, num_seqs, token_budget: see ``agg_loss``.

    Returns:
        loss: scalar (multiply by the KL coefficient).
        metrics (shares): ``actor/kl_loss``.
    """
    mask = action_mask.bool()
    d = torch.where(mask, logp_ref.float() - logp.float(), 0.0).clamp(-20.0, 20.0)
    k3 = (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)
    loss = agg_loss(k3, mask, agg, num_tokens, num_seqs, token_budget)
    return loss, {"actor/kl_loss": loss.detach()}
