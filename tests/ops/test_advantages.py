"""Fused advantage pass: the Triton kernel (interpreter on CPU) against the algos references, and
those references against a plain-Python scalar loop run in double precision."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from carft_mega.algos.advantage import compute_gae, kl_shaped_rewards, masked_whiten
from carft_mega.ops.dispatch import choose_impl
from carft_mega.ops.advantages import (
    advantages, advantages_ref, global_moments, whiten_from_moments)
from tests.utils import assert_close_to_ref

BETA = 0.05


def loop_advantages(scores, logp_old, logp_ref, values, mask, beta, gamma, lam):
    """Scalar GAE in Python floats (fp64): per row, list the action positions, recurse backwards.

    Returns (rewards, advantages, returns) as (B, T) fp64 tensors and (row_sum, row_sumsq,
    row_count) as (B,) fp64 tensors.
    """
    sc, lo, lr, v, m = (x.double().tolist() if x.dtype != torch.bool else x.tolist()
                        for x in (scores, logp_old, logp_ref, values, mask))
    B, T = mask.shape
    rew, adv, ret = (torch.zeros(B, T, dtype=torch.float64) for _ in range(3))
    stats = torch.zeros(3, B, dtype=torch.float64)
    for b in range(B):
        steps = [t for t in range(T) if m[b][t]]
        a_next = v_next = 0.0
        for i, t in enumerate(reversed(steps)):
            r = -beta * (lo[b][t] - lr[b][t]) + (sc[b] if i == 0 else 0.0)
            a = r + gamma * v_next - v[b][t] + gamma * lam * a_next
            rew[b, t], adv[b, t], ret[b, t] = r, a, a + v[b][t]
            stats[:, b] += torch.tensor([a, a * a, 1.0], dtype=torch.float64)
            a_next, v_next = a, v[b][t]
    return rew, adv, ret, stats[0], stats[1], stats[2]


def make_mask(B, T, kind, gen):
    """``kind``: contiguous (one span per row, maybe empty), gaps (Bernoulli 0.6), full, or mixed
    (rows cycle through empty / a single action token / gaps)."""
    if kind == "full":
        return torch.ones(B, T, dtype=torch.bool)
    gaps = torch.rand(B, T, generator=gen) < 0.6
    if kind == "gaps":
        return gaps
    m = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        if kind == "contiguous":
            s = int(torch.randint(0, T, (1,), generator=gen))
            e = int(torch.randint(s, T + 1, (1,), generator=gen))
            m[b, s:e] = True
        elif kind == "mixed":
            if b % 3 == 1:
                m[b, int(torch.randint(0, T, (1,), generator=gen))] = True
            elif b % 3 == 2:
                m[b] = gaps[b]
        else:
            raise ValueError(kind)
    return m


def make_inputs(B, T, kind, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(B, T, kind, gen)
    scores = torch.rand(B, generator=gen) * 2 - 0.5
    logp_old = -torch.rand(B, T, generator=gen) * 3
    logp_ref = logp_old + 0.3 * torch.randn(B, T, generator=gen)
    values = torch.randn(B, T, generator=gen)
    return scores, logp_old.to(dtype), logp_ref.to(dtype), values.to(dtype), mask


def check_against_loop(out, out_pt, args, gamma, lam):
    """Kernel ``out`` vs the fp64 loop, with the fp32 reference ``out_pt`` setting the slack (STYLE rule 4)."""
    loop = loop_advantages(*args, BETA, gamma, lam)
    for name, o, p, r in zip(("advantages", "returns", "rewards"), out, out_pt, loop):
        assert o.dtype == torch.float32, name
        assert_close_to_ref(o, p, r, name=name)
    # Row sums grow with T: compare them per action token, where fp32 rounding is O(1e-7).
    n = loop[5].clamp(min=1)
    for name, i in (("row_sum", 3), ("row_sumsq", 4)):
        assert out[i].dtype == torch.float32, name
        assert_close_to_ref(out[i] / n, out_pt[i] / n, loop[i] / n, name=f"{name} / row_count")
    assert torch.equal(out.row_count, loop[5].long()), "row_count"
    mask = args[4]
    assert not out.advantages[~mask].any() and not out.returns[~mask].any() and not out.rewards[~mask].any()


GAMMA_LAM = [(1.0, 0.95), (1.0, 1.0), (0.99, 0.0), "random"]


def _gamma_lam(gl, seed):
    if gl != "random":
        return gl
    g = torch.rand(2, generator=torch.Generator().manual_seed(seed + 7)).tolist()
    return g[0], g[1]


@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (4, 64), (2, 5)])
@pytest.mark.parametrize("kind", ["contiguous", "gaps", "mixed"])
@pytest.mark.parametrize("gl", GAMMA_LAM)
def test_algos_references_match_python_loop(B, T, kind, gl):
    seed = 31 * B + T
    gamma, lam = _gamma_lam(gl, seed)
    args = make_inputs(B, T, kind, seed)
    rew = kl_shaped_rewards(*args[:3], args[4], BETA)
    adv, ret = compute_gae(rew, args[3], args[4], gamma, lam)
    ref = advantages_ref(*args, BETA, gamma, lam)
    loop = loop_advantages(*args, BETA, gamma, lam)
    for got, want in zip((rew, adv, ret, ref.row_sum, ref.row_sumsq), loop):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(ref.row_count, loop[5].long())


# (B, T, block_t): T = 1, T < block, T a multiple of the block (4 blocks), T not a multiple
# (5 blocks, last partial), odd B, one 1024 block.
SHAPES = [(1, 1, None), (2, 5, None), (5, 64, 16), (4, 300, 64), (7, 130, None), (2, 1024, None)]


@pytest.mark.parametrize("B,T,block_t", SHAPES)
@pytest.mark.parametrize("kind", ["contiguous", "gaps", "mixed", "full"])
@pytest.mark.parametrize("gl", GAMMA_LAM)
def test_kernel_matches_reference(B, T, block_t, kind, gl):
    seed = 1000 * B + T
    gamma, lam = _gamma_lam(gl, seed)
    args = make_inputs(B, T, kind, seed)
    out = advantages(*args, BETA, gamma, lam, impl="triton", block_t=block_t)
    check_against_loop(out, advantages_ref(*args, BETA, gamma, lam), args, gamma, lam)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,T,block_t", [(3, 37, 16), (2, 200, 64)])
def test_kernel_low_precision_inputs(dtype, B, T, block_t):
    """fp16/bf16 loads are upcast in the kernel: it must agree with the reference on the same
    (upcast) values to fp32 tolerance. bf16 also checks the interpreter's cast-on-load path."""
    args = make_inputs(B, T, "mixed", seed=B + T, dtype=dtype)
    out = advantages(*args, BETA, 1.0, 0.95, impl="triton", block_t=block_t)
    check_against_loop(out, advantages_ref(*args, BETA, 1.0, 0.95), args, 1.0, 0.95)


def test_kernel_mixed_dtypes_and_non_contiguous_inputs():
    B, T = 3, 40
    scores, lo, lr, v, mask = make_inputs(B, T, "gaps", seed=5)
    lo_nc = lo.t().contiguous().t()          # column-major: not contiguous
    v_bf16 = v.to(torch.bfloat16)
    mask_nc = torch.cat([mask, mask], dim=1)[:, ::2]
    assert not lo_nc.is_contiguous() and not mask_nc.is_contiguous()
    args = (scores.half(), lo_nc, lr, v_bf16, mask_nc)
    out = advantages(*args, BETA, 0.9, 0.8, impl="triton", block_t=16)
    check_against_loop(out, advantages_ref(*args, BETA, 0.9, 0.8), args, 0.9, 0.8)


def test_empty_batch_and_zero_length():
    for B, T in ((0, 7), (3, 0)):
        args = make_inputs(max(B, 1), max(T, 1), "gaps", seed=0)
        args = tuple(x[:B] for x in args[:1]) + tuple(x[:B, :T] for x in args[1:])
        out = advantages(*args, BETA, 1.0, 0.95, impl="triton")
        assert out.advantages.shape == (B, T) and out.row_sum.shape == (B,)
        assert not out.row_count.any() and not out.row_sum.any()


def test_impl_selection(monkeypatch):
    """model.kernels: auto = the kernel on CUDA, the reference on CPU even under TRITON_INTERPRET
    (the interpreter is a test tool); triton on CPU needs the interpreter."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_impl("advantages", "auto", cuda) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_impl("advantages", "auto", cpu) == "ref"
    assert choose_impl("advantages", "triton", cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert choose_impl("advantages", "auto", cpu) == "ref"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        choose_impl("advantages", "triton", cpu)
    assert choose_impl("advantages", "ref", cuda) == "ref"
    assert choose_impl("cot_head", "auto", cuda, unsupported="d too large") == "ref"
    args = make_inputs(2, 9, "gaps", seed=3)
    ref = advantages_ref(*args, BETA, 1.0, 0.95)
    out = advantages(*args, BETA, 1.0, 0.95)  # the reference path, called through the public op
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_bad_inputs_name_the_field():
    scores, lo, lr, v, mask = make_inputs(2, 6, "gaps", seed=1)
    with pytest.raises(ValueError, match="values"):
        advantages(scores, lo, lr, v[:, :5], mask, BETA, 1.0, 0.95)
    with pytest.raises(ValueError, match="scores"):
        advantages(scores[:1], lo, lr, v, mask, BETA, 1.0, 0.95)
    with pytest.raises(TypeError, match="action_mask"):
        advantages(scores, lo, lr, v, mask.float(), BETA, 1.0, 0.95)
    with pytest.raises(TypeError, match="logp_ref"):
        advantages(scores, lo, lr.long(), v, mask, BETA, 1.0, 0.95)
    with pytest.raises(ValueError, match="lam"):
        advantages(scores, lo, lr, v, mask, BETA, 1.0, 1.5)
    with pytest.raises(ValueError, match="impl"):
        advantages(scores, lo, lr, v, mask, BETA, 1.0, 0.95, impl="cuda")


@pytest.mark.parametrize("add_mean_back", [False, True])
@pytest.mark.parametrize("kind", ["gaps", "mixed"])
def test_whiten_from_moments_matches_masked_whiten(add_mean_back, kind):
    args = make_inputs(6, 50, kind, seed=11)
    out = advantages(*args, BETA, 1.0, 0.95, impl="triton", block_t=16)
    mask = args[4]
    w = whiten_from_moments(out.advantages, mask, *global_moments(out.row_sum, out.row_sumsq, out.row_count),
                            add_mean_back=add_mean_back)
    expect = masked_whiten(out.advantages, mask, add_mean_back=add_mean_back)
    torch.testing.assert_close(w, expect, atol=1e-5, rtol=1e-4)
    # An offset mean (mean / std = 30) still whitens to fp32 tolerance through the fp64 moments.
    x = (torch.randn(6, 50) + 30.0) * mask
    sums = (x.sum(-1), (x * x).sum(-1), mask.sum(-1))
    torch.testing.assert_close(whiten_from_moments(x, mask, *global_moments(*sums), add_mean_back=add_mean_back),
                               masked_whiten(x, mask, add_mean_back=add_mean_back), atol=1e-4, rtol=1e-4)


def test_whiten_from_moments_degenerate_counts():
    x = torch.randn(2, 4)
    one = torch.zeros(2, 4, dtype=torch.bool)
    one[1, 2] = True
    for mask in (torch.zeros(2, 4, dtype=torch.bool), one):  # count 0 and count 1
        got = whiten_from_moments(x, mask, (x * mask).sum(), (x * x * mask).sum(), mask.sum())
        torch.testing.assert_close(got, masked_whiten(x, mask))
        assert torch.isfinite(got).all()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_ROWS = (3, 4)  # uneven local batches


def _global_inputs():
    return make_inputs(sum(RANK_ROWS), 23, "mixed", seed=77)


def _whiten_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        start = sum(RANK_ROWS[:rank])
        rows = slice(start, start + RANK_ROWS[rank])
        args = tuple(x[rows] for x in _global_inputs())
        out = advantages(*args, BETA, 1.0, 0.95, impl="triton")  # the kernel, in the interpreter
        moments = global_moments(out.row_sum, out.row_sumsq, out.row_count, group=dist.group.WORLD)
        res = {f"w{int(s)}": whiten_from_moments(out.advantages, args[4], *moments, add_mean_back=s)
               for s in (True, False)}
        res["moments"] = torch.stack(moments)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_whitening_over_two_gloo_ranks(tmp_path):
    """Each rank whitens its rows with all-reduced moments; the concatenation equals
    ``masked_whiten`` of the concatenated batch."""
    mp.spawn(_whiten_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    args = _global_inputs()
    full = advantages_ref(*args, BETA, 1.0, 0.95)
    expect_moments = torch.stack(global_moments(full.row_sum, full.row_sumsq, full.row_count))
    for r in res:
        torch.testing.assert_close(r["moments"], expect_moments, atol=1e-4, rtol=1e-5)
    for s in (True, False):
        got = torch.cat([r[f"w{int(s)}"] for r in res])
        torch.testing.assert_close(got, masked_whiten(full.advantages, args[4], add_mean_back=s), atol=1e-5, rtol=1e-4)
    assert math.isfinite(got.sum().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T", [(64, 1024), (64, 4096), (5, 333)])
def test_kernel_on_gpu(dtype, B, T):
    args = make_inputs(B, T, "mixed", seed=B + T, dtype=dtype)
    out = advantages(*(x.cuda() for x in args), BETA, 1.0, 0.95)
    assert out.advantages.is_cuda
    out = type(out)(*(x.cpu() for x in out))
    check_against_loop(out, advantages_ref(*args, BETA, 1.0, 0.95), args, 1.0, 0.95)


def _check_row_subset(B, T, device, rows, dtype=torch.bfloat16):
    """The kernel on a (B, T) batch generated on ``device``, checked on ``rows`` only against the fp64
    loop (the rows are independent), with the fp32 reference of those rows setting the slack."""
    gen = torch.Generator(device=device).manual_seed(B + T)
    # Drawn in ``dtype`` and updated in place: no fp32 temporaries of the full size.
    mask = torch.rand(B, T, device=device, generator=gen, dtype=dtype) < 0.6
    mask[0] = False  # an empty row
    mask[B - 1] = True  # a full one, at the end of the buffers
    scores = torch.rand(B, device=device, generator=gen) * 2 - 0.5
    logp_old = torch.rand(B, T, device=device, generator=gen, dtype=dtype).mul_(-3)
    logp_ref = torch.randn(B, T, device=device, generator=gen, dtype=dtype).mul_(0.3).add_(logp_old)
    values = torch.randn(B, T, device=device, generator=gen, dtype=dtype)
    out = advantages(scores, logp_old, logp_ref, values, mask, BETA, 1.0, 0.95, impl="triton")
    idx = torch.tensor(rows, device=device)
    sub = tuple(x.index_select(0, idx).cpu() for x in (scores, logp_old, logp_ref, values, mask))
    out = type(out)(*(x.index_select(0, idx).cpu() for x in out))
    check_against_loop(out, advantages_ref(*sub, BETA, 1.0, 0.95), sub, 1.0, 0.95)
    assert out.row_count[0] == 0 and out.row_count[-1] == T


def test_row_subset_check_on_cpu():
    """The check of test_kernel_int64_offsets_on_gpu on a small batch, so that its own logic runs in CI."""
    _check_row_subset(9, 70, "cpu", [0, 1, 7, 8])


@pytest.mark.gpu
def test_kernel_int64_offsets_on_gpu():
    """B x T = 524289 x 4096 > 2**31 elements (bf16 inputs, fp32 outputs, ~45 GB at the peak): the last rows start past
    2**31, so a 32-bit row offset would read and write other rows. Checked on the first and last rows."""
    B, T = 2**31 // 4096 + 1, 4096
    props = torch.cuda.get_device_properties(0)
    if props.total_memory < 64 * 2**30:
        pytest.skip(f"needs ~50 GiB of GPU memory; {props.name} has {props.total_memory / 2**30:.0f} GiB")
    _check_row_subset(B, T, "cuda", [0, 1, B - 2, B - 1])
