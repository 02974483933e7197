"""Rewards: answer extraction, correctness, the terminal score, and the python sandbox."""

from .extract import extract_answer, extract_answers, parse_nl_answer, parse_number
from .sandbox import Sandbox, SandboxResult, default_sandbox, run_programs, set_default_sandbox
from .score import PARTIAL_MODES, REFT_PARTIAL, is_correct, score, score_batch

__all__ = [
    "PARTIAL_MODES", "REFT_PARTIAL", "Sandbox", "SandboxResult", "default_sandbox", "extract_answer",
    "extract_answers", "is_correct", "parse_nl_answer", "parse_number", "run_programs", "score", "score_batch",
    "set_default_sandbox",
]
