"""The run's config record: what a resume may change, and the history of launches.

A run directory keeps ``config.yaml`` (the config of its latest launch) and ``config_history/``
(one file per launch that really started: the resolved config, the time, where it resumed from and
what it changed). Both are written only once the launch has passed its checks and loaded its data,
so a launch that fails never touches them. Every checkpoint's ``trainer_state.json`` also carries the
config it was written with; a resume compares against that one.

On resume, the fields in :data:`RESUMABLE` may differ (each change is printed); any other
difference refuses to resume, naming the fields, unless ``checkpoint.allow_config_change=true``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import yaml

from carft_mega.config import TrainerConfig, format_config, to_dict
from carft_mega.trainer.preflight import RunError

# Fields (exact, or a section prefix ending in '.') a resumed run may change. Step limits and
# micro-batches change nothing already computed (every loss is a share of a global sum, so the
# micro-batch size only reorders sums); TP reshards the checkpoint; the rest is cadence and output.
RESUMABLE = (
    "out_dir",
    "sft.max_steps", "sft.epochs", "ppo.max_steps", "ppo.epochs",
    "sft.micro_batch_size", "ppo.micro_batch_size",
    "parallel.tp", "parallel.sequence_parallel", "parallel.backend",
    "logging.", "checkpoint.",
    "data.eval_limit", "rollout.eval_max_new_tokens", "rollout.eval_batch_size",
    "reward.sandbox_workers", "model.kernels", "model.recompute_activations",
)
_STEP_LIMITS = {"sft.max_steps", "sft.epochs", "ppo.max_steps", "ppo.epochs"}
HISTORY_DIR = "config_history"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff(saved: dict[str, Any], cfg: TrainerConfig) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, new value)`` for every field that differs (fields the saved config
    lacks, from older versions, count as unchanged)."""
    old, new = flatten(saved), flatten(to_dict(cfg))
    return [(k, old[k], new[k]) for k in sorted(new) if k in old and old[k] != new[k]]


def resumable(name: str) -> bool:
    return any(name == r or (r.endswith(".") and name.startswith(r)) for r in RESUMABLE)


def check_resume(saved: dict[str, Any] | None, cfg: TrainerConfig, stage: str, where: str) -> list[str]:
    """Compare a resume's config with the one its checkpoint was written with.

    Args:
        saved: the checkpoint's config (``trainer_state.json``), or None (nothing to compare).
        cfg: this launch's config.
        stage: the checkpoint's stage (``sft`` or ``carft``): once RL runs, ``sft.*`` no longer matters.
        where: the checkpoint path (for messages).

    Returns:
        One printed note per accepted change.

    Raises:
        RunError: a change that is not resumable, naming every such field.
    """
    if saved is None:
        return []
    notes, refused = [], []
    for name, old, new in diff(saved, cfg):
        change = f"{name} {old!r} -> {new!r}"
        if resumable(name):
            why = ""
            if name in _STEP_LIMITS:
                why = " (the stage's step count changes; a linear LR schedule is re-spread over the new total)"
            notes.append(f"config change on resume: {change}{why}")
        elif stage == "carft" and name.startswith("sft."):
            notes.append(f"config change on resume: {change} (SFT is complete: no effect)")
        else:
            refused.append(change)
    if refused and not cfg.checkpoint.allow_config_change:
        raise RunError(f"checkpoint.resume={cfg.checkpoint.resume}: {where} was written with a different config: "
                       f"{'; '.join(refused)}. These fields cannot change in a resumed run; set "
                       f"checkpoint.allow_config_change=true to resume anyway, or checkpoint.resume=none (or "
                       f"another out_dir) to start afresh")
    notes += [f"config change on resume, allowed by checkpoint.allow_config_change: {c}" for c in refused]
    return notes


def read_saved_config(out_dir: str) -> dict[str, Any] | None:
    """``<out_dir>/config.yaml`` as a dict, or None."""
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def record_launch(cfg: TrainerConfig, resumed_from: str | None, notes: list[str]) -> str:
    """Write ``config.yaml`` and a new ``config_history/NNNN-<time>.yaml`` (rank 0; atomic).

    Returns:
        The history file written.
    """
    hist = os.path.join(cfg.out_dir, HISTORY_DIR)
    os.makedirs(hist, exist_ok=True)
    n = 1 + sum(1 for f in os.listdir(hist) if f.endswith(".yaml"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    header = [f"# launch {n} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
              + (f"resumed from {resumed_from}" if resumed_from else "fresh start")]
    header += [f"# {note}" for note in notes]
    text = "\n".join(header) + "\n" + format_config(cfg)
    path = os.path.join(hist, f"{n:04d}-{stamp}.yaml")
    for target in (path, os.path.join(cfg.out_dir, "config.yaml")):
        with open(target + ".tmp", "w") as f:
            f.write(text)
        os.replace(target + ".tmp", target)
    return path
