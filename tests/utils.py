"""Shared test helpers (STYLE.md rule 4: tolerance from PyTorch's own error, as flash-attn does)."""

import torch

ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_close_to_ref(out, out_pt, out_ref, atol=None, name="output"):
    """Assert max|out - out_ref| <= 2 * max|out_pt - out_ref| + atol.

    Args:
        out: the kernel's result.
        out_pt: the PyTorch reference run in the same (low) precision as the kernel.
        out_ref: the PyTorch reference run in fp32 (``upcast=True``).
        atol: absolute slack; defaults by the dtype of ``out_pt`` (1e-4 / 1e-2 / 5e-2).
    """
    if atol is None:
        atol = ATOL.get(out_pt.dtype, 1e-4)
    out, out_pt, out_ref = (t.detach().float().cpu() for t in (out, out_pt, out_ref))
    assert out.shape == out_ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(out_ref.shape)}"
    if out.numel() == 0:
        return
    err = (out - out_ref).abs()
    bound = 2 * (out_pt - out_ref).abs().max().item() + atol
    if err.numel() and err.max().item() > bound:
        bad = (err > bound).nonzero()
        raise AssertionError(
            f"{name}: max|out-ref| = {err.max().item():.3e} > bound {bound:.3e}; "
            f"{bad.shape[0]} of {err.numel()} mismatches, first at {bad[:5].tolist()}: "
            f"out={out[tuple(bad[:5].T)].tolist()} ref={out_ref[tuple(bad[:5].T)].tolist()}")
