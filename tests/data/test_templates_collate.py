"""ReFT templates (exact strings), tokenisation with limits and the two collators, against plain-loop
re-implementations on random records."""

import random

import pytest
import torch

from carft_mega.data import (ANSWER_TRIGGER, COT_TRIGGER, PROMPT_PREFIX, CharTokenizer, Record,
                             build_generation_prefix, build_prompt, build_target, collate_prompts, collate_sft,
                             encode_prompt, encode_sft, encode_sft_batch, make_synthetic, program_from_generation)

NL = Record(id="a", question="  Ann has 3 pens. How many? ", cot=" 3 + 0 = 3\n", answer=3.0, answer_text="3",
            style="nl")
PY = Record(id="b", question="Ann has 3 pens. How many?",
            cot='def solution():\n    """Ann has 3 pens. How many?"""\n    pens = 3\n    return pens\n',
            answer=3.0, answer_text="3", style="python")


def test_template_constants_are_reft():
    assert PROMPT_PREFIX == "Question:\n"
    assert COT_TRIGGER == "\nAnswer reasoning:\n"
    assert ANSWER_TRIGGER == "\nTherefore, the answer is: "


def test_exact_strings():
    assert build_prompt(NL) == "Question:\nAnn has 3 pens. How many?\nAnswer reasoning:\n"
    assert build_target(NL) == "3 + 0 = 3\nTherefore, the answer is: 3"
    assert build_generation_prefix(NL) == build_prompt(NL)
    assert build_prompt(PY) == "Question:\nAnn has 3 pens. How many?\nAnswer reasoning:\n"
    assert build_target(PY) == 'def solution():\n    """Ann has 3 pens. How many?"""\n    pens = 3\n    return pens'
    assert build_generation_prefix(PY) == ('Question:\nAnn has 3 pens. How many?\nAnswer reasoning:\n'
                                           'def solution():\n    """Ann has 3 pens. How many?"""\n')
    with pytest.raises(ValueError, match="no CoT"):
        build_target(Record("t", "q", None, 1.0, "1", "nl"))


def test_program_from_generation():
    header = 'def solution():\n    """Ann has 3 pens. How many?"""\n'
    gen = "    x = 3\n\n    y = x + 1\n    return y\nQuestion:\nsomething else\n    return 0"
    assert program_from_generation(PY, gen) == header + "    x = 3\n\n    y = x + 1\n    return y"
    assert program_from_generation(PY, "    return 1\n\n\n") == header + "    return 1"
    assert program_from_generation(PY, "") == header


# ------------------------------------------------------------------------------- reference tokenisation

def _ref_encode(text):
    """Character ids as CharTokenizer documents them: 0 pad, 1 eos, 2 unk, then '\\n' and printable ASCII."""
    alphabet = ["\n"] + [chr(c) for c in range(32, 127)]
    table = {}
    for i, ch in enumerate(alphabet):
        table[ch] = 3 + i
    return [table[ch] for ch in text]


def _ref_sft(rec, max_prompt, max_len):
    prompt = _ref_encode("Question:\n" + rec.question.strip() + "\nAnswer reasoning:\n")
    while len(prompt) > max_prompt:
        prompt = prompt[1:]
    if rec.style == "nl":
        target_text = rec.cot.strip() + "\nTherefore, the answer is: " + rec.answer_text
    else:
        target_text = rec.cot.strip()
    target = _ref_encode(target_text) + [1]
    while len(prompt) + len(target) > max_len:
        target = target[:-1]
    return prompt, target


def _ref_collate(pairs, pad):
    T = max(len(p) + len(t) for p, t in pairs)
    tokens, tmask, lmask, lengths = [], [], [], []
    for p, t in pairs:
        row = p + t + [pad] * (T - len(p) - len(t))
        m = [False] * len(p) + [True] * len(t) + [False] * (T - len(p) - len(t))
        tokens.append(row)
        tmask.append(m)
        lmask.append([m[j + 1] if j + 1 < T else False for j in range(T)])
        lengths.append(len(p) + len(t))
    return tokens, tmask, lmask, lengths


def _random_records(rng, n):
    recs = make_synthetic(n, seed=rng.randint(0, 10**6), style=rng.choice(["nl", "python"]))
    # plus odd ones: empty-ish CoT pieces, long questions, characters from the whole alphabet
    for i in range(n):
        q = "".join(rng.choice("abc xyz?.,$\n0123456789") for _ in range(rng.randint(1, 120)))
        cot = "".join(rng.choice("abc =+-*/0123456789\n") for _ in range(rng.randint(1, 40)))
        if not q.strip():
            q = "q" + q
        if not cot.strip():
            cot = "c"
        recs.append(Record(f"r{i}", q, cot, 1.0, str(rng.randint(0, 999)), "nl"))
    return recs


@pytest.mark.parametrize("max_prompt,max_len", [(300, 1024), (20, 60), (5, 6), (40, 41), (1, 2)])
def test_encode_and_collate_sft_vs_loop(max_prompt, max_len):
    rng = random.Random(max_prompt * 1000 + max_len)
    tok = CharTokenizer()
    recs = _random_records(rng, 12)
    rng.shuffle(recs)
    for start in range(0, len(recs), 5):
        batch = recs[start:start + 5]
        exs = [encode_sft(r, tok, max_prompt, max_len) for r in batch]
        pairs = [_ref_sft(r, max_prompt, max_len) for r in batch]
        for e, (p, t), r in zip(exs, pairs, batch):
            assert e.input_ids == p + t and e.prompt_len == len(p)
            full_prompt = len(_ref_encode("Question:\n" + r.question.strip() + "\nAnswer reasoning:\n"))
            assert e.prompt_truncated == (full_prompt > max_prompt)
            assert e.target_truncated == (len(t) < len(_ref_sft(r, 10**9, 10**9)[1]))
        out = collate_sft(exs, tok.pad_id)
        tokens, tmask, lmask, lengths = _ref_collate(pairs, tok.pad_id)
        assert out["tokens"].dtype == torch.long and out["tokens"].tolist() == tokens
        assert out["target_mask"].dtype == torch.bool and out["target_mask"].tolist() == tmask
        assert out["loss_mask"].dtype == torch.bool and out["loss_mask"].tolist() == lmask
        assert out["lengths"].tolist() == lengths
        assert out["prompt_lens"].tolist() == [len(p) for p, _ in pairs]


def test_truncation_edge_cases():
    tok = CharTokenizer()
    rec = NL
    prompt = build_prompt(rec)
    target = build_target(rec)
    # prompt longer than the limit keeps its last tokens, so the trigger survives
    e = encode_sft(rec, tok, 10, 1000)
    assert e.prompt_truncated and e.prompt_len == 10
    assert tok.decode(e.input_ids[:10]) == prompt[-10:] and prompt[-10:] in COT_TRIGGER
    assert e.input_ids[-1] == tok.eos_id and not e.target_truncated
    # target cut on the right: EOS lost, length exactly max_length
    e = encode_sft(rec, tok, len(prompt), len(prompt) + 5)
    assert e.target_truncated and len(e.input_ids) == len(prompt) + 5
    assert tok.eos_id not in e.input_ids and tok.decode(e.input_ids[e.prompt_len:]) == target[:5]
    # exactly fits: target + EOS
    e = encode_sft(rec, tok, len(prompt), len(prompt) + len(target) + 1)
    assert not e.target_truncated and e.input_ids[-1] == tok.eos_id
    # a single target token survives
    e = encode_sft(rec, tok, len(prompt), len(prompt) + 1)
    assert e.input_ids[e.prompt_len:] == tok.encode(target[0])
    batch = collate_sft([e], tok.pad_id)
    assert batch["target_mask"].sum() == 1 and batch["loss_mask"].sum() == 1
    assert batch["loss_mask"][0, e.prompt_len - 1] and not batch["loss_mask"][0, -1]
    # a one-character python target: target = that char + EOS
    tiny = Record("t", "q", "x", 0.0, "0", "python")
    e = encode_sft(tiny, tok, 50, 100)
    assert e.input_ids[e.prompt_len:] == tok.encode("x") + [tok.eos_id]
    with pytest.raises(ValueError, match="must exceed"):
        encode_sft(rec, tok, 10, 10)
    with pytest.raises(ValueError, match="empty batch"):
        collate_sft([], 0)


def test_encode_sft_batch_logs_truncation(caplog):
    tok = CharTokenizer()
    recs = make_synthetic(6, seed=3)
    with caplog.at_level("WARNING", logger="carft_mega.data.collate"):
        exs = encode_sft_batch(recs, tok, 15, 40)
    assert len(exs) == 6
    assert any("6 of 6 prompts cut" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("max_prompt", [1, 7, 64, 1000])
def test_encode_and_collate_prompts_vs_loop(max_prompt):
    rng = random.Random(max_prompt)
    tok = CharTokenizer()
    recs = _random_records(rng, 4) + make_synthetic(3, seed=1, style="python")
    prompts = [encode_prompt(r, tok, max_prompt) for r in recs]
    for r, p in zip(recs, prompts):
        ref = _ref_encode(build_generation_prefix(r))
        assert p == ref[max(0, len(ref) - max_prompt):]
    prompts.append([])  # a zero-length row is allowed: all padding
    out = collate_prompts(prompts, pad_id=tok.pad_id)
    P = max(len(p) for p in prompts)
    for b, p in enumerate(prompts):
        assert out["tokens"][b].tolist() == [tok.pad_id] * (P - len(p)) + p
        assert out["lengths"][b].item() == len(p)
    assert out["tokens"].shape == (len(prompts), P) and out["tokens"].dtype == torch.long
    assert out["lengths"].dtype == torch.long


@pytest.mark.parametrize("n,size", [(0, 4), (1, 4), (7, 3), (16, 4), (5, 8)])
def test_micro_batches_group_by_length(n, size):
    from carft_mega.data.collate import micro_batches, padding_share

    g = torch.Generator().manual_seed(n * 10 + size)
    lengths = torch.randint(1, 50, (n,), generator=g)
    groups = micro_batches(lengths, size)
    assert sorted(torch.cat(groups).tolist() if groups else []) == list(range(n))
    assert all(len(x) == size for x in groups[:-1])
    flat = [int(lengths[i]) for grp in groups for i in grp]
    assert flat == sorted(lengths.tolist(), reverse=True)
    # Padding share against a loop: rows cut to their micro-batch's longest row.
    total = sum(len(grp) * max(int(lengths[i]) for i in grp) for grp in groups)
    expect = 1.0 - int(lengths.sum()) / max(1, total)
    assert padding_share(lengths, size) == pytest.approx(expect)
    # Never more padding than fixed-order chunks of the same size.
    fixed = sum(len(lengths[s:s + size]) * int(lengths[s:s + size].max()) for s in range(0, n, size))
    assert total <= fixed
