"""Log-probs and entropy of next tokens from vocab-parallel logits, without gathering the vocabulary.

Each TP rank holds the logits of a contiguous slice ``[vocab_start, vocab_start + V_local)`` of
the (padded) vocabulary. The log-softmax needs two global reductions over TP (Megatron's
vocab-parallel cross entropy, Shoeybi et al. 2019, Sec. 3): the max (for stability) and the
sum of exponentials; the target logit lives on one rank and is summed in the same all-reduce.
The entropy ``H = lse - E_p[l]`` needs one more sum, ``sum_j exp(l_j - m) (l_j - m)``, which
rides in the same all-reduce. Columns at or past ``vocab_size`` (Megatron's vocabulary padding)
are excluded, so the distribution is exactly the HF model's.

Backward needs no communication: every rank computes the same (replicated) loss from the
reduced statistics, so ``d logp / d l_j = [j = y] - p_j`` and
``d H / d l_j = p_j (E_p[l] - l_j)`` are local given ``lse`` and ``E_p[l]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogProbs(torch.autograd.Function):
    """Token log-probs (and entropy) from vocab-sharded logits; see module docstring."""

    @staticmethod
    def forward(ctx, logits, target, tp_group, vocab_start, n_valid, need_entropy):
        # logits: (N, V_local); target: (N,) global ids.
        lv = logits[:, :n_valid].float()  # (N, n_valid)
        n = lv.shape[0]
        if n_valid > 0:
            m = lv.max(dim=-1).values
        else:
            m = torch.full((n,), float("-inf"), device=logits.device)
        _all_reduce(m, dist.ReduceOp.MAX, tp_group)
        shifted = lv - m[:, None]
        e = torch.exp(shifted)
        local_idx = target - vocab_start
        owned = (local_idx >= 0) & (local_idx < n_valid)
        safe_idx = torch.where(owned, local_idx, torch.zeros_like(local_idx))
        if n_valid > 0:
            t_shift = torch.where(owned, shifted.gather(1, safe_idx[:, None]).squeeze(1), torch.zeros_like(m))
        else:  # this rank's slice is all vocabulary padding
            t_shift = torch.zeros_like(m)
        stats = [e.sum(dim=-1), t_shift]
        if need_entropy:
            stats.append((e * shifted).sum(dim=-1))
        stats = _all_reduce(torch.stack(stats), dist.ReduceOp.SUM, tp_group)
        log_s = torch.log(stats[0])
        logp = stats[1] - log_s
        lse = m + log_s
        if need_entropy:
            mean_shift = stats[2] / stats[0]  # E_p[l] - m
            entropy = log_s - mean_shift
            mean_l = m + mean_shift
        else:
            entropy = None
            mean_l = torch.zeros_like(m)
        ctx.save_for_backward(logits, safe_idx, owned, lse, mean_l)
        ctx.n_valid = n_valid
        ctx.need_entropy = need_entropy
        if entropy is None:
            return logp, torch.zeros_like(logp)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, safe_idx, owned, lse, mean_l = ctx.saved_tensors
        n_valid = ctx.n_valid
        grad = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        if n_valid > 0:
            lv = logits[:, :n_valid].float()
            # Recompute p instead of saving an (N, V_local) fp32 tensor in forward.
            p = torch.exp(lv - lse[:, None])
            g = -g_logp[:, None] * p
            if ctx.need_entropy:
                g = g + g_ent[:, None] * p * (mean_l[:, None] - lv)
            g.scatter_add_(1, safe_idx[:, None], (g_logp * owned)[:, None])
            grad[:, :n_valid] = g
        return grad.to(logits.dtype), None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None,
    vocab_start: int,
    vocab_size: int,
    need_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``target`` and (optionally) entropy under ``softmax(logits)`` over the TP-sharded vocab.

    Args:
        logits: ``[..., V_local]`` this rank's slice of the logits (any float dtype; maths in fp32).
        target: ``[...]`` int64 global token ids, each ``< vocab_size``.
        tp_group: the tensor-parallel group the vocabulary is split over (None or a 1-rank group:
            no communication).
        vocab_start: global id of this rank's first column.
        vocab_size: real vocabulary size; columns with global id ``>= vocab_size`` are padding and
            take no probability mass.
        need_entropy: also return the entropy of the full distribution.

    Returns:
        ``(logp [...] fp32, entropy [...] fp32 or None)``.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree")
    v_local = logits.shape[-1]
    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    lead = target.shape
    logp, ent = _VocabParallelLogProbs.apply(logits.reshape(-1, v_local), target.reshape(-1).long(),
                                            tp_group, vocab_start, n_valid, need_entropy)
    return logp.view(lead), (ent.view(lead) if need_entropy else None)


def full_vocab_logprobs_ref(logits: torch.Tensor, target: torch.Tensor, vocab_size: int | None = None,
                            need_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: ``log_softmax`` over the full (gathered) vocabulary in fp32.

    Args:
        logits: ``[..., V]``; columns past ``vocab_size`` are dropped.
        target: ``[...]`` token ids.

    Returns:
        ``(logp [...], entropy [...] or None)``.
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    lp = torch.log_softmax(logits.float(), dim=-1)
    logp = lp.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    ent = -(lp.exp() * lp).sum(-1) if need_entropy else None
    return logp, ent
