"""The rollout's fast paths leave the tokens unchanged.

* Greedy tokens equal a naive full-recompute loop (no KV cache, each row alone) for prompts of
  very different lengths whose rows end at different steps, so finished rows are dropped from the
  batch and its cache mid-generation; at B = 1 and odd B, both layouts, with and without
  compaction, and for every prefill bucketing.
* Sampled tokens with compaction equal those without, for the same generator, and equal the
  prefix (up to EOS) of a run in which no row ever stops. With a ``RowNoise`` (the trainer's
  sampler) they are also the same for the batch split in two, and equal a row-alone sampler.
* The lean decode step (``KVCache.lean_trunk``, used by default) gives bit-identical log-probs
  to the decode step through Megatron's modules.
* The KV-cache pieces against independent references: decode attention against a plain
  repeated-heads softmax attention, the bucket planner against brute force, swap-remove.
"""

import itertools

import pytest
import torch

from carft_mega import parallel
from carft_mega.config import ModelConfig, ParallelConfig, TinyModelConfig
from carft_mega.rollout.generate import generate, plan_prefill_buckets
from carft_mega.rollout.kv_cache import KVCache, decode_attention, swap_remove_plan
from tests.rollout.test_generate import PAD, left_pad

VOCAB = 50
NEVER = VOCAB + 7  # an EOS id the model cannot emit


@pytest.fixture(scope="module")
def policy():
    parallel.init_distributed(ParallelConfig(tp=1), seed=0)
    from carft_mega.models.build import build_policy
    cfg = ModelConfig(source="tiny", tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4,
                                                          num_kv_heads=2, ffn_hidden_size=64))
    p = build_policy(cfg, vocab_size=VOCAB).eval()
    # HF's init (std 0.02, tied embeddings) makes greedy decoding copy the last token forever;
    # larger random matrices give varied continuations, so rows end at different steps.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in p.gpt.parameters():
            if w.dim() == 2:
                w.copy_(torch.randn(w.shape, generator=g) * 2.0 / w.shape[1] ** 0.5)
    yield p
    parallel.destroy()


@torch.no_grad()
def naive_greedy(policy, row, max_new):
    """No cache, no padding, no EOS: rerun the whole sequence each step (plain causal forward)."""
    seq, out = list(row), []
    for _ in range(max_new):
        hidden = policy.trunk(torch.tensor([seq]))
        nxt = int(policy.lm_logits(hidden[-1:], gather=True)[0, 0, :VOCAB].argmax())
        out.append(nxt)
        seq.append(nxt)
    return out


def cut_at(seq, eos):
    return seq[:seq.index(eos) + 1] if eos in seq else seq


def pick_eos(streams, max_new):
    """The token whose first occurrences end the most rows at distinct steps (some rows never)."""
    def score(t):
        ends = [s.index(t) for s in streams if t in s[:max_new - 1]]
        return (len(set(ends)), -len(ends)) if len(ends) < len(streams) else (-1, 0)
    return max(range(2, VOCAB), key=score)


def prompts_of_lengths(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


CASES = [[1], [5, 40, 1, 17, 3], [12, 2, 33, 7, 1, 26, 9]]  # B = 1 and odd B, very different lengths
MAX_NEW = 24


@pytest.fixture(scope="module")
def greedy_refs(policy):
    out = []
    for k, lengths in enumerate(CASES):
        rows = prompts_of_lengths(lengths, seed=10 + k)
        streams = [naive_greedy(policy, r, MAX_NEW) for r in rows]
        eos = pick_eos(streams, MAX_NEW)
        out.append((rows, eos, [cut_at(s, eos) for s in streams]))
    return out


def test_reference_rows_end_at_different_steps(greedy_refs):
    """The cases exercise compaction: rows end early at several distinct steps, others run on."""
    for rows, eos, refs in greedy_refs[1:]:
        ends = [len(r) for r in refs if r[-1] == eos and len(r) < MAX_NEW]
        assert len(set(ends)) >= 2, (eos, [len(r) for r in refs])
        assert any(len(r) == MAX_NEW for r in refs)


@pytest.mark.parametrize("layout", ["left", "aligned"])
@pytest.mark.parametrize("compact,decode", [(True, "eager"), (False, "eager"), (True, "static")])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_greedy_equals_naive_full_recompute(policy, greedy_refs, layout, compact, decode, case):
    rows, eos, refs = greedy_refs[case]
    toks, lens = left_pad(rows)
    out = generate(policy, toks, lens, max_new_tokens=MAX_NEW, eos_id=eos, pad_id=PAD, greedy=True,
                   layout=layout, compact=compact, decode=decode)
    assert out.generations() == refs
    for i, r in enumerate(rows):
        assert out.tokens[i, :len(r)].tolist() == r
        assert (out.tokens[i, len(r) + len(refs[i]):] == PAD).all()
        assert bool(out.finished[i]) == (refs[i][-1] == eos)


@pytest.mark.parametrize("cost", [0, 8, 10**9])
def test_greedy_same_for_every_prefill_bucketing(policy, greedy_refs, cost):
    rows, eos, refs = greedy_refs[2]
    toks, lens = left_pad(rows)
    out = generate(policy, toks, lens, max_new_tokens=MAX_NEW, eos_id=eos, pad_id=PAD, greedy=True,
                   layout="left", prefill_call_cost=cost)
    assert out.generations() == refs


@pytest.mark.parametrize("layout,decode", [("left", "eager"), ("aligned", "eager"), ("left", "static"),
                                           ("aligned", "static")])
@pytest.mark.parametrize("lengths", [[4], [9, 1, 30, 5, 14], [3, 21, 8, 1, 12, 6, 27, 2, 16]])
def test_sampling_unchanged_by_compaction(policy, layout, decode, lengths):
    rows = prompts_of_lengths(lengths, seed=len(lengths))
    toks, lens = left_pad(rows)
    kw = dict(max_new_tokens=MAX_NEW, pad_id=PAD, temperature=1.0, layout=layout)
    # No row ever stops: the raw sample streams. Then stop at a token that ends rows at various steps.
    free = generate(policy, toks, lens, eos_id=NEVER, generator=torch.Generator().manual_seed(5), **kw)
    streams = free.generations()
    eos = pick_eos(streams, MAX_NEW)
    a = generate(policy, toks, lens, eos_id=eos, generator=torch.Generator().manual_seed(5), compact=True,
                 decode=decode, **kw)
    b = generate(policy, toks, lens, eos_id=eos, generator=torch.Generator().manual_seed(5), compact=False, **kw)
    assert a.generations() == b.generations() == [cut_at(s, eos) for s in streams]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.gen_lens, b.gen_lens)
    torch.testing.assert_close(a.sample_logp, b.sample_logp, atol=1e-5, rtol=1e-5)
    if len(rows) > 1:
        ends = {len(g) for g in a.generations() if g[-1] == eos}
        assert len(ends) >= 2 and any(len(g) == MAX_NEW for g in a.generations())


@torch.no_grad()
def naive_row_noise_sample(policy, row, row_id, seed, max_new, temperature, eos):
    """No cache, the row alone: rerun the sequence each step; the token whose CDF interval holds
    this row's uniform of this step, drawn from its own seeded generator (the RowNoise contract,
    written out: uniform = 1 - U[row_id] with U ~ torch.rand under seed mix_seed(seed, step))."""
    from carft_mega.rollout.sampling import mix_seed

    seq, out, logps = list(row), [], []
    for step in range(max_new):
        logits = policy.lm_logits(policy.trunk(torch.tensor([seq]))[-1:], gather=True)[0, 0, :VOCAB].double()
        p = torch.softmax(logits / temperature, dim=0)
        g = torch.Generator().manual_seed(mix_seed(seed, step))
        u = 1.0 - torch.rand(row_id + 1, generator=g, dtype=torch.float64)[row_id]
        cdf = torch.cumsum(p, 0)
        nxt = int((cdf < u * cdf[-1]).sum())  # the first index with cdf >= u * total
        out.append(nxt)
        logps.append(float(torch.log(p[nxt])))
        seq.append(nxt)
        if nxt == eos:
            break
    return out, logps


@pytest.mark.parametrize("layout,decode", [("left", "eager"), ("aligned", "eager"), ("left", "static"),
                                           ("aligned", "static")])
def test_row_noise_sampling_unchanged_by_compaction_and_batch_split(policy, layout, decode):
    """With a RowNoise, a row's samples depend on (seed, its global id, its step) only: the same
    with compaction on and off, for the batch split in two halves (each left-padded to its own
    longest prompt, so the halves' layouts differ from the whole's), and equal to a row-alone,
    no-cache sampler given the same per-row uniforms; the behaviour log-prob at temperature 0.7
    is the row-alone one."""
    from carft_mega.rollout.sampling import RowNoise

    lengths = [3, 21, 8, 1, 12, 6, 27, 2, 16]
    rows = prompts_of_lengths(lengths, seed=77)
    first, seed, T = 100, 1234, 0.7  # global ids 100.. as on a later data-parallel rank
    kw = dict(max_new_tokens=MAX_NEW, pad_id=PAD, temperature=T, layout=layout, decode=decode)

    def run(sub, ids, eos, compact=True):
        toks, lens = left_pad(sub)
        return generate(policy, toks, lens, eos_id=eos, compact=compact,
                        generator=RowNoise(seed, torch.tensor(ids)), **kw)

    ids = list(range(first, first + len(rows)))
    streams = run(rows, ids, NEVER).generations()
    eos = pick_eos(streams, MAX_NEW)
    whole = run(rows, ids, eos)
    gens = whole.generations()
    ends = {len(g) for g in gens if g[-1] == eos}
    assert len(ends) >= 2 and any(len(g) == MAX_NEW for g in gens)  # rows leave at several steps
    assert gens == [cut_at(s, eos) for s in streams]
    uncompacted = run(rows, ids, eos, compact=False)
    assert uncompacted.generations() == gens
    torch.testing.assert_close(uncompacted.sample_logp, whole.sample_logp, atol=1e-5, rtol=1e-5)
    h = len(rows) // 2
    assert run(rows[:h], ids[:h], eos).generations() + run(rows[h:], ids[h:], eos).generations() == gens
    if layout == "left" and decode == "eager":  # the independent reference, once (slow)
        for i, (r, g) in enumerate(zip(rows, gens)):
            want, want_lp = naive_row_noise_sample(policy, r, ids[i], seed, MAX_NEW, T, eos)
            assert g == want, i
            got_lp = whole.sample_logp[i, len(r) - 1:len(r) - 1 + len(g)]
            torch.testing.assert_close(got_lp, torch.tensor(want_lp, dtype=torch.float32), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def window_policy(policy):  # after `policy`: shares its 1-rank parallel state
    from carft_mega.models.build import policy_from_hf_source
    from carft_mega.models.convert import HFSource
    from tests.models.mcore_helpers import model_cfg, tiny_arch, tiny_hf_model

    arch = tiny_arch("qwen2", vocab=VOCAB, hidden=32, heads=4, kv_heads=2, ffn=64, window=5)
    p = policy_from_hf_source(HFSource.from_model(tiny_hf_model(arch, seed=3)), model_cfg()).eval()
    assert p.arch.sliding_window == 5
    return p


@torch.no_grad()
def naive_greedy_windowed(policy, row, max_new):
    """No cache: the whole sequence each step under the sliding-window causal mask."""
    from carft_mega.models.policy import build_attention_mask

    seq, out = list(row), []
    for _ in range(max_new):
        x = torch.tensor([seq])
        mask = build_attention_mask(torch.ones_like(x, dtype=torch.bool), sliding_window=policy.arch.sliding_window)
        nxt = int(policy.lm_logits(policy.trunk(x, attention_mask=mask)[-1:], gather=True)[0, 0, :VOCAB].argmax())
        out.append(nxt)
        seq.append(nxt)
    return out


@pytest.mark.parametrize("layout,decode", [("left", "eager"), ("aligned", "eager"), ("left", "static"),
                                           ("aligned", "static")])
def test_sliding_window_greedy_equals_naive(window_policy, layout, decode):
    rows = prompts_of_lengths([9, 1, 14, 3, 6], seed=21)
    streams = [naive_greedy_windowed(window_policy, r, 16) for r in rows]
    assert len({tuple(s) for s in streams}) > 1 and max(len(set(s)) for s in streams) > 2  # not degenerate
    eos = pick_eos(streams, 16)
    toks, lens = left_pad(rows)
    out = generate(window_policy, toks, lens, max_new_tokens=16, eos_id=eos, pad_id=PAD, greedy=True,
                   layout=layout, decode=decode)
    assert out.generations() == [cut_at(s, eos) for s in streams]


@pytest.mark.parametrize("which", ["llama", "qwen2_bias_window"])
@pytest.mark.parametrize("layout", ["left", "aligned"])
@pytest.mark.parametrize("greedy", [True, False])
def test_lean_decode_equals_megatron_modules(policy, window_policy, which, layout, greedy):
    """The lean decode step gives bit-identical log-probs (hence tokens) to Megatron's modules."""
    from carft_mega.rollout.kv_cache import lean_decode_unsupported

    pol = policy if which == "llama" else window_policy
    assert lean_decode_unsupported(pol) is None
    rows = prompts_of_lengths([7, 1, 19, 4, 11], seed=33)
    toks, lens = left_pad(rows)
    kw = dict(max_new_tokens=12, eos_id=3, pad_id=PAD, greedy=greedy, layout=layout)
    a = generate(pol, toks, lens, generator=torch.Generator().manual_seed(1), lean_decode=True, **kw)
    b = generate(pol, toks, lens, generator=torch.Generator().manual_seed(1), lean_decode=False, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.sample_logp, b.sample_logp)


def test_lean_decode_refuses_what_it_does_not_cover(policy):
    from carft_mega.rollout.kv_cache import lean_decode_unsupported

    toks, lens = left_pad([[5, 6, 7], [8]])
    policy.config.fp32_residual_connection = True  # a layer option the lean step does not implement
    try:
        assert "residual" in lean_decode_unsupported(policy)
        with pytest.raises(ValueError, match="needs Megatron's modules"):
            generate(policy, toks, lens, max_new_tokens=2, eos_id=NEVER, pad_id=PAD, greedy=True, lean_decode=True)
    finally:
        policy.config.fp32_residual_connection = False
    assert lean_decode_unsupported(policy) is None


def test_cuda_graph_request_on_cpu_decodes_eagerly(policy, greedy_refs):
    rows, eos, refs = greedy_refs[1]
    toks, lens = left_pad(rows)
    with pytest.warns(UserWarning, match="needs CUDA tensors"):
        out = generate(policy, toks, lens, max_new_tokens=MAX_NEW, eos_id=eos, pad_id=PAD, greedy=True,
                       decode="cuda_graph")
    assert out.generations() == refs


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_on_gpu():
    """On a GPU: tokens from replayed CUDA graphs equal eager decoding (greedy and sampled)."""
    from carft_mega.models.build import policy_from_hf_source
    from carft_mega.models.convert import HFSource
    from tests.models.mcore_helpers import model_cfg, tiny_arch, tiny_hf_model

    parallel.init_distributed(ParallelConfig(tp=1), seed=0)
    try:
        arch = tiny_arch("llama", vocab=VOCAB, hidden=64, heads=4, kv_heads=2, ffn=96)
        pol = policy_from_hf_source(HFSource.from_model(tiny_hf_model(arch, seed=4)), model_cfg()).eval()
        rows = prompts_of_lengths([12, 2, 33, 7, 1, 26, 9, 40], seed=9)
        toks, lens = (t.cuda() for t in left_pad(rows))
        for layout in ("left", "aligned"):
            free = generate(pol, toks, lens, max_new_tokens=MAX_NEW, eos_id=NEVER, pad_id=PAD, greedy=True,
                            layout=layout)
            eos = pick_eos(free.generations(), MAX_NEW)
            for greedy in (True, False):
                kw = dict(max_new_tokens=MAX_NEW, eos_id=eos, pad_id=PAD, greedy=greedy, layout=layout)
                a = generate(pol, toks, lens, generator=torch.Generator("cuda").manual_seed(3), **kw)
                b = generate(pol, toks, lens, generator=torch.Generator("cuda").manual_seed(3), decode="cuda_graph",
                             **kw)
                assert a.generations() == b.generations(), (layout, greedy)
    finally:
        parallel.destroy()


def test_model_is_untouched_after_generate(policy):
    """The cache's core-attention hooks are removed, also when generation fails."""
    cores = [layer.self_attention.core_attention for layer in policy.gpt.decoder.layers]
    toks, lens = left_pad([[3, 4, 5], [6]])
    generate(policy, toks, lens, max_new_tokens=3, eos_id=NEVER, pad_id=PAD, greedy=True)
    assert all("forward" not in c.__dict__ for c in cores)
    cache = KVCache(policy, 2, 8)
    with pytest.raises(RuntimeError, match="outside prefill/decode"):
        with cache.attached():
            policy.trunk(toks)
    assert all("forward" not in c.__dict__ for c in cores)


# ------------------------------------------------------------------------------------ pieces
def attention_ref(q, k, v, valid, scale):
    """Plain attention with the key/value heads repeated for their query groups (fp64)."""
    n, G, S, D = k.shape
    H = q.shape[2]
    kk = k.double().repeat_interleave(H // G, dim=1)  # (n, H, S, D)
    vv = v.double().repeat_interleave(H // G, dim=1)
    qq = q[0].double()  # (n, H, D)
    out = torch.empty(n, H, D, dtype=torch.float64)
    for b in range(n):
        for h in range(H):
            s = (kk[b, h] @ qq[b, h]) * scale  # (S,)
            if valid is not None:
                s = s.masked_fill(~valid[b], float("-inf"))
            out[b, h] = torch.softmax(s, 0) @ vv[b, h]
    return out.reshape(1, n, H * D)


@pytest.mark.parametrize("n,H,G,S,D", [(3, 4, 2, 7, 8), (1, 9, 3, 1, 64), (5, 6, 6, 13, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_reference(n, H, G, S, D, masked):
    g = torch.Generator().manual_seed(n * 100 + S)
    q = torch.randn(1, n, H, D, generator=g)
    buf = torch.randn(2, n + 2, G, S + 3, D, generator=g)  # strided views, as in the cache
    k, v = buf[0, :n, :, :S], buf[1, :n, :, :S]
    valid = None
    if masked:
        valid = torch.rand(n, S, generator=g) > 0.4
        valid[:, -1] = True  # the query's own slot
    got = decode_attention(q, k, v, valid, scale=D ** -0.5)
    want = attention_ref(q, k, v, valid, D ** -0.5)
    assert (got.double() - want).abs().max() <= 1e-5


def test_swap_remove_plan():
    assert swap_remove_plan(5, []) == (5, [], [])
    assert swap_remove_plan(5, [4]) == (4, [], [])
    assert swap_remove_plan(5, [0]) == (4, [0], [4])
    assert swap_remove_plan(6, [1, 4]) == (4, [1], [5])
    assert swap_remove_plan(3, [0, 1, 2]) == (0, [], [])
    for n in range(1, 7):
        for k in range(n + 1):
            for dead in itertools.combinations(range(n), k):
                new_n, holes, sources = swap_remove_plan(n, list(dead))
                rows = list(range(n))
                for h, s in zip(holes, sources):
                    rows[h] = rows[s]
                assert sorted(rows[:new_n]) == sorted(set(range(n)) - set(dead))


def brute_force_cost(lengths, cost):
    """Cheapest partition of the sorted rows into contiguous groups, by enumeration."""
    L = sorted(lengths)
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(L) - 1):
        total, start = 0, 0
        for i, c in enumerate(list(cuts) + [True]):
            if c:
                total += (i + 1 - start) * L[i] + cost
                start = i + 1
        best = min(best, total)
    return best


@pytest.mark.parametrize("lengths", [[5], [3, 3, 3], [1, 40, 2, 39, 20], [7, 1, 9, 30, 31, 2, 15, 16]])
@pytest.mark.parametrize("cost", [0, 5, 32, 10**6])
def test_prefill_buckets_are_optimal(lengths, cost):
    groups = plan_prefill_buckets(lengths, cost)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    total = sum(len(g) * max(lengths[r] for r in g) + cost for g in groups)
    assert total == brute_force_cost(lengths, cost)
    if cost >= 10**6:
        assert len(groups) == 1
    if cost == 0:
        assert len(groups) == len(set(lengths))
