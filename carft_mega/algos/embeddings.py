"""CoT embeddings: value-weighted softmax pooling of token embeddings (paper Eq. 6).

``z(S) = sum_{t in S} softmax_{t in S}(V_t) * e_t`` for a token set S of one sequence. The weights
are the PPO critic's values, as in the authors' ValueHeadV2 (authors_code.md Sec. 1). Unlike the
authors' code, an empty S gives no embedding (``valid = False``, ``z = 0``) instead of a uniform
softmax over padding (their bug 9); callers drop such pairs from every loss.
"""

from __future__ import annotations

import torch


def cot_embeddings(
    e: torch.Tensor, values: torch.Tensor, span_masks: torch.Tensor, upcast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool token embeddings over K token sets per sequence with softmax(V) weights.

    Args:
        e: ``(N, T, d)`` token embeddings ``e_t``.
        values: ``(N, T)`` token values ``V_t`` (the softmax logits).
        span_masks: ``(K, N, T)`` or ``(N, T)`` bool, the token sets S (True = in S).
        upcast: compute in fp32 (the result is fp32 either way when set).

    Returns:
        z: ``(K, N, d)`` pooled embeddings (``(N, d)`` when ``span_masks`` was 2-D); 0 for empty sets.
        valid: ``(K, N)`` bool (``(N,)`` for 2-D masks), False where the set is empty.
    """
    squeeze = span_masks.dim() == 2
    masks = span_masks.unsqueeze(0) if squeeze else span_masks  # (K, N, T)
    if masks.dtype != torch.bool:
        raise TypeError(f"span_masks must be bool, got {masks.dtype}")
    if upcast:
        e, values = e.float(), values.float()
    valid = masks.any(dim=-1)  # (K, N)
    scores = values.unsqueeze(0).masked_fill(~masks, float("-inf"))  # (K, N, T)
    weights = torch.softmax(scores, dim=-1)
    # Rows with an empty set are all -inf -> NaN after softmax; they get zero weight instead.
    weights = torch.where(valid.unsqueeze(-1), weights, torch.zeros_like(weights))
    z = torch.einsum("knt,ntd->knd", weights, e)  # (K, N, d)
    if squeeze:
        return z[0], valid[0]
    return z, valid
