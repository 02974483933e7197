"""Shared by the benchmark scripts: the repository on sys.path, the commit, the measured copy bandwidth.

Imported as ``from _common import ...`` (the scripts' own folder is on sys.path when they run), so it
works from a source checkout that was never pip-installed, as on the GPU machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))


def git_sha() -> str:
    """CARFT_GIT_SHA if set (no .git travels to the GPU machine), else ``git describe --dirty``."""
    sha = os.environ.get("CARFT_GIT_SHA", "").strip()
    if sha:
        return sha
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


_COPY_GBPS: dict[str, float] = {}


def copy_bandwidth_gbps(device: str = "cuda", nbytes: int = 2**30) -> float:
    """Copy bandwidth in GB/s on ``device``, counting bytes read plus bytes written (on CUDA the median
    of ``triton.testing.do_bench`` over a ``nbytes`` device-to-device copy; on the CPU, for smoke runs, a
    64 MiB copy); measured once per process. The ceiling a memory-bound kernel is compared with: the
    datasheet's peak is not reachable."""
    if device not in _COPY_GBPS:
        import torch

        if device == "cuda":
            from triton.testing import do_bench

            x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            y = torch.empty_like(x)
            ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
            del x, y
            torch.cuda.empty_cache()
        else:
            import time

            nbytes = 2**26
            x = torch.empty(nbytes, dtype=torch.uint8)
            y = torch.empty_like(x)
            y.copy_(x)
            t0 = time.perf_counter()
            y.copy_(x)
            ms = (time.perf_counter() - t0) * 1e3
        _COPY_GBPS[device] = 2 * nbytes / (ms * 1e-3) / 1e9
    return _COPY_GBPS[device]
