"""Fused PPO advantage pass: KL-shaped rewards, GAE reverse scan, returns and whitening moments.

One program per row walks the row from its end in blocks of BLOCK_T steps. GAE over the action
positions (gaps skipped) is the scalar affine recurrence u_t = c_t * u_{t+1} + d_t on
u = gamma * (V_next + lam * A_next), solved inside a block by a `tl.associative_scan` and carried
across blocks; the terminal score is folded into the initial carry. Limits: B programs only (64
rows occupy half an H100), so long rows run their T / BLOCK_T blocks serially per row; maths in fp32.
"""

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _affine_combine(c_first, d_first, c_then, d_then):
    # Compose u -> c_then * (c_first * u + d_first) + d_then (first = the later time steps).
    return c_first * c_then, c_then * d_first + d_then


@triton.jit
def _advantages_fwd_kernel(
    scores_ptr,
    logp_old_ptr,
    logp_ref_ptr,
    values_ptr,
    mask_ptr,
    adv_ptr,
    ret_ptr,
    rew_ptr,
    row_sum_ptr,
    row_sumsq_ptr,
    row_count_ptr,
    T,
    stride_lo_row,
    stride_lr_row,
    stride_v_row,
    stride_m_row,
    stride_out_row,
    beta,
    gamma,
    lam,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lo_row = logp_old_ptr + row * stride_lo_row
    lr_row = logp_ref_ptr + row * stride_lr_row
    v_row = values_ptr + row * stride_v_row
    m_row = mask_ptr + row * stride_m_row
    adv_row = adv_ptr + row * stride_out_row
    ret_row = ret_ptr + row * stride_out_row
    rew_row = rew_ptr + row * stride_out_row

    j = tl.arange(0, BLOCK_T)
    gl = gamma * lam
    score = tl.load(scores_ptr + row).to(tl.float32)
    # u after the last action is gamma * (0 + lam * 0); adding the score there pays it at the last action.
    carry_u = score
    carry_n = tl.zeros((), dtype=tl.int32)
    acc_sum = tl.zeros((), dtype=tl.float32)
    acc_sq = tl.zeros((), dtype=tl.float32)
    for k in range(0, tl.cdiv(T, BLOCK_T)):
        # Reversed block: j = 0 is the latest step, so a forward scan runs backwards in time.
        t = T - 1 - k * BLOCK_T - j
        valid = t >= 0
        m = tl.load(m_row + t, mask=valid, other=0) != 0
        # Cast loads to fp32: the interpreter has no bf16 arithmetic, the GPU accumulates in fp32 anyway.
        lo = tl.load(lo_row + t, mask=m, other=0.0).to(tl.float32)
        lr = tl.load(lr_row + t, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_row + t, mask=m, other=0.0).to(tl.float32)
        r_kl = -beta * (lo - lr)

        # Step t+1 of this block (j >= 1), re-read (L1/L2 hit) so the inclusive scan yields u_{t+1}.
        valid1 = valid & (j > 0)
        m1 = tl.load(m_row + t + 1, mask=valid1, other=0) != 0
        lo1 = tl.load(lo_row + t + 1, mask=m1, other=0.0).to(tl.float32)
        lr1 = tl.load(lr_row + t + 1, mask=m1, other=0.0).to(tl.float32)
        v1 = tl.load(v_row + t + 1, mask=m1, other=0.0).to(tl.float32)
        c1 = tl.where(m1, gl, 1.0)
        d1 = tl.where(m1, gamma * ((1.0 - lam) * v1 + lam * (-beta * (lo1 - lr1))), 0.0)
        c_scan, d_scan = tl.associative_scan((c1, d1), 0, _affine_combine)
        u_next = c_scan * carry_u + d_scan

        adv = tl.where(m, r_kl - v + u_next, 0.0)
        n_from_end = tl.cumsum(m.to(tl.int32), 0) + carry_n
        is_last = m & (n_from_end == 1)
        rew = tl.where(m, r_kl + tl.where(is_last, score, 0.0), 0.0)
        tl.store(adv_row + t, adv, mask=valid)
        tl.store(ret_row + t, tl.where(m, adv + v, 0.0), mask=valid)
        tl.store(rew_row + t, rew, mask=valid)

        acc_sum += tl.sum(adv, axis=0)
        acc_sq += tl.sum(adv * adv, axis=0)
        carry_n += tl.sum(m.to(tl.int32), axis=0)
        # u at the block's earliest step (j = BLOCK_T - 1) seeds the next block.
        u_t = tl.where(m, gl * u_next + gamma * ((1.0 - lam) * v + lam * r_kl), u_next)
        carry_u = tl.sum(tl.where(j == BLOCK_T - 1, u_t, 0.0), axis=0)

    tl.store(row_sum_ptr + row, acc_sum)
    tl.store(row_sumsq_ptr + row, acc_sq)
    tl.store(row_count_ptr + row, carry_n.to(tl.int64))


def advantages_fwd(scores, logp_old, logp_ref, values, mask, beta, gamma, lam, block_t=None):
    """Launch the fused advantage pass (inputs already validated by `carft_mega.ops.advantages`).

    Args:
        scores: ``(*, )`` terminal scores, any float dtype.
        logp_old: ``(*, T)`` rollout log-probs (fp32, fp16 or bf16), unit stride along T.
        logp_ref: ``(*, T)`` reference log-probs, same layout.
        values: ``(*, T)`` value predictions, same layout.
        mask: ``(*, T)`` action mask as uint8 (a ``bool`` tensor viewed as ``uint8``).
        beta: KL coefficient.
        gamma: GAE discount.
        lam: GAE lambda.
        block_t: steps per block (a power of two); default min(1024, next_pow2(T)).

    Returns:
        advantages, returns, rewards: ``(*, T)`` fp32, 0 outside the mask.
        row_sum, row_sumsq: ``(*,)`` fp32 masked sums of the advantages and their squares.
        row_count: ``(*,)`` int64 action counts.
    """
    lead, T = logp_old.shape[:-1], logp_old.shape[-1]
    B = math.prod(lead)
    logp_old, logp_ref, values, mask = (x.reshape(B, T) for x in (logp_old, logp_ref, values, mask))
    scores = scores.reshape(B)
    dev = logp_old.device
    adv = torch.empty(B, T, dtype=torch.float32, device=dev)
    ret = torch.empty_like(adv)
    rew = torch.empty_like(adv)
    row_sum = torch.zeros(B, dtype=torch.float32, device=dev)
    row_sumsq = torch.zeros_like(row_sum)
    row_count = torch.zeros(B, dtype=torch.int64, device=dev)
    if B > 0 and T > 0:
        BLOCK_T = block_t or min(1024, max(16, triton.next_power_of_2(T)))
        if BLOCK_T & (BLOCK_T - 1):
            raise ValueError(f"kernels/triton/advantages.py: block_t={BLOCK_T} must be a power of two")
        # 8 steps per thread at 1024; scans need whole warps, small blocks use one.
        num_warps = max(1, min(8, BLOCK_T // 256))
        _advantages_fwd_kernel[(B,)](
            scores, logp_old, logp_ref, values, mask,
            adv, ret, rew, row_sum, row_sumsq, row_count,
            T,
            logp_old.stride(0), logp_ref.stride(0), values.stride(0), mask.stride(0), adv.stride(0),
            float(beta), float(gamma), float(lam),
            BLOCK_T=BLOCK_T,
            num_warps=num_warps,
        )
    out_shape = (*lead, T)
    return (adv.view(out_shape), ret.view(out_shape), rew.view(out_shape),
            row_sum.view(lead), row_sumsq.view(lead), row_count.view(lead))

