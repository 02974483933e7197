"""Run logging on rank 0: a console progress bar with ETA, a JSONL metrics file, TensorBoard, and a
PNG plot of reward, accuracy and losses written next to the run."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch

# What the progress bar shows, in order, when present.
_BAR_KEYS = ("loss", "reward/score", "reward/accuracy", "eval/accuracy", "actor/pg_loss",
             "critic/vf_loss", "contrastive/loss", "perf/tokens_per_s")
# What the plot shows: one panel per group.
_PLOT_GROUPS = {
    "reward": ("reward/score", "reward/accuracy", "eval/accuracy"),
    "losses": ("sft/loss", "actor/pg_loss", "critic/vf_loss"),
    "contrastive": ("contrastive/loss", "contrastive/pos_loss", "contrastive/neg_loss"),
}


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        v = v.item()
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


class MetricsLogger:
    """Collects per-step scalars; writes them on rank 0 only (other ranks get a no-op logger).

    Args:
        out_dir: run directory; writes ``metrics.jsonl``, ``tb/`` and ``curves.png`` there.
        enabled: False on non-zero ranks.
        tensorboard: write TensorBoard events.
        progress_bar: show a tqdm bar on the console.
        plot: write ``curves.png`` on ``close()`` and on ``plot()``.
    """

    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = True,
                 progress_bar: bool = True, plot: bool = True):
        self.enabled = enabled
        self.out_dir = out_dir
        self.history: list[dict[str, Any]] = []
        self._tb = None
        self._bar = None
        self._plot = plot
        self._progress = progress_bar
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._jsonl_path = os.path.join(out_dir, "metrics.jsonl")
        self.history = self._read_existing()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except ImportError:  # tensorboard is in requirements.txt; tolerate its absence
                self._tb = None

    def _read_existing(self) -> list[dict[str, Any]]:
        """Keep earlier lines of a resumed run, so the plot covers the whole run."""
        if not os.path.exists(self._jsonl_path):
            return []
        rows = []
        with open(self._jsonl_path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a crash: drop it and everything after
        return rows

    def reset(self) -> None:
        """A fresh run in an existing directory: forget earlier metrics."""
        if not self.enabled:
            return
        self.history = []
        open(self._jsonl_path, "w").close()

    def truncate_after(self, stage: str, step: int) -> None:
        """On resume, drop logged rows of ``stage`` past ``step`` (they will be logged again)."""
        if not self.enabled:
            return
        stage_order = {"sft": 0, "carft": 1}
        keep = [r for r in self.history
                if stage_order.get(r.get("stage"), 0) < stage_order.get(stage, 0)
                or (r.get("stage") == stage and r.get("step", 0) <= step)]
        self.history = keep
        tmp = self._jsonl_path + ".tmp"
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self._jsonl_path)

    def start_stage(self, stage: str, total_steps: int, initial_step: int = 0) -> None:
        """Open a progress bar for a stage."""
        if not self.enabled or not self._progress:
            return
        from tqdm.auto import tqdm
        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm(total=total_steps, initial=initial_step, desc=stage, dynamic_ncols=True,
                         smoothing=0.1)

    def log(self, stage: str, step: int, metrics: dict[str, Any], advance: bool = True) -> None:
        """Record one step's metrics (tensors are converted; non-scalars dropped). Empty
        ``metrics`` only advances the progress bar."""
        if not self.enabled:
            return
        if not metrics:
            if self._bar is not None and advance:
                self._bar.update(1)
            return
        row: dict[str, Any] = {"stage": stage, "step": step, "time": time.time()}
        for k, v in metrics.items():
            s = _scalar(v)
            if s is not None:
                row[k] = s if math.isfinite(s) else str(s)
        self.history.append(row)
        with open(self._jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            offset = 0 if stage == "sft" else 1_000_000  # keep the two stages apart on one axis
            for k, v in row.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"{stage}/{k}", v, offset + step)
        if self._bar is not None:
            shown = {k.split("/")[-1]: f"{row[k]:.4g}" for k in _BAR_KEYS if isinstance(row.get(k), float)}
            self._bar.set_postfix(shown, refresh=False)
            if advance:
                self._bar.update(1)

    def maybe_plot(self, step: int, every: int = 10) -> None:
        """Refresh ``curves.png`` every ``every`` steps, so a long run shows its curves as it goes."""
        if step % every == 0:
            self.plot()

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def plot(self) -> str | None:
        """Write ``curves.png``: one panel per metric group over all logged steps."""
        if not self.enabled or not self._plot or not self.history:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(_PLOT_GROUPS), figsize=(5 * len(_PLOT_GROUPS), 3.6))
        # x axis: SFT steps first, then RL steps shifted after them.
        sft_steps = max((r["step"] for r in self.history if r["stage"] == "sft"), default=0)
        for ax, (title, keys) in zip(axes, _PLOT_GROUPS.items()):
            for key in keys:
                xs, ys = [], []
                for r in self.history:
                    if isinstance(r.get(key), float):
                        xs.append(r["step"] + (sft_steps if r["stage"] == "carft" else 0))
                        ys.append(r[key])
                if xs:
                    ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key)
            if sft_steps:
                ax.axvline(sft_steps, color="grey", lw=0.8, ls="--")
            ax.set_title(title)
            ax.set_xlabel("step (SFT, then RL)")
            if any(not line.get_label().startswith("_") for line in ax.lines):
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(self.out_dir, "curves.png")
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        self.plot()


class StageTimer:
    """Wall-clock per named stage of a step (rollout, scoring, forwards, update).

    Synchronises CUDA before reading the clock so GPU work is attributed to the right stage. Stages
    do not nest (``time/step`` is their sum).
    """

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._name: str | None = None
        self._t0 = 0.0

    def __call__(self, name: str) -> "StageTimer":
        if self._name is not None:
            raise RuntimeError(f"StageTimer: stage {name!r} started inside {self._name!r}; stages do not nest")
        self._name = name
        return self

    def __enter__(self) -> "StageTimer":
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        assert self._name is not None
        self.times[self._name] = self.times.get(self._name, 0.0) + time.perf_counter() - self._t0
        self._name = None

    def metrics(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.times.items()}
        out["time/step"] = sum(self.times.values())
        return out
