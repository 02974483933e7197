"""Shared launcher plumbing of the conversion CLIs (single process for TP=1, torchrun for TP>1)."""

from __future__ import annotations

import os
import sys

# Run from a checkout without installing: make the repository importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def check_tp(path: str, tp: int, source: str = "hf") -> None:
    """Refuse a ``--tp`` that does not divide the model's KV heads, naming the flag, before any work."""
    from carft_mega.trainer.preflight import RunError
    from carft_mega.trainer.preflight import check_tp as _check
    from carft_mega.trainer.preflight import model_facts

    try:
        _check(model_facts(path, source), tp, "--tp {tp}")
    except RunError as e:
        raise SystemExit(f"error: {e}") from None


def init(tp: int, seed: int = 0) -> int:
    """Initialise torch.distributed + Megatron for a world of exactly ``tp`` ranks (DP = 1); returns the rank."""
    from carft_mega import parallel
    from carft_mega.config import ParallelConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        hint = f"torchrun --nproc_per_node {tp} {sys.argv[0]} ..." if tp > 1 else f"python {sys.argv[0]} ..."
        raise SystemExit(f"--tp {tp} needs exactly {tp} processes, found WORLD_SIZE={world}; run: {hint}")
    parallel.init_distributed(ParallelConfig(tp=tp), seed=seed)
    return parallel.world_rank()
