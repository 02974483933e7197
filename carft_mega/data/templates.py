"""ReFT's prompt and target templates, byte for byte (lqtrung1998/mwp_ReFT ``train_sft_model.py``
and ``train_rl_reft.py``; see ../shared/notes/authors_code.md Sec. 6). No BOS and no chat template
are added, as in ReFT, even for instruction-tuned checkpoints. EOS is appended by the tokeniser
step (``collate.encode_sft``), never here.

    prompt            = "Question:\\n" + question.strip() + "\\nAnswer reasoning:\\n"
    nl target         = cot.strip() + "\\nTherefore, the answer is: " + answer_text
    python target     = cot.strip()        (the cot already starts with the solution() header)
    python gen prefix = prompt + 'def solution():\\n    \"\"\"' + question + '\"\"\"\\n'
"""

from __future__ import annotations

from .records import Record

PROMPT_PREFIX = "Question:\n"
COT_TRIGGER = "\nAnswer reasoning:\n"
ANSWER_TRIGGER = "\nTherefore, the answer is: "


def python_header(question: str) -> str:
    """The ``def solution():`` line and docstring that open every ReFT python_sdp program."""
    return 'def solution():\n    """' + question + '"""\n'


def build_prompt(rec: Record) -> str:
    """The SFT prompt (and the nl generation prefix)."""
    return PROMPT_PREFIX + rec.question.strip() + COT_TRIGGER


def build_target(rec: Record) -> str:
    """The SFT target without EOS: the CoT, then for nl the answer line.

    Raises:
        ValueError: the record has no CoT (test sets).
    """
    if rec.cot is None:
        raise ValueError(f"record {rec.id!r} has no CoT (a test-set record cannot be an SFT target)")
    if rec.style == "nl":
        annotated = rec.annotated_answer if rec.annotated_answer is not None else rec.answer_text
        return rec.cot.strip() + ANSWER_TRIGGER + annotated
    if rec.style == "python":
        return rec.cot.strip()
    raise ValueError(f"record {rec.id!r}: unknown style {rec.style!r}")


def build_generation_prefix(rec: Record) -> str:
    """The text the policy continues during rollouts and evaluation.

    nl: the prompt. python: the prompt followed by the ``def solution():`` header with the question
    as its docstring, so the model writes only the function body (ReFT's RL and eval prefix).
    """
    if rec.style == "python":
        return build_prompt(rec) + python_header(rec.question)
    return build_prompt(rec)


def program_from_generation(rec: Record, generated_text: str) -> str:
    """The full program to run for a python-style generation.

    Args:
        rec: the record whose generation prefix was continued.
        generated_text: the decoded generated tokens only (no prompt, special tokens skipped).

    Returns:
        ``python_header(rec.question) + body``. The body ends where the function does: at the first
        non-blank line that is not indented (a new top-level statement, e.g. a model that goes on
        to write another question). Blank lines inside the body are kept; ReFT cut the program at
        its first blank line, which truncated valid programs (authors_code.md Sec. 9, item 16).
    """
    kept = []
    for line in generated_text.split("\n"):
        if line.strip() and not line[0].isspace():
            break
        kept.append(line)
    return python_header(rec.question) + "\n".join(kept).rstrip()
