"""The LCS reference against an independent memoised recursion with the same tie-break, and
brute force on tiny inputs."""

import functools
import itertools
import random

import pytest
import torch

from carft_mega.algos.lcs import lcs_masks_ref, lcs_pair


def memo_lcs(a, b):
    """LCS length table by top-down recursion (a different computation of L), then the rule."""
    @functools.lru_cache(maxsize=None)
    def L(i, j):
        if i == 0 or j == 0:
            return 0
        if a[i - 1] == b[j - 1]:
            return L(i - 1, j - 1) + 1
        return max(L(i - 1, j), L(i, j - 1))

    ia, ib = [], []
    i, j = len(a), len(b)
    while i and j:
        if a[i - 1] == b[j - 1]:
            ia.insert(0, i - 1)
            ib.insert(0, j - 1)
            i, j = i - 1, j - 1
        elif L(i - 1, j) > L(i, j - 1):
            i -= 1
        else:
            j -= 1
    return ia, ib


def brute_lcs_len(a, b):
    best = 0
    for r in range(len(a), 0, -1):
        for idx in itertools.combinations(range(len(a)), r):
            sub = [a[i] for i in idx]
            it = iter(b)
            if all(x in it for x in sub):
                return r
    return best


@pytest.mark.parametrize("alphabet", [2, 3, 50])
def test_pair_matches_memo_and_is_optimal(alphabet):
    rng = random.Random(alphabet)
    for _ in range(60):
        a = [rng.randrange(alphabet) for _ in range(rng.randrange(0, 9))]
        b = [rng.randrange(alphabet) for _ in range(rng.randrange(0, 9))]
        ia, ib = lcs_pair(a, b)
        assert (ia, ib) == memo_lcs(a, b)
        assert [a[i] for i in ia] == [b[j] for j in ib]
        assert len(ia) == brute_lcs_len(a, b)


def test_tie_break_prefers_left_on_equal():
    # a = [1, 2], b = [2, 1]: L[1][2] == L[2][1] == 1 at the mismatch -> move left (j -= 1),
    # so the traceback ends matching the 2s.
    assert lcs_pair([1, 2], [2, 1]) == ([1], [0])


def test_batched_masks_with_lengths():
    rng = random.Random(0)
    N, La, Lb = 7, 30, 25
    a = torch.randint(0, 4, (N, La))
    b = torch.randint(0, 4, (N, Lb))
    a_len = torch.tensor([0, 1, 30, 12, 5, 30, 17])
    b_len = torch.tensor([3, 0, 25, 12, 25, 1, 9])
    a[3, :12] = b[3, :12]  # equal prefix
    in_a, in_b, n = lcs_masks_ref(a, a_len, b, b_len)
    for r in range(N):
        ia, ib = memo_lcs(a[r, :a_len[r]].tolist(), b[r, :b_len[r]].tolist())
        assert in_a[r].nonzero().flatten().tolist() == ia
        assert in_b[r].nonzero().flatten().tolist() == ib
        assert n[r].item() == len(ia)
    assert n[3].item() == 12 and n[0].item() == 0 and n[1].item() == 0
    assert not in_a[:, :][torch.arange(La) >= a_len[:, None]].any()
    del rng


def test_bad_inputs():
    a = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="batch mismatch"):
        lcs_masks_ref(a, torch.tensor([1, 1]), torch.zeros(3, 3, dtype=torch.long), torch.tensor([1, 1, 1]))
    with pytest.raises(TypeError, match="int32 or int64"):
        lcs_masks_ref(a.float(), torch.tensor([1, 1]), a, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="a_len"):
        lcs_masks_ref(a, torch.tensor([4, 1]), a, torch.tensor([1, 1]))
