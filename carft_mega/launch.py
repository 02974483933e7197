"""``python -m carft_mega.launch [torchrun options] -m carft_mega.train [train arguments]``.

torchrun (``torch.distributed.run``, same options, same rendezvous: ``--standalone`` on one node;
``--nnodes N --node_rank K --master_addr A --master_port P`` on N nodes) with what a cluster user
of the trainer needs around it:

* **Checks before any worker starts.** The trainer's ``--check`` runs in this process first: a
  missing model or data file, a truncated GGUF, an out_dir that cannot be written, a disk too
  small for a checkpoint, a resume whose config changed: one line naming the field or the file,
  exit 2. A finished run says so and exits 0 without starting workers.
* **Preemption.** The agent forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT *and SIGUSR1* (Slurm's
  ``--signal=USR1@<seconds>``) to the workers, which finish their step, save a checkpoint and
  exit 0; it waits ``--shutdown-timeout`` seconds for that (default here
  ``$CARFT_STOP_TIMEOUT`` or 900; torchrun's own default of 30 s is shorter than a step and a
  save). torchrun then exits 1 with a traceback although every worker exited 0; this launcher
  exits 0 when every local worker reported a clean stop.
* **Errors the user can fix** (raised in the workers after the checks, e.g. a disk that fills up
  during a save): the rank-0 line is the whole report; without this launcher torchrun adds its
  ``ChildFailedError`` report for every worker.

Any other failure is torchrun's usual report and exit code.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import sys
import tempfile

DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def _has(argv: list[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in argv for n in names)


def _split(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """torchrun's arguments, and the trainer's (those after ``-m carft_mega.train``; None otherwise)."""
    for i in range(len(argv) - 1):
        if argv[i] in ("-m", "--module") and argv[i + 1] == "carft_mega.train":
            return argv[:i + 2], argv[i + 2:]
    return argv, None


def _node_rank(argv: list[str]) -> int:
    for i, a in enumerate(argv):
        if a in ("--node_rank", "--node-rank") and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith(("--node_rank=", "--node-rank=")):
            return int(a.split("=", 1)[1])
    return 0


def _statuses(d: str) -> list[dict]:
    out = []
    for f in sorted(glob.glob(os.path.join(d, "*.json"))):
        with open(f) as fh:
            out.append(json.load(fh))
    return out


def _nproc(argv: list[str]) -> int | None:
    for i, a in enumerate(argv):
        if a in ("--nproc_per_node", "--nproc-per-node") and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        if a.startswith(("--nproc_per_node=", "--nproc-per-node=")) and a.split("=", 1)[1].isdigit():
            return int(a.split("=", 1)[1])
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    torchrun_args, train_args = _split(argv)
    node = _node_rank(torchrun_args)
    if train_args is not None:
        from carft_mega import train

        args, cfg = train.resolve(train_args)
        if cfg is None:
            return 2
        if not (args.print_config or args.check):
            # Every node checks its own view of the filesystem; node 0 alone says "finished".
            code, finished = train.check(cfg, quiet=node != 0)
            if code or finished:
                return code  # an error (printed), or a finished run: no workers to start
    extra = []
    if not _has(torchrun_args, "--signals_to_handle", "--signals-to-handle"):
        extra += ["--signals_to_handle", DEFAULT_SIGNALS]
    if not _has(torchrun_args, "--shutdown_timeout", "--shutdown-timeout"):
        extra += ["--shutdown-timeout", os.environ.get("CARFT_STOP_TIMEOUT", "900")]
    status_dir = tempfile.mkdtemp(prefix="carft_launch_")
    os.environ["CARFT_LAUNCH_STATUS_DIR"] = status_dir  # the workers inherit it
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    nproc = _nproc(torchrun_args)
    try:
        torchrun_main(extra + argv)
        return 0
    except SignalException as e:
        st = _statuses(status_dir)
        if st and all(s["status"] in ("stopped", "done", "finished") for s in st) and (nproc is None or len(st) == nproc):
            return 0  # every worker saved and exited 0; rank 0 printed where the checkpoint is
        print(f"carft_mega.launch: stopped by {signal.Signals(e.sigval).name} before the workers could save a "
              f"checkpoint ({len([s for s in st if s['status'] == 'stopped'])} of {nproc or '?'} reported a clean "
              f"stop); the run resumes from its last checkpoint", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        errors = [s for s in _statuses(status_dir) if s["status"] == "error"]
        # The trainer printed its one line (rank 0) and every worker exited with its code, or was
        # sent SIGTERM by the agent once the first of them had exited: that line is the report.
        if errors and all(c == errors[0]["code"] or c == -signal.SIGTERM for c in codes):
            return errors[0]["code"]
        raise
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
