"""Command line: ``python -m carft_mega.train --config CONFIG.yaml [section.field=value ...]``.

Runs SFT warm-up then CARFT (or ReFT with ``contrastive.signal=none``) as configured. Works in a
plain process (one rank) and under ``torchrun`` with any ``parallel.tp`` that divides the world
size (the rest is data parallel)::

    python -m carft_mega.train --config examples/configs/quickstart.yaml
    python -m carft_mega.launch --nproc_per_node 8 -m carft_mega.train --config examples/configs/carft_gsm8k.yaml \\
        model.source=hf model.path=/models/Qwen2.5-0.5B parallel.tp=2

(``carft_mega.launch`` is torchrun plus the checks of ``--check`` before any worker starts, and a
clean exit on SIGTERM / SIGINT / SIGUSR1; plain ``torchrun`` works too.)

``--resume auto`` (the default, ``checkpoint.resume``) continues from the latest checkpoint in
``out_dir``; ``--print-config`` shows the resolved configuration and exits; ``--check`` runs the
checks a launch makes before loading any model (paths, writability, free space, the resume
point and its config) and exits.

Exit codes: 0 done (also: already finished, or stopped by a signal after saving a checkpoint);
2 an error to fix (one line naming the config field or the file); 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from carft_mega.config import format_config, load_config
from carft_mega.trainer.status import report_status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m carft_mega.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (examples/configs/*.yaml); defaults when omitted")
    p.add_argument("--resume", help="shorthand for checkpoint.resume=VALUE (auto | none | a checkpoint dir)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--check", action="store_true", help="run the pre-launch checks and exit (0: ready, 2: not)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, applied in order")
    return p.parse_args(argv)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def resolve(argv: list[str] | None):
    """``(args, config)``; a config error is printed and returned as ``(args, None)``."""
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        return args, load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        if _rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return args, None


def check(cfg, quiet: bool = False) -> tuple[int, bool]:
    """The pre-launch checks (``--check``, and ``carft_mega.launch`` before torchrun starts); one
    process, no process group, nothing written.

    Returns:
        ``(exit code, finished)``: 0 ready (or finished: said so), 2 an error (printed, one line).
    """
    from carft_mega.trainer.context import finished_message, open_run
    from carft_mega.trainer.preflight import RunError

    try:
        opening = open_run(cfg)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2, False
    if opening.finished is not None and not quiet:
        print(finished_message(cfg, opening.finished), flush=True)
    return 0, opening.finished is not None


def main(argv: list[str] | None = None) -> int:
    args, cfg = resolve(argv)
    if cfg is None:
        report_status("error", 2)
        return 2
    if args.print_config:
        print(format_config(cfg))
        return 0
    if args.check:
        return check(cfg)[0]
    from carft_mega.trainer.context import TrainingStopped
    from carft_mega.trainer.preflight import RunError
    from carft_mega.trainer.run import run_training

    try:
        results = run_training(cfg)
    except RunError as e:  # one line, once, no traceback: the error names what to fix
        if not getattr(e, "printed", False):
            if _rank() == 0:
                print(f"error: {e}", file=sys.stderr, flush=True)
            report_status("error", 2)
        return 2
    except TrainingStopped as e:
        if _rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        report_status("error", 1)
        return 1
    if "stopped" in results:
        report_status("stopped", 0)
        return 0
    if _rank() == 0 and not results.get("finished"):  # once, not once per torchrun rank
        print("results: " + json.dumps(results), flush=True)
    report_status("finished" if results.get("finished") else "done", 0)
    return 0


if __name__ == "__main__":  # dist_checkpointing's async writer re-imports __main__: keep the guard
    sys.exit(main())
