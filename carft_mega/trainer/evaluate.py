"""Greedy test accuracy with the reward's answer extraction; per-sample outputs as JSONL."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from carft_mega import parallel
from carft_mega.data.collate import collate_prompts, encode_prompt
from carft_mega.data.templates import program_from_generation
from carft_mega.reward.extract import extract_answers
from carft_mega.reward.score import is_correct
from carft_mega.rollout.generate import generate


def decode_generations(run, records, gens: list[list[int]]) -> tuple[list[str], list[str]]:
    """Decoded generated texts, and what the extractor reads (the full program for python)."""
    texts = [run.tokenizer.decode(g, skip_special_tokens=True) for g in gens]
    if run.cfg.data.style == "python":
        return texts, [program_from_generation(r, t) for r, t in zip(records, texts)]
    return texts, texts


@torch.no_grad()
def evaluate(run, policy, tag: str, path: str | None = None) -> float:
    """Greedy accuracy on ``run.test`` (sharded over DP); rank 0 writes ``eval/<tag>.jsonl``.

    Args:
        run: the ``Run`` (or anything with its ``cfg``, ``test``, ``tokenizer``, ``device``, ``sandbox``).
        policy: the unwrapped policy.
        tag: file name stem, e.g. ``sft_step40`` or ``carft_step10``.
        path: write the per-sample JSONL here instead of ``<out_dir>/eval/<tag>.jsonl``.

    Returns:
        Accuracy over the whole test set (identical on every rank).
    """
    cfg = run.cfg
    dp, r = parallel.dp_size(), parallel.dp_rank()
    mine = list(range(r, len(run.test), dp))
    rows = []
    bs = cfg.rollout.eval_batch_size
    # Every DP rank runs the same number of batches (TP collectives inside generation).
    n_batches = -(-max(1, -(-len(run.test) // dp)) // bs)
    for b in range(n_batches):
        idx = mine[b * bs:(b + 1) * bs] or mine[:1] or [0]
        recs = [run.test[i] for i in idx]
        prompts = collate_prompts([encode_prompt(x, run.tokenizer, cfg.data.max_prompt_tokens) for x in recs],
                                  run.tokenizer.pad_id)
        out = generate(policy, prompts["tokens"].to(run.device), prompts["lengths"].to(run.device),
                       max_new_tokens=cfg.rollout.eval_max_new_tokens, eos_id=run.tokenizer.eos_id,
                       pad_id=run.tokenizer.pad_id, greedy=True)
        if not mine[b * bs:(b + 1) * bs]:
            continue  # a padding batch that keeps the ranks in step
        texts, to_extract = decode_generations(run, recs, out.generations())
        preds = extract_answers_tp(run, to_extract)
        for i, rec, text, pred in zip(idx, recs, texts, preds):
            rows.append({"index": i, "id": rec.id, "question": rec.question, "gold": rec.answer,
                         "pred": pred, "correct": is_correct(pred, rec.answer, cfg.reward.tolerance),
                         "generation": text})
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows if parallel.tp_rank() == 0 else [])
    all_rows = sorted((x for part in gathered for x in part), key=lambda x: x["index"])
    acc = sum(x["correct"] for x in all_rows) / max(1, len(all_rows))
    if dist.get_rank() == 0:
        path = path or os.path.join(cfg.out_dir, "eval", f"{tag}.jsonl")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            for x in all_rows:
                f.write(json.dumps(x) + "\n")
        os.replace(path + ".tmp", path)
    return acc


def extract_answers_tp(run, to_extract: list[str]) -> list[float | None]:
    """``extract_answers`` with one answer per TP group: programs run once, on the group's first
    rank, and the answers are broadcast. Run on every TP rank, a program near its time limit (or
    one that reads the clock or draws unseeded random numbers) could score differently per rank,
    and the replicated parameters (CoT head, norms) would drift apart."""
    style = run.cfg.data.style
    if style != "python" or parallel.tp_size() == 1:
        return extract_answers(to_extract, style, run.sandbox)
    preds = extract_answers(to_extract, style, run.sandbox) if parallel.tp_rank() == 0 else None
    return parallel.broadcast_object(preds, parallel.tp_group())
