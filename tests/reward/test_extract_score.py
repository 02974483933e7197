"""Answer extraction edge cases (expected values written by hand) and the score in every partial mode,
batched against the scalar version."""

import math
import random

import pytest
import torch

from carft_mega.reward import (PARTIAL_MODES, extract_answer, extract_answers, is_correct, parse_nl_answer,
                               parse_number, score, score_batch)

T = "\nTherefore, the answer is: "


@pytest.mark.parametrize("text,expected", [
    ("2 + 3 = 5" + T + "5", 5.0),
    (T + "1,000", 1000.0),
    (T + "1,234,567.25", 1234567.25),
    (T + "$18", 18.0),
    (T + "$18.00.", 18.0),
    (T + "-$5", -5.0),
    (T + "$-5", -5.0),
    (T + "- 5", -5.0),
    (T + "\u22127", -7.0),
    (T + "+4", 4.0),
    (T + "  42  ", 42.0),
    (T + "42.", 42.0),
    (T + "3.5", 3.5),
    (T + ".5", 0.5),
    (T + "5.", 5.0),
    (T + "<203>", 203.0),
    (T + "<203>.", 203.0),
    (T + "<1,000>", 1000.0),
    (T + "0", 0.0),
    (T + "007", 7.0),
    (T + "3\nQuestion: next problem 9", 3.0),
    (T + "\n12", 12.0),  # the answer on the next line
    (T + "1" + T + "2", 2.0),  # the last trigger wins
    ("Therefore, the answer is: 8", 8.0),  # trigger at the very start (no leading newline)
    ("Question:\nq\nAnswer reasoning:\nx" + T + "6", 6.0),
    # None: nothing numeric, or more than a number
    ("no trigger here 5", None),
    ("", None),
    (T, None),
    (T + "   ", None),
    (T + "five", None),
    (T + "5 pens", None),
    (T + "5 or 6", None),
    (T + "1,2", None),  # not a thousands separator
    (T + "3 4", None),  # two numbers, not 34
    (T + "1 2345", None),
    (T + "1 000", 1000.0),  # a space as thousands separator
    (T + "12 345.5", 12345.5),
    (T + "$ 18", 18.0),
    (T + "12,34", None),
    (T + "1e3", None),
    (T + "nan", None),
    (T + "inf", None),
    (T + "3/4", None),
    (T + "$", None),
    (T + "-", None),
    (T + ".", None),
    (T + "<>", None),
    (T + "1.2.3", None),
    ("Therefore, the answer is 5", None),  # ReFT's trigger has a colon
])
def test_nl_extraction(text, expected):
    got = parse_nl_answer(text)
    assert got == expected
    assert extract_answer(text, "nl") == expected


def test_parse_number_bare():
    assert parse_number(" 12 ") == 12.0 and parse_number("x") is None


def test_extract_answers_batch_nl_and_bad_style():
    texts = [T + "1", "nothing", T + "2.5"]
    assert extract_answers(texts, "nl") == [1.0, None, 2.5]
    with pytest.raises(ValueError, match="style"):
        extract_answer("x", "latex")


def test_is_correct():
    assert is_correct(5.0, 5.0) and is_correct(5.01, 5.0) and is_correct(4.995, 5.0)
    assert not is_correct(5.011, 5.0) and not is_correct(None, 5.0) and not is_correct(float("nan"), 5.0)
    assert not is_correct(float("inf"), 5.0)
    assert is_correct(5.4, 5.0, tol=0.5) and not is_correct(5.6, 5.0, tol=0.5)


def _ref_score(pred, gold, partial, pv, tol):
    if pred is not None and abs(pred - gold) <= tol:
        return 1.0
    if pred is None:
        return 0.0
    return {"none": 0.0, "reft": 0.1, "embedding": pv}[partial]


def test_score_scalar_all_modes():
    assert score(3.0, 3.0, partial="none") == 1.0
    assert score(3.0, 3.0, partial="embedding", partial_value=0.25) == 1.0
    assert score(4.0, 3.0, partial="none") == 0.0
    assert score(4.0, 3.0, partial="reft") == pytest.approx(0.1)
    assert score(4.0, 3.0, partial="embedding", partial_value=0.27) == pytest.approx(0.27)
    for mode in PARTIAL_MODES:
        assert score(None, 3.0, partial=mode, partial_value=0.3) == 0.0
    with pytest.raises(ValueError, match="partial_value"):
        score(4.0, 3.0, partial="embedding")
    with pytest.raises(ValueError, match="partial must be"):
        score(4.0, 3.0, partial="cosine")


@pytest.mark.parametrize("mode", PARTIAL_MODES)
@pytest.mark.parametrize("B", [1, 7, 64])
def test_score_batch_vs_loop(mode, B):
    rng = random.Random(B)
    golds = [float(rng.randint(0, 20)) for _ in range(B)]
    preds = [rng.choice([None, g, g + 0.005, g + 1.0, -g, float("nan")]) for g in golds]
    cos = torch.rand(B) * 2 - 1
    pv = 0.1 * cos + 0.2  # what partial_reward_embedding returns for this cosine
    out = score_batch(preds, torch.tensor(golds), partial=mode, partial_value=pv if mode == "embedding" else None)
    assert out.dtype == torch.float32 and out.shape == (B,)
    ref = [_ref_score(None if (p is not None and math.isnan(p)) else p, g, mode, pv[i].item(), 1e-2)
           for i, (p, g) in enumerate(zip(preds, golds))]
    assert torch.allclose(out, torch.tensor(ref, dtype=torch.float32))
    scal = [score(p, g, partial=mode, partial_value=pv[i].item()) for i, (p, g) in enumerate(zip(preds, golds))]
    assert torch.allclose(out, torch.tensor(scal, dtype=torch.float32))


def test_score_batch_errors():
    with pytest.raises(ValueError, match="length"):
        score_batch([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="partial_value"):
        score_batch([1.0], [2.0], partial="embedding")
    with pytest.raises(ValueError, match="entries"):
        score_batch([1.0], [2.0], partial="embedding", partial_value=torch.zeros(2))


def reft_nl_answer(generation: str):
    """ReFT's nl extraction, transcribed (lqtrung1998/mwp_ReFT @ bdc844e): train_rl_reft.py:295
    ``text.strip().split(cot_trigger)[-1].strip()`` (the generation), then :66
    ``floatify(res.split(answer_trigger)[-1].strip())`` with answer_trigger
    ``'\\nTherefore, the answer is: '`` (:51) and src/utils.py:39-43 ``floatify`` = ``float(s)``, None
    on any exception."""
    res = generation.strip()
    try:
        return float(res.split("\nTherefore, the answer is: ")[-1].strip())
    except Exception:
        return None


_SAME = "same"


C = "4 + 1 = 5" + T  # a CoT line, then the trigger (ReFT strips the generation first)


@pytest.mark.parametrize("generation,ours,reft", [
    # Where both agree.
    (C + "5", _SAME, _SAME),
    (C + "  42  ", _SAME, _SAME),
    (C + "42.", _SAME, _SAME),
    (C + "-7", _SAME, _SAME),
    (C + "five", _SAME, _SAME),
    (C + "5 pens", _SAME, _SAME),
    # ReFT's float() accepts what ours refuses (docs/deviations.md, answer extraction).
    (C + "1e3", None, 1000.0),
    (C + "1_000", None, 1000.0),
    (C + "nan", None, "nan"),      # ReFT: extracted but never correct, so it earns the 0.1 partial
    (C + "inf", None, math.inf),
    (C + "-Infinity", None, -math.inf),
    ("42", None, 42.0),            # a bare number and no trigger: ReFT reads the whole generation
    ("  17 \n", None, 17.0),
    # Ours is more lenient.
    (C + "1,000", 1000.0, None),
    (C + "$18", 18.0, None),
    (C + "<203>", 203.0, None),
    (C + "- 5", -5.0, None),
    (C + "\u22127", -7.0, None),
    (C + "1 000", 1000.0, None),
    (C + "3\nQuestion: next problem 9", 3.0, None),  # ours: first line after the trigger
    ("Therefore, the answer is: 8", 8.0, None),      # trigger without its leading newline
    (T + "8", 8.0, None),  # ... which ReFT's strip() of the generation removes when it comes first
])
def test_differences_from_reft_extraction(generation, ours, reft):
    """Every listed difference from ReFT's extraction holds, and nothing else differs on these."""
    got_ours, got_reft = parse_nl_answer(generation), reft_nl_answer(generation)
    if ours == _SAME:
        assert got_ours == got_reft
        return
    assert got_ours == ours
    if reft == "nan":
        assert got_reft is not None and math.isnan(got_reft)
    else:
        assert got_reft == reft


def test_reft_and_ours_agree_on_real_annotations():
    """On the answer lines of real annotated targets (what SFT teaches), both read the same number."""
    import os

    from carft_mega.data.loaders import load_dataset
    from carft_mega.data.templates import build_target

    data_dir = os.environ.get("CARFT_DATA_DIR")
    if not data_dir:
        pytest.fail("set CARFT_DATA_DIR to the data folder (CI: ../shared/data)")
    for name in ("gsm8k", "svamp"):
        recs = load_dataset(name, "train", data_dir=data_dir, style="nl")[:500]
        for r in recs:
            text = build_target(r)
            assert parse_nl_answer(text) == reft_nl_answer(text) == pytest.approx(r.answer), (name, r.id, text[-60:])
