"""torchrun worker for tests/rollout/test_generate_tp2.py (2 ranks, gloo, CPU).

    torchrun --nproc_per_node 2 tests/rollout/tp2_worker.py WORKDIR

Generates at TP=2 (greedy in both layouts, sampled with compaction) and checks that both ranks
produced the same tokens; rank 0 writes them to ``WORKDIR/tp2_generations.pt`` for pytest to
compare with TP=1. Prints ``CHECK <name> ok`` per check.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from carft_mega import parallel  # noqa: E402
from carft_mega.config import ParallelConfig  # noqa: E402


def check(name: str, cond: bool, detail: str = "") -> None:
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: check {name} failed: {detail}")
    if dist.get_rank() == 0:
        print(f"CHECK {name} ok {detail}", flush=True)


def main(workdir: str) -> None:
    from tests.rollout.test_generate_tp2 import build_policy_for_tp, run_cases

    parallel.init_distributed(ParallelConfig(tp=2), seed=0)
    policy = build_policy_for_tp()
    results = run_cases(policy)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    check("tp2_generate_same_tokens_on_all_ranks", all(r == everyone[0] for r in everyone))
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(workdir, "tp2_generations.pt"))
    check("tp2_generations_saved", True)
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
