"""Next-token selection with every sampling parameter pinned explicitly.

Nothing is read from a checkpoint's ``generation_config.json``: Qwen2.5-Instruct ships
temperature 0.7 / top_p 0.8 / top_k 20 there, which would silently change the paper's setting
(temperature 1, no top-k, no top-p; authors_code.md Sec. 9, item 15).

Randomness: either a ``torch.Generator`` (one stream for the batch, ``torch.multinomial``), or a
:class:`RowNoise`, which gives every row its own uniform per decode step as a function of (seed,
global row id, step) only, and samples by inverse CDF. With it a row's tokens do not depend on
which other rows share its batch, rank or micro-batch: the rollout is the same at any
data-parallel size (each rank takes its rows of one global stream), after rows leave the decode
batch, and on every tensor-parallel rank.
"""

from __future__ import annotations

import torch


def mix_seed(seed: int, *parts: int) -> int:
    """A 62-bit seed from ``seed`` and integer ``parts`` (order matters)."""
    value = int(seed)
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2**62)
    return value


class RowNoise:
    """Per-row uniforms in (0, 1], one per decode step, independent of the batch layout.

    Step ``t`` draws ``max(row_ids) + 1`` uniforms from a CPU generator seeded with
    ``mix_seed(seed, t)`` and hands row ``b`` the uniform of its global id ``row_ids[b]``; every
    rank and every batch arrangement that contains a row sees the same number for it. The draw is
    on the host (a few hundred floats per step) and moves to ``device`` without a sync.

    Args:
        seed: the stream's seed (e.g. ``mix_seed(run_seed, rl_step)``).
        row_ids: ``(B,)`` global ids of this batch's rows (distinct, >= 0).
        device: where the uniforms are used.
    """

    def __init__(self, seed: int, row_ids: torch.Tensor, device: torch.device | str = "cpu"):
        self.seed = int(seed)
        self.row_ids = torch.as_tensor(row_ids, dtype=torch.long).cpu()
        self.n = int(self.row_ids.max()) + 1 if self.row_ids.numel() else 0
        self.device = torch.device(device)
        self.step = 0

    def _uniforms(self, step: int) -> torch.Tensor:
        """``(n,)`` fp64 uniforms in (0, 1] of step ``step``, indexed by global row id."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, step))
        return 1.0 - torch.rand(self.n, generator=g, dtype=torch.float64)

    def next(self, rows: torch.Tensor | list[int] | None = None,
             lag: list[int] | None = None) -> torch.Tensor:
        """Uniforms of the next decode step for ``rows`` (indices into ``row_ids``; default all).

        Args:
            rows: ``(n,)`` host indices into ``row_ids`` (a device tensor works but costs a sync).
            lag: ``(n,)`` host ints: row ``i`` takes the uniform of step ``self.step - lag[i]``
                instead (a decoder whose rows start generating at different calls, like the
                ``aligned`` layout, keys each row by its own generation index); default 0.
        """
        step = self.step
        self.step += 1
        ids = self.row_ids if rows is None else self.row_ids[torch.as_tensor(rows).cpu()]
        if lag is None or not any(lag):
            u = self._uniforms(step)[ids]
        else:
            lag_t = torch.as_tensor(lag, dtype=torch.long)
            u = torch.empty(ids.shape, dtype=torch.float64)
            for d in lag_t.unique().tolist():
                sel = lag_t == d
                u[sel] = self._uniforms(step - d)[ids[sel]]
        return u.to(self.device, non_blocking=True)


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval holds ``u``: the smallest ``i`` with ``cumsum(p)[i] >= u * sum(p)``.

    Args:
        probs: ``(B, V)`` non-negative (need not be normalised); zero entries are never chosen.
        u: ``(B,)`` uniforms in (0, 1].

    Returns:
        ``(B,)`` int64.
    """
    cdf = probs.double().cumsum(dim=-1)  # fp64: no rounding drift over a 150k vocabulary
    target = u.double()[:, None] * cdf[:, -1:]
    tok = torch.searchsorted(cdf, target).squeeze(-1)
    return tok.clamp(max=probs.shape[-1] - 1)


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
    generator: torch.Generator | RowNoise | None = None,
    rows: torch.Tensor | list[int] | None = None,
    lag: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row.

    Args:
        logits: ``(B, V)`` next-token logits (full vocabulary).
        greedy: argmax instead of sampling.
        temperature, top_k, top_p: sampling parameters (ignored when greedy).
        generator: RNG for sampling (a ``torch.Generator`` or a :class:`RowNoise`); the same seed
            on every tensor-parallel rank gives the same tokens on all of them.
        rows: with a ``RowNoise``, which of its rows ``logits`` holds (default: all, in order).
        lag: with a ``RowNoise``, per-row step lags (:meth:`RowNoise.next`).

    Returns:
        tokens: ``(B,)`` int64.
        logp: ``(B,)`` fp32 log-probability of the token under ``softmax(logits / temperature)``
            before any top-k / top-p filter (temperature 1 when greedy): with no filter, the
            behaviour policy's own log-prob, which the training forward at the same temperature
            reproduces (``rollout/logp_mismatch_max``).
    """
    logits = logits.float()
    if greedy:
        tokens = logits.argmax(dim=-1)
        logp_all = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / temperature
        logp_all = torch.log_softmax(scaled, dim=-1)
        probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
        if isinstance(generator, RowNoise):
            tokens = sample_inverse_cdf(probs, generator.next(rows, lag))
        else:
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp_all.gather(-1, tokens[:, None]).squeeze(-1)
