"""The one record type every loader normalises to, and the error raised for malformed input."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Style = Literal["nl", "python"]
STYLES: tuple[str, ...] = ("nl", "python")


class DataError(ValueError):
    """A malformed data file or row. The message names the file and the row (line or index)."""


@dataclass(frozen=True)
class Record:
    """One math word problem.

    Attributes:
        id: unique within its split (ReFT ``item_id`` when the file has one).
        question: the problem text, as stored in the file.
        cot: the annotated chain of thought (natural language, or for ``python`` style ReFT's
            ``def solution():`` program including its docstring header); None for test sets.
        answer: the gold value as a float.
        answer_text: the gold value as a clean string (commas removed), e.g. ``"203.0"``. The nl
            target ends with it.
        style: ``"nl"`` or ``"python"``.
        annotated_answer: the answer line the *annotation* gives, when it differs from the gold
            (only the synthetic task's ``annotation_noise`` sets it); None = ``answer_text``.
    """

    id: str
    question: str
    cot: str | None
    answer: float
    answer_text: str
    style: Style
    annotated_answer: str | None = None


def parse_answer_value(raw: object) -> tuple[float, str]:
    """Parse a gold answer (ReFT ``answer_value`` or GSM8K ``#### N``) into (value, clean text).

    Commas and surrounding whitespace are removed (ReFT does the same to the target). Ints and
    floats are accepted as well as strings; bools, NaN, inf and non-numeric text are rejected.

    Raises:
        ValueError: with a short reason (the caller adds the file and row).
    """
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError(f"answer must be a string or a number, got {type(raw).__name__}")
    text = str(raw).replace(",", "").strip()
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"answer {raw!r} is not numeric") from None
    if not math.isfinite(value):
        raise ValueError(f"answer {raw!r} is not finite")
    return value, text
