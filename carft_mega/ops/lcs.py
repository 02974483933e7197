"""Batched token LCS and the CoT segment masks built from it (DESIGN.md Sec. 4, negative signal).

``lcs_masks`` runs the compiled extension ``carft_mega_cuda`` (kernels/cuda/lcs): its CUDA path for
CUDA tensors and its multi-threaded bit-parallel C++ path for CPU tensors. Both are bit-identical
to the readable reference ``carft_mega.algos.lcs.lcs_masks_ref`` (same tie-break), which is also
what runs, after a one-time warning, when the extension was not built.

``span_lcs_masks`` is what the trainer calls: it takes the CoT spans where they lie in the padded
prompt+response rows, runs one batched LCS over the compacted spans, and returns the in-LCS masks
at row positions. The "excluded" masks of Eq. 8 are then ``span & ~lcs``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from carft_mega import _ext
from carft_mega.algos.lcs import lcs_masks_ref

__all__ = ["lcs_masks", "lcs_masks_ref", "span_lcs_masks", "extension_available"]

_C = _ext._C  # module attribute, so that tests can swap it for None
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, UserWarning, stacklevel=3)


def extension_available(device: torch.device | str = "cpu") -> bool:
    """Whether ``lcs_masks`` runs compiled code (not the Python reference) for tensors on ``device``."""
    if _C is None:
        return False
    return torch.device(device).type != "cuda" or bool(getattr(_C, "with_cuda", False))


def lcs_masks(
    a: torch.Tensor, a_len: torch.Tensor, b: torch.Tensor, b_len: torch.Tensor, *,
    check_lengths: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched LCS over the first ``a_len[r]`` / ``b_len[r]`` tokens of each row pair.

    Bit-identical to ``lcs_masks_ref`` (DESIGN.md Sec. 4 tie-break). CUDA tensors run the CUDA
    kernel on the current stream; CPU tensors run the C++ path on ``torch.get_num_threads()``
    threads.

    Args:
        a: ``(N, La)`` int32 or int64 token ids; positions ``>= a_len`` are ignored.
        a_len: ``(N,)`` int32 or int64, valid length of each row of ``a``, in ``[0, La]``. On the
            CPU it may be given for CUDA ``a`` (it is moved).
        b: ``(N, Lb)`` int32 or int64 token ids, on the device of ``a``; its dtype may differ.
        b_len: ``(N,)`` int32 or int64, in ``[0, Lb]``.
        check_lengths: on CUDA, check the lengths' range (one device synchronisation). False
            skips it for lengths known to be valid; out-of-range ones are then clamped to
            ``[0, L]`` instead of raising. CPU inputs are always checked (it costs nothing).

    Returns:
        in_lcs_a: ``(N, La)`` bool, True at the tokens of ``a`` in the LCS (False past ``a_len``).
        in_lcs_b: ``(N, Lb)`` bool.
        lcs_len: ``(N,)`` int64.

    Raises:
        ValueError: wrong ranks or shapes, inputs on different devices, or a length out of range
            (the message names the row).
        TypeError: a non-integer dtype.
    """
    for name, t in (("a", a), ("a_len", a_len), ("b", b), ("b_len", b_len)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lcs_masks: {name} must be a torch.Tensor, got {type(t).__name__}")
    if a.device != b.device:
        raise ValueError(f"lcs_masks: a and b must be on one device, got {a.device} and {b.device}")
    if _C is None:
        _warn_once("no_ext", f"carft_mega_cuda is {_ext._C_error or 'not built'}, so lcs_masks "
                   "runs the pure-Python reference lcs_masks_ref (~20 ms per 512x512 pair). Build "
                   "the extension with `pip install --no-build-isolation -e .` (needs torch and a "
                   "C++ compiler).")
        return lcs_masks_ref(a, a_len, b, b_len)
    if a.device.type == "cuda":
        a_len, b_len = a_len.to(a.device), b_len.to(a.device)
        if getattr(_C, "with_cuda", False):
            stream = torch.cuda.current_stream(a.device).cuda_stream
            return _C.lcs_masks_cuda(a.contiguous(), a_len, b.contiguous(), b_len, stream, check_lengths)
        _warn_once("no_cuda", "carft_mega_cuda was built without its CUDA part (CPU torch, no nvcc "
                   "or CARFT_SKIP_CUDA_BUILD), so lcs_masks copies CUDA inputs to its CPU path. "
                   "Rebuild with a CUDA torch and nvcc for the kernel.")
        out = _C.lcs_masks_cpu(a.cpu().contiguous(), a_len.cpu(), b.cpu().contiguous(), b_len.cpu())
        return tuple(t.to(a.device) for t in out)
    return _C.lcs_masks_cpu(a.contiguous(), a_len, b.contiguous(), b_len)


def _compact(tokens: torch.Tensor, span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Moves each row's span tokens, in order, to the front.

    Args:
        tokens: ``(N, T)`` token ids.
        span: ``(N, T)`` bool.

    Returns:
        compact: ``(N, max span length)`` the span tokens of each row, then padding.
        length: ``(N,)`` int64 span lengths.
        dest: ``(N, T)`` int64, a permutation of ``[0, T)`` per row: where each position went.
    """
    n_rows, n_cols = tokens.shape
    csum = span.to(torch.int64).cumsum(1)  # (N, T) span positions up to and including each column
    length = span.sum(1)  # (N,)
    pos = torch.arange(n_cols, device=tokens.device)
    # A span position goes to its rank among span positions; any other one after all of them,
    # in order (pos - csum = the number of non-span positions before it).
    dest = torch.where(span, csum - 1, length[:, None] + pos - csum)  # (N, T)
    max_len = int(length.max()) if n_rows and n_cols else 0  # one sync on CUDA: the output width
    compact = torch.zeros_like(tokens).scatter_(1, dest, tokens)[:, :max_len]  # (N, max_len)
    return compact.contiguous(), length, dest


def span_lcs_masks(
    tokens_a: torch.Tensor, span_a: torch.Tensor, tokens_b: torch.Tensor, span_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-LCS masks of the spans of two batches of token rows, at row positions.

    Row ``r``'s span of ``a`` is the sequence ``tokens_a[r, span_a[r]]`` (positions in order, not
    necessarily contiguous; an empty span is allowed), likewise for ``b``. One batched
    ``lcs_masks`` call over the compacted spans gives the LCS of each pair; its flags are put back
    at the positions they came from. Fully vectorised: no Python loop over rows.

    Args:
        tokens_a: ``(N, Ta)`` int32/int64 token ids, e.g. the annotated prompt+CoT rows.
        span_a: ``(N, Ta)`` bool, the CoT positions of each row of ``tokens_a``.
        tokens_b: ``(N, Tb)`` int32/int64 token ids on the same device, e.g. the rollouts.
        span_b: ``(N, Tb)`` bool.

    Returns:
        lcs_a: ``(N, Ta)`` bool, True at span positions whose token is in the LCS; False outside
            the span. The excluded tokens of Eq. 8 are ``span_a & ~lcs_a``.
        lcs_b: ``(N, Tb)`` bool, likewise.

    Raises:
        ValueError: shapes or devices that do not match.
        TypeError: spans that are not bool, tokens that are not int32/int64.
    """
    for side, tok, span in (("a", tokens_a, span_a), ("b", tokens_b, span_b)):
        if tok.dim() != 2 or span.shape != tok.shape:
            raise ValueError(f"span_lcs_masks: tokens_{side} {tuple(tok.shape)} and span_{side} "
                             f"{tuple(span.shape)} must be the same (N, T) shape")
        if span.dtype != torch.bool:
            raise TypeError(f"span_lcs_masks: span_{side} must be bool, got {span.dtype}")
        if tok.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"span_lcs_masks: tokens_{side} must be int32 or int64, got {tok.dtype}")
        if span.device != tok.device or tok.device != tokens_a.device:
            raise ValueError(f"span_lcs_masks: all inputs must be on one device, got tokens_a on "
                             f"{tokens_a.device}, tokens_{side} on {tok.device}, "
                             f"span_{side} on {span.device}")
    if tokens_a.shape[0] != tokens_b.shape[0]:
        raise ValueError(f"span_lcs_masks: batch mismatch, tokens_a {tuple(tokens_a.shape)} vs "
                         f"tokens_b {tuple(tokens_b.shape)}")
    comp_a, len_a, dest_a = _compact(tokens_a, span_a)  # (N, La), (N,), (N, Ta)
    comp_b, len_b, dest_b = _compact(tokens_b, span_b)
    # The lengths are valid by construction: no second synchronisation on CUDA.
    in_a, in_b, _ = lcs_masks(comp_a, len_a, comp_b, len_b, check_lengths=False)  # (N, La), (N, Lb)
    # Pad to full width with False, then pull each position's flag from where it was sent.
    lcs_a = F.pad(in_a, (0, tokens_a.shape[1] - in_a.shape[1])).gather(1, dest_a) & span_a
    lcs_b = F.pad(in_b, (0, tokens_b.shape[1] - in_b.shape[1])).gather(1, dest_b) & span_b
    return lcs_a, lcs_b
