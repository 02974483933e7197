"""Benchmark the fused cot_head (Triton) against cot_head_ref and the unfused PyTorch head.

Times forward, backward and forward+backward with ``triton.testing.do_bench`` for the three paths and
prints one CSV row per (path, pass, shape) with the time, the ratio to the unfused path, the bytes
moved, GB/s, the fraction of the measured device-to-device copy bandwidth and of the peak HBM bandwidth,
peak memory, the GPU name and the git SHA (CARFT_GIT_SHA where no .git is), then one ``RESULT`` line per
(shape, pass). The fused kernels autotune here (unless CARFT_TRITON_AUTOTUNE=0) and the configs they
chose are printed per shape::

    python benchmarks/bench_cot_head.py                              # H in {576, 896, 4096}, T=1024
    python benchmarks/bench_cot_head.py --sweep T --values 256,1024,4096 --H 4096
    python benchmarks/bench_cot_head.py --shapes 1024x576,2048x4096  # explicit T x H pairs
    python benchmarks/bench_cot_head.py --csv docs/cot_head.csv      # also append the rows to a file

Bytes (``bytes`` column) are the minimum HBM traffic of the op, whoever computes it: forward = read h
once (+ W_p, masks, V, z); backward = read h once and write dh once (+ dV, dz, W_p, dW_p). The fused
backward actually reads h twice (recompute of e, then dW_p = de^T h), so its GB/s is a lower bound of
what the kernel streams. Issue 3's target: fwd+bwd at N=64, T=1024, H in {576, 4096}, K=3, bf16 on an
H100 >= 3x faster than the unfused path and >= 60% of peak bandwidth for reading h once.

Needs a CUDA GPU (exits with a message otherwise). ``--cpu-smoke`` runs the same code on the CPU under the
Triton interpreter with one timed call per case: a check of this script (tests/test_gpu_check.py), not a
measurement.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch
import torch.nn.functional as F
from _common import copy_bandwidth_gbps, git_sha  # puts the repository on sys.path

from carft_mega._ext import triton_kernels  # noqa: E402
from carft_mega.ops.cot_head import cot_head, cot_head_ref  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Peak HBM bandwidth by device name, when the driver does not report clock and bus width.
PEAK_GBPS = {"H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0,
             "H200": 4800.0, "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0}
FIELDS = ["gpu", "sha", "impl", "pass", "dtype", "N", "T", "H", "d", "K", "ms", "x_vs_unfused", "bytes",
          "GB_s", "pct_copy_bw", "pct_peak_bw", "peak_mem_MB", "configs"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", choices=["H", "T"], default="H", help="dimension to sweep")
    p.add_argument("--values", default="576,896,4096", help="comma-separated values of the swept dimension")
    p.add_argument("--N", type=int, default=64, help="sequences")
    p.add_argument("--T", type=int, default=1024, help="sequence length (when sweeping H)")
    p.add_argument("--H", type=int, default=4096, help="hidden size (when sweeping T)")
    p.add_argument("--shapes", default=None, help="comma-separated TxH pairs, e.g. 1024x576,2048x4096 "
                   "(instead of --sweep/--values)")
    p.add_argument("--d", type=int, default=64, help="projection size")
    p.add_argument("--K", type=int, default=3, help="span masks (full CoT, LCS, excluded)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--impls", default="fused,ref,unfused", help="subset of fused,ref,unfused")
    p.add_argument("--passes", default="fwd,bwd,fwd+bwd", help="subset of fwd,bwd,fwd+bwd")
    p.add_argument("--layout", choices=["sbh", "bsh"], default="sbh",
                   help="sbh: h is Megatron's [s, b, h] and the fused op reads h.transpose(0, 1) in place")
    p.add_argument("--peak-gbps", type=float, default=None, help="override the device's peak HBM GB/s")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    p.add_argument("--csv", default=None, help="also append the rows to this CSV file")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run on the CPU under the Triton interpreter, one call per timing (checks the script)")
    args = p.parse_args(argv)
    args.values = [int(v) for v in args.values.split(",") if v]
    if args.shapes:
        try:
            args.shape_list = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
        except ValueError:
            p.error(f"--shapes takes TxH pairs such as 1024x576, got {args.shapes!r}")
    else:
        args.shape_list = [((v if args.sweep == "T" else args.T), (v if args.sweep == "H" else args.H))
                           for v in args.values]
    args.impls = [s for s in args.impls.split(",") if s]
    args.passes = [s for s in args.passes.split(",") if s]
    bad = [s for s in args.impls if s not in ("fused", "ref", "unfused")] + \
          [s for s in args.passes if s not in ("fwd", "bwd", "fwd+bwd")]
    if bad:
        p.error(f"unknown --impls/--passes entries: {bad}")
    return args


def peak_gbps(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    return next((v for k, v in PEAK_GBPS.items() if k in props.name), None)


def unfused_head(h, W_p, b_p, w_v, b_v, span_masks, sbh=False):
    """The head as model code would write it without the kernel: a Linear, the value, then K separate
    masked softmax poolings in fp32.

    Args:
        h: ``(N, T, H)``, or Megatron's ``(T, N, H)`` when ``sbh`` (the Linear runs on it in place and
            only the small e is transposed).
        span_masks: ``(K, N, T)`` bool.
    """
    e = F.linear(h, W_p, b_p)  # (N, T, d) or (T, N, d), in h's dtype
    if sbh:
        e = e.transpose(0, 1)  # (N, T, d) view
    V = (F.linear(torch.relu(e), w_v.unsqueeze(0)).squeeze(-1) + b_v).float()  # (N, T)
    N, d = V.shape[0], W_p.shape[0]
    zs, valids = [], []
    for k in range(span_masks.shape[0]):
        m = span_masks[k]  # (N, T)
        valid = m.any(-1)
        w = torch.softmax(V.masked_fill(~m, float("-inf")), dim=-1)
        w = torch.where(valid.unsqueeze(-1), w, torch.zeros_like(w))
        zs.append(torch.einsum("nt,ntd->nd", w, e.float()))
        valids.append(valid)
    if not zs:
        return V, V.new_zeros((0, N, d)), torch.zeros((0, N), dtype=torch.bool, device=V.device)
    return V, torch.stack(zs), torch.stack(valids)


def make_inputs(N, T, H, d, K, dtype, layout, dev="cuda"):
    """Hidden states, head parameters and CARFT-like spans: the generated part of each row (after a
    random prompt), an LCS-like subset of it and its complement."""
    h_sbh = torch.randn(T, N, H, device=dev, dtype=dtype)
    W_p = (torch.randn(d, H, device=dev) / H ** 0.5).to(dtype)
    b_p, w_v = (0.1 * torch.randn(d, device=dev)).to(dtype), (torch.randn(d, device=dev) / d ** 0.5).to(dtype)
    b_v = torch.zeros((), device=dev, dtype=dtype)
    pos = torch.arange(T, device=dev)
    start = torch.randint(0, max(1, T // 4), (N, 1), device=dev)
    end = start + torch.randint(1, T + 1, (N, 1), device=dev)
    gen = (pos >= start) & (pos < end)  # (N, T)
    lcs = gen & (torch.rand(N, T, device=dev) < 0.6)
    masks = torch.stack([gen, lcs, gen & ~lcs])[:K] if K <= 3 else torch.rand(K, N, T, device=dev) < 0.5
    return h_sbh, (W_p, b_p, w_v, b_v), masks.contiguous()


def min_bytes(N, T, H, d, K, dtype, which):
    s = torch.finfo(dtype).bits // 8
    fwd = N * T * H * s + d * H * s + K * N * T + N * T * 4 + K * N * d * 4
    bwd = 2 * N * T * H * s + 2 * d * H * s + K * N * T + N * T * 4 + K * N * d * 4
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[which]


def bench_one(impl, which, h_sbh, params, masks, args, do_bench):
    leaves = [h_sbh.detach().requires_grad_()] + [p.detach().requires_grad_() for p in params]
    h_in = leaves[0].transpose(0, 1) if args.layout == "sbh" else leaves[0]

    def forward():
        if impl == "fused":
            return cot_head(h_in, *leaves[1:], masks, impl="triton")
        if impl == "ref":
            return cot_head_ref(h_in, *leaves[1:], masks)
        return unfused_head(leaves[0], *leaves[1:], masks, sbh=args.layout == "sbh")

    V, z, _ = forward()
    gV, gz = torch.randn_like(V), torch.randn_like(z)
    outs, grads = ((V, z), (gV, gz)) if z.numel() else ((V,), (gV,))

    def backward():
        torch.autograd.grad(outs, leaves, grads, retain_graph=True)

    def fwd_bwd():
        o = forward()
        torch.autograd.grad(o[:len(outs)], leaves, grads)

    fn = {"fwd": forward, "bwd": backward, "fwd+bwd": fwd_bwd}[which]
    fn()
    peak_mb = float("nan")
    if h_sbh.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    ms = do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=leaves)
    return ms, peak_mb


def _time_once(fn, warmup=0, rep=0, grad_to_none=None):
    """--cpu-smoke's stand-in for do_bench: one call, in ms."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def check_close(h_sbh, params, masks):
    """One sanity check before timing: fused vs the fp32 reference."""
    h = h_sbh.transpose(0, 1)
    V, z, valid = cot_head(h, *params, masks, impl="triton")
    Vr, zr, vr = cot_head_ref(h, *params, masks, upcast=True)
    return (V - Vr).abs().max().item(), (z - zr).abs().max().item() if z.numel() else 0.0, torch.equal(valid, vr)


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--cpu-smoke: triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
        dev, do_bench = "cpu", _time_once
    elif not torch.cuda.is_available():
        sys.exit("bench_cot_head.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "the CPU tests are tests/ops/test_cot_head.py (or try --cpu-smoke)")
    else:
        from triton.testing import do_bench
        dev = "cuda"

    kernels = triton_kernels("cot_head")
    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (--cpu-smoke, Triton interpreter)"
    sha, peak, copy_bw = git_sha(), peak_gbps(args.peak_gbps), copy_bandwidth_gbps(dev)
    dtype = DTYPES[args.dtype]
    print(f"# {gpu}, torch {torch.__version__}, triton {__import__('triton').__version__}, sha {sha}, "
          f"peak HBM {peak or float('nan'):.0f} GB/s, measured copy {copy_bw:.0f} GB/s, "
          f"autotune {'on' if kernels.autotune_enabled() else 'OFF (CARFT_TRITON_AUTOTUNE=0)'}", file=sys.stderr)
    writer = csv.DictWriter(sys.stdout, FIELDS)
    writer.writeheader()
    rows, results = [], []
    for T, H in args.shape_list:
        N = args.N
        torch.manual_seed(0)
        h_sbh, params, masks = make_inputs(N, T, H, args.d, args.K, dtype, args.layout, dev)
        configs = ""
        if "fused" in args.impls:
            dv, dz, same = check_close(h_sbh, params, masks)
            print(f"# N={N} T={T} H={H}: max|V-ref| {dv:.2e}, max|z-ref| {dz:.2e}, valid equal {same}",
                  file=sys.stderr)
        for which in args.passes:
            times = {}
            for impl in args.impls:
                times[impl] = bench_one(impl, which, h_sbh, params, masks, args, do_bench)
                if impl == "fused":
                    configs = "; ".join(f"{k}: {v}" for k, v in kernels.chosen_configs().items())
            nbytes = min_bytes(N, T, H, args.d, args.K, dtype, which)
            for impl, (ms, peak_mb) in times.items():
                gbs = nbytes / (ms * 1e-3) / 1e9
                row = dict(gpu=gpu, sha=sha, impl=impl, **{"pass": which}, dtype=args.dtype, N=N, T=T, H=H,
                           d=args.d, K=args.K, ms=f"{ms:.4f}",
                           x_vs_unfused=f"{times['unfused'][0] / ms:.2f}" if "unfused" in times else "",
                           bytes=nbytes, GB_s=f"{gbs:.0f}", pct_copy_bw=f"{100 * gbs / copy_bw:.1f}",
                           pct_peak_bw=f"{100 * gbs / peak:.1f}" if peak else "",
                           peak_mem_MB=f"{peak_mb:.1f}", configs=configs if impl == "fused" else "")
                writer.writerow(row)
                rows.append(row)
            if "fused" in times:
                f_ms = times["fused"][0]
                gbs = nbytes / (f_ms * 1e-3) / 1e9
                vs = "  ".join(f"{times[i][0] / f_ms:.2f}x vs {i}" for i in times if i != "fused")
                results.append(f"RESULT cot_head {which:7s} N={N} T={T} H={H} {args.dtype}: fused {f_ms:.3f} ms, "
                               f"{gbs:.0f} GB/s = {100 * gbs / copy_bw:.0f}% of copy; {vs}")
            sys.stdout.flush()
        if configs:
            results.append(f"RESULT cot_head configs T={T} H={H} (autotune "
                           f"{'on' if kernels.autotune_enabled() else 'off'}): {configs}")
        del h_sbh, params, masks
        if dev == "cuda":
            torch.cuda.empty_cache()
    print("\n".join(results), flush=True)
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
