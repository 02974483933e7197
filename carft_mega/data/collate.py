"""Tokenisation with explicit limits, and the two collators (SFT and rollout prompts).

Conventions (used by the model, rollout and trainer code; keep them in sync):
    * prompt and target are tokenised separately and concatenated:
      ``input_ids = enc(prompt) + enc(target) + [eos]`` (ReFT; authors_code.md Sec. 6).
    * a prompt longer than ``max_prompt_tokens`` keeps its *last* tokens, so the trigger
      ``"\\nAnswer reasoning:\\n"`` that the model continues from survives;
      the target is cut on the right to fit ``max_length`` (the EOS is then lost).
    * SFT batches are right-padded; ``target_mask`` is token-aligned (token t is a target token,
      EOS included) and ``loss_mask`` is state-aligned (position t predicts token t+1, so
      ``loss_mask[:, t] = target_mask[:, t + 1]`` and the last column is False).
    * rollout prompt batches are left-padded so that generation appends at the same column.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from .records import Record
from .templates import build_generation_prefix, build_prompt, build_target
from .tokenizers import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTExample:
    """One tokenised SFT sequence.

    Attributes:
        input_ids: prompt ids, then target ids, then EOS (unless the target was cut).
        prompt_len: number of prompt ids at the start of ``input_ids``.
        prompt_truncated: the prompt lost tokens on the left to fit ``max_prompt_tokens``.
        target_truncated: the target (and its EOS) lost tokens on the right to fit ``max_length``.
    """

    input_ids: list[int]
    prompt_len: int
    prompt_truncated: bool = False
    target_truncated: bool = False


def _check_limits(max_prompt_tokens: int, max_length: int | None = None) -> None:
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if max_length is not None and max_length <= max_prompt_tokens:
        raise ValueError(f"max_length ({max_length}) must exceed max_prompt_tokens ({max_prompt_tokens}) "
                         "so that every target keeps at least one token")


def encode_sft(rec: Record, tok: Tokenizer, max_prompt_tokens: int, max_length: int) -> SFTExample:
    """Tokenise one record for SFT: ``enc(prompt)[-max_prompt_tokens:] + (enc(target) + [eos])[:room]``.

    Args:
        rec: a record with a CoT.
        tok: the tokenizer (``encode`` adds no special tokens).
        max_prompt_tokens: longest prompt kept (from the right).
        max_length: longest full sequence; ``room = max_length - prompt_len`` target tokens fit.

    Returns:
        The example; its ``prompt_truncated`` / ``target_truncated`` flags let callers count cuts.
    """
    _check_limits(max_prompt_tokens, max_length)
    prompt = tok.encode(build_prompt(rec))
    prompt_truncated = len(prompt) > max_prompt_tokens
    if prompt_truncated:
        prompt = prompt[-max_prompt_tokens:]
    target = tok.encode(build_target(rec)) + [tok.eos_id]
    room = max_length - len(prompt)
    target_truncated = len(target) > room
    if target_truncated:
        target = target[:room]
    return SFTExample(prompt + target, len(prompt), prompt_truncated, target_truncated)


def encode_sft_batch(records: Sequence[Record], tok: Tokenizer, max_prompt_tokens: int,
                     max_length: int) -> list[SFTExample]:
    """``encode_sft`` over a dataset; logs one line with the number of truncated prompts/targets."""
    examples = [encode_sft(r, tok, max_prompt_tokens, max_length) for r in records]
    n_p = sum(e.prompt_truncated for e in examples)
    n_t = sum(e.target_truncated for e in examples)
    if n_p or n_t:
        logger.warning("SFT tokenisation: %d of %d prompts cut to their last %d tokens, %d targets cut "
                       "to fit max_length=%d (their EOS is lost)", n_p, len(examples), max_prompt_tokens,
                       n_t, max_length)
    return examples


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad SFT examples into a batch.

    Args:
        examples: B tokenised examples.
        pad_id: id written into padding positions (they are masked everywhere).

    Returns:
        dict with
            ``tokens``       ``[B, T]`` long, left-aligned, right-padded (T = longest example);
            ``target_mask``  ``[B, T]`` bool, token-aligned: token t is a target token (EOS incl.);
            ``loss_mask``    ``[B, T]`` bool, state-aligned: ``loss_mask[:, t] = target_mask[:, t+1]``,
                             last column False (the logits at t predict token t+1);
            ``lengths``      ``[B]`` long, tokens per row before padding;
            ``prompt_lens``  ``[B]`` long, prompt tokens per row.
    """
    if not examples:
        raise ValueError("collate_sft: empty batch")
    B = len(examples)
    T = max(len(e.input_ids) for e in examples)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    target_mask = torch.zeros((B, T), dtype=torch.bool)
    lengths = torch.empty(B, dtype=torch.long)
    prompt_lens = torch.empty(B, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        tokens[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        target_mask[b, e.prompt_len:n] = True
        lengths[b] = n
        prompt_lens[b] = e.prompt_len
    loss_mask = torch.zeros_like(target_mask)
    loss_mask[:, :-1] = target_mask[:, 1:]
    return {"tokens": tokens, "target_mask": target_mask, "loss_mask": loss_mask, "lengths": lengths,
            "prompt_lens": prompt_lens}


def encode_prompt(rec: Record, tok: Tokenizer, max_prompt_tokens: int) -> list[int]:
    """Token ids of the generation prefix (``templates.build_generation_prefix``), cut to its last
    ``max_prompt_tokens`` tokens."""
    _check_limits(max_prompt_tokens)
    ids = tok.encode(build_generation_prefix(rec))
    return ids[-max_prompt_tokens:]


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad rollout prompts.

    Args:
        prompts: B lists of token ids.
        pad_id: id written into padding positions.

    Returns:
        dict with ``tokens`` ``[B, P]`` long, each row right-aligned (left-padded, P = longest prompt),
        and ``lengths`` ``[B]`` long (real tokens per row; row b's tokens are
        ``tokens[b, P - lengths[b]:]``).
    """
    if not prompts:
        raise ValueError("collate_prompts: empty batch")
    B = len(prompts)
    P = max(len(p) for p in prompts)
    tokens = torch.full((B, P), pad_id, dtype=torch.long)
    lengths = torch.empty(B, dtype=torch.long)
    for b, p in enumerate(prompts):
        n = len(p)
        if n:
            tokens[b, P - n:] = torch.tensor(list(p), dtype=torch.long)
        lengths[b] = n
    return {"tokens": tokens, "lengths": lengths}


def micro_batches(lengths: torch.Tensor | Sequence[int], size: int) -> list[torch.Tensor]:
    """Row indices in micro-batches of ``size``, longest rows first: rows of similar length share a
    micro-batch, so little is spent on padding. The trainer's losses are shares of global sums, so
    the grouping changes nothing but the summation order.

    Args:
        lengths: ``(n,)`` tokens per row (host).
        size: rows per micro-batch.

    Returns:
        ``ceil(n / size)`` int64 index tensors (CPU), together a permutation of ``range(n)``.
    """
    order = torch.argsort(torch.as_tensor(lengths).cpu(), descending=True, stable=True)
    return [order[s:s + size] for s in range(0, len(order), size)]


def padding_share(lengths: torch.Tensor | Sequence[int], size: int) -> float:
    """Share of padded positions when the rows run in :func:`micro_batches`, each cut to its
    longest row (0 = no padding)."""
    lengths = torch.as_tensor(lengths).cpu()
    total = sum(len(rows) * int(lengths[rows].max()) for rows in micro_batches(lengths, size))
    return 1.0 - float(lengths.sum()) / max(1, total)
