"""Stopping a run cleanly: SIGTERM / SIGINT / SIGUSR1 (Slurm's ``--signal``) and timed saves.

Every rank installs the same handler; it only records the signal. Once per training step all
ranks all-reduce one small tensor (``StopRequest.poll``): "has any rank received a stop signal?"
and "is a timed save due?" (rank 0's clock, ``checkpoint.save_interval_minutes``). So every rank
finishes the step it is in, then all of them save the same checkpoint and stop at the same step,
whichever rank the signal reached first and however late. The idea is Megatron-LM's
``--exit-signal-handler`` (``DistributedSignalHandler`` plus an all-gather of the flags each
iteration); this is our own, smaller version.

Under torchrun the agent catches the signal and forwards it to the workers, then waits
``--shutdown-timeout`` seconds before SIGKILL (30 s by default, too short for a step and a save),
and exits 1 with a traceback even when every worker exited 0: ``python -m carft_mega.launch``
raises the timeout, forwards SIGUSR1 too, and turns that outcome into exit 0.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class RunStopped(Exception):
    """Raised by a stage after the checkpoint it saved on a stop request (carries its path)."""

    def __init__(self, signum: int, stage: str, step: int, total: int, checkpoint: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} at {stage} step {step}")
        self.signum, self.stage, self.step, self.total, self.checkpoint = signum, stage, step, total, checkpoint


class StopRequest:
    """Records stop signals; decides, collectively once per step, whether to save and stop.

    Args:
        save_interval_minutes: a timed save is due this long after the last save (0 = never).
    """

    def __init__(self, save_interval_minutes: float = 0.0):
        self.signum: int | None = None
        self.save_interval_s = 60.0 * save_interval_minutes
        self._last_save = time.monotonic()
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def install(self) -> "StopRequest":
        """Catch :data:`STOP_SIGNALS` (main thread only; elsewhere signals cannot be caught), and
        start the checkpoint writer's helper processes so that the same signals do not kill them
        (``megatron_compat.shield_checkpoint_helpers``)."""
        if threading.current_thread() is threading.main_thread():
            from carft_mega.models.megatron_compat import shield_checkpoint_helpers

            shield_checkpoint_helpers()
            self._pid = os.getpid()
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked checkpoint writer inherits the handler: not its business
            return
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            if int(os.environ.get("RANK", "0")) == 0:  # os.write: print() is not safe inside a handler
                os.write(2, (f"carft_mega: received {signal.Signals(signum).name}: finishing the current step, "
                             f"then saving a checkpoint and exiting (a second Ctrl-C stops at once, without "
                             f"saving)\n").encode())
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > 1.0:
            # A deliberate second Ctrl-C (torchrun forwards one SIGINT per press; a signal that reaches
            # a worker twice, directly and through the agent, arrives within milliseconds).
            raise KeyboardInterrupt

    def note_saved(self) -> None:
        """Restart the save-interval clock (after any checkpoint)."""
        self._last_save = time.monotonic()

    def poll(self, device: torch.device) -> tuple[int | None, bool]:
        """Collective over the world, once per step on every rank.

        Returns:
            ``(signal number or None, timed save due)``, the same on every rank.
        """
        due = (dist.get_rank() == 0 and self.save_interval_s > 0
               and time.monotonic() - self._last_save >= self.save_interval_s)
        flags = torch.tensor([float(self.signum or 0), float(due)], dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum = int(flags[0].item())
        return (signum or None), bool(flags[1].item())


def stop_message(e: RunStopped, out_dir: str) -> str:
    """The one line a stopped run prints."""
    return (f"carft_mega: stopped by {signal.Signals(e.signum).name} after {e.stage} step {e.step} of {e.total}; "
            f"checkpoint saved: {e.checkpoint}. To resume, run the same command again "
            f"(checkpoint.resume=auto continues from it; out_dir {out_dir})")
