"""Benchmark of lcs_masks (kernels/cuda/lcs) against the pure-Python DP lcs_masks_ref, one run.

CPU (always): N pairs x L tokens for each L in --lengths (default 64 x 512 and 64 x 1024); the
extension on torch.get_num_threads() threads and on one thread, the reference once (it takes
seconds). CUDA (when torch sees a GPU and the extension has its CUDA part): the same shapes plus
2048, timed with CUDA events; the issue's target is <= 1 ms at 64 x 1024 x 1024.

Inputs look like an annotated CoT and a sampled one: ids from a 3000-token vocabulary, and b is a
copy of a in which ~50% of the tokens were replaced, dropped or had a token inserted after them,
so the alignment drifts along the row. Outputs are checked for bit equality with the reference
(CPU) and with the CPU path (CUDA) before any time is printed.

Prints one line per measurement and a CSV row (device, shape, times, ratio, pairs/s, cells/s,
torch version, git SHA); --csv appends the rows to a file.

    python benchmarks/bench_lcs.py
    python benchmarks/bench_lcs.py --pairs 64 --lengths 512 1024 --csv bench_lcs.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import torch
from _common import git_sha  # puts the repository on sys.path (a checkout that was never pip-installed)

from carft_mega.algos.lcs import lcs_masks_ref  # noqa: E402
from carft_mega.ops.lcs import extension_available, lcs_masks  # noqa: E402

# ref_ms: lcs_masks_ref for the CPU rows, the CPU path for the CUDA rows; ratio = ref_ms / ms.
FIELDS = ["device", "impl", "n_pairs", "la", "lb", "threads", "ms", "min_ms", "ref_ms", "ratio",
          "pairs_per_s", "gcells_per_s", "torch", "sha"]


def cot_like_pairs(n_pairs: int, length: int, vocab: int = 3000, change: float = 0.5, seed: int = 0):
    """(a, a_len, b, b_len) with full rows of `length` tokens; b is a ~`change`-edited copy of a."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, vocab, (n_pairs, length), generator=gen)
    b = torch.empty_like(a)
    for r in range(n_pairs):
        src = a[r].tolist()
        u = torch.rand(len(src), generator=gen).tolist()
        new = torch.randint(0, vocab, (2 * len(src),), generator=gen).tolist()
        out = []
        for k, (t, x) in enumerate(zip(src, u)):
            if x < change / 3:  # drop
                continue
            if x < 2 * change / 3:  # replace
                out.append(new[k])
            elif x < change:  # keep, then insert a new token
                out += [t, new[len(src) + k]]
            else:  # keep
                out.append(t)
        out = (out + new)[:length]
        b[r] = torch.tensor(out)
    lens = torch.full((n_pairs,), length, dtype=torch.int64)
    return a, lens, b, lens.clone()


def time_cpu(fn, min_reps: int = 5, min_s: float = 0.5) -> tuple[float, float]:
    """(median, min) wall time of fn() in ms over at least min_reps calls and min_s seconds. On a
    shared machine the min is the better estimate: with 2 threads a call whose second thread waits
    for a busy core takes a scheduler time slice (~8 ms) longer."""
    fn()  # warm-up (allocations, thread pool)
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def time_cuda(fn, reps: int = 50) -> tuple[float, float]:
    """(median, min) of per-call CUDA-event times in ms."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def same(x, y) -> bool:
    return all(torch.equal(p.cpu(), q.cpu()) for p, q in zip(x, y))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--gpu-lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--no-ref", action="store_true", help="skip the (slow) Python reference")
    p.add_argument("--csv", help="append CSV rows to this file")
    args = p.parse_args()

    sha, tv = git_sha(), torch.__version__
    rows = []
    if not extension_available("cpu"):
        sys.exit("carft_mega_cuda is not built: `pip install --no-build-isolation -e .` first")

    threads = torch.get_num_threads()
    dev = cpu_name()
    print(f"# lcs_masks CPU: {dev}, torch {tv}, {threads} threads, commit {sha}")
    for length in args.lengths:
        inputs = cot_like_pairs(args.pairs, length, seed=length)
        n, cells = args.pairs, args.pairs * length * length
        ref_ms, ref_out = float("nan"), None
        if not args.no_ref:
            t0 = time.perf_counter()
            ref_out = lcs_masks_ref(*inputs)
            ref_ms = (time.perf_counter() - t0) * 1e3
        for nt in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(nt)
            out = lcs_masks(*inputs)
            if ref_out is not None and not same(out, ref_out):
                sys.exit(f"MISMATCH with lcs_masks_ref at {n} x {length}: not timing a wrong result")
            ms, ms_min = time_cpu(lambda: lcs_masks(*inputs))
            ratio = ref_ms / ms
            print(f"cpu  {n:4d} x {length:5d} x {length:5d}  threads={nt}  ext {ms:8.3f} ms "
                  f"(min {ms_min:.3f})   "
                  f"ref {ref_ms:10.1f} ms   ratio {ratio:8.0f}x   {n / ms * 1e3:10.0f} pairs/s   "
                  f"{cells / ms / 1e6:6.2f} Gcells/s   (mean LCS {out[2].float().mean():.0f})")
            rows.append([dev, "cpp", n, length, length, nt, f"{ms:.4f}", f"{ms_min:.4f}", f"{ref_ms:.1f}",
                         f"{ratio:.1f}", f"{n / ms * 1e3:.0f}", f"{cells / ms / 1e6:.3f}", tv, sha])
        torch.set_num_threads(threads)

    if torch.cuda.is_available() and extension_available("cuda"):
        gdev = torch.cuda.get_device_name()
        print(f"# lcs_masks CUDA: {gdev}, torch {tv} (CUDA {torch.version.cuda}), commit {sha}")
        for length in args.gpu_lengths:
            inputs = cot_like_pairs(args.pairs, length, seed=length)
            cpu_ms = time_cpu(lambda: lcs_masks(*inputs), min_reps=3, min_s=0.2)[0]
            cpu_out = lcs_masks(*inputs)
            g = tuple(t.cuda() for t in inputs)
            out = lcs_masks(*g)
            if not same(out, cpu_out):
                sys.exit(f"MISMATCH between the CUDA and CPU paths at {args.pairs} x {length}")
            n, cells = args.pairs, args.pairs * length * length
            for check in (True, False):  # with / without the synchronising length check
                ms, ms_min = time_cuda(lambda: lcs_masks(*g, check_lengths=check))
                target = ""
                if length == 1024:
                    target = "  meets the 1 ms target" if ms <= 1.0 else "  MISSES the 1 ms target"
                print(f"RESULT lcs cuda {n:4d} x {length:5d} x {length:5d}  check_lengths={check!s:5}  {ms:8.3f} ms "
                      f"(min {ms_min:.3f})   cpu {cpu_ms:8.2f} ms   {n / ms * 1e3:10.0f} pairs/s   "
                      f"{cells / ms / 1e6:7.1f} Gcells/s{target}")
                rows.append([gdev, "cuda" if check else "cuda-nocheck", n, length, length, 0, f"{ms:.4f}",
                             f"{ms_min:.4f}", f"{cpu_ms:.3f}", f"{cpu_ms / ms:.1f}", f"{n / ms * 1e3:.0f}",
                             f"{cells / ms / 1e6:.3f}", tv, sha])
    else:
        print("# CUDA: skipped (no GPU, or carft_mega_cuda built without its CUDA part)")

    w = csv.writer(sys.stdout)
    w.writerow(FIELDS)
    w.writerows(rows)
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            cw = csv.writer(f)
            if new:
                cw.writerow(FIELDS)
            cw.writerows(rows)


if __name__ == "__main__":
    main()
