"""Weights & Biases logging (``logging.wandb=true``; rank 0; wandb is an optional dependency).

The same scalars as TensorBoard, under the same names, on the same x axis: ``run_step`` (SFT steps,
then RL steps after them; ``MetricsLogger.set_stage_offsets``), declared as every metric's step
metric, so a resumed run that logs a step again does not fight wandb's own monotonic step. The
resolved config is the run's wandb config. The wandb run id is kept in ``<out_dir>/wandb_run_id``:
every launch of one run directory continues the same wandb run. ``WANDB_MODE=offline`` (or
``disabled``) works without an account or network; offline runs go to ``<out_dir>/wandb/`` and can
be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import os
import uuid

from carft_mega.config import TrainerConfig, to_dict
from carft_mega.trainer.preflight import RunError

RUN_ID_FILE = "wandb_run_id"


class WandbSink:
    """A ``MetricsLogger`` sink (``log_scalars``, ``close``) writing to one wandb run.

    Raises:
        RunError: wandb is not installed, or ``wandb.init`` failed (no login in online mode, ...).
    """

    def __init__(self, cfg: TrainerConfig):
        try:
            import wandb
        except ImportError:
            raise RunError("config field 'logging.wandb' = True: the 'wandb' package is not installed "
                           "(pip install wandb), or set logging.wandb=false") from None
        lg = cfg.logging
        id_file = os.path.join(cfg.out_dir, RUN_ID_FILE)
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:8]  # wandb's own ids are 8 characters of [a-z0-9]
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        tags = [t.strip() for t in lg.wandb_tags.split(",") if t.strip()]
        try:
            self.run = wandb.init(project=lg.wandb_project, entity=lg.wandb_entity,
                                  name=lg.wandb_run_name or os.path.basename(os.path.abspath(cfg.out_dir)),
                                  tags=tags, config=to_dict(cfg), dir=cfg.out_dir, id=run_id, resume="allow")
        except Exception as e:  # wandb raises its own UsageError / CommError types
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise RunError(f"config field 'logging.wandb' = True: wandb.init failed ({msg}); run `wandb login`, "
                           f"or set WANDB_MODE=offline to log locally") from None
        self.run.config.update(to_dict(cfg), allow_val_change=True)  # a resume may change cadence fields
        self.run.define_metric("run_step")
        self.run.define_metric("*", step_metric="run_step")

    def log_scalars(self, scalars: dict[str, float], run_step: int, walltime: float) -> None:
        self.run.log({**scalars, "run_step": run_step})

    def close(self) -> None:
        self.run.finish()
