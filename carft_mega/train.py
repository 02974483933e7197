"""Command line: ``python -m carft_mega.train --config CONFIG.yaml [section.field=value ...]``.

Runs SFT warm-up then CARFT (or ReFT with ``contrastive.signal=none``) as configured. Works in a
plain process (one rank) and under ``torchrun`` with any ``parallel.tp`` that divides the world
size (the rest is data parallel)::

    python -m carft_mega.train --config examples/configs/quickstart.yaml
    torchrun --nproc_per_node 8 -m carft_mega.train --config examples/configs/carft_gsm8k.yaml \\
        model.source=hf model.path=/models/Qwen2.5-0.5B parallel.tp=2

``--resume auto`` (the default, ``checkpoint.resume``) continues from the latest checkpoint in
``out_dir``; ``--print-config`` shows the resolved configuration and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from carft_mega.config import format_config, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m carft_mega.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (examples/configs/*.yaml); defaults when omitted")
    p.add_argument("--resume", help="shorthand for checkpoint.resume=VALUE (auto | none | a checkpoint dir)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, applied in order")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(format_config(cfg))
        return 0
    from carft_mega.trainer.run import run_training

    results = run_training(cfg)
    import torch.distributed as dist  # noqa: F401  (destroyed by run_training)

    if int(os.environ.get("RANK", "0")) == 0:  # once, not once per torchrun rank
        print("results: " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":  # dist_checkpointing's async writer re-imports __main__: keep the guard
    sys.exit(main())
