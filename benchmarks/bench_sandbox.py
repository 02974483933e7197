"""Sandbox throughput on ReFT's SVAMP python_sdp programs, and the cost of a timeout.

    python benchmarks/bench_sandbox.py [--n 1000] [--workers 1 2 4] [--data-dir DIR]

Prints, in one run:
  * programs/s of the pool (``carft_mega.reward.Sandbox``) for each worker count, with the share of
    programs whose value matches the gold answer (a correctness check of the whole path), the CPU
    time per program (server + program processes, from /proc: what a busy box does not distort
    as much as the wall clock), and the load average before and after (other users of the cores
    lower programs/s: rerun when it is high);
  * two references on the same programs: in-process ``exec`` (no isolation at all, the upper bound)
    and one fresh ``python -I`` process per program (the naive way to isolate), and the ratios;
  * the cost of a timeout: the latency of one looping program against its timeout, and how much a
    batch with looping programs takes longer than the same batch without them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from carft_mega.reward import Sandbox  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _programs(data_dir: str, n: int) -> tuple[list[str], list[float]]:
    path = os.path.join(data_dir, "svamp", "svamp_python_sdp.json")
    with open(path) as f:
        rows = json.load(f)
    rows = (rows * (n // len(rows) + 1))[:n]
    return [r["answer_cot"] for r in rows], [float(r["answer_value"]) for r in rows]


def _in_process(programs: list[str]) -> float:
    t0 = time.perf_counter()
    for p in programs:
        g: dict = {}
        exec(p, g)
        g["solution"]()
    return time.perf_counter() - t0


def _fresh_process(programs: list[str]) -> float:
    t0 = time.perf_counter()
    for p in programs:
        subprocess.run([sys.executable, "-I", "-c", p + "\nprint(solution())"], capture_output=True, timeout=10,
                       env={"PATH": "/usr/bin:/bin"})
    return time.perf_counter() - t0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _servers_cpu(pool: Sandbox) -> float:
    """CPU seconds used so far by the pool's servers and their (reaped) programs."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for wpid in pool.worker_pids:
        try:
            with open(f"/proc/{wpid}/task/{wpid}/children") as f:
                kids = [int(k) for k in f.read().split()] or [wpid]
            for pid in kids:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
        except (OSError, ValueError):
            pass
    return total


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="programs per throughput run")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--fresh-n", type=int, default=40, help="programs for the fresh-process reference")
    ap.add_argument("--timeout", type=float, default=1.0, help="timeout used for the timeout-cost runs")
    ap.add_argument("--data-dir",
                    default=os.environ.get("CARFT_DATA_DIR") or os.path.join(REPO, "..", "shared", "data"))
    args = ap.parse_args()

    programs, golds = _programs(args.data_dir, args.n)
    print(f"# bench_sandbox  git={_git_sha()}  python={platform.python_version()}  cpus={os.cpu_count()}  "
          f"machine={platform.machine()}  cpu={_cpu_model()!r}  kernel={platform.release()}  uid={os.geteuid()}")
    print(f"# {len(programs)} SVAMP python_sdp programs (svamp_python_sdp.json, repeated as needed)")

    t_inproc = _in_process(programs)
    rate_inproc = len(programs) / t_inproc
    t_fresh = _fresh_process(programs[: args.fresh_n])
    rate_fresh = args.fresh_n / t_fresh
    print(f"reference  in-process exec (no isolation) : {rate_inproc:10.0f} programs/s")
    print(f"reference  fresh python -I per program    : {rate_fresh:10.1f} programs/s  (n={args.fresh_n})")

    print("workers  start_s  programs/s  x_fresh  x_inproc  match_gold  cpu_ms/prog  load_before  load_after  layers")
    for w in args.workers:
        t0 = time.perf_counter()
        with Sandbox(workers=w, timeout=10) as sb:
            start = time.perf_counter() - t0
            sb.run_programs(programs[:10])  # warm-up
            load0, cpu0 = os.getloadavg()[0], _servers_cpu(sb)
            t0 = time.perf_counter()
            values = sb.run_programs(programs)
            dt = time.perf_counter() - t0
            cpu = (_servers_cpu(sb) - cpu0) / len(programs) * 1e3
            load1 = os.getloadavg()[0]
            layers = sb.layers
            stats = sb.stats()
        rate = len(programs) / dt
        match = sum(v is not None and abs(v - g) <= 1e-2 for v, g in zip(values, golds)) / len(golds)
        active = ",".join(k for k, v in layers.items() if v is True)
        print(f"{w:7d}  {start:7.3f}  {rate:10.1f}  {rate / rate_fresh:7.1f}  {rate / rate_inproc:8.4f}  "
              f"{match:10.3f}  {cpu:11.2f}  {load0:11.2f}  {load1:10.2f}  {active}"
              + (f"  sandbox_errors={stats['sandbox_errors']}" if stats["sandbox_errors"] else ""))

    # The cost of a timeout: one looping program, then a batch with and without looping programs.
    loop = "def solution():\n    while True:\n        pass\n"
    w = 2
    with Sandbox(workers=w, timeout=args.timeout) as sb:
        t0 = time.perf_counter()
        r = sb.run_programs_detailed([loop])[0]
        single = time.perf_counter() - t0
        base = programs[:200]
        t0 = time.perf_counter()
        sb.run_programs(base)
        t_base = time.perf_counter() - t0
        n_loops = 4
        t0 = time.perf_counter()
        sb.run_programs(base + [loop] * n_loops)
        t_loops = time.perf_counter() - t0
    print(f"timeout={args.timeout:g}s  one looping program: status={r.status} call={single:.3f}s "
          f"(overhead beyond the timeout {single - args.timeout:+.3f}s)")
    print(f"timeout={args.timeout:g}s  {len(base)} programs: {t_base:.3f}s; plus {n_loops} looping programs on "
          f"{w} workers: {t_loops:.3f}s (+{t_loops - t_base:.3f}s = {n_loops}x{args.timeout:g}s/{w} workers "
          f"expected {n_loops * args.timeout / w:.3f}s)")


if __name__ == "__main__":
    main()
