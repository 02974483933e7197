"""Fused CoT head (DESIGN.md Sec. 2-3): e = h W_p^T + b_p, V = w_v . relu(e) + b_v, z_k = sum_{S_k} softmax(V) e.

Forward (reads h once): one program per (row, BLOCK_T positions) builds e with tl.dot (fp32 accumulation),
stores V and per-span partial softmax stats (max, sum, weighted e); a small kernel merges the T blocks
(split-T as in flash-decoding), so N=64 rows still fill an H100. Backward: recompute e, write dh = de W_p,
then dW_p = de^T h as a split-row GEMM (fwd+bwd: three reads of h, one write of dh).
Limits: d <= 128 (the (BLOCK_T, d) e tile lives in registers); K is a runtime loop; not yet timed on a GPU."""

import os

import torch
import triton
import triton.language as tl

MAX_D = 128

# Under TRITON_INTERPRET an autotuner may hold one config only (it cannot benchmark without a driver),
# see ../shared/notes/megatron_triton_on_cpu.md Sec. 4; the first config of each list is the default.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Autotuning benchmarks every config of a kernel the first time it meets a new key, 1-6 s of compiles
# each: tests pin the first config of each list instead (one compile per shape, no benchmarking) with
# CARFT_TRITON_AUTOTUNE=0 in the environment or set_autotune(False); benchmarks autotune and print
# chosen_configs().
_AUTOTUNE_ENV = "CARFT_TRITON_AUTOTUNE"
_autotune = os.environ.get(_AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _configs(specs):
    configs = [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in specs]
    return configs[:1] if _INTERPRET else configs


# Untuned on a GPU so far (none was available to the session that wrote this); the autotuner picks
# among these. Each compiles for sm_90 without spills at BLOCK_T=64, d=64, bf16 (ptxas -v, triton 3.8);
# the first is the interpreter's and lowest in registers (fwd 116, bwd 189, dW 168 per thread).
_FWD_CONFIGS = _configs([
    ({"BLOCK_H": 64}, 8, 4),
    ({"BLOCK_H": 64}, 4, 3),
    ({"BLOCK_H": 128}, 8, 3),
    ({"BLOCK_H": 32}, 4, 4),
])
_BWD_CONFIGS = _configs([
    ({"BLOCK_H": 64}, 8, 3),
    ({"BLOCK_H": 128}, 8, 3),
    ({"BLOCK_H": 32}, 4, 4),
])
_BWD_DW_CONFIGS = _configs([
    ({"BLOCK_H": 64, "BLOCK_R": 64}, 4, 3),
    ({"BLOCK_H": 128, "BLOCK_R": 32}, 4, 4),
    ({"BLOCK_H": 256, "BLOCK_R": 32}, 8, 3),
    ({"BLOCK_H": 64, "BLOCK_R": 64}, 4, 4),
])


@triton.jit
def _embed_tile(
    h_ptr,
    w_p_ptr,
    b_p_ptr,
    row_off,
    t_mask,
    offs_d,
    d_mask,
    H,
    stride_w_p_row,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """e = h W_p^T + b_p for BLOCK_T rows: (BLOCK_T, BLOCK_D) fp32; columns >= d are 0."""
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    x_ptrs = h_ptr + row_off[:, None] + offs_h[None, :]  # (BLOCK_T, BLOCK_H)
    w_ptrs = w_p_ptr + offs_d[None, :] * stride_w_p_row + offs_h[:, None]  # (BLOCK_H, BLOCK_D) = W_p^T tile
    for h0 in range(0, H, BLOCK_H):
        h_mask = offs_h < H - h0
        x = tl.load(x_ptrs, mask=t_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=h_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    b_p = tl.load(b_p_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    return acc + b_p[None, :]


@triton.autotune(configs=_FWD_CONFIGS, key=["H", "BLOCK_D", "BLOCK_T"])
@triton.jit
def _cot_head_fwd_kernel(
    h_ptr,
    w_p_ptr,
    b_p_ptr,
    w_v_ptr,
    b_v_ptr,
    span_ptr,
    v_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_acc_ptr,
    N,
    T,
    H,
    D,
    K,
    n_tblocks,
    stride_h_n,
    stride_h_t,
    stride_w_p_row,
    stride_span_k,
    stride_span_n,
    stride_span_t,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    e = _embed_tile(h_ptr, w_p_ptr, b_p_ptr, n * stride_h_n + offs_t * stride_h_t, t_mask, offs_d, d_mask,
                    H, stride_w_p_row, BLOCK_T, BLOCK_H, BLOCK_D, DOT_FP32)
    w_v = tl.load(w_v_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    b_v = tl.load(b_v_ptr).to(tl.float32)  # scalar
    v = tl.sum(tl.maximum(e, 0.0) * w_v[None, :], axis=1) + b_v  # (BLOCK_T,)
    tl.store(v_ptr + n * T + offs_t, v, mask=t_mask)

    # Partial softmax of each span over this block; an empty part has max -inf and sum 0.
    for k in range(K):
        s = tl.load(span_ptr + k * stride_span_k + n * stride_span_n + offs_t * stride_span_t,
                    mask=t_mask, other=0)
        in_s = (s != 0) & t_mask
        m = tl.max(tl.where(in_s, v, float("-inf")), axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.where(in_s, tl.exp(v - m_safe), 0.0)
        acc = tl.sum(p[:, None] * e, axis=0)  # (BLOCK_D,)
        part = (k * N + n) * n_tblocks + pid_t
        tl.store(part_max_ptr + part, m)  # scalar, in bounds by the grid
        tl.store(part_sum_ptr + part, tl.sum(p, axis=0))
        tl.store(part_acc_ptr + part * D + offs_d, acc, mask=d_mask)


@triton.jit
def _cot_head_combine_kernel(
    part_max_ptr,
    part_sum_ptr,
    part_acc_ptr,
    z_ptr,
    valid_ptr,
    lse_ptr,
    N,
    D,
    n_tblocks,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row = k * N + n
    m_run = tl.full((), float("-inf"), tl.float32)
    s_run = tl.zeros((), dtype=tl.float32)
    z_run = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for b0 in range(0, n_tblocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_mask = offs_b < n_tblocks
        part = row * n_tblocks + offs_b
        m = tl.load(part_max_ptr + part, mask=b_mask, other=float("-inf"))
        s = tl.load(part_sum_ptr + part, mask=b_mask, other=0.0)
        acc = tl.load(part_acc_ptr + part[:, None] * D + offs_d[None, :],
                      mask=b_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_B, BLOCK_D)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)  # 0 while nothing was seen (m_run = -inf)
        beta = tl.exp(m - m_safe)  # 0 for empty parts
        s_run = s_run * alpha + tl.sum(s * beta, axis=0)
        z_run = z_run * alpha + tl.sum(acc * beta[:, None], axis=0)
        m_run = m_new
    valid = s_run > 0.0  # the max element alone contributes exp(0) = 1
    s_safe = tl.where(valid, s_run, 1.0)
    tl.store(z_ptr + row * D + offs_d, tl.where(valid, z_run / s_safe, 0.0), mask=d_mask)
    tl.store(valid_ptr + row, valid.to(tl.uint8))  # scalar, in bounds by the grid
    tl.store(lse_ptr + row, tl.where(valid, m_run + tl.log(s_safe), 0.0))


@triton.autotune(configs=_BWD_CONFIGS, key=["H", "BLOCK_D", "BLOCK_T"])
@triton.jit
def _cot_head_bwd_kernel(
    h_ptr,
    w_p_ptr,
    b_p_ptr,
    w_v_ptr,
    b_v_ptr,
    span_ptr,
    lse_ptr,
    z_ptr,
    dz_ptr,
    dv_ptr,
    dh_ptr,
    de_ptr,
    part_ptr,
    N,
    T,
    H,
    D,
    K,
    n_tblocks,
    stride_h_n,
    stride_h_t,
    stride_dh_n,
    stride_dh_t,
    stride_w_p_row,
    stride_span_k,
    stride_span_n,
    stride_span_t,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    HAS_DZ: tl.constexpr,
    HAS_DV: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DE: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    # Recompute e instead of saving it (issue 3); costs one read of h, see CoTHeadFunction.
    e = _embed_tile(h_ptr, w_p_ptr, b_p_ptr, n * stride_h_n + offs_t * stride_h_t, t_mask, offs_d, d_mask,
                    H, stride_w_p_row, BLOCK_T, BLOCK_H, BLOCK_D, DOT_FP32)
    w_v = tl.load(w_v_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    b_v = tl.load(b_v_ptr).to(tl.float32)  # scalar
    relu_e = tl.maximum(e, 0.0)
    v = tl.sum(relu_e * w_v[None, :], axis=1) + b_v  # (BLOCK_T,)

    # g = dL/dV (total), de = dL/de. Softmax pooling: dV_t += p_t (dz . e_t - dz . z), de_t += p_t dz.
    if HAS_DV:
        g = tl.load(dv_ptr + n * T + offs_t, mask=t_mask, other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK_T,), dtype=tl.float32)
    de = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if HAS_DZ:
        for k in range(K):
            row = k * N + n
            s = tl.load(span_ptr + k * stride_span_k + n * stride_span_n + offs_t * stride_span_t,
                        mask=t_mask, other=0)
            in_s = (s != 0) & t_mask
            lse = tl.load(lse_ptr + row)  # scalar
            p = tl.where(in_s, tl.exp(v - lse), 0.0)
            dz = tl.load(dz_ptr + row * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + row * D + offs_d, mask=d_mask, other=0.0)
            dz_e = tl.sum(e * dz[None, :], axis=1)  # (BLOCK_T,)
            g += p * (dz_e - tl.sum(dz * z, axis=0))
            de += p[:, None] * dz[None, :]
    de += tl.where(e > 0.0, g[:, None] * w_v[None, :], 0.0)

    # Per-program partials of db_p, dw_v, db_v; the host sums them (deterministic, no atomics).
    part = (n * n_tblocks + pid_t) * (2 * D + 1)
    tl.store(part_ptr + part + offs_d, tl.sum(de, axis=0), mask=d_mask)
    tl.store(part_ptr + part + D + offs_d, tl.sum(g[:, None] * relu_e, axis=0), mask=d_mask)
    tl.store(part_ptr + part + 2 * D, tl.sum(g, axis=0))  # scalar, in bounds by the grid

    if DOT_FP32:
        de_c = de
    else:
        de_c = de.to(h_ptr.dtype.element_ty)
    if NEED_DE:
        tl.store(de_ptr + (n * T + offs_t)[:, None] * D + offs_d[None, :], de_c,
                 mask=t_mask[:, None] & d_mask[None, :])
    if NEED_DH:
        offs_h = tl.arange(0, BLOCK_H)
        w_ptrs = w_p_ptr + offs_d[:, None] * stride_w_p_row + offs_h[None, :]  # (BLOCK_D, BLOCK_H)
        dh_ptrs = dh_ptr + (n * stride_dh_n + offs_t * stride_dh_t)[:, None] + offs_h[None, :]  # (BLOCK_T, BLOCK_H)
        for h0 in range(0, H, BLOCK_H):
            h_mask = offs_h < H - h0
            w = tl.load(w_ptrs, mask=d_mask[:, None] & h_mask[None, :], other=0.0)
            if DOT_FP32:
                dh = tl.dot(de_c, w.to(tl.float32), input_precision="ieee")
            else:
                dh = tl.dot(de_c, w.to(de_c.dtype))
            tl.store(dh_ptrs, dh.to(dh_ptr.dtype.element_ty), mask=t_mask[:, None] & h_mask[None, :])
            w_ptrs += BLOCK_H
            dh_ptrs += BLOCK_H


@triton.autotune(configs=_BWD_DW_CONFIGS, key=["H", "BLOCK_D"])
@triton.jit
def _cot_head_bwd_dw_kernel(
    h_ptr,
    de_ptr,
    part_dw_ptr,
    T,
    H,
    D,
    n_rows,
    rows_per_split,
    stride_h_n,
    stride_h_t,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """part_dw[split] = de[rows]^T h[rows] over one slice of the N*T rows, for one block of H."""
    pid_h = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    r_start = pid_s * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, n_rows)
    acc = tl.zeros((BLOCK_D, BLOCK_H), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < r_end
        n = (offs_r.to(tl.int32) // T).to(tl.int64)  # N*T < 2**31; a 64-bit division is slow
        row_off = n * stride_h_n + (offs_r - n * T) * stride_h_t
        x = tl.load(h_ptr + row_off[:, None] + offs_h[None, :],
                    mask=r_mask[:, None] & h_mask[None, :], other=0.0)  # (BLOCK_R, BLOCK_H)
        de_t = tl.load(de_ptr + offs_r[None, :] * D + offs_d[:, None],
                       mask=d_mask[:, None] & r_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_R)
        if DOT_FP32:
            acc = tl.dot(de_t.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(de_t, x, acc)
    tl.store(part_dw_ptr + (pid_s * D + offs_d)[:, None] * H + offs_h[None, :], acc,
             mask=d_mask[:, None] & h_mask[None, :])


_TUNED = {"fwd": _cot_head_fwd_kernel, "bwd": _cot_head_bwd_kernel, "bwd_dw": _cot_head_bwd_dw_kernel}
_last_config: dict[str, triton.Config] = {}  # per kernel, the config of its latest launch


def set_autotune(enabled: bool) -> None:
    """Autotune over each kernel's config list (True, the default) or run its first config (False).

    The environment variable CARFT_TRITON_AUTOTUNE=0 sets False at import. Under the interpreter each
    list holds one config, so both settings run the same code.
    """
    global _autotune
    _autotune = bool(enabled)


def autotune_enabled() -> bool:
    return _autotune


def chosen_configs() -> dict[str, str]:
    """The config each autotuned kernel ran with at its latest launch ("-" before the first one)."""
    return {name: str(_last_config[name]) if name in _last_config else "-" for name in _TUNED}


def _launch(name, kernel, grid, *args, **kwargs):
    """Launch an autotuned kernel; with autotuning off, its JITFunction with the first config's
    meta-parameters (no benchmarking: one compile per specialisation)."""
    if _autotune:
        kernel[grid](*args, **kwargs)
        _last_config[name] = getattr(kernel, "best_config", None) or kernel.configs[0]
    else:
        cfg = kernel.configs[0]
        kernel.fn[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _last_config[name] = cfg


def _block_sizes(h: torch.Tensor, T: int, D: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D). tl.dot needs every dim >= 16 on a GPU. BLOCK_T is fixed per launch (not
    autotuned) because the partial buffers are sized by the number of T blocks."""
    block_d = max(16, triton.next_power_of_2(D))
    # 64 rows x d=64 fp32 e tile = 32 regs/thread at 4 warps. The interpreter gets 16 so that small test
    # shapes still span several T blocks and exercise the split-T merge.
    cap = 64 if h.is_cuda else 16
    block_t = max(16, min(cap, triton.next_power_of_2(T)))
    return block_t, block_d


def _dot_fp32(h: torch.Tensor) -> bool:
    # The interpreter has no bf16 arithmetic and silently returns garbage from a bf16 tl.dot.
    return h.dtype == torch.float32 or (h.dtype == torch.bfloat16 and not h.is_cuda)


def _check(h, W_p, b_p, w_v, b_v, span_masks):
    if h.dim() != 3:
        raise ValueError(f"cot_head: h must be (N, T, H), got shape {tuple(h.shape)}")
    N, T, H = h.shape
    if W_p.dim() != 2 or W_p.shape[1] != H:
        raise ValueError(f"cot_head: W_p must be (d, H={H}), got {tuple(W_p.shape)}")
    D = W_p.shape[0]
    if D > MAX_D:
        raise ValueError(f"cot_head: the Triton kernel supports d <= {MAX_D}, got d={D}")
    if tuple(b_p.shape) != (D,) or tuple(w_v.shape) != (D,):
        raise ValueError(f"cot_head: b_p and w_v must be ({D},), got {tuple(b_p.shape)} and {tuple(w_v.shape)}")
    if b_v.numel() != 1:
        raise ValueError(f"cot_head: b_v must hold one element, got shape {tuple(b_v.shape)}")
    if span_masks.dim() != 3 or tuple(span_masks.shape[1:]) != (N, T) or span_masks.dtype != torch.bool:
        raise ValueError(f"cot_head: span_masks must be bool (K, {N}, {T}), got {span_masks.dtype} "
                         f"{tuple(span_masks.shape)}")
    for name, t in (("W_p", W_p), ("b_p", b_p), ("w_v", w_v), ("b_v", b_v), ("span_masks", span_masks)):
        if t.device != h.device:
            raise ValueError(f"cot_head: {name} is on {t.device}, h on {h.device}")
    return N, T, H, D, span_masks.shape[0]


def _prepare(h, W_p, b_p, w_v, b_v, span_masks):
    # N and T keep their strides (Megatron's [s, b, h].transpose(0, 1) is read in place); H must be unit-stride.
    if h.stride(2) != 1:
        h = h.contiguous()
    return (h, W_p.contiguous(), b_p.contiguous(), w_v.contiguous(), b_v.reshape(1).contiguous(),
            span_masks.view(torch.uint8))


def cot_head_fwd(h, W_p, b_p, w_v, b_v, span_masks):
    """Forward launcher.

    Args:
        h: ``(N, T, H)`` bf16/fp16/fp32 hidden states, any strides on N and T.
        W_p: ``(d, H)``, b_p: ``(d,)``, w_v: ``(d,)``, b_v: 0-d or ``(1,)``.
        span_masks: ``(K, N, T)`` bool.

    Returns:
        V ``(N, T)`` fp32, z ``(K, N, d)`` fp32, valid ``(K, N)`` bool, lse ``(K, N)`` fp32 (the log-sum-exp
        of V over each span, 0 for empty spans; the backward needs it).
    """
    N, T, H, D, K = _check(h, W_p, b_p, w_v, b_v, span_masks)
    h, W_p, b_p, w_v, b_v, spans = _prepare(h, W_p, b_p, w_v, b_v, span_masks)
    dev = h.device
    V = torch.empty((N, T), device=dev, dtype=torch.float32)
    z = torch.zeros((K, N, D), device=dev, dtype=torch.float32)
    valid = torch.zeros((K, N), device=dev, dtype=torch.bool)
    lse = torch.zeros((K, N), device=dev, dtype=torch.float32)
    if N == 0 or T == 0:
        return V, z, valid, lse
    block_t, block_d = _block_sizes(h, T, D)
    n_tblocks = triton.cdiv(T, block_t)
    part_max = torch.empty((K, N, n_tblocks), device=dev, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty((K, N, n_tblocks, D), device=dev, dtype=torch.float32)
    _launch("fwd", _cot_head_fwd_kernel, (n_tblocks, N),
        h, W_p, b_p, w_v, b_v, spans, V, part_max, part_sum, part_acc,
        N, T, H, D, K, n_tblocks,
        h.stride(0), h.stride(1), W_p.stride(0), spans.stride(0), spans.stride(1), spans.stride(2),
        BLOCK_T=block_t, BLOCK_D=block_d, DOT_FP32=_dot_fp32(h),
    )
    if K > 0:
        # The interpreter merges 2 partials per step, so small test shapes run the rescaling loop.
        block_b = min(64 if h.is_cuda else 2, triton.next_power_of_2(n_tblocks))
        _cot_head_combine_kernel[(N, K)](
            part_max, part_sum, part_acc, z, valid.view(torch.uint8), lse, N, D, n_tblocks,
            BLOCK_B=block_b, BLOCK_D=block_d, num_warps=2,
        )
    return V, z, valid, lse


def cot_head_bwd(h, W_p, b_p, w_v, b_v, span_masks, lse, z, dz, dV, need_dh=True, need_dw=True):
    """Backward launcher: gradients of a loss L(V, z) with respect to h and the head parameters.

    Args:
        h, W_p, b_p, w_v, b_v, span_masks: as in :func:`cot_head_fwd`.
        lse: ``(K, N)`` fp32 and z: ``(K, N, d)`` fp32, from the forward.
        dz: ``(K, N, d)`` dL/dz or None; dV: ``(N, T)`` dL/dV or None.
        need_dh: compute dh (skip it when h needs no gradient).
        need_dw: compute dW_p (skips the second read of h when W_p needs no gradient).

    Returns:
        dh ``(N, T, H)`` in h's dtype and strides (None if not need_dh), dW_p ``(d, H)``, db_p ``(d,)``,
        dw_v ``(d,)``, db_v (b_v's shape), the parameter gradients in their parameters' dtypes
        (dW_p None if not need_dw).
    """
    N, T, H, D, K = _check(h, W_p, b_p, w_v, b_v, span_masks)
    b_v_shape, dtypes = b_v.shape, (W_p.dtype, b_p.dtype, w_v.dtype, b_v.dtype)
    h, W_p, b_p, w_v, b_v, spans = _prepare(h, W_p, b_p, w_v, b_v, span_masks)
    dev = h.device
    has_dz = dz is not None and K > 0
    has_dv = dV is not None
    dz = dz.contiguous() if has_dz else lse  # placeholder pointer when absent (never read)
    dV = dV.contiguous() if has_dv else lse
    dot_fp32 = _dot_fp32(h)
    block_t, block_d = _block_sizes(h, T, D)
    n_tblocks = triton.cdiv(T, block_t) if T > 0 else 0
    dh = torch.empty_like(h) if need_dh else None  # keeps h's layout, e.g. a transposed [s, b, h] view
    de = torch.empty((N * T, D), device=dev, dtype=torch.float32 if dot_fp32 else h.dtype) if need_dw else None
    part = torch.zeros((N * n_tblocks, 2 * D + 1), device=dev, dtype=torch.float32)
    if N > 0 and T > 0:
        _launch("bwd", _cot_head_bwd_kernel, (n_tblocks, N),
            h, W_p, b_p, w_v, b_v, spans, lse, z, dz, dV, dh if need_dh else h, de if need_dw else lse, part,
            N, T, H, D, K, n_tblocks,
            h.stride(0), h.stride(1), (dh if need_dh else h).stride(0), (dh if need_dh else h).stride(1),
            W_p.stride(0), spans.stride(0), spans.stride(1), spans.stride(2),
            BLOCK_T=block_t, BLOCK_D=block_d, DOT_FP32=dot_fp32,
            HAS_DZ=has_dz, HAS_DV=has_dv, NEED_DH=need_dh, NEED_DE=need_dw,
        )
    sums = part.sum(0)  # (2d+1,)
    db_p, dw_v, db_v = sums[:D], sums[D:2 * D], sums[2 * D].reshape(b_v_shape)
    dW_p = None
    if need_dw:
        n_rows = N * T
        dW_p = torch.zeros((D, H), device=dev, dtype=torch.float32)
        if n_rows > 0:
            # Split the rows so that (H blocks x splits) covers about two waves of SMs; on CPU (the
            # interpreter) tiny splits, so that test shapes run the split path.
            if h.is_cuda:
                n_sm, min_rows = torch.cuda.get_device_properties(dev).multi_processor_count, 256
            else:
                n_sm, min_rows = 2, 32
            n_split = max(1, min(triton.cdiv(2 * n_sm, triton.cdiv(H, 128)), triton.cdiv(n_rows, min_rows)))
            rows_per_split = triton.cdiv(triton.cdiv(n_rows, n_split), 64) * 64  # whole BLOCK_R steps
            n_split = triton.cdiv(n_rows, rows_per_split)
            part_dw = torch.empty((n_split, D, H), device=dev, dtype=torch.float32)
            grid = lambda meta: (triton.cdiv(H, meta["BLOCK_H"]), n_split)  # noqa: E731
            _launch("bwd_dw", _cot_head_bwd_dw_kernel, grid,
                h, de, part_dw, T, H, D, n_rows, rows_per_split, h.stride(0), h.stride(1),
                BLOCK_D=block_d, DOT_FP32=dot_fp32,
            )
            dW_p = part_dw.sum(0) if n_split > 1 else part_dw[0]
        dW_p = dW_p.to(dtypes[0])
    return dh, dW_p, db_p.to(dtypes[1]), dw_v.to(dtypes[2]), db_v.to(dtypes[3])
