"""Atomic, resumable checkpoints.

Layout under ``<out_dir>/checkpoints``::

    sft/step_00000040/      model + optimizer (dist_checkpointing), trainer_state.json, rng/, COMPLETE
    carft/step_00000003/
    latest                  text: "carft/step_00000003"

Every rank writes into ``<name>.tmp`` and, after a barrier, rank 0 writes ``COMPLETE``, renames
the directory into place and updates ``latest`` with ``os.replace``. A crash at any point leaves
either the previous checkpoint or the new one, never a half-written directory that ``--resume
auto`` would pick. The filesystem must be shared by all ranks (as for any Megatron checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

STAGES = ("sft", "carft")
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass(frozen=True)
class CheckpointRef:
    """A completed checkpoint on disk."""

    stage: str
    step: int
    path: str

    @property
    def order(self) -> tuple[int, int]:
        return STAGES.index(self.stage), self.step


def _barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CheckpointManager:
    """Finds, writes and prunes checkpoints of one run.

    Args:
        root: ``<out_dir>/checkpoints``.
        keep_last: completed checkpoints kept per stage.
    """

    def __init__(self, root: str, keep_last: int = 3):
        self.root = root
        self.keep_last = keep_last

    def list(self, stage: str | None = None) -> list[CheckpointRef]:
        """Completed checkpoints, oldest first."""
        refs = []
        for st in STAGES if stage is None else (stage,):
            d = os.path.join(self.root, st)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                m = _STEP_DIR.match(name)
                path = os.path.join(d, name)
                if m and os.path.exists(os.path.join(path, "COMPLETE")):
                    refs.append(CheckpointRef(st, int(m.group(1)), path))
        return sorted(refs, key=lambda r: r.order)

    def latest(self) -> CheckpointRef | None:
        """The most advanced completed checkpoint (stage order, then step)."""
        refs = self.list()
        return refs[-1] if refs else None

    def resolve(self, resume: str) -> CheckpointRef | None:
        """``auto`` -> latest or None; ``none`` -> None; a path -> that checkpoint (validated)."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = os.path.abspath(resume)
        m = _STEP_DIR.match(os.path.basename(path))
        stage = os.path.basename(os.path.dirname(path))
        if not m or stage not in STAGES:
            raise ValueError(f"checkpoint.resume={resume!r}: expected 'auto', 'none' or a directory "
                             f".../{{{','.join(STAGES)}}}/step_NNNNNNNN")
        if not os.path.exists(os.path.join(path, "COMPLETE")):
            raise FileNotFoundError(f"checkpoint.resume={resume!r}: no completed checkpoint there "
                                    f"(missing {os.path.join(path, 'COMPLETE')})")
        return CheckpointRef(stage, int(m.group(1)), path)

    def save(self, stage: str, step: int, write: Callable[[str], None], state: dict[str, Any]) -> CheckpointRef:
        """Write a checkpoint atomically. Collective: every rank must call it.

        Args:
            stage: ``sft`` or ``carft``.
            step: the number of completed steps of the stage.
            write: called on every rank with the temporary directory; writes model, optimizer and
                per-rank files there.
            state: JSON-serialisable trainer state, written by rank 0.

        Returns:
            The new checkpoint.
        """
        final = os.path.join(self.root, stage, f"step_{step:08d}")
        tmp = final + ".tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        write(tmp)
        _barrier()
        if _rank() == 0:
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f, indent=1)
            with open(os.path.join(tmp, "COMPLETE"), "w") as f:
                f.write("ok\n")
            old = None
            if os.path.exists(final):  # re-saving a step: move the old one out of sight first
                old = final + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)  # a crash from here on leaves no half-deleted step_* dir
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            latest_tmp = os.path.join(self.root, "latest.tmp")
            with open(latest_tmp, "w") as f:
                f.write(f"{stage}/step_{step:08d}\n")
            os.replace(latest_tmp, os.path.join(self.root, "latest"))
            self._prune(stage)
        _barrier()
        return CheckpointRef(stage, step, final)

    def _prune(self, stage: str) -> None:
        refs = self.list(stage)
        for ref in refs[: max(0, len(refs) - self.keep_last)]:
            shutil.rmtree(ref.path, ignore_errors=True)
        # Leftover temporaries of crashed saves.
        d = os.path.join(self.root, stage)
        for name in os.listdir(d):
            if name.endswith((".tmp", ".old")):
                shutil.rmtree(os.path.join(d, name), ignore_errors=True)

    def set_aside(self, keep: CheckpointRef | None) -> tuple[str, int] | None:
        """Move every checkpoint after ``keep`` (all of them when None) out of the way.

        A fresh start (``resume=none``) or a resume from an older checkpoint begins a new history:
        checkpoints of the abandoned one must neither win ``resume=auto`` later nor be pruned in
        place of the new ones. Nothing is deleted: they go to ``<root>.replaced-<time>/<stage>/``.
        Rank 0 moves, every rank waits (collective).

        Returns:
            ``(destination, count)``, or None when there was nothing to move.
        """
        moved = None
        if _rank() == 0:
            later = [(st, name) for st in STAGES if os.path.isdir(os.path.join(self.root, st))
                     for name in sorted(os.listdir(os.path.join(self.root, st)))
                     if (m := _STEP_DIR.match(name))
                     and (keep is None or (STAGES.index(st), int(m.group(1))) > keep.order)]
            if later:
                dest = f"{self.root}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                n = 0
                while os.path.exists(dest):  # two fresh starts within a second
                    n += 1
                    dest = f"{self.root}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
                for st, name in later:
                    os.makedirs(os.path.join(dest, st), exist_ok=True)
                    os.replace(os.path.join(self.root, st, name), os.path.join(dest, st, name))
                moved = (dest, len(later))
            latest = os.path.join(self.root, "latest")
            if keep is None:
                if os.path.exists(latest):
                    os.remove(latest)
            elif moved is not None:
                with open(latest + ".tmp", "w") as f:
                    f.write(f"{keep.stage}/step_{keep.step:08d}\n")
                os.replace(latest + ".tmp", latest)
        if dist.is_available() and dist.is_initialized():
            box = [moved]
            dist.broadcast_object_list(box, src=0)
            moved = box[0]
        return moved

    @staticmethod
    def read_state(ref: CheckpointRef) -> dict[str, Any]:
        with open(os.path.join(ref.path, "trainer_state.json")) as f:
            return json.load(f)
