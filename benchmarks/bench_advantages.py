"""Benchmark the fused advantage pass against its reference and the unfused PyTorch path.

Rows, all on the same inputs (B rows, a T sweep, ~80% action tokens with gaps and a prompt prefix):
    kernel          advantages(impl="triton"): rewards, GAE, returns and row moments, one launch
    ref             advantages_ref: kl_shaped_rewards + compute_gae (a loop over T) + row moments
    fused+whiten    kernel, global_moments, whiten_from_moments (what the trainer runs)
    unfused+whiten  kl_shaped_rewards + compute_gae + masked_whiten (two-pass moments)
There is no backward: advantages are no-grad quantities. The kernel needs CUDA; on a CPU-only
machine only the PyTorch rows run (the Triton interpreter is a correctness tool, not a timing one),
unless --cpu-smoke runs the kernel rows too, under the interpreter, once each (a check of this script).
--sweep-block-t also times the kernel at every block length up to T (its one tuning knob) and prints the
best. GB/s are also given as a fraction of the measured copy bandwidth; `RESULT` lines summarise.

    python benchmarks/bench_advantages.py                       # B=64, T in 256..4096
    python benchmarks/bench_advantages.py --dtype bf16 --csv results.csv
    python benchmarks/bench_advantages.py --seq 1024 4096 --sweep-block-t
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch
from _common import copy_bandwidth_gbps, git_sha  # puts the repository on sys.path

from carft_mega.algos.advantage import compute_gae, kl_shaped_rewards, masked_whiten  # noqa: E402
from carft_mega.ops.advantages import (  # noqa: E402
    advantages, advantages_ref, global_moments, whiten_from_moments)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BETA, GAMMA, LAM = 0.05, 1.0, 0.95


def make_inputs(B: int, T: int, dtype: torch.dtype, device: torch.device):
    """A rollout-like batch: a prompt prefix of random length, then ~80% action tokens with gaps."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, T // 4 + 1, (B, 1), generator=g)
    mask = (torch.arange(T) >= prompt) & (torch.rand(B, T, generator=g) < 0.95)
    logp_old = -torch.rand(B, T, generator=g) * 3
    logp_ref = logp_old + 0.1 * torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    scores = (torch.rand(B, generator=g) < 0.5).float()
    return (scores.to(device), logp_old.to(device, dtype), logp_ref.to(device, dtype),
            values.to(device, dtype), mask.to(device))


def bytes_moved(B: int, T: int, dtype: torch.dtype) -> int:
    """HBM traffic of the fused pass: three (B, T) inputs, the bool mask and scores read once;
    three (B, T) fp32 outputs and three (B,) row statistics written."""
    elt = torch.finfo(dtype).bits // 8
    return B * T * (3 * elt + 1) + 4 * B + B * T * 3 * 4 + B * (4 + 4 + 8)


def time_us(fn, device: torch.device, once: bool = False) -> tuple[float, float]:
    """Median microseconds per call, and peak extra memory in MiB (CUDA only, else nan); ``once``: one
    call (smoke runs)."""
    if once:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6, float("nan")
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3, peak
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < 0.5 and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, float("nan")


def block_sizes(T: int) -> list[int]:
    """The kernel's block lengths worth timing at T: powers of two from 128 up to next_pow2(T), 4096 at most."""
    top = min(4096, max(16, 1 << (T - 1).bit_length()))
    return [b for b in (128, 256, 512, 1024, 2048, 4096) if b <= top] or [top]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="log-prob and value dtype")
    p.add_argument("--sweep-block-t", action="store_true", help="also time the kernel at every block length")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the kernel rows on the CPU under the Triton interpreter, once each (checks the script)")
    p.add_argument("--csv", type=str, default=None, help="append rows to this CSV file")
    args = p.parse_args(argv)

    if args.cpu_smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--cpu-smoke: triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} threads)"
    has_kernel = device.type == "cuda" or args.cpu_smoke
    sha = git_sha()
    dtype = DTYPES[args.dtype]
    copy_bw = copy_bandwidth_gbps(device.type)
    print(f"# bench_advantages  device={dev_name}  commit={sha}  torch={torch.__version__}  dtype={args.dtype}  "
          f"copy={copy_bw:.0f} GB/s")
    if not has_kernel:
        print("# the Triton kernel needs CUDA: timing the PyTorch paths only")

    rows, results = [], []
    for T in args.seq:
        B = args.batch
        x = make_inputs(B, T, dtype, device)
        mask = x[4]
        nbytes = bytes_moved(B, T, dtype)

        def fused_whiten():
            out = advantages(*x, BETA, GAMMA, LAM, impl="triton")
            return whiten_from_moments(out.advantages, mask, *global_moments(
                out.row_sum, out.row_sumsq, out.row_count))

        def unfused_whiten():
            rew = kl_shaped_rewards(x[0], x[1], x[2], mask, BETA)
            adv, _ = compute_gae(rew, x[3], mask, GAMMA, LAM)
            return masked_whiten(adv, mask)

        cases = {"ref": lambda: advantages_ref(*x, BETA, GAMMA, LAM), "unfused+whiten": unfused_whiten}
        if has_kernel:
            cases = {"kernel": lambda: advantages(*x, BETA, GAMMA, LAM, impl="triton"),
                     "fused+whiten": fused_whiten, **cases}
            if args.sweep_block_t:
                for bt in block_sizes(T):
                    cases[f"kernel[block_t={bt}]"] = (
                        lambda bt=bt: advantages(*x, BETA, GAMMA, LAM, impl="triton", block_t=bt))
        res = {name: time_us(fn, device, once=args.cpu_smoke) for name, fn in cases.items()}
        # Ratio: how many times slower than the fused counterpart (the kernel, or kernel + whitening).
        base = {"ref": "kernel", "fused+whiten": "fused+whiten", "unfused+whiten": "fused+whiten"}
        for name, (us, peak) in res.items():
            ref_name = base.get(name, "kernel")
            ratio = res[ref_name][0] if ref_name in res else float("nan")
            gbs = nbytes / (us * 1e-6) / 1e9
            rows.append({"device": dev_name, "commit": sha, "dtype": args.dtype, "B": B, "T": T, "impl": name,
                         "us_per_call": round(us, 2), "x_vs_fused": round(us / ratio, 2),
                         "GB_s": round(gbs, 2), "pct_copy_bw": round(100 * gbs / copy_bw, 1),
                         "peak_MiB": round(peak, 2)})
        if "kernel" in res:
            us = res["kernel"][0]
            gbs = nbytes / (us * 1e-6) / 1e9
            results.append(f"RESULT advantages B={B} T={T} {args.dtype}: kernel {us:.1f} us, {gbs:.0f} GB/s = "
                           f"{100 * gbs / copy_bw:.0f}% of copy; ref {res['ref'][0] / us:.1f}x slower; "
                           f"fused+whiten {res['fused+whiten'][0]:.1f} us vs unfused+whiten "
                           f"{res['unfused+whiten'][0]:.1f} us")
            swept = {k: v[0] for k, v in res.items() if k.startswith("kernel[")}
            if swept:
                best = min(swept, key=swept.get)
                results.append(f"RESULT advantages B={B} T={T} block_t sweep: best {best} {swept[best]:.1f} us "
                               f"(default {us:.1f} us); " + ", ".join(f"{k[7:-1]}: {v:.1f}" for k, v in swept.items()))

    cols = list(rows[0])
    print(",".join(cols))
    for r in rows:
        print(",".join(str(r[c]) for c in cols))
    print("\n".join(results), flush=True)
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
