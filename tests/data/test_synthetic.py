"""The embedded synthetic task: determinism, disjoint splits, correct arithmetic (re-derived from the
question text), answers extracted from its own targets (nl) and own programs (python, in the
sandbox), and coverage by the character tokenizer."""

import re

import pytest

from carft_mega.data import (CharTokenizer, build_generation_prefix, build_prompt, build_target, load_dataset,
                             make_synthetic, program_from_generation, python_header)
from carft_mega.reward import Sandbox, extract_answers, parse_nl_answer

_START = re.compile(r"^([A-Z][a-z]+) has (\d+) ([a-z]+)\.$")
_ADD = re.compile(r"^(He|She) (?:gets|buys|finds) (\d+) more\.$")
_SUB = re.compile(r"^(He|She) (?:loses|gives away|sells) (\d+)\.$")


def _solve_question(q):
    """Independent solver: re-derive the operations and answer from the question text."""
    sentences = [s.strip() for s in re.findall(r"[^.?]+[.?]", q)]
    m = _START.match(sentences[0])
    assert m, q
    value, ops = int(m.group(2)), []
    for s in sentences[1:-1]:
        if (a := _ADD.match(s)):
            ops.append(("+", int(a.group(2))))
        elif (b := _SUB.match(s)):
            ops.append(("-", int(b.group(2))))
        else:
            raise AssertionError(f"unexpected sentence {s!r} in {q!r}")
    pronoun = sentences[1].split(" ")[0].lower()
    assert sentences[-1] == f"How many {m.group(3)} does {pronoun} have?", q
    return value, ops


@pytest.mark.parametrize("min_steps,max_steps", [(1, 3), (2, 2), (1, 1), (3, 5)])
def test_arithmetic_and_answers(min_steps, max_steps):
    recs = make_synthetic(300, seed=min_steps * 10 + max_steps, min_steps=min_steps, max_steps=max_steps)
    for r in recs:
        start, ops = _solve_question(r.question)
        assert min_steps <= len(ops) <= max_steps
        lines = r.cot.split("\n")
        assert len(lines) == len(ops)
        cur = start
        for line, (op, k) in zip(lines, ops):
            x, o, kk, eq, y = line.split(" ")
            assert (int(x), o, int(kk), eq) == (cur, op, k, "=")
            cur = cur + k if op == "+" else cur - k
            assert int(y) == cur and 0 <= cur <= 99
        assert r.answer == cur and r.answer_text == str(cur)
        assert parse_nl_answer(build_target(r)) == r.answer
        assert parse_nl_answer(build_prompt(r) + build_target(r)) == r.answer


def test_deterministic_by_seed_and_seed_matters():
    a = make_synthetic(50, seed=7)
    assert a == make_synthetic(50, seed=7)
    assert a != make_synthetic(50, seed=8)
    assert [r.question for r in a] == [r.question for r in make_synthetic(50, seed=7, style="python")]
    assert load_dataset("synthetic", "train", limit=30) == load_dataset("synthetic", "train", limit=30)


def test_train_test_disjoint():
    train = load_dataset("synthetic", "train")
    test = load_dataset("synthetic", "test")
    assert len(train) == 2000 and len(test) == 200
    assert not {r.question for r in train} & {r.question for r in test}
    other = load_dataset("synthetic", "test", seed=1, limit=50)
    assert not {r.question for r in train} & {r.question for r in other}
    assert len({r.id for r in train}) == len(train)


def test_char_tokenizer_covers_everything_and_lengths():
    tok = CharTokenizer()
    nl = make_synthetic(500, seed=1)
    py = make_synthetic(500, seed=1, style="python")
    for r in nl + py:
        text = build_prompt(r) + build_target(r)
        assert tok.decode(tok.encode(text)) == text  # raises on any unknown character
        assert tok.decode(tok.encode(build_generation_prefix(r))) == build_generation_prefix(r)
    assert max(len(build_prompt(r) + build_target(r)) for r in nl) <= 210
    assert max(len(build_prompt(r) + build_target(r)) for r in py) <= 400


def test_python_programs_run_to_the_answer():
    recs = make_synthetic(60, seed=11, style="python") + load_dataset("synthetic", "test", "python", limit=20)
    programs = []
    for r in recs:
        target = build_target(r)
        header = python_header(r.question)
        assert target.startswith(header)
        # the model continues the generation prefix, so its text is the target minus the header
        programs.append(program_from_generation(r, target[len(header):] + "\nQuestion: junk"))
    with Sandbox(workers=2, timeout=5) as sb:
        assert extract_answers(programs, "python", sandbox=sb) == [r.answer for r in recs]


def test_max_value_bounds_every_number():
    import re

    from carft_mega.data.synthetic import synthetic_split
    for r in synthetic_split("train", 300, seed=3, max_steps=3, max_value=12):
        nums = [int(x) for x in re.findall(r"\d+", r.question + " " + r.cot)]
        assert max(nums) <= 12 and min(nums) >= 0, r


def test_annotation_noise_corrupts_only_the_annotated_answer_line():
    from carft_mega.data.synthetic import synthetic_split
    from carft_mega.data.templates import ANSWER_TRIGGER, build_target
    clean = synthetic_split("train", 500, seed=5, max_steps=2)
    noisy = synthetic_split("train", 500, seed=5, max_steps=2, annotation_noise=0.5)
    corrupted = 0
    for c, n in zip(clean, noisy):
        # Same problems, CoT steps and gold answers: noise touches only the annotated answer line.
        assert (c.question, c.cot, c.answer, c.answer_text) == (n.question, n.cot, n.answer, n.answer_text)
        if n.annotated_answer is not None:
            corrupted += 1
            first = int(n.question.split(" has ")[1].split()[0])
            assert n.annotated_answer == str(first) and float(first) != n.answer
            assert build_target(n).endswith(ANSWER_TRIGGER + str(first))
        else:
            assert build_target(n) == build_target(c)
    assert 0.35 < corrupted / 500 < 0.55  # about half (a record whose start equals its answer stays clean)
    assert all(r.annotated_answer is None for r in synthetic_split("test", 200, seed=5, annotation_noise=1.0))
