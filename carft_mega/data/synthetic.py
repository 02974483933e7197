"""The embedded default task: multi-step arithmetic word problems with a step-by-step CoT.

Short and regular on purpose, so that a 2-layer transformer with the character tokenizer learns it
in minutes on a CPU and the whole pipeline (SFT, rollouts, rewards, PPO, contrastive terms) runs
offline. Example (nl)::

    question: "Ann has 3 pens. She gets 4 more. She loses 2. How many pens does she have?"
    cot:      "3 + 4 = 7\\n7 - 2 = 5"            answer_text: "5"

python style uses the same question with a ReFT-style program as its CoT::

    def solution():
        \"\"\"Ann has 3 pens. She gets 4 more. She loses 2. How many pens does she have?\"\"\"
        pens = 3
        pens = pens + 4
        pens = pens - 2
        return pens

Every intermediate and final value stays in 0..max_value (99 by default). Train and test never share a question: a
question belongs to the test split iff crc32(question) % 10 == 0, and the two splits are also drawn
from different seeds (2*seed and 2*seed+1).
"""

from __future__ import annotations

import random
import zlib

from .records import Record, Style
from .templates import python_header

NAMES = (("Ann", "She"), ("Bob", "He"), ("Eve", "She"), ("Tom", "He"), ("Mia", "She"), ("Sam", "He"))
OBJECTS = ("pens", "apples", "cards", "coins", "books")
ADD_VERBS = ("gets {k} more", "buys {k} more", "finds {k} more")
SUB_VERBS = ("loses {k}", "gives away {k}", "sells {k}")
MAX_VALUE = 99
_TEST_BUCKETS = 10  # 1 in 10 questions belongs to the test split


def split_of(question: str) -> str:
    """``"test"`` or ``"train"``: a fixed partition of the question space (so splits are disjoint)."""
    return "test" if zlib.crc32(question.encode()) % _TEST_BUCKETS == 0 else "train"


def _problem(rng: random.Random, n_steps: int, max_value: int = MAX_VALUE
             ) -> tuple[str, list[tuple[int, str, int, int]], str, int]:
    """Draw one problem: (question, steps [(x, op, k, y)], object, answer); values in 0..max_value."""
    name, pron = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    cur = rng.randint(1, min(30, max_value))
    start = cur
    sentences = [f"{name} has {start} {obj}."]
    steps = []
    for _ in range(n_steps):
        # Subtract only when something is left; add only while the sum can stay <= MAX_VALUE.
        can_add, can_sub = cur < max_value, cur > 0
        op = "+" if (can_add and (not can_sub or rng.random() < 0.5)) else "-"
        if op == "+":
            k = rng.randint(1, min(20, max_value - cur))
            sentences.append(f"{pron} {rng.choice(ADD_VERBS).format(k=k)}.")
            new = cur + k
        else:
            k = rng.randint(1, min(20, cur))
            sentences.append(f"{pron} {rng.choice(SUB_VERBS).format(k=k)}.")
            new = cur - k
        steps.append((cur, op, k, new))
        cur = new
    sentences.append(f"How many {obj} does {pron.lower()} have?")
    return " ".join(sentences), steps, obj, cur


def _python_cot(question: str, obj: str, start: int, steps) -> str:
    lines = [f"    {obj} = {start}"] + [f"    {obj} = {obj} {op} {k}" for _, op, k, _ in steps]
    return python_header(question) + "\n".join(lines) + f"\n    return {obj}"


def make_synthetic(
    n: int,
    seed: int,
    min_steps: int = 1,
    max_steps: int = 3,
    *,
    style: Style = "nl",
    split: str | None = None,
    max_value: int = MAX_VALUE,
    annotation_noise: float = 0.0,
) -> list[Record]:
    """Generate ``n`` problems, deterministically from ``seed``.

    Args:
        n: number of records.
        seed: RNG seed; the same arguments always give the same records.
        min_steps: fewest arithmetic operations after the starting amount (>= 1).
        max_steps: most operations (>= min_steps).
        style: ``"nl"`` (CoT lines ``"x + k = y"``) or ``"python"`` (a ``solution()`` program).
        split: keep only questions of this split (``"train"``/``"test"``, see ``split_of``);
            None keeps all.
        max_value: every starting, intermediate and final value stays in 0..max_value (the
            difficulty knob: a tiny model learns max_value=20 in a few CPU minutes).
        annotation_noise: fraction of nl records whose annotated answer line is wrong (it repeats
            the starting amount, as if the steps were forgotten) while the CoT steps and the gold
            ``answer`` stay right. SFT imitates the annotations; RL learns from the reward, which
            checks the gold. This is the quick start's demonstration of what RL adds.

    Returns:
        ``n`` records with ids ``synthetic_<i>`` (``synthetic_<split>_<i>`` when split is given).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
    if style not in ("nl", "python"):
        raise ValueError(f"style must be 'nl' or 'python', got {style!r}")
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    if max_value < 2:
        raise ValueError(f"max_value must be >= 2, got {max_value}")
    if not 0.0 <= annotation_noise <= 1.0:
        raise ValueError(f"annotation_noise must be in [0, 1], got {annotation_noise}")
    rng = random.Random(seed)
    noise_rng = random.Random(seed + 7919)  # separate stream: noise 0 leaves the records unchanged
    prefix = "synthetic_" if split is None else f"synthetic_{split}_"
    out: list[Record] = []
    while len(out) < n:
        question, steps, obj, answer = _problem(rng, rng.randint(min_steps, max_steps), max_value)
        if split is not None and split_of(question) != split:
            continue
        if style == "nl":
            cot = "\n".join(f"{x} {op} {k} = {y}" for x, op, k, y in steps)
        else:
            cot = _python_cot(question, obj, steps[0][0], steps)
        annotated = None
        if style == "nl" and annotation_noise and noise_rng.random() < annotation_noise and steps[0][0] != answer:
            annotated = str(steps[0][0])
        out.append(Record(id=f"{prefix}{len(out)}", question=question, cot=cot, answer=float(answer),
                          answer_text=str(answer), style=style, annotated_answer=annotated))
    return out


def synthetic_split(split: str, n: int, seed: int = 0, min_steps: int = 1, max_steps: int = 3,
                    style: Style = "nl", max_value: int = MAX_VALUE, annotation_noise: float = 0.0) -> list[Record]:
    """The train or test split of the synthetic task: disjoint seeds and disjoint questions."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    split_seed = 2 * seed + (1 if split == "test" else 0)
    noise = annotation_noise if split == "train" else 0.0  # test records have no annotation to trust
    return make_synthetic(n, split_seed, min_steps, max_steps, style=style, split=split, max_value=max_value,
                          annotation_noise=noise)
