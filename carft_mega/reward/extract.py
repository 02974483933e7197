"""Answer extraction (DESIGN.md Sec. 5): ReFT's rule, made robust to how models write numbers.

nl: the text after the last ``"Therefore, the answer is:"`` (ReFT splits on
``"\\nTherefore, the answer is: "``; we also accept the trigger without its leading newline, e.g. at
the very start of a generation), first line only. ReFT then calls ``float()``, so ``"1,000"`` or
``"$18"`` scored None (authors_code.md Sec. 6); we strip ``$``, a trailing period, enclosing
``<...>``, spaces after a sign or around ``$``, a comma or space between digits before a group of
three (``"1,000"``, ``"1 000"``; but ``"3 4"`` stays two numbers), and accept a unicode minus. What is
left must be a plain decimal number (no units, no exponent, no nan/inf), else None. Without a trigger
the result is None.

python: the text is a full program (``templates.program_from_generation``); its ``solution()`` runs
in the sandbox and a finite numeric return value is the answer.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..data.templates import ANSWER_TRIGGER
from .sandbox import Sandbox, default_sandbox

_TRIGGER = ANSWER_TRIGGER.strip()  # "Therefore, the answer is:"
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"(?<=\d)(?:,|\s)(?=\d{3}(?!\d))")
_SIGN_SPACE = re.compile(r"(?<=[+\-$])\s+|\s+(?=\$)")  # "- 5", "$ 18", "- $5"


def parse_number(text: str) -> float | None:
    """Parse one answer string such as ``" $1,234.50."``, ``"<203>"``, ``"-7"``; None if not a number."""
    s = text.strip().replace("\u2212", "-")
    for _ in range(2):  # "<203>." and ".<203>" orders
        s = s.strip()
        if s.endswith("."):
            s = s[:-1]
        s = s.strip()
        if s.startswith("<") and s.endswith(">"):
            s = s[1:-1]
    s = _SIGN_SPACE.sub("", s).replace("$", "")
    s = _THOUSANDS.sub("", s)
    if not _NUMBER.fullmatch(s):
        return None
    return float(s)


def parse_nl_answer(text: str) -> float | None:
    """The number after the last answer trigger of a natural-language generation, or None."""
    pos = text.rfind(_TRIGGER)
    if pos < 0:
        return None
    rest = text[pos + len(_TRIGGER):].strip()
    return parse_number(rest.split("\n", 1)[0]) if rest else None


def extract_answer(text: str, style: str, sandbox: Sandbox | None = None,
                   timeout: float | None = None) -> float | None:
    """The predicted answer of one generation.

    Args:
        text: nl: the generated text (the prompt may be included). python: the full program.
        style: ``"nl"`` or ``"python"``.
        sandbox: pool for python programs (default: the shared pool, ``sandbox.default_sandbox()``).
        timeout: wall-clock seconds for a python program (default: the pool's).
    """
    return extract_answers([text], style, sandbox, timeout)[0]


def extract_answers(texts: Sequence[str], style: str, sandbox: Sandbox | None = None,
                    timeout: float | None = None) -> list[float | None]:
    """``extract_answer`` over a batch; python programs run in parallel across the pool's workers."""
    if style == "nl":
        return [parse_nl_answer(t) for t in texts]
    if style == "python":
        if not texts:
            return []
        return (sandbox or default_sandbox()).run_programs(list(texts), timeout)
    raise ValueError(f"style must be 'nl' or 'python', got {style!r}")
