"""``python -m carft_mega.evaluate --model MODEL --dataset gsm8k|svamp``: greedy test accuracy.

The trainer's own evaluation (the same prompts, greedy decoding, the reward's answer extraction,
python-style programs in the sandbox), with one JSON line per test problem (question, gold,
extracted answer, correct, generation)::

    python -m carft_mega.evaluate --model runs/carft_gsm8k/hf/carft --dataset gsm8k
    python -m carft_mega.evaluate --model runs/carft_gsm8k                      # the run's latest checkpoint
    python -m carft_mega.evaluate --model SmolLM2-135M-Instruct.Q4_1.gguf --dataset svamp --limit 100
    torchrun --nproc_per_node 4 -m carft_mega.evaluate --model /models/Qwen2.5-1.5B --tp 2 --dataset gsm8k

``--model``: an HF directory, a GGUF file, a carft_mega checkpoint or a run directory. For a trainer
checkpoint the run's data and evaluation settings are the defaults (``--dataset`` may then be
omitted). Under torchrun the test set is split over data-parallel ranks (world / tp). Prints the
accuracy; exit 2 with one line for an error to fix.
"""

from __future__ import annotations

import argparse
import os
import sys

from carft_mega import _inference


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m carft_mega.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _inference.add_model_args(p)
    p.add_argument("--dataset", choices=["gsm8k", "svamp", "synthetic"],
                   help="test set (default: the run's, for a trainer checkpoint; else required)")
    p.add_argument("--data-dir", help="folder holding <dataset>/... files (default $CARFT_DATA_DIR)")
    p.add_argument("--test-path", help="an explicit test file (JSON / JSONL) instead of the dataset's")
    p.add_argument("--limit", type=int, help="the first N test problems only")
    p.add_argument("--out", help="per-sample JSONL (default eval_<dataset>.jsonl in the current directory)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    extra = []
    if args.dataset:
        extra.append(f"data.dataset={args.dataset}")
    if args.data_dir:
        extra.append(f"data.data_dir={args.data_dir}")
    if args.test_path:
        extra.append(f"data.test_path={args.test_path}")
    if args.limit:
        extra.append(f"data.eval_limit={args.limit}")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = _inference.build_config(args, extra)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    source, _, saved = _inference.resolve_model(args.model)
    if not args.dataset and not (source == "mcore" and saved):
        print("error: --dataset is required (gsm8k, svamp or synthetic) unless --model is a trainer checkpoint",
              file=sys.stderr)
        return 2
    from carft_mega.data.loaders import load_from_config
    from carft_mega.data.records import DataError
    from carft_mega.trainer.evaluate import evaluate
    from carft_mega.trainer.preflight import RunError

    out = args.out or f"eval_{cfg.data.dataset}.jsonl"
    ctx = None
    try:
        tokenizer, policy, ctx = _inference.open_model(cfg)
        try:
            ctx.test = load_from_config(cfg.data, "test")
        except (DataError, FileNotFoundError) as e:
            raise RunError(str(e).replace("config field 'data.test_path'", "--test-path")
                           .replace("data.data_dir", "--data-dir")) from None
        acc = evaluate(ctx, policy, tag="evaluate", path=out)
    except RunError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        _inference.close(ctx)
    if rank0:
        n = len(ctx.test)
        print(f"accuracy {acc:.4f} ({round(acc * n)}/{n}) on the {cfg.data.dataset} test set ({cfg.data.style}, "
              f"greedy, up to {cfg.rollout.eval_max_new_tokens} new tokens); per-sample outputs: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
