"""Longest common subsequence of token spans: the readable reference (DESIGN.md Sec. 4).

The negative signal splits each annotated and sampled CoT into its LCS tokens and the rest. The
authors computed the LCS over whole padded rows, so the shared prompt was always "common" (their
bug 5); we compute it over the CoT spans only.

Tie-break, which every implementation (C++ and CUDA in kernels/cuda/lcs) must reproduce bit for
bit: the classic table ``L[i][j]`` over prefixes ``a[:i]``, ``b[:j]``; trace back from ``(m, n)``:
if ``a[i-1] == b[j-1]`` take the diagonal and mark both tokens; else if ``L[i-1][j] > L[i][j-1]``
move up (``i -= 1``), else move left (``j -= 1``).
"""

from __future__ import annotations

import torch


def lcs_pair(a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    """LCS of two token lists with the DESIGN tie-break.

    Returns:
        The matched indices into ``a`` and into ``b``, both ascending.
    """
    m, n = len(a), len(b)
    # table[i][j] = LCS length of a[:i], b[:j]
    table = [[0] * (n + 1) for _ in range(m + 1)]
    for i in range(1, m + 1):
        ai, prev, row = a[i - 1], table[i - 1], table[i]
        for j in range(1, n + 1):
            if ai == b[j - 1]:
                row[j] = prev[j - 1] + 1
            else:
                up, left = prev[j], row[j - 1]
                row[j] = up if up > left else left
    idx_a, idx_b = [], []
    i, j = m, n
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1]:
            idx_a.append(i - 1)
            idx_b.append(j - 1)
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return idx_a[::-1], idx_b[::-1]


def lcs_masks_ref(
    a: torch.Tensor, a_len: torch.Tensor, b: torch.Tensor, b_len: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched LCS over the first ``a_len[i]`` / ``b_len[i]`` tokens of each row pair.

    Args:
        a: ``(N, La)`` int token ids; positions ``>= a_len`` are ignored.
        a_len: ``(N,)`` int, valid length of each row of ``a`` (0 allowed).
        b: ``(N, Lb)`` int token ids.
        b_len: ``(N,)`` int.

    Returns:
        in_lcs_a: ``(N, La)`` bool, True at the tokens of ``a`` in the LCS.
        in_lcs_b: ``(N, Lb)`` bool.
        lcs_len: ``(N,)`` int64.
    """
    _check_lcs_inputs(a, a_len, b, b_len)
    n_rows = a.shape[0]
    in_a = torch.zeros(a.shape, dtype=torch.bool)
    in_b = torch.zeros(b.shape, dtype=torch.bool)
    lcs_len = torch.zeros(n_rows, dtype=torch.int64)
    a_rows, b_rows = a.cpu().tolist(), b.cpu().tolist()
    a_lens, b_lens = a_len.cpu().tolist(), b_len.cpu().tolist()
    for r in range(n_rows):
        ia, ib = lcs_pair(a_rows[r][: a_lens[r]], b_rows[r][: b_lens[r]])
        in_a[r, ia] = True
        in_b[r, ib] = True
        lcs_len[r] = len(ia)
    return in_a.to(a.device), in_b.to(b.device), lcs_len.to(a.device)


def _check_lcs_inputs(a, a_len, b, b_len) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"a and b must be 2-D (N, L), got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[0]
    if b.shape[0] != n or a_len.shape != (n,) or b_len.shape != (n,):
        raise ValueError(f"batch mismatch: a {tuple(a.shape)}, b {tuple(b.shape)}, "
                         f"a_len {tuple(a_len.shape)}, b_len {tuple(b_len.shape)}")
    for name, t in (("a", a), ("b", b), ("a_len", a_len), ("b_len", b_len)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if n and (a_len.min() < 0 or a_len.max() > a.shape[1] or b_len.min() < 0 or b_len.max() > b.shape[1]):
        raise ValueError("a_len/b_len must lie in [0, La] / [0, Lb]")
