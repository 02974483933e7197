"""KV-cache generation on a tiny Megatron policy: greedy equals a no-cache loop on each row alone,
the two prompt layouts agree, sampling is reproducible, and the rollout batch's masks are right."""

import pytest
import torch

from carft_mega import parallel
from carft_mega.config import ModelConfig, ParallelConfig, TinyModelConfig
from carft_mega.rollout.generate import generate

VOCAB, EOS, PAD = 50, 1, 0


@pytest.fixture(scope="module")
def policy():
    parallel.init_distributed(ParallelConfig(tp=1), seed=0)
    from carft_mega.models.build import build_policy
    cfg = ModelConfig(source="tiny", tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4,
                                                          num_kv_heads=2, ffn_hidden_size=64))
    p = build_policy(cfg, vocab_size=VOCAB).eval()
    yield p
    parallel.destroy()


def left_pad(rows):
    P = max(len(r) for r in rows)
    toks = torch.full((len(rows), P), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        toks[i, P - len(r):] = torch.tensor(r)
    return toks, torch.tensor([len(r) for r in rows])


@torch.no_grad()
def naive_greedy(policy, row, max_new):
    """No cache, no padding: rerun the whole sequence each step."""
    seq = list(row)
    out = []
    for _ in range(max_new):
        hidden = policy.trunk(torch.tensor([seq]))
        nxt = int(policy.lm_logits(hidden[-1:], gather=True)[0, 0, :VOCAB].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt == EOS:
            break
    return out


def random_prompts(n, gen, lo=1, hi=9):
    return [torch.randint(2, VOCAB, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("layout", ["left", "aligned"])
def test_greedy_matches_naive_loop(policy, layout):
    gen = torch.Generator().manual_seed(1)
    rows = random_prompts(5, gen)
    toks, lens = left_pad(rows)
    out = generate(policy, toks, lens, max_new_tokens=7, eos_id=EOS, pad_id=PAD, greedy=True, layout=layout)
    for i, r in enumerate(rows):
        g = out.generations()[i]
        assert g == naive_greedy(policy, r, 7)
        assert out.tokens[i, : len(r)].tolist() == r
        assert (out.tokens[i, len(r) + len(g):] == PAD).all()  # left-aligned: padding only at the end


@pytest.mark.parametrize("layout", ["left", "aligned"])
def test_sampling_is_reproducible_by_seed(policy, layout):
    gen = torch.Generator().manual_seed(2)
    rows = random_prompts(6, gen)
    toks, lens = left_pad(rows)
    kw = dict(max_new_tokens=9, eos_id=EOS, pad_id=PAD, temperature=1.0, layout=layout)
    a = generate(policy, toks, lens, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(policy, toks, lens, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(policy, toks, lens, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.gen_lens, b.gen_lens)
    assert not torch.equal(a.tokens, c.tokens)


def test_rollout_masks_and_logp_agree_with_training_forward(policy):
    gen = torch.Generator().manual_seed(3)
    rows = random_prompts(4, gen)
    toks, lens = left_pad(rows)
    out = generate(policy, toks, lens, max_new_tokens=6, eos_id=EOS, pad_id=PAD,
                   generator=torch.Generator().manual_seed(0))
    span, act = out.gen_span(), out.action_mask()
    for i in range(4):
        p, g = int(out.prompt_lens[i]), int(out.gen_lens[i])
        assert span[i].nonzero().flatten().tolist() == list(range(p, p + g))
        assert act[i].nonzero().flatten().tolist() == list(range(p - 1, p + g - 1))
        assert out.finished[i] == (out.tokens[i, p + g - 1] == EOS)
        assert g == 6 or out.finished[i]
    # The training forward on the left-aligned rows recomputes the sampling log-probs.
    with torch.no_grad():
        logp = policy(out.tokens).logp
    torch.testing.assert_close(logp[act], out.sample_logp[act], atol=1e-4, rtol=1e-4)
    assert not out.sample_logp[~act].any()


def test_bad_prompts(policy):
    with pytest.raises(ValueError, match="at least one token"):
        generate(policy, torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 3]), max_new_tokens=2,
                 eos_id=EOS, pad_id=PAD)
