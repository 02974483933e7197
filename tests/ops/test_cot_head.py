"""cot_head (Triton kernel, interpreter on CPU) against cot_head_ref: forward outputs and all five
gradients, tolerance from PyTorch's own error in the same dtype (tests/utils.py, STYLE.md rule 4)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from carft_mega.ops import cot_head as op
from carft_mega.ops.cot_head import cot_head, cot_head_ref
from tests.utils import ATOL, assert_close_to_ref

NAMES = ("V", "z")
GRAD_NAMES = ("dh", "dW_p", "db_p", "dw_v", "db_v")


def _inputs(N, T, H, d, K, dtype, device="cpu", transposed=False):
    """Random head inputs; h is (N, T, H), a transposed (T, N, H) view when ``transposed``.

    Masks carry the edge cases: row 0 is empty in every span (when N > 1), span 1 of the last row is
    empty, span 0 of the last row is the whole sequence.
    """
    if transposed:
        h = torch.randn(T, N, H, device=device).to(dtype).transpose(0, 1)  # strides (H, N*H, 1)
    else:
        h = torch.randn(N, T, H, device=device).to(dtype)
    params = (
        (torch.randn(d, H, device=device) / H ** 0.5).to(dtype),  # W_p: e ~ N(0, 1)
        (0.5 * torch.randn(d, device=device)).to(dtype),  # b_p
        (torch.randn(d, device=device) / d ** 0.5).to(dtype),  # w_v
        torch.randn((), device=device).to(dtype),  # b_v
    )
    masks = torch.rand(K, N, T, device=device) < 0.5
    if K > 0:
        if N > 1:
            masks[:, 0] = False
        masks[0, N - 1] = True
        if K > 1:
            masks[1, N - 1] = False
    return h, params, masks


def _leaves(h, params, dtype, need=(True,) * 5, param_dtype=None):
    dtypes = [dtype] + [param_dtype or dtype] * 4
    out = [x.detach().to(dt).requires_grad_(r) for x, dt, r in zip((h, *params), dtypes, need)]
    return out[0], out[1:]


def _run(impl_fn, h, params, masks, upstream):
    V, z, valid = impl_fn(h, *params, masks)
    gV, gz = upstream
    loss = 0
    if gV is not None:
        loss = loss + (V * gV).sum()
    if gz is not None:
        loss = loss + (z * gz).sum()
    inputs = [x for x in (h, *params) if x.requires_grad]
    grads = torch.autograd.grad(loss, inputs) if inputs else ()
    return (V, z), valid, grads


def _check(N, T, H, d, K, dtype, device="cpu", transposed=False, grad_mode="both", need=(True,) * 5,
           param_dtype=None):
    """Kernel vs cot_head_ref in ``dtype`` and in fp32: V, z, valid and the gradients of a random linear
    function of V and/or z (``grad_mode`` "both", "V" or "z") for the inputs flagged in ``need``."""
    h, params, masks = _inputs(N, T, H, d, K, dtype, device, transposed)
    gV = torch.randn(N, T, device=device) if grad_mode in ("both", "V") else None
    gz = torch.randn(K, N, d, device=device) if grad_mode in ("both", "z") else None

    def kernel(*a):
        return cot_head(*a, impl="triton")

    def ref_low(*a):
        return cot_head_ref(*a, upcast=False)

    def ref_fp32(*a):
        return cot_head_ref(*a, upcast=True)

    runs = []
    for fn, dt, pdt in ((kernel, dtype, param_dtype), (ref_low, dtype, param_dtype),
                        (ref_fp32, torch.float32, torch.float32)):
        hh, pp = _leaves(h, params, dt, need, pdt)
        if transposed:  # keep the (T, N, H) storage of the leaf; the op sees a strided view
            base = h.transpose(0, 1).detach().to(dt).requires_grad_(need[0])
            hh = base.transpose(0, 1)
            assert not hh.is_contiguous()
        runs.append(_run(fn, hh, pp, masks, (gV, gz)))
    (out, valid, grads), (out_pt, _, grads_pt), (out_ref, valid_ref, grads_ref) = runs
    assert torch.equal(valid, valid_ref)
    assert torch.equal(valid_ref, masks.any(-1))
    for name, a, b, c in zip(NAMES, out, out_pt, out_ref):
        assert a.dtype == torch.float32 and a.shape == c.shape, name
        if c.numel():  # assert_close_to_ref cannot take a max over K = 0 spans
            assert_close_to_ref(a, b, c, name=name)
    grad_dtypes = [dt for dt, r in zip([dtype] + [param_dtype or dtype] * 4, need) if r]
    names = [n for n, r in zip(GRAD_NAMES, need) if r]
    assert len(grads) == len(names)
    for name, a, b, c, dt in zip(names, grads, grads_pt, grads_ref, grad_dtypes):
        assert a.dtype == dt, f"{name} came back as {a.dtype}, expected {dt}"
        assert torch.isfinite(a.float()).all(), name
        assert_close_to_ref(a, b, c, atol=ATOL[dtype], name=name)


@pytest.fixture
def device():
    """The kernel's device: CUDA when present, else CPU under the interpreter (conftest sets it)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "N,T,H,d,K",
    [
        (2, 37, 100, 64, 3),  # T and H not multiples of the blocks, several T blocks
        (3, 40, 576, 64, 2),  # H = 576 (SmolLM2-135M)
        (1, 1, 64, 64, 1),  # T = 1
        (3, 1, 896, 64, 3),  # T = 1, H = 896 (Qwen2.5-0.5B)
        (3, 20, 200, 24, 3),  # d not a power of two
    ],
)
def test_forward_backward(N, T, H, d, K, dtype, device):
    _check(N, T, H, d, K, dtype, device)


def test_bf16_interpreter_upcast(device):
    """bf16 on CPU: the interpreter path upcasts loads to fp32 (it has no bf16 arithmetic); the real
    bf16 tl.dot path runs in test_gpu."""
    if device == "cuda":
        pytest.skip("covered by test_gpu")
    _check(2, 37, 100, 64, 3, torch.bfloat16, transposed=True)


@pytest.mark.parametrize("K", [0, 1])
def test_few_spans(K, device):
    _check(2, 18, 48, 32, K, torch.float32, device)


def test_transposed_hidden_states(device):
    _check(3, 33, 96, 64, 2, torch.float32, device, transposed=True)
    _check(3, 33, 96, 64, 2, torch.float16, device, transposed=True)


def test_fp32_parameters_with_fp16_hidden_states(device):
    """Megatron may keep the head in fp32 next to a half-precision trunk: W_p is cast to h's dtype for
    the dot (as autocast does) and every gradient comes back in its own input's dtype."""
    _check(2, 21, 80, 64, 2, torch.float16, device, param_dtype=torch.float32)


@pytest.mark.parametrize("grad_mode", ["V", "z"])
def test_one_output_used(grad_mode, device):
    _check(2, 21, 80, 64, 3, torch.float32, device, grad_mode=grad_mode)


@pytest.mark.parametrize("need", [(False, True, True, True, True), (True, False, False, True, False)])
def test_partial_requires_grad(need, device):
    _check(2, 21, 80, 64, 2, torch.float32, device, need=need)


def test_all_masked_rows_and_no_grad(device):
    """Every span of every row empty: z = 0, valid = False, zero gradients; also under no_grad."""
    h, params, _ = _inputs(2, 19, 64, 64, 3, torch.float32, device)
    masks = torch.zeros(3, 2, 19, dtype=torch.bool, device=device)
    with torch.no_grad():
        V, z, valid = cot_head(h, *params, masks, impl="triton")
    assert torch.equal(z, torch.zeros_like(z)) and not valid.any()
    assert_close_to_ref(V, *[cot_head_ref(h, *params, masks, upcast=True)[0]] * 2, name="V")
    hh, pp = _leaves(h, params, torch.float32)
    _, z, _ = cot_head(hh, *pp, masks, impl="triton")
    grads = torch.autograd.grad((z * torch.randn_like(z)).sum(), (hh, *pp), allow_unused=True)
    for g in grads:
        assert g is not None and torch.equal(g, torch.zeros_like(g))


def test_auto_picks_reference_on_cpu(monkeypatch):
    """auto: CPU tensors -> the reference, with or without TRITON_INTERPRET (the interpreter is a
    test tool); CUDA tensors -> the kernel; impl='triton' on CPU needs the interpreter."""
    calls = []
    real = op._kernels
    monkeypatch.setattr(op, "_kernels", lambda: calls.append(1) or real())

    h, params, masks = _inputs(2, 9, 32, 16, 2, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    V, z, valid = cot_head(h, *params, masks)
    assert calls == []
    V_ref, z_ref, valid_ref = cot_head_ref(h, *params, masks)
    assert torch.equal(V, V_ref) and torch.equal(z, z_ref) and torch.equal(valid, valid_ref)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cot_head(h, *params, masks, impl="triton")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cot_head(h, *params, masks)
    assert calls == []
    if torch.cuda.is_available():
        h, params, masks = _inputs(2, 9, 32, 16, 2, torch.float32, "cuda")
        cot_head(h, *params, masks)
    else:  # triton was imported in interpreter mode by conftest, so the kernel can run here
        cot_head(h, *params, masks, impl="triton")
    assert calls == [1]
    calls.clear()
    cot_head(h, *params, masks, impl="ref")
    assert calls == []


def test_large_d_falls_back_and_bad_inputs_raise():
    h, params, masks = _inputs(1, 5, 16, 130, 1, torch.float32)
    V, z, _ = cot_head(h, *params, masks)  # d > 128: the reference, whatever the device
    assert z.shape == (1, 1, 130)
    with pytest.raises(ValueError, match="d <= 128"):
        cot_head(h, *params, masks, impl="triton")
    h, (W_p, b_p, w_v, b_v), masks = _inputs(2, 5, 16, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="W_p"):
        cot_head(h, W_p[:, :-1], b_p, w_v, b_v, masks)
    with pytest.raises(ValueError, match="w_v"):
        cot_head(h, W_p, b_p, w_v[:-1], b_v, masks)
    with pytest.raises(ValueError, match="b_v"):
        cot_head(h, W_p, b_p, w_v, torch.zeros(2), masks)
    with pytest.raises(TypeError, match="span_masks must be bool"):
        cot_head(h, W_p, b_p, w_v, b_v, masks.float())
    with pytest.raises(ValueError, match="span_masks"):
        cot_head(h, W_p, b_p, w_v, b_v, masks[:, :, :-1])
    with pytest.raises(ValueError, match="impl"):
        cot_head(h, W_p, b_p, w_v, b_v, masks, impl="cuda")


# Compiles every kernel and autotune config for sm_90 (through ptxas, no GPU or driver needed), in a
# subprocess because this process imported triton in interpreter mode. Catches what the interpreter
# accepts but the compiler rejects (layouts, dot shapes, loop-carried types).
_COMPILE_SCRIPT = textwrap.dedent("""
    import itertools, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from carft_mega.ops.cot_head import _kernels

    m = _kernels()
    target = GPUTarget("cuda", 90, 32)
    U8, F32 = ("span_ptr", "valid_ptr"), ("v_ptr", "part_max_ptr", "part_sum_ptr", "part_acc_ptr", "lse_ptr",
                                          "z_ptr", "dz_ptr", "dv_ptr", "part_ptr", "part_dw_ptr")

    def build(kernel, configs, dt, **fixed):
        fn = kernel.fn if configs else kernel  # the autotuner wraps the JITFunction
        for cfg in configs or [None]:
            consts = dict(fixed, **(cfg.kwargs if cfg else {}))
            sig = {}
            for name in fn.arg_names:
                if name in consts:
                    sig[name] = "constexpr"
                elif name.endswith("_ptr"):
                    fp32_de = name == "de_ptr" and dt == "fp32"
                    sig[name] = "*u8" if name in U8 else "*fp32" if name in F32 or fp32_de else "*" + dt
                else:
                    sig[name] = "i32"
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if cfg else {"num_warps": 2}
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=opts)
            assert k.asm["cubin"], (kernel, cfg)

    # Every autotune config in bf16 at the production tile; one config for the other dtypes, for the
    # smallest tile and for each optional-gradient variant of the backward.
    for dt, block_t, block_d, all_cfgs in (("bf16", 64, 64, True), ("bf16", 16, 16, False),
                                           ("fp16", 64, 64, False), ("fp32", 64, 64, False)):
        pick = (lambda c: c) if all_cfgs else (lambda c: c[:1])
        fp32 = dt == "fp32"
        build(m._cot_head_fwd_kernel, pick(m._FWD_CONFIGS), dt, BLOCK_T=block_t, BLOCK_D=block_d, DOT_FP32=fp32)
        build(m._cot_head_bwd_kernel, pick(m._BWD_CONFIGS), dt, BLOCK_T=block_t, BLOCK_D=block_d, DOT_FP32=fp32,
              HAS_DZ=True, HAS_DV=True, NEED_DH=True, NEED_DE=True)
        build(m._cot_head_bwd_dw_kernel, pick(m._BWD_DW_CONFIGS), dt, BLOCK_D=block_d, DOT_FP32=fp32)
    for has_dz, has_dv, need_dh, need_de in itertools.product((True, False), repeat=4):
        if (has_dz or has_dv) and not (has_dz and has_dv and need_dh and need_de):
            build(m._cot_head_bwd_kernel, m._BWD_CONFIGS[:1], "bf16", BLOCK_T=64, BLOCK_D=64, DOT_FP32=False,
                  HAS_DZ=has_dz, HAS_DV=has_dv, NEED_DH=need_dh, NEED_DE=need_de)
    build(m._cot_head_combine_kernel, None, "fp32", BLOCK_B=64, BLOCK_D=128)
    print("compiled")
""")


def test_kernels_compile_for_sm90():
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-4000:]


# GPU tests run the first config of each kernel (tests/ops/conftest.py pins it): no autotuning here.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "N,T,H,K,transposed",
    [(4, 257, 576, 3, False), (2, 1030, 4096, 3, True), (3, 1, 896, 2, False), (5, 100, 200, 0, False)],
)
def test_gpu(N, T, H, K, transposed, dtype):
    _check(N, T, H, 64, K, dtype, device="cuda", transposed=transposed)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "N,T,H,transposed",
    [(16, 2048, 576, True), (16, 2048, 896, False), (8, 2048, 4096, True), (64, 1024, 4096, True)],
    ids=["smollm2", "qwen0.5b", "7b", "7b-batch64"],
)
def test_gpu_bf16_real_shapes(N, T, H, transposed):
    """The production path: bf16 tl.dot, T up to 2048, the hidden sizes of SmolLM2-135M, Qwen2.5-0.5B
    and 7B models, Megatron's [s, b, h] layout read in place."""
    _check(N, T, H, 64, 3, torch.bfloat16, device="cuda", transposed=transposed)


def _check_strided_rows(N, T, H, device, rows):
    """Kernel vs cot_head_ref (bf16 and fp32) on h in the [s, b, h] layout: V, z and the parameter
    gradients whole, dh on ``rows`` only (a few rows of a tensor too large to compare on the host)."""
    d, K = 64, 3
    h_base = torch.randn(T, N, H, device=device, dtype=torch.bfloat16)  # no fp32 temporary of h
    params = [p.to(device) for p in _inputs(1, 1, H, d, 0, torch.bfloat16)[1]]
    masks = torch.rand(K, N, T, device=device) < 0.5
    masks[0, N - 1] = True  # the last row's span 0 covers its last positions
    masks[1, 0] = False  # and an empty span
    gV, gz = torch.randn(N, T, device=device), torch.randn(K, N, d, device=device)
    results = []
    for impl, dt in (("triton", torch.bfloat16), ("low", torch.bfloat16), ("fp32", torch.float32)):
        base = h_base.detach().to(dt).requires_grad_()  # a leaf; the bf16 ones share h_base's memory
        pp = [p.detach().to(dt).requires_grad_() for p in params]
        h = base.transpose(0, 1)
        if impl == "triton":
            V, z, valid = cot_head(h, *pp, masks, impl="triton")
        else:
            V, z, valid = cot_head_ref(h, *pp, masks, upcast=impl == "fp32")
        grads = torch.autograd.grad((V * gV).sum() + (z * gz).sum(), (base, *pp))
        results.append((V.detach(), z.detach(), valid, grads[0].transpose(0, 1), grads[1:]))
        del base, h, V, z, grads
    (V, z, valid, dh, gp), (V_pt, z_pt, _, dh_pt, gp_pt), (V_ref, z_ref, valid_ref, dh_ref, gp_ref) = results
    assert torch.equal(valid, valid_ref) and valid[0, N - 1] and not valid[1, 0]
    assert_close_to_ref(V, V_pt, V_ref, name="V")
    assert_close_to_ref(z, z_pt, z_ref, name="z")
    for name, a, b, c in zip(GRAD_NAMES[1:], gp, gp_pt, gp_ref):
        assert_close_to_ref(a, b, c, atol=ATOL[torch.bfloat16], name=name)
    idx = torch.tensor(rows, device=device)
    assert_close_to_ref(dh.index_select(0, idx), dh_pt.index_select(0, idx), dh_ref.index_select(0, idx),
                        atol=ATOL[torch.bfloat16], name=f"dh[rows {rows}]")


def test_strided_rows_check_on_cpu():
    """The check of test_gpu_int64_offsets on a small input, so that its own logic runs in CI."""
    _check_strided_rows(5, 33, 48, "cpu", [0, 3, 4])


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """h with more than 2**31 elements (257 x 2048 x 4096 bf16, 4.3 GB, in the [s, b, h] layout): the
    element offsets of the last positions exceed int32, so a 32-bit offset anywhere in the three kernels
    (fwd, bwd, dW) would read or write the wrong rows. dh is compared on the first and last rows."""
    N, T, H = 257, 2048, 4096
    assert N * T * H > 2**31 and (T - 1) * N * H + (N - 1) * H > 2**31
    props = torch.cuda.get_device_properties(0)
    if props.total_memory < 48 * 2**30:
        pytest.skip(f"needs ~35 GiB of GPU memory; {props.name} has {props.total_memory / 2**30:.0f} GiB")
    _check_strided_rows(N, T, H, "cuda", [0, 1, N - 2, N - 1])
