"""One training run: SFT warm-up, then CARFT / ReFT / Dr.GRPO, with checkpoints and resume.

Stages hand over through checkpoints: SFT always ends with a checkpoint, and the RL stage builds
its policy *and* its frozen reference model from it. A run resumed in the middle of RL therefore
takes exactly the path of an uninterrupted one. The stages share a ``Run`` context
(``trainer/context.py``).

A launch opens the run first (``context.setup_run``): checks, the resume point, the config
comparison with the checkpoint's, and whether the run is already finished (then nothing is loaded
and nothing is written). A stop signal makes the current stage save a checkpoint after the step it
is in and raise ``RunStopped``; ``run_training`` returns ``{"stopped": ...}`` for it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from carft_mega import parallel
from carft_mega.config import TrainerConfig
from carft_mega.trainer.carft import run_carft
from carft_mega.trainer.context import finished_message, setup_run
from carft_mega.trainer.plan import print_plan
from carft_mega.trainer.preflight import RunError
from carft_mega.trainer.sft import run_sft
from carft_mega.trainer.stop import RunStopped, StopRequest, stop_message


def run_training(cfg: TrainerConfig) -> dict[str, Any]:
    """Run the configured stages; returns accuracies and the final checkpoint path.

    Resume (``checkpoint.resume``): the latest (or the given) checkpoint decides where to start:
    inside SFT, at the SFT/RL boundary, or inside RL. A finished run returns its ``results.json``
    with ``"finished": True`` and does nothing else; a stopped one returns ``{"stopped": {...}}``.

    Raises:
        RunError: an error the user can fix (one line naming the field or file).
    """
    stop = StopRequest(cfg.checkpoint.save_interval_minutes).install()
    run_box: list = []
    try:
        return _run_stages(cfg, stop, run_box)
    except RunError as e:  # raised on every rank alike (checks are broadcast, saves agree)
        announce_error(e)
        raise
    finally:
        stop.uninstall()
        run = run_box[0] if run_box else None
        if run is not None:
            run.logger.close()
            if run.sandbox is not None:
                run.sandbox.close()
        parallel.destroy()


def announce_error(e: RunError) -> None:
    """Rank 0 prints the one line, then every rank waits for the others: a rank that exits first
    would make torchrun kill the rest, rank 0 perhaps before it printed."""
    import sys

    import torch.distributed as dist

    from carft_mega.trainer.status import report_status

    if not parallel.is_initialized() or parallel.world_rank() == 0:
        print(f"error: {e}", file=sys.stderr, flush=True)
    e.printed = True
    report_status("error", 2)
    if dist.is_initialized() and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                import datetime

                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except Exception:  # a rank that did not raise: nothing more to wait for
            pass


def _run_stages(cfg: TrainerConfig, stop: StopRequest, run_box: list) -> dict[str, Any]:
    """The body of :func:`run_training`; the run (or None) goes into ``run_box`` for its cleanup."""
    run, opening = setup_run(cfg, stop)
    run_box.append(run)
    if run is None:
        if parallel.world_rank() == 0:
            print(finished_message(cfg, opening.finished), flush=True)
        return {**opening.finished, "finished": True}
    resume = run.resume
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
    plan = print_plan(run)
    try:
        sft_ref = None
        if cfg.sft.enabled and (resume is None or resume.stage == "sft"):
            sft_ref = run_sft(run, resume, plan)
        elif resume is not None and resume.stage == "carft":
            state = run.ckpts.read_state(resume)
            init = state.get("init_checkpoint")
            sft_ref = run.ckpts.resolve(os.path.join(run.ckpts.root, init)) if init else None
            if sft_ref is not None:  # the SFT result of an earlier launch
                sft_eval = run.ckpts.read_stage_end(sft_ref).get("eval")
                if sft_eval:
                    run.results.setdefault("sft_accuracy", sft_eval["accuracy"])
                    run.results.setdefault("sft_checkpoint", sft_ref.path)
        if cfg.ppo.enabled:
            run_carft(run, init=sft_ref, resume=resume if resume is not None and resume.stage == "carft" else None,
                      plan=plan)
    except RunStopped as e:
        run.print(stop_message(e, cfg.out_dir))
        return {"stopped": {"signal": e.signum, "stage": e.stage, "step": e.step, "checkpoint": e.checkpoint}}
    best = run.ckpts.best() if cfg.checkpoint.keep_best else None
    if best is not None:
        run.results["best_checkpoint"] = os.path.join(run.ckpts.root, best["checkpoint"])
        run.results["best_accuracy"] = best["accuracy"]
    if run.is_main:
        write_results(cfg.out_dir, run.results)
    return run.results


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
