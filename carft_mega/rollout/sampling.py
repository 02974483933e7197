"""Next-token selection with every sampling parameter pinned explicitly.

Nothing is read from a checkpoint's ``generation_config.json``: Qwen2.5-Instruct ships
temperature 0.7 / top_p 0.8 / top_k 20 there, which would silently change the paper's setting
(temperature 1, no top-k, no top-p; authors_code.md Sec. 9, item 15).
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits outside the top-k and the nucleus with ``-inf``.

    Args:
        logits: ``(B, V)`` fp32 (already divided by the temperature).
        top_k: keep the k largest; 0 disables.
        top_p: keep the smallest set of largest tokens whose probability reaches ``top_p``
            (Holtzman et al. 2020); 1.0 disables.

    Returns:
        ``(B, V)`` filtered logits (a new tensor).
    """
    out = logits.clone()
    V = out.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (B, 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first is always kept).
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def select_next(
    logits: torch.Tensor,
    *,
    greedy: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row.

    Args:
        logits: ``(B, V)`` next-token logits (full vocabulary).
        greedy: argmax instead of sampling.
        temperature, top_k, top_p: sampling parameters (ignored when greedy).
        generator: RNG for sampling; the same seed on every tensor-parallel rank gives the same
            tokens on all of them.

    Returns:
        tokens: ``(B,)`` int64.
        logp: ``(B,)`` fp32 log-probability of the token under the unfiltered, temperature-1
            distribution (the policy's own log-prob, for diagnostics).
    """
    logits = logits.float()
    logp_all = torch.log_softmax(logits, dim=-1)
    if greedy:
        tokens = logits.argmax(dim=-1)
    else:
        filtered = filter_logits(logits / temperature, top_k, top_p)
        probs = torch.softmax(filtered, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp_all.gather(-1, tokens[:, None]).squeeze(-1)
