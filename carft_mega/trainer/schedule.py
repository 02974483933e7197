"""Learning-rate schedules: constant, or linear warm-up then linear decay to zero."""

from __future__ import annotations


def lr_at(step: int, total_steps: int, peak_lr: float, schedule: str, warmup_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Args:
        step: the optimizer step about to be taken.
        total_steps: steps in the stage (>= 1).
        peak_lr: the peak (or constant) rate.
        schedule: ``constant`` or ``linear``.
        warmup_ratio: fraction of ``total_steps`` spent warming up linearly from 0 (both schedules).

    Returns:
        The learning rate.
    """
    total_steps = max(1, total_steps)
    warmup = int(round(warmup_ratio * total_steps))
    if warmup and step < warmup:
        return peak_lr * (step + 1) / warmup
    if schedule == "constant":
        return peak_lr
    if schedule == "linear":
        remaining = total_steps - warmup
        return peak_lr * max(0.0, (total_steps - step) / max(1, remaining))
    raise ValueError(f"unknown schedule {schedule!r} (expected 'constant' or 'linear')")
