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

A sampling temperature ``T`` divides the logits first (``l = logits / T``, as verl's actors do
before the log-softmax: ``dp_actor.py`` ``logits.div_(temperature)``): the log-probs are then those
of the distribution the rollout sampled from, and the chain rule adds a factor ``1 / T``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


_CHUNK_ELEMENTS = 1 << 25
"""fp32 elements of one row chunk (128 MiB): bounds the temporaries at large ``N x V_local``."""


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


class _VocabParallelLogProbs(torch.autograd.Function):
    """Token log-probs (and entropy) from vocab-sharded logits; see module docstring.

    Two all-reduces per call whatever the size (MAX of the row maxima, then SUM of the stacked
    statistics); rows are processed in chunks so fp32 temporaries stay bounded.
    """

    @staticmethod
    def forward(ctx, logits, target, tp_group, vocab_start, n_valid, need_entropy, inv_temp):
        # logits: (N, V_local); target: (N,) global ids; l = logits * inv_temp.
        n = logits.shape[0]
        chunks = _row_chunks(n, n_valid)
        m = torch.full((n,), float("-inf"), dtype=torch.float32, device=logits.device)
        if n_valid > 0:
            for c in chunks:
                m[c] = (logits[c, :n_valid].float() * inv_temp).amax(dim=-1)
        _all_reduce(m, dist.ReduceOp.MAX, tp_group)
        local_idx = target - vocab_start
        owned = (local_idx >= 0) & (local_idx < n_valid)
        safe_idx = torch.where(owned, local_idx, torch.zeros_like(local_idx))
        stats = torch.zeros(3 if need_entropy else 2, n, dtype=torch.float32, device=logits.device)
        if n_valid > 0:
            for c in chunks:
                shifted = logits[c, :n_valid].float() * inv_temp - m[c, None]  # (rows, n_valid)
                e = torch.exp(shifted)
                stats[0, c] = e.sum(dim=-1)
                stats[1, c] = torch.where(owned[c], shifted.gather(1, safe_idx[c, None]).squeeze(1), 0.0)
                if need_entropy:
                    stats[2, c] = (e * shifted).sum(dim=-1)
        _all_reduce(stats, dist.ReduceOp.SUM, tp_group)
        log_s = torch.log(stats[0])
        logp = stats[1] - log_s
        lse = m + log_s
        if need_entropy:
            mean_shift = stats[2] / stats[0]  # E_p[l] - m
            entropy = log_s - mean_shift
            mean_l = m + mean_shift
        else:
            entropy = torch.zeros_like(logp)
            mean_l = torch.zeros_like(m)
        ctx.save_for_backward(logits, safe_idx, owned, lse, mean_l)
        ctx.n_valid = n_valid
        ctx.need_entropy = need_entropy
        ctx.inv_temp = inv_temp
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, safe_idx, owned, lse, mean_l = ctx.saved_tensors
        n_valid, inv_temp = ctx.n_valid, ctx.inv_temp
        grad = torch.zeros_like(logits)
        if n_valid > 0:
            for c in _row_chunks(logits.shape[0], n_valid):
                lv = logits[c, :n_valid].float() * inv_temp
                # Recompute p instead of saving an (N, V_local) fp32 tensor in forward.
                p = torch.exp(lv - lse[c, None])
                g = -g_logp[c, None] * p
                if ctx.need_entropy:
                    g += g_ent[c, None] * p * (mean_l[c, None] - lv)
                g.scatter_add_(1, safe_idx[c, None], (g_logp[c] * owned[c])[:, None])
                if inv_temp != 1.0:
                    g *= inv_temp  # d l / d logits
                grad[c, :n_valid] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None,
    vocab_start: int,
    vocab_size: int,
    need_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``target`` and (optionally) entropy under ``softmax(logits / temperature)`` over
    the TP-sharded vocab.

    Args:
        logits: ``[..., V_local]`` this rank's slice of the logits (any float dtype; maths in fp32).
        target: ``[...]`` int64 global token ids, each ``< vocab_size``.
        tp_group: the tensor-parallel group the vocabulary is split over (None or a 1-rank group:
            no communication).
        vocab_start: global id of this rank's first column.
        vocab_size: real vocabulary size; columns with global id ``>= vocab_size`` are padding and
            take no probability mass.
        need_entropy: also return the entropy of the full distribution.
        temperature: the sampling temperature (> 0); 1 is the model's own distribution.

    Returns:
        ``(logp [...] fp32, entropy [...] fp32 or None)``.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    v_local = logits.shape[-1]
    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    lead = target.shape
    logp, ent = _VocabParallelLogProbs.apply(logits.reshape(-1, v_local), target.reshape(-1).long(),
                                            tp_group, vocab_start, n_valid, need_entropy, 1.0 / temperature)
    return logp.view(lead), (ent.view(lead) if need_entropy else None)


def full_vocab_logprobs_ref(logits: torch.Tensor, target: torch.Tensor, vocab_size: int | None = None,
                            need_entropy: bool = False, temperature: float = 1.0
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: ``log_softmax(logits / temperature)`` over the full (gathered) vocabulary in fp32.

    Args:
        logits: ``[..., V]``; columns past ``vocab_size`` are dropped.
        target: ``[...]`` token ids.
        temperature: sampling temperature.

    Returns:
        ``(logp [...], entropy [...] or None)``.
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = lp.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    ent = -(lp.exp() * lp).sum(-1) if need_entropy else None
    return logp, ent
