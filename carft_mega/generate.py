"""``python -m carft_mega.generate --model MODEL --question "..."``: a model's answers to questions.

The training prompt template (so a fine-tuned model sees what it was trained on), then decoding:
greedy by default; ``--temperature T`` samples, with ``--top-k`` / ``--top-p`` filters allowed here
(they are refused only for RL training, whose PPO ratio needs the unfiltered distribution)::

    python -m carft_mega.generate --model runs/carft_gsm8k/hf/carft --question "Tom has 3 apples and buys 4. How many?"
    python -m carft_mega.generate --model runs/carft_gsm8k --file questions.txt --temperature 0.7 --top-p 0.9
    torchrun --nproc_per_node 2 -m carft_mega.generate --model /models/Qwen2.5-1.5B --tp 2 --question "..."

Questions come from ``--question`` (repeatable) and ``--file`` (one per line, or JSONL with a
``question`` field). Prints, per question, the generation and the answer the reward would extract
(``--json``: one JSON object per line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from carft_mega import _inference


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m carft_mega.generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _inference.add_model_args(p)
    p.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    p.add_argument("--file", help="questions: one per line, or JSONL with a 'question' field")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print one JSON object per question")
    return p.parse_args(argv)


def read_questions(args) -> list[str]:
    qs = list(args.question)
    if args.file:
        with open(args.file) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                if line.startswith("{"):
                    qs.append(json.loads(line)["question"])
                else:
                    qs.append(line)
    return qs


def answer(ctx, policy, questions: list[str], *, temperature: float, top_k: int, top_p: float, seed: int):
    """``[(generation text, extracted answer)]``, batched by ``rollout.eval_batch_size``; collective."""
    import torch

    from carft_mega.data.collate import collate_prompts, encode_prompt
    from carft_mega.data.records import Record
    from carft_mega.rollout.generate import generate
    from carft_mega.trainer.evaluate import decode_generations, extract_answers_tp

    cfg = ctx.cfg
    recs = [Record(id=f"q{i}", question=q, cot=None, answer=0.0, answer_text="0", style=cfg.data.style)
            for i, q in enumerate(questions)]
    g = torch.Generator(device="cpu").manual_seed(seed)  # the same on every TP rank: the same tokens
    out = []
    bs = cfg.rollout.eval_batch_size
    for start in range(0, len(recs), bs):
        batch = recs[start:start + bs]
        prompts = collate_prompts([encode_prompt(r, ctx.tokenizer, cfg.data.max_prompt_tokens) for r in batch],
                                  ctx.tokenizer.pad_id)
        roll = generate(policy, prompts["tokens"].to(ctx.device), prompts["lengths"].to(ctx.device),
                        max_new_tokens=cfg.rollout.eval_max_new_tokens, eos_id=ctx.tokenizer.eos_id,
                        pad_id=ctx.tokenizer.pad_id, greedy=temperature == 0.0, temperature=temperature or 1.0,
                        top_k=top_k, top_p=top_p, generator=g)
        texts, to_extract = decode_generations(ctx, batch, roll.generations())
        out += list(zip(texts, extract_answers_tp(ctx, to_extract)))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        questions = read_questions(args)
    except (OSError, json.JSONDecodeError, KeyError) as e:
        print(f"error: --file {args.file}: {e}", file=sys.stderr)
        return 2
    if not questions:
        print("error: no questions: give --question TEXT (repeatable) or --file FILE", file=sys.stderr)
        return 2
    for flag, bad in (("--temperature", args.temperature < 0), ("--top-k", args.top_k < 0),
                      ("--top-p", not 0.0 < args.top_p <= 1.0)):
        if bad:
            print(f"error: {flag} = {getattr(args, flag[2:].replace('-', '_'))}: out of range", file=sys.stderr)
            return 2
    try:
        cfg = _inference.build_config(args, [])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from carft_mega.trainer.preflight import RunError

    ctx = None
    try:
        _, policy, ctx = _inference.open_model(cfg)
        results = answer(ctx, policy, questions, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=args.seed)
    except RunError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        _inference.close(ctx)
    if rank0:
        for q, (text, pred) in zip(questions, results):
            if args.json:
                print(json.dumps({"question": q, "generation": text, "answer": pred}), flush=True)
            else:
                print(f"Q: {q}\n{text}\n=> answer: {pred}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
