"""Atomic, resumable checkpoints.

Layout under ``<out_dir>/checkpoints``::

    sft/step_00000040/      model + optimizer (dist_checkpointing), trainer_state.json, rng/, COMPLETE
    carft/step_00000003/
    latest                  text: "carft/step_00000003"

Every rank writes into ``<name>.tmp`` and, after a barrier, rank 0 writes ``COMPLETE``, renames
the directory into place and updates ``latest`` with ``os.replace``. A crash at any point leaves
either the previous checkpoint or the new one, never a half-written directory that ``--resume
auto`` would pick. The filesystem must be shared by all ranks (as for any Megatron checkpoint).

Before a save, rank 0 checks the free space against the expected size (the last checkpoint's, or
the estimate from the model size); a write that fails anyway (a full disk) fails on every rank
with one line, and the partial ``.tmp`` directory is removed. Evaluations of a checkpoint are
recorded in it (``eval.json``); with ``checkpoint.keep_best`` the best one is named in
``best.json`` and never pruned by ``keep_last``. ``stage_end.json`` in a stage's final checkpoint
records the work done after it (the HF export, the final evaluation), so a resumed run does it once.
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

from carft_mega.trainer import preflight
from carft_mega.trainer.preflight import RunError

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


def _from_rank0(obj):
    """``obj`` of rank 0 on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_ok(ok: bool, why: str | None) -> str | None:
    """None when every rank is ok, else the first failing rank's reason (collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None if ok else why
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, None if ok else (why or "failed"))
    return next((g for g in got if g is not None), None)


def _short_reason(e: BaseException) -> str:
    """The OS error inside an exception's text (``[Errno 28] No space left on device``), else its last line."""
    text = str(e)
    m = re.search(r"\[Errno \d+\][^\n]*", text)
    if m:
        return m.group(0).strip()[:300]
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[-1].strip()[:300] if lines else ''}"


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if not os.path.islink(os.path.join(d, f)))


def _write_json(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


class CheckpointManager:
    """Finds, writes and prunes checkpoints of one run.

    Args:
        root: ``<out_dir>/checkpoints``.
        keep_last: completed checkpoints kept per stage.
    """

    def __init__(self, root: str, keep_last: int = 3, keep_best: bool = False, expected_bytes: int = 0):
        self.root = root
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.expected_bytes = expected_bytes
        """Bytes a new checkpoint is expected to take (the preflight's estimate; 0 = unknown)."""
        self._best: dict[str, Any] | None = None
        self._best_loaded = False

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
        err = None
        if _rank() == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                self._check_space(final)
                os.makedirs(tmp)
            except RunError as e:
                err = str(e)
            except OSError as e:
                err = f"cannot create checkpoint directory {tmp}: {e.strerror}"
        err = _from_rank0(err)
        if err:
            raise RunError(err)
        try:
            write(tmp)
            why = None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a full disk, a quota, an I/O error (DCP's CheckpointException is a
            why = _short_reason(e)  # BaseException): on every rank, after cleaning up
        failed = _all_ok(why is None, why)
        if failed is None and _rank() == 0:
            try:
                _write_json(os.path.join(tmp, "trainer_state.json"), state)
                with open(os.path.join(tmp, "COMPLETE"), "w") as f:
                    f.write("ok\n")
            except OSError as e:
                failed = f"{type(e).__name__}: {e.strerror}"
        failed = _from_rank0(failed)
        if failed is not None:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            _barrier()
            # The real free space (not the probe the checks use): a torch writer that hits a full disk
            # may say only "enforce fail at inline_container.cc ... unexpected pos".
            free = shutil.disk_usage(preflight.existing_ancestor(self.root)).free
            full = " (the disk is full)" if free < max(self.expected_bytes, self.last_bytes, 1 << 20) else ""
            raise RunError(f"could not write checkpoint {final} ({failed}); {preflight.human_bytes(free)} free on its "
                           f"filesystem{full}; the partial checkpoint was removed")
        if _rank() == 0:
            from carft_mega.models.convert import follow_umask

            follow_umask(tmp)
            self.last_bytes = dir_bytes(tmp)
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

    last_bytes = 0
    """Size of the last checkpoint this manager wrote (rank 0)."""

    def _check_space(self, final: str) -> None:
        need = max(self.expected_bytes, self.last_bytes)
        if not need:
            return
        where = preflight.existing_ancestor(final)
        free = preflight.free_bytes(where)
        if free < 1.05 * need:
            raise RunError(f"not enough free space for checkpoint {final}: {preflight.human_bytes(free)} free, a "
                           f"checkpoint takes about {preflight.human_bytes(need)}; free some space (older "
                           f"checkpoints: checkpoint.keep_last) and resume")

    def _prune(self, stage: str) -> None:
        refs = self.list(stage)
        best = self._best if self._best_loaded else self._read_best()  # rank 0 only here: no collective
        keep_best = os.path.join(self.root, best["checkpoint"]) if best and self.keep_best else None
        for ref in refs[: max(0, len(refs) - self.keep_last)]:
            if keep_best is not None and os.path.abspath(ref.path) == os.path.abspath(keep_best):
                continue  # checkpoint.keep_best: never pruned by keep_last
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
        self._best_loaded = False  # best.json may name a checkpoint that moved
        return moved

    @staticmethod
    def read_state(ref: CheckpointRef) -> dict[str, Any]:
        with open(os.path.join(ref.path, "trainer_state.json")) as f:
            return json.load(f)

    # ----------------------------------------------------------------------------------------
    # Evaluations, the best checkpoint, and what a stage did after its final checkpoint

    def best(self) -> dict[str, Any] | None:
        """``best.json``: ``{"checkpoint": "<stage>/step_N", "accuracy", "tag"}`` (None: none yet)."""
        if not self._best_loaded:
            self._best, self._best_loaded = _from_rank0(self._read_best() if _rank() == 0 else None), True
        return self._best

    def _read_best(self) -> dict[str, Any] | None:
        path = os.path.join(self.root, "best.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            best = json.load(f)
        if not os.path.exists(os.path.join(self.root, best["checkpoint"], "COMPLETE")):
            return None  # set aside with an abandoned history
        return best

    def would_be_best(self, accuracy: float) -> bool:
        """With ``keep_best``: ``accuracy`` beats the best checkpoint so far (the same on every rank)."""
        if not self.keep_best:
            return False
        best = self.best()
        return best is None or accuracy > best["accuracy"]

    def record_eval(self, ref: CheckpointRef, tag: str, accuracy: float) -> bool:
        """Write ``eval.json`` into ``ref`` and, with ``keep_best``, make it the best when it is.
        Collective (rank 0 writes). Returns whether it became the best."""
        better = self.would_be_best(accuracy)
        name = f"{ref.stage}/step_{ref.step:08d}"
        if _rank() == 0:
            _write_json(os.path.join(ref.path, "eval.json"), {"tag": tag, "accuracy": accuracy})
            if better:
                _write_json(os.path.join(self.root, "best.json"),
                            {"checkpoint": name, "accuracy": accuracy, "tag": tag})
        if better:
            self._best, self._best_loaded = {"checkpoint": name, "accuracy": accuracy, "tag": tag}, True
        _barrier()
        return better

    @staticmethod
    def read_stage_end(ref: CheckpointRef) -> dict[str, Any]:
        """What was done after a stage's final checkpoint (``stage_end.json``; rank 0's view everywhere)."""
        path = os.path.join(ref.path, "stage_end.json")
        data = {}
        if _rank() == 0 and os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        return _from_rank0(data)

    @staticmethod
    def write_stage_end(ref: CheckpointRef, data: dict[str, Any]) -> None:
        if _rank() == 0:
            _write_json(os.path.join(ref.path, "stage_end.json"), data)
        _barrier()
