"""One training run: SFT warm-up, then CARFT / ReFT / Dr.GRPO, with checkpoints and resume.

Stages hand over through checkpoints: SFT always ends with a checkpoint, and the RL stage builds
its policy *and* its frozen reference model from it. A run resumed in the middle of RL therefore
takes exactly the path of an uninterrupted one. The stages share a ``Run`` context
(``trainer/context.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from carft_mega import parallel
from carft_mega.config import TrainerConfig
from carft_mega.trainer.carft import run_carft
from carft_mega.trainer.context import setup_run
from carft_mega.trainer.sft import run_sft


def run_training(cfg: TrainerConfig) -> dict[str, Any]:
    """Run the configured stages; returns accuracies and the final checkpoint path.

    Resume (``checkpoint.resume``): the latest (or the given) checkpoint decides where to start:
    inside SFT, at the SFT/RL boundary, or inside RL.
    """
    run = setup_run(cfg)
    try:
        resume = run.ckpts.resolve(cfg.checkpoint.resume)
        moved = run.ckpts.set_aside(resume)  # checkpoints of an abandoned history: kept, out of the way
        if moved is not None:
            dest, count = moved
            metrics_file = os.path.join(cfg.out_dir, "metrics.jsonl")
            if resume is None and run.is_main and os.path.exists(metrics_file):
                shutil.copy2(metrics_file, dest)
            run.print(f"checkpoint.resume={cfg.checkpoint.resume}: moved {count} checkpoint(s) "
                      f"{'of an earlier run' if resume is None else 'newer than ' + resume.path} to {dest}")
        if resume is not None:
            run.print(f"resuming from {resume.path} ({resume.stage} step {resume.step})")
            run.logger.truncate_after(resume.stage, resume.step)
        else:
            run.logger.reset()
        sft_ref = None
        if cfg.sft.enabled and (resume is None or resume.stage == "sft"):
            sft_ref = run_sft(run, resume)
        elif resume is not None and resume.stage == "carft":
            state = run.ckpts.read_state(resume)
            init = state.get("init_checkpoint")
            sft_ref = run.ckpts.resolve(os.path.join(run.ckpts.root, init)) if init else None
        if cfg.ppo.enabled:
            run_carft(run, init=sft_ref, resume=resume if resume is not None and resume.stage == "carft" else None)
        if run.is_main:
            write_results(cfg.out_dir, run.results)
        return run.results
    finally:
        run.logger.close()
        if run.sandbox is not None:
            run.sandbox.close()
        parallel.destroy()


def write_results(out_dir: str, results: dict[str, Any]) -> None:
    """``<out_dir>/results.json``, written atomically when a run has finished every stage (a resumed
    run adds what it computed to what the earlier process recorded)."""
    path = os.path.join(out_dir, "results.json")
    merged: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = json.load(f)
    merged.update(results)
    with open(path + ".tmp", "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(path + ".tmp", path)
