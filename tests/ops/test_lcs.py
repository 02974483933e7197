"""lcs_masks / span_lcs_masks (carft_mega/ops/lcs.py, kernels/cuda/lcs) against the pure-Python
reference carft_mega.algos.lcs (DESIGN.md Sec. 4 tie-break): bit equality on random, tie-heavy,
edge-case and real GSM8K CoT pairs. The CUDA kernel source also runs here, on the CPU, through the
thread emulation in lcs_kernel_emu.cpp; the real CUDA path runs under the `gpu` marker.

A missing extension fails these tests (ops would silently use the reference, and equality with it
would prove nothing) unless CARFT_SKIP_EXT_BUILD=1 says the install was pure Python on purpose.
"""

import ctypes
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import carft_mega.ops.lcs as lcs_op
from carft_mega.algos.lcs import lcs_masks_ref, lcs_pair
from carft_mega.ops.lcs import lcs_masks, span_lcs_masks

REPO = Path(__file__).resolve().parents[2]
LCS_DIR = REPO / "kernels" / "cuda" / "lcs"
SHARED = REPO.parent / "shared"
NAMES = ("in_lcs_a", "in_lcs_b", "lcs_len")


@pytest.fixture
def ext():
    if lcs_op._C is None:
        if os.environ.get("CARFT_SKIP_EXT_BUILD", "").lower() in ("1", "true", "yes", "on"):
            pytest.skip("CARFT_SKIP_EXT_BUILD is set: carft_mega_cuda was not built on purpose")
        from carft_mega import _ext

        pytest.fail(f"carft_mega_cuda is {_ext._C_error}, so lcs_masks would run the reference itself. "
                    "Build it: `pip install --no-build-isolation -e .` (or `python setup.py "
                    "build_ext --inplace` in the repo root)")
    return lcs_op._C


def assert_same(out, ref, what=""):
    """Bit equality of the three outputs; on failure names the output and the first bad rows."""
    assert len(out) == 3
    for name, o, r in zip(NAMES, out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, (
            f"{what} {name}: {o.dtype}{tuple(o.shape)} != {r.dtype}{tuple(r.shape)}")
        o, r = o.cpu(), r.cpu()
        if not torch.equal(o, r):
            bad = (o != r).nonzero()
            raise AssertionError(f"{what} {name}: {bad.shape[0]} mismatches, first at "
                                 f"{bad[:5].tolist()}, rows {bad[:, 0].unique()[:8].tolist()}")


def random_batch(n, la, lb, vocab, dtype=torch.int64, gen=None, shared=0.0):
    """Token rows with random valid lengths (row 0 full, row 1 empty when n > 2); `shared` is the
    fraction of b's tokens copied from a at the same position (CoT-like overlap)."""
    a = torch.randint(0, vocab, (n, la), generator=gen)
    b = torch.randint(0, vocab, (n, lb), generator=gen)
    if shared > 0 and min(la, lb) > 0:
        k = min(la, lb)
        copy = torch.rand(n, k, generator=gen) < shared
        b[:, :k] = torch.where(copy, a[:, :k], b[:, :k])
    a_len = torch.randint(0, la + 1, (n,), generator=gen)
    b_len = torch.randint(0, lb + 1, (n,), generator=gen)
    if n > 2:
        a_len[0], b_len[0] = la, lb
        a_len[1] = 0
    return a.to(dtype), a_len, b.to(dtype), b_len


def padded(rows, dtype=torch.int64, pad=-1):
    """List of token lists -> ((N, L) tensor padded with `pad`, (N,) lengths)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out, torch.tensor([len(r) for r in rows], dtype=torch.int64)


# ---------------------------------------------------------------- CPU path vs the reference


@pytest.mark.parametrize("vocab,dtype", [(2, torch.int32), (3, torch.int64), (50, torch.int32),
                                         (5000, torch.int64)])
@pytest.mark.parametrize("n,la,lb", [(7, 1, 1), (9, 63, 65), (6, 130, 127), (5, 200, 64), (4, 17, 300)])
def test_random_pairs_match_ref(ext, vocab, dtype, n, la, lb):
    gen = torch.Generator().manual_seed(vocab * 1000 + la * 7 + lb)
    args = random_batch(n, la, lb, vocab, dtype, gen, shared=0.5 if vocab > 3 else 0.0)
    assert_same(lcs_masks(*args), lcs_masks_ref(*args), f"vocab={vocab} {dtype} {n}x{la}x{lb}")


def test_special_pairs(ext):
    """Equal, disjoint, one or both empty, length 1, prefix, reversed, constant and alternating
    rows (the constant and alternating ones are all ties)."""
    gen = torch.Generator().manual_seed(1)
    s = torch.randint(0, 40, (70,), generator=gen).tolist()
    cases = [
        (s, s), (s, [t + 100 for t in s]), (s, []), ([], s), ([], []), ([5], [5]), ([5], [6]),
        ([5], s + [5]), (s[:30], s), (s, s[::-1]), ([7] * 70, [7] * 33), ([1, 2] * 35, [2, 1] * 30),
        ([0, 0, 1] * 20, [1, 0] * 35), (s[::2], s[1::2]),
    ]
    a, a_len = padded([c[0] for c in cases])
    b, b_len = padded([c[1] for c in cases])
    out = lcs_masks(a, a_len, b, b_len)
    assert_same(out, lcs_masks_ref(a, a_len, b, b_len), "special pairs")
    assert out[2][0] == 70 and out[0][0].all() and out[2][1] == 0 and out[2][2:5].eq(0).all()


def test_word_boundaries(ext):
    """b lengths around multiples of 64 (the word size) in one batch, tie-heavy alphabet."""
    lens = [1, 2, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257]
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(0, 3, (len(lens), 45), generator=gen, dtype=torch.int32)
    b = torch.randint(0, 3, (len(lens), 257), generator=gen, dtype=torch.int32)
    a_len = torch.full((len(lens),), 45, dtype=torch.int32)
    b_len = torch.tensor(lens, dtype=torch.int32)
    assert_same(lcs_masks(a, a_len, b, b_len), lcs_masks_ref(a, a_len, b, b_len), "word boundaries")
    # and a batch whose full width is exactly one word
    args = random_batch(5, 64, 64, 3, torch.int64, gen)
    assert_same(lcs_masks(*args), lcs_masks_ref(*args), "Lb = 64")


def test_long_pairs_1024(ext):
    """Full 1024-token pairs: a 2-letter alphabet (ties everywhere), CoT-like overlap over a
    3000-id vocabulary, and a 1024 x 300 pair. The reference takes ~0.3 s per 1024^2 pair."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(0, 2, (3, 1024), generator=gen)
    b = torch.randint(0, 2, (3, 1024), generator=gen)
    a[1] = torch.randint(0, 3000, (1024,), generator=gen)
    noise = torch.randint(0, 3000, (1024,), generator=gen)
    b[1] = torch.where(torch.rand(1024, generator=gen) < 0.5, a[1], noise)
    a_len = torch.tensor([1024, 1024, 1024])
    b_len = torch.tensor([1024, 1024, 300])
    assert_same(lcs_masks(a, a_len, b, b_len), lcs_masks_ref(a, a_len, b, b_len), "1024 pairs")


def test_dtypes_layouts_and_empty_batch(ext):
    """Mixed int32/int64 tokens and lengths, non-contiguous inputs, N = 0, zero-width rows."""
    gen = torch.Generator().manual_seed(4)
    a, a_len, b, b_len = random_batch(6, 80, 90, 4, torch.int64, gen)
    ref = lcs_masks_ref(a, a_len, b, b_len)
    assert_same(lcs_masks(a.to(torch.int32), a_len.to(torch.int32), b, b_len), ref, "a int32, b int64")
    wide = torch.randint(0, 4, (6, 160), generator=gen)
    wide[:, ::2] = a  # a as the even columns of a wider tensor
    a_strided = wide[:, ::2]
    assert not a_strided.is_contiguous()
    assert_same(lcs_masks(a_strided, a_len, b.t().contiguous().t(), b_len), ref, "non-contiguous")
    empty = torch.zeros(0, 5, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    assert_same(lcs_masks(*empty, *empty), lcs_masks_ref(*empty, *empty), "N = 0")
    z = torch.zeros(3, 0, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    args = (*z, *random_batch(3, 1, 9, 3, torch.int32, gen)[2:])
    assert_same(lcs_masks(*args), lcs_masks_ref(*args), "La = 0")


def _gsm8k_cot_tokens(n_records=240):
    data_dir = Path(os.environ.get("CARFT_DATA_DIR") or SHARED / "data")
    data = data_dir / "gsm8k" / "train.jsonl"
    tok_file = next((p for p in (SHARED / "models", data_dir.parent / "models")
                     if (p / "tokenizers/gpt2/tokenizer.json").is_file()), SHARED / "models")
    tok_file = tok_file / "tokenizers" / "gpt2" / "tokenizer.json"
    if not data.is_file() or not tok_file.is_file():
        pytest.skip(f"needs {data} and {tok_file} (shared/ beside the repo, or $CARFT_DATA_DIR)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    questions, cots = [], []
    with open(data) as f:
        for _, line in zip(range(n_records), f):
            rec = json.loads(line)
            # ReFT-style CoT: the answer before '####', calculator annotations removed
            cots.append(tok.encode(re.sub(r"<<[^>]*>>", "", rec["answer"].split("####")[0]).strip()).ids)
            questions.append(tok.encode(rec["question"]).ids)
    return questions, cots


def _perturb(ids, rng, vocab=50257, rate=0.2):
    """A 'sampled' copy of a CoT: each token dropped, replaced or followed by a new one w.p. rate/3."""
    out = []
    for t in ids:
        r = rng.random()
        if r < rate / 3:
            continue
        out.append(rng.randrange(vocab) if r < 2 * rate / 3 else t)
        if r > 1 - rate / 3:
            out.append(rng.randrange(vocab))
    return out


def test_gsm8k_cot_pairs(ext):
    """Real GPT-2-tokenised GSM8K CoTs: each paired with the most similar other CoT (token-set
    Jaccard over 240 problems) and with a perturbed copy of itself."""
    _, cots = _gsm8k_cot_tokens()
    rng = random.Random(5)
    sets = [set(c) for c in cots]
    pairs = []
    for k in range(0, len(cots), 8):
        best = max((j for j in range(len(cots)) if j != k),
                   key=lambda j: len(sets[k] & sets[j]) / len(sets[k] | sets[j]))
        pairs += [(cots[k], cots[best]), (cots[k], _perturb(cots[k], rng))]
    a, a_len = padded([p[0] for p in pairs], torch.int32, pad=50256)
    b, b_len = padded([p[1] for p in pairs], torch.int64, pad=50256)
    out = lcs_masks(a, a_len, b, b_len)
    assert_same(out, lcs_masks_ref(a, a_len, b, b_len), "gsm8k pairs")
    assert out[2][1::2].float().mean() > 0.6 * a_len[1::2].float().mean()  # copies share most tokens


# ---------------------------------------------------------------- span_lcs_masks


def span_lcs_masks_loop(tokens_a, span_a, tokens_b, span_b):
    """Plain loop version: per row, take the span positions, run lcs_pair, mark the positions."""
    lcs_a = torch.zeros_like(span_a)
    lcs_b = torch.zeros_like(span_b)
    for r in range(tokens_a.shape[0]):
        pos_a = span_a[r].nonzero().flatten().tolist()
        pos_b = span_b[r].nonzero().flatten().tolist()
        ia, ib = lcs_pair([int(tokens_a[r, p]) for p in pos_a], [int(tokens_b[r, p]) for p in pos_b])
        for k in ia:
            lcs_a[r, pos_a[k]] = True
        for k in ib:
            lcs_b[r, pos_b[k]] = True
    return lcs_a, lcs_b


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_span_lcs_masks_matches_loop(ext, dtype):
    """Scattered and contiguous spans, empty and full spans, different row widths."""
    gen = torch.Generator().manual_seed(6)
    n, ta, tb = 12, 90, 77
    tokens_a = torch.randint(0, 4, (n, ta), generator=gen, dtype=dtype)
    tokens_b = torch.randint(0, 4, (n, tb), generator=gen, dtype=dtype)
    span_a = torch.rand(n, ta, generator=gen) < 0.6
    span_b = torch.rand(n, tb, generator=gen) < 0.5
    span_a[0], span_b[0] = False, True                 # empty span vs full span
    span_a[1], span_b[1] = False, False                # both empty
    span_a[2], span_b[2] = True, True                  # whole rows
    span_a[3] = False
    span_a[3, 20:61] = True                            # a contiguous CoT after a "prompt"
    span_b[3] = False
    span_b[3, 5:50] = True
    out = span_lcs_masks(tokens_a, span_a, tokens_b, span_b)
    ref = span_lcs_masks_loop(tokens_a, span_a, tokens_b, span_b)
    for name, o, r in zip(("lcs_a", "lcs_b"), out, ref):
        assert o.dtype == torch.bool and o.shape == r.shape
        assert torch.equal(o, r), f"{name}: rows {(o != r).any(1).nonzero().flatten().tolist()} differ"
    assert not (out[0] & ~span_a).any() and not (out[1] & ~span_b).any()


def test_span_lcs_masks_gsm8k_rows(ext):
    """Prompt + CoT rows as the trainer holds them: question tokens, then the CoT, then padding;
    the span is the CoT part; the two sides have different prompt lengths."""
    questions, cots = _gsm8k_cot_tokens(64)
    rng = random.Random(7)
    rows_a, rows_b, spans_a, spans_b = [], [], [], []
    for q, c in zip(questions[:16], cots[:16]):
        c2 = _perturb(c, rng)
        q2 = q[: max(1, len(q) - rng.randrange(8))]
        rows_a.append(q + c)
        rows_b.append(q2 + c2)
        spans_a.append([False] * len(q) + [True] * len(c))
        spans_b.append([False] * len(q2) + [True] * len(c2))
    tokens_a, _ = padded(rows_a, pad=0)
    tokens_b, _ = padded(rows_b, pad=0)
    span_a = padded([[int(x) for x in s] for s in spans_a], pad=0)[0].bool()
    span_b = padded([[int(x) for x in s] for s in spans_b], pad=0)[0].bool()
    out = span_lcs_masks(tokens_a, span_a, tokens_b, span_b)
    ref = span_lcs_masks_loop(tokens_a, span_a, tokens_b, span_b)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_span_lcs_masks_degenerate_shapes(ext):
    for n, ta, tb in [(0, 4, 5), (3, 0, 5), (2, 0, 0)]:
        tokens_a, tokens_b = torch.zeros(n, ta, dtype=torch.int64), torch.ones(n, tb, dtype=torch.int64)
        out = span_lcs_masks(tokens_a, torch.ones(n, ta, dtype=torch.bool), tokens_b,
                             torch.ones(n, tb, dtype=torch.bool))
        assert out[0].shape == (n, ta) and out[1].shape == (n, tb)
        assert not out[0].any() and not out[1].any()


# ---------------------------------------------------------------- fallback and errors


def test_fallback_warns_once_and_matches_ref(monkeypatch):
    monkeypatch.setattr(lcs_op, "_C", None)
    monkeypatch.setattr(lcs_op, "_warned", set())
    assert not lcs_op.extension_available("cpu")
    args = random_batch(4, 20, 25, 3, torch.int64, torch.Generator().manual_seed(8))
    with pytest.warns(UserWarning, match="lcs_masks runs the pure-Python reference"):
        out = lcs_masks(*args)
    assert_same(out, lcs_masks_ref(*args), "fallback")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        span = torch.ones(4, 20, dtype=torch.bool)
        span_lcs_masks(args[0], span, args[0], span)


def _bad_cases():
    a = torch.zeros(3, 8, dtype=torch.int64)
    ln = torch.full((3,), 8, dtype=torch.int64)
    return [
        ("1-D a", (a[0], ln, a, ln), ValueError, "2-D"),
        ("batch mismatch", (a, ln, a[:2], ln), ValueError, "shape"),
        ("a_len shape", (a, ln[:2], a, ln), ValueError, "a_len"),
        ("float tokens", (a.float(), ln, a, ln), TypeError, "int32 or int64"),
        ("float lengths", (a, ln, a, ln.float()), TypeError, "int32 or int64"),
        ("a_len too long", (a, torch.tensor([8, 9, 8]), a, ln), ValueError, r"a_len\[1\] = 9"),
        ("b_len negative", (a, ln, a, torch.tensor([8, 8, -1])), ValueError, r"b_len\[2\] = -1"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise_clear_errors(ext, case):
    _, args, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        lcs_masks(*args)
    with pytest.raises(exc, match=pattern):  # the raw binding checks the same things
        ext.lcs_masks_cpu(*args)


def test_span_lcs_masks_bad_inputs(ext):
    t = torch.zeros(2, 5, dtype=torch.int64)
    s = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="span_a must be bool"):
        span_lcs_masks(t, s.int(), t, s)
    with pytest.raises(ValueError, match="same"):
        span_lcs_masks(t, s[:, :4], t, s)
    with pytest.raises(ValueError, match="batch mismatch"):
        span_lcs_masks(t, s, t[:1], s[:1])
    with pytest.raises(TypeError, match="tokens_b must be int32 or int64"):
        span_lcs_masks(t, s, t.float(), s)


# ---------------------------------------------------------------- the CUDA kernel source, emulated on the CPU


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """lcs_kernel_emu.cpp (which includes kernels/cuda/lcs/lcs_kernel.cuh) built with g++ -> ctypes."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++/c++) to build the kernel emulation")
    lib = tmp_path_factory.mktemp("lcs_emu") / "lcs_emu.so"
    cmd = [cxx, "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", f"-I{LCS_DIR}",
           str(Path(__file__).with_name("lcs_kernel_emu.cpp")), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"building the kernel emulation failed:\n{proc.stderr[-3000:]}"
    return ctypes.CDLL(str(lib))


def run_emu(lib, a, a_len, b, b_len, words_per_lane=-1, use_smem=True, threads=64):
    if a.dtype != b.dtype:
        a, b = a.long(), b.long()
    a, b = a.contiguous(), b.contiguous()
    a_len, b_len = a_len.long().contiguous(), b_len.long().contiguous()
    n, la, lb = a.shape[0], a.shape[1], b.shape[1]
    # Poisoned outputs: the kernel must write every element.
    in_a = torch.ones(n, la, dtype=torch.bool)
    in_b = torch.ones(n, lb, dtype=torch.bool)
    ln = torch.full((n,), -7, dtype=torch.int64)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    rc = lib.emu_lcs_masks(ptr(a), ptr(b), a.element_size(), ptr(a_len), ptr(b_len),
                           ctypes.c_int64(n), ctypes.c_int64(la), ctypes.c_int64(lb),
                           ptr(in_a), ptr(in_b), ptr(ln), words_per_lane, int(use_smem), threads)
    assert rc == 0, f"emu_lcs_masks returned {rc}"
    return in_a, in_b, ln


@pytest.mark.parametrize("use_smem", [True, False], ids=["smem", "global"])
@pytest.mark.parametrize("words_per_lane", [-1, 0], ids=["registers", "dynamic"])
def test_cuda_kernel_source_emulated(emu, use_smem, words_per_lane):
    """The kernel's phases (match table, carry wavefront over lanes, ballot traceback) on random
    and tie-heavy pairs, Lb from 1 to 300 (1 to 5 words), int32 and int64, empty rows."""
    gen = torch.Generator().manual_seed(9)
    for vocab, dtype, (n, la, lb) in [(2, torch.int32, (5, 70, 300)), (3, torch.int64, (6, 129, 65)),
                                      (1000, torch.int64, (4, 40, 1)), (20, torch.int32, (3, 1, 200))]:
        args = random_batch(n, la, lb, vocab, dtype, gen, shared=0.5)
        assert_same(run_emu(emu, *args, words_per_lane, use_smem), lcs_masks_ref(*args),
                    f"emulated kernel S={words_per_lane} smem={use_smem} vocab={vocab} {n}x{la}x{lb}")


def test_cuda_kernel_source_emulated_wide_rows(emu):
    """More than 32 words per row: S = 2 (Lb 2049..4096), S = 4 (up to 8192), the dynamic path
    beyond; plus one 1024 x 1024 pair in shared-memory mode."""
    gen = torch.Generator().manual_seed(10)
    for lb, s in [(2100, -1), (4500, -1), (4500, 0)]:
        args = random_batch(2, 24, lb, 3, torch.int32, gen)
        assert_same(run_emu(emu, *args, s, use_smem=False), lcs_masks_ref(*args), f"emulated Lb={lb} S={s}")
    a = torch.randint(0, 3000, (1, 1024), generator=gen)
    noise = torch.randint(0, 3000, (1, 1024), generator=gen)
    b = torch.where(torch.rand(1, 1024, generator=gen) < 0.5, a, noise)
    lens = torch.tensor([1024])
    assert_same(run_emu(emu, a, lens, b, lens), lcs_masks_ref(a, lens, b, lens), "emulated 1024^2")


# ---------------------------------------------------------------- the CUDA path on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [3, 3000], ids=["ties", "cot-like"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_cuda_bit_exact_vs_reference_64x1024(ext, vocab, dtype):
    """The trainer's largest case, 64 pairs of 1024 x 1024 tokens (int64 rows at that size take the most
    shared memory), against the pure-Python DP directly: mostly full rows, some shorter, one empty;
    a 3-token vocabulary makes nearly every step a tie."""
    assert getattr(ext, "with_cuda", False), "carft_mega_cuda was built without its CUDA part"
    gen = torch.Generator().manual_seed(vocab + dtype.itemsize)
    a, a_len, b, b_len = random_batch(64, 1024, 1024, vocab, dtype, gen, shared=0.5 if vocab > 3 else 0.0)
    a_len[2:48], b_len[2:48] = 1024, 1024
    dev = torch.device("cuda")
    out = lcs_masks(a.to(dev), a_len.to(dev), b.to(dev), b_len.to(dev))
    assert out[0].is_cuda and out[2].is_cuda
    assert_same(out, lcs_masks_ref(a, a_len, b, b_len), f"cuda 64 x 1024 x 1024 {dtype} vocab={vocab}")


@pytest.mark.gpu
def test_cuda_path_matches_cpu_and_ref(ext):
    assert getattr(ext, "with_cuda", False), "carft_mega_cuda was built without its CUDA part"
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(11)
    batches = [random_batch(9, 130, 127, 3, torch.int32, gen),
               random_batch(7, 300, 260, 5000, torch.int64, gen, shared=0.5),
               random_batch(64, 1024, 1024, 3000, torch.int64, gen, shared=0.5),   # shared memory
               random_batch(3, 700, 5000, 3, torch.int32, gen),                    # global, S = 4
               random_batch(2, 50, 9000, 4, torch.int64, gen),                     # dynamic S
               random_batch(0, 5, 5, 3, torch.int64, gen)]
    for k, (a, a_len, b, b_len) in enumerate(batches):
        cpu = lcs_masks(a, a_len, b, b_len)
        gpu = lcs_masks(a.to(dev), a_len.to(dev), b.to(dev), b_len.to(dev))
        assert gpu[0].device.type == "cuda"
        assert_same(gpu, cpu, f"cuda batch {k}")
        unchecked = lcs_masks(a.to(dev), a_len.to(dev), b.to(dev), b_len.to(dev), check_lengths=False)
        assert_same(unchecked, cpu, f"cuda batch {k}, check_lengths=False")
        if a.shape[0] * a.shape[1] * b.shape[1] <= 2e6:
            assert_same(gpu, lcs_masks_ref(a, a_len, b, b_len), f"cuda batch {k} vs ref")
    # a side stream, mixed dtypes, lengths on the CPU
    a, a_len, b, b_len = batches[0]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = lcs_masks(a.to(dev), a_len, b.long().to(dev), b_len)
    stream.synchronize()
    assert_same(out, lcs_masks_ref(a, a_len, b, b_len), "side stream")
    with pytest.raises(ValueError, match=r"a_len\[0\]"):
        lcs_masks(a.to(dev), a_len + 1000, b.to(dev), b_len)
    sa = torch.rand(a.shape) < 0.7
    sb = torch.rand(b.shape) < 0.7
    out = span_lcs_masks(a.to(dev), sa.to(dev), b.to(dev), sb.to(dev))
    ref = span_lcs_masks_loop(a, sa, b, sb)
    assert torch.equal(out[0].cpu(), ref[0]) and torch.equal(out[1].cpu(), ref[1])
