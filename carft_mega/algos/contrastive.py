"""CARFT's contrastive signals (paper Eqs. 7-8, DESIGN.md Sec. 4) and the embedding partial reward.

Both signals are InfoNCE terms ``l_i = -log(exp(s(anchor_i, positive_i)) / sum_j exp(s(anchor_i,
cand_j)))`` with ``s(a, b) = cos(a, b) / tau``, normalised by the **global** number of selected
anchors:

* positive (Eq. 7): anchor ``za_i`` (annotated CoT), positive ``zr_i`` (its rollout), candidates
  ``zr_j`` (all rollouts); selected where the rollout is correct.
* negative (Eq. 8): anchor ``zr_lcs_i`` (rollout tokens in the LCS with the annotated CoT),
  positive ``za_exc_i`` (annotated tokens outside the LCS), candidates ``zr_exc_j`` (rollout
  tokens outside the LCS); selected where the rollout is wrong.

**Candidates are the whole global rollout batch.** The trainer gathers a detached *bank* of every
sample's embeddings once per rollout batch (one all-gather over data parallel); each micro-batch
substitutes its own rows, computed with gradient, into the bank. The loss of a micro-batch is

    sum_{i local} l_i / n  +  sum_{i not local} (l_i - stopgrad(l_i)) / n

The second sum is zero in value but carries the gradient that the other anchors' denominators
send to this micro-batch's candidates (the gradient-cache idea of Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup"). Summed over micro-batches and ranks,
loss and gradient equal those of the full global batch whenever the bank holds the current
embeddings; the trainer refreshes it (one no-grad forward) before every PPO epoch after the first,
so every epoch is exact. This fixes the authors' code, whose gather carried no gradient and whose
negatives were limited to one micro-batch per rank (authors_code.md Sec. 9, bugs 2-3).

**Groups.** With G samples per prompt, the rows of one prompt share one annotated CoT: another
sample of the same prompt is no negative, so it is left out of the anchor's denominator (its own
row stays). ``InfoNCEBank.group`` holds each row's prompt id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class InfoNCEBank:
    """Detached global view of one InfoNCE term (rows in global-batch order).

    Attributes:
        anchor: ``(N, d)`` anchor embeddings.
        positive: ``(N, d)`` positive embeddings.
        candidate: ``(N, d)`` candidate (denominator) embeddings.
        select: ``(N,)`` bool, anchors that contribute a term.
        cand_valid: ``(N,)`` bool, candidates that may enter a denominator.
        group: ``(N,)`` int64 prompt id of each row (rows of one group are not each other's negatives).
    """

    anchor: torch.Tensor
    positive: torch.Tensor
    candidate: torch.Tensor
    select: torch.Tensor
    cand_valid: torch.Tensor
    group: torch.Tensor

    @property
    def num_selected(self) -> torch.Tensor:
        """Global number of contributing anchors (the normaliser)."""
        return self.select.sum()


def gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather ``(n, ...)`` rows over ``group`` into ``(world * n, ...)``, rank-major, detached.

    Every rank must hold the same number of rows (the trainer shards rollouts evenly).
    """
    x = x.detach().contiguous()
    if group is None or dist.get_world_size(group) == 1:
        return x
    world = dist.get_world_size(group)
    sizes = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    if any(int(s) != x.shape[0] for s in all_sizes):
        raise ValueError(f"gather_rows needs equal row counts on every rank, got {[int(s) for s in all_sizes]}")
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x, group=group)
    return torch.cat(out, dim=0)


def build_bank(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    candidate: torch.Tensor,
    select: torch.Tensor,
    cand_valid: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    prompt_ids: torch.Tensor | None = None,
) -> tuple[InfoNCEBank, torch.Tensor]:
    """Gather this rank's ``(n, ...)`` rows into a global bank.

    Args:
        anchor, positive, candidate: ``(n, d)`` embeddings.
        select, cand_valid: ``(n,)`` bool.
        group: data-parallel process group (None = local).
        prompt_ids: ``(n,)`` int64 global prompt id of each row (default: every row its own
            prompt, i.e. ``global row index``).

    Returns:
        bank: the gathered, detached bank.
        offset: scalar int, the global index of this rank's first row.
    """
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    n = anchor.shape[0]
    if prompt_ids is None:
        prompt_ids = rank * n + torch.arange(n, device=anchor.device)
    bank = InfoNCEBank(
        anchor=gather_rows(anchor.float(), group),
        positive=gather_rows(positive.float(), group),
        candidate=gather_rows(candidate.float(), group),
        select=gather_rows(select.bool(), group),
        cand_valid=gather_rows(cand_valid.bool(), group),
        group=gather_rows(prompt_ids.to(device=anchor.device, dtype=torch.long), group),
    )
    return bank, torch.tensor(rank * n)


def info_nce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    candidate: torch.Tensor,
    local_index: torch.Tensor,
    bank: InfoNCEBank,
    tau: float,
    clamp_pos_cos: float | None = None,
    prefix: str = "contrastive/",
    positive_is_candidate: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's share of a global InfoNCE loss (see the module docstring).

    Args:
        anchor: ``(n, d)`` this micro-batch's anchors (live, may carry grad).
        positive: ``(n, d)`` this micro-batch's positives.
        candidate: ``(n, d)`` this micro-batch's candidates.
        local_index: ``(n,)`` int64, the rows' positions in the bank.
        bank: the global detached bank (``N`` rows).
        tau: temperature.
        clamp_pos_cos: clamp the positive pair's cosine from above in the loss (authors' 0.9); None = off.
        prefix: metric-name prefix.
        positive_is_candidate: anchor ``i``'s positive is candidate ``i`` (the positive signal); the
            accuracy metric then compares it with the *other* candidates.

    Returns:
        loss: scalar; its sum over all micro-batches and ranks is the global loss.
        metrics, detached, each a share of a global quantity (summing over micro-batches and ranks
            gives it): ``{prefix}loss``; ``{prefix}count`` (selected anchors); ``{prefix}cos``
            (mean positive cosine over the selected anchors, unclamped); ``{prefix}acc`` (fraction
            of selected anchors whose positive outscores every other candidate of their
            denominator).
    """
    n_global = bank.anchor.shape[0]
    device = bank.anchor.device
    local_index = local_index.to(device=device, dtype=torch.long)
    is_local = torch.zeros(n_global, dtype=torch.bool, device=device)
    is_local[local_index] = True
    dt = torch.float32
    A = bank.anchor.to(dt).index_copy(0, local_index, anchor.to(dt))  # (N, d)
    P = bank.positive.to(dt).index_copy(0, local_index, positive.to(dt))
    C = bank.candidate.to(dt).index_copy(0, local_index, candidate.to(dt))
    cols = torch.arange(n_global, device=device)
    select = bank.select.bool()
    rows = torch.nonzero(select).squeeze(-1)  # (M,)
    # Candidates of anchor i: valid rows not of i's prompt, and i's own row.
    same_prompt = bank.group[rows, None] == bank.group[None, :]  # (M, N)
    own = cols[None, :] == rows[:, None]
    allowed = bank.cand_valid.bool()[None, :] & (~same_prompt | own)
    has_cand = allowed.any(dim=-1)  # an anchor without candidates has no denominator: no term
    rows, allowed, own = rows[has_cand], allowed[has_cand], own[has_cand]
    n_sel = has_cand.sum().clamp(min=1).to(dt)

    a = F.normalize(A[rows], dim=-1)  # (M, d)
    logits = (a @ F.normalize(C, dim=-1).T / tau).masked_fill(~allowed, float("-inf"))  # (M, N)
    pos_cos_raw = (a * F.normalize(P[rows], dim=-1)).sum(-1)  # (M,)
    pos_cos = pos_cos_raw if clamp_pos_cos is None else pos_cos_raw.clamp(max=clamp_pos_cos)
    losses = torch.logsumexp(logits, dim=-1) - pos_cos / tau  # (M,)

    loc = is_local[rows]
    mine = losses[loc].sum()
    cross = losses[~loc]
    loss = (mine + (cross - cross.detach()).sum()) / n_sel
    if rows.numel() == 0:  # keep the graph connected so every rank runs the same backward
        loss = loss + 0.0 * (anchor.sum() + positive.sum() + candidate.sum()).to(dt)
    with torch.no_grad():
        others = logits[loc]
        if positive_is_candidate:  # the positive itself is not a competitor
            others = others.masked_fill(own[loc], float("-inf"))
        best_other = others.max(dim=-1).values if others.numel() else others.new_zeros(0)
        wins = pos_cos_raw[loc] / tau > best_other  # an anchor with no other candidate wins
        metrics = {
            f"{prefix}loss": (mine / n_sel).detach(),
            f"{prefix}count": loc.sum().to(dt),
            f"{prefix}cos": pos_cos_raw[loc].sum() / n_sel,
            f"{prefix}acc": wins.to(dt).sum() / n_sel,
        }
    return loss, metrics


def _local_bank(anchor, positive, candidate, select, cand_valid, group, prompt_ids):
    bank, offset = build_bank(anchor, positive, candidate, select, cand_valid, group, prompt_ids)
    local_index = offset + torch.arange(anchor.shape[0])
    return bank, local_index


def contrastive_positive(
    za: torch.Tensor,
    zr: torch.Tensor,
    select: torch.Tensor,
    cand_valid: torch.Tensor | None = None,
    *,
    tau: float = 0.2,
    bank: InfoNCEBank | None = None,
    local_index: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    clamp_pos_cos: float | None = None,
    prompt_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Positive signal, Eq. 7: pull each correct rollout towards its annotated CoT.

    ``l_i = -log(exp(s(za_i, zr_i)) / sum_j exp(s(za_i, zr_j)))``, ``L = sum_i M1_i l_i / max(1,
    sum_i M1_i)`` with ``j`` and the count over the global batch (``j`` not another sample of
    ``i``'s prompt).

    Args:
        za: ``(n, d)`` annotated-CoT embeddings (anchors; no grad needed).
        zr: ``(n, d)`` rollout-CoT embeddings (positives and candidates; with grad).
        select: ``(n,)`` bool, M1: correct rollout with both embeddings valid.
        cand_valid: ``(n,)`` bool, rollouts whose embedding exists (default all).
        tau: temperature.
        bank: global bank (``build_bank(za, zr, zr, select, cand_valid, dp_group)`` over the whole
            rollout batch); None builds it from these rows, gathered over ``group``.
        local_index: ``(n,)`` positions of these rows in ``bank`` (required with ``bank``).
        group: data-parallel group used when ``bank`` is None.
        clamp_pos_cos: optional cosine clamp on the positive pair (authors' 0.9).
        prompt_ids: ``(n,)`` global prompt id per row when ``bank`` is None (default: distinct).

    Returns:
        (loss, metrics) with metrics under ``contrastive/pos_*``.
    """
    if cand_valid is None:
        cand_valid = torch.ones_like(select, dtype=torch.bool)
    if bank is None:
        bank, local_index = _local_bank(za, zr, zr, select, cand_valid, group, prompt_ids)
    elif local_index is None:
        raise ValueError("local_index is required when a bank is given")
    return info_nce(za, zr, zr, local_index, bank, tau, clamp_pos_cos, prefix="contrastive/pos_",
                    positive_is_candidate=True)


def contrastive_negative(
    zr_lcs: torch.Tensor,
    za_exc: torch.Tensor,
    zr_exc: torch.Tensor,
    select: torch.Tensor,
    cand_valid: torch.Tensor | None = None,
    *,
    tau: float = 0.2,
    bank: InfoNCEBank | None = None,
    local_index: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    prompt_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative signal, Eq. 8, for wrong rollouts.

    ``l_i = -log(exp(s(zr_lcs_i, za_exc_i)) / sum_j exp(s(zr_lcs_i, zr_exc_j)))``.

    Args:
        zr_lcs: ``(n, d)`` rollout tokens in the LCS (anchors; with grad).
        za_exc: ``(n, d)`` annotated tokens outside the LCS (positives; no grad needed).
        zr_exc: ``(n, d)`` rollout tokens outside the LCS (candidates; with grad).
        select: ``(n,)`` bool, M2: wrong rollout with ``zr_lcs`` and ``za_exc`` valid.
        cand_valid: ``(n,)`` bool, rows whose ``zr_exc`` exists (default all).
        tau, bank, local_index, group, prompt_ids: as in ``contrastive_positive`` (bank =
            ``build_bank(zr_lcs, za_exc, zr_exc, select, cand_valid, dp_group, prompt_ids)``).

    Returns:
        (loss, metrics) with metrics under ``contrastive/neg_*``.
    """
    if cand_valid is None:
        cand_valid = torch.ones_like(select, dtype=torch.bool)
    if bank is None:
        bank, local_index = _local_bank(zr_lcs, za_exc, zr_exc, select, cand_valid, group, prompt_ids)
    elif local_index is None:
        raise ValueError("local_index is required when a bank is given")
    return info_nce(zr_lcs, za_exc, zr_exc, local_index, bank, tau, prefix="contrastive/neg_")


def partial_reward_embedding(za: torch.Tensor, zr: torch.Tensor) -> torch.Tensor:
    """CARFT's embedding-enhanced partial reward ``0.1 * cos(za, zr) + 0.2``, in [0.1, 0.3].

    Args:
        za: ``(N, d)`` annotated-CoT embeddings.
        zr: ``(N, d)`` rollout-CoT embeddings.

    Returns:
        ``(N,)`` fp32.
    """
    return 0.1 * F.cosine_similarity(za.float(), zr.float(), dim=-1) + 0.2
