"""Correctness and the terminal score of a rollout (DESIGN.md Sec. 5).

score = 1 if correct; otherwise, if a number was extracted, the partial reward
(``none``: 0, ``reft``: 0.1, ``embedding``: the value of
``carft_mega.algos.contrastive.partial_reward_embedding(za, zr)`` = 0.1 * cos(za, zr) + 0.2,
passed in as ``partial_value``; its maths lives only there); else 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

PARTIAL_MODES = ("none", "reft", "embedding")
REFT_PARTIAL = 0.1  # ReFT: a wrong but extractable answer earns 0.1 (authors_code.md Sec. 6)


def is_correct(pred: float | None, gold: float, tol: float = 1e-2) -> bool:
    """``|pred - gold| <= tol`` (absolute, as ReFT); False for None or non-finite ``pred``."""
    return pred is not None and math.isfinite(pred) and abs(pred - gold) <= tol


def _check_partial(partial: str) -> None:
    if partial not in PARTIAL_MODES:
        raise ValueError(f"partial must be one of {PARTIAL_MODES}, got {partial!r}")


def score(pred: float | None, gold: float, *, partial: str = "reft", partial_value: float | None = None,
          tol: float = 1e-2) -> float:
    """Terminal score of one rollout.

    Args:
        pred: extracted answer, or None.
        gold: gold answer.
        partial: ``"none"`` | ``"reft"`` | ``"embedding"``.
        partial_value: for ``"embedding"``, the output of ``partial_reward_embedding(za, zr)`` for
            this sample (required then, ignored otherwise).
        tol: absolute tolerance of ``is_correct``.
    """
    _check_partial(partial)
    if is_correct(pred, gold, tol):
        return 1.0
    if pred is None or not math.isfinite(pred) or partial == "none":
        return 0.0
    if partial == "reft":
        return REFT_PARTIAL
    if partial_value is None:
        raise ValueError("partial='embedding' needs partial_value (partial_reward_embedding(za, zr))")
    return float(partial_value)


def score_batch(preds: Sequence[float | None], golds: Sequence[float] | torch.Tensor, *, partial: str = "reft",
                partial_value: torch.Tensor | Sequence[float] | None = None, tol: float = 1e-2) -> torch.Tensor:
    """``score`` over a batch.

    Args:
        preds: B extracted answers (None where nothing was extracted).
        golds: ``[B]`` gold answers.
        partial: ``"none"`` | ``"reft"`` | ``"embedding"``.
        partial_value: ``[B]`` outputs of ``partial_reward_embedding`` (required for ``"embedding"``).
        tol: absolute tolerance.

    Returns:
        ``[B]`` float32 scores, on ``partial_value``'s device when it is a tensor, else on CPU.
    """
    _check_partial(partial)
    golds_l = golds.tolist() if isinstance(golds, torch.Tensor) else list(golds)
    if len(golds_l) != len(preds):
        raise ValueError(f"preds ({len(preds)}) and golds ({len(golds_l)}) differ in length")
    device = partial_value.device if isinstance(partial_value, torch.Tensor) else torch.device("cpu")
    correct = torch.tensor([is_correct(p, g, tol) for p, g in zip(preds, golds_l)], dtype=torch.bool)
    extracted = torch.tensor([p is not None and math.isfinite(p) for p in preds], dtype=torch.bool)
    if partial == "none":
        partial_t = torch.zeros(len(preds))
    elif partial == "reft":
        partial_t = torch.full((len(preds),), REFT_PARTIAL)
    else:
        if partial_value is None:
            raise ValueError("partial='embedding' needs partial_value (partial_reward_embedding(za, zr))")
        partial_t = torch.as_tensor(partial_value, dtype=torch.float32).detach().reshape(-1).cpu()
        if partial_t.numel() != len(preds):
            raise ValueError(f"partial_value has {partial_t.numel()} entries for {len(preds)} predictions")
    zeros = torch.zeros(len(preds))
    out = torch.where(correct, torch.ones(len(preds)), torch.where(extracted, partial_t, zeros))
    return out.to(dtype=torch.float32, device=device)
