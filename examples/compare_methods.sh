#!/usr/bin/env bash
# The paper's comparison on one budget: SFT, ReFT, CARFT (positive / negative / both, and without the
# embedding partial reward) and Dr.GRPO (G = 2), from one shared SFT checkpoint, over N seeds.
# Writes $OUT/results.csv, $OUT/results.md and $OUT/curves.png (see carft_mega/compare.py).
#
#   bash examples/compare_methods.sh                        # the embedded task, 3 seeds (~30 min, 2 CPU cores)
#   QUICK=1 bash examples/compare_methods.sh                # 1 seed, 3 RL steps: checks the harness in minutes
#   ABLATION=coef bash examples/compare_methods.sh          # contrastive.coef 5e-4 / 1e-3 / 1.5e-3 (paper Fig. 7)
#   ABLATION=partial bash examples/compare_methods.sh       # embedding partial reward on / off (Fig. 8)
#   CONFIG=examples/configs/carft_gsm8k.yaml MODEL=/models/Qwen2.5-1.5B TP=2 bash examples/compare_methods.sh
#
# SEEDS (default 3), OUT (default runs/compare), EVAL_EVERY (test accuracy every N RL steps: the
# curves' points; default the config's), CONFIG, MODEL (HF dir / GGUF; for configs with
# model.source=hf), DATA_DIR, NPROC and TP as in the other examples. Extra arguments are overrides for
# every run (e.g. ppo.max_steps=100). Re-running resumes: finished runs are skipped, interrupted
# ones continue from their last checkpoint.
source "$(dirname "$0")/_launch.sh"
CONFIG=${CONFIG:-examples/configs/quickstart.yaml}
OUT=${OUT:-runs/compare}
args=(--config "$CONFIG" --out "$OUT" --seeds "${SEEDS:-3}")
[ "${QUICK:-0}" = "1" ] && args+=(--quick)
[ -n "${ABLATION:-}" ] && args+=(--ablation "$ABLATION")
[ -n "${EVAL_EVERY:-}" ] && args+=(--eval-every "$EVAL_EVERY")
extra=(parallel.tp="${TP:-1}")
if [ -n "${MODEL:-}" ]; then
  extra+=(model.source=hf model.path="$MODEL")
fi
if [ -n "${DATA_DIR:-${CARFT_DATA_DIR:-}}" ]; then
  extra+=(data.data_dir="${DATA_DIR:-$CARFT_DATA_DIR}")
fi
if [ "$NPROC" -gt 1 ] || [ "$NGPU" -gt 0 ]; then
  args+=(--launcher "$PYTHON -m torch.distributed.run --standalone --nproc_per_node $NPROC -m carft_mega.train")
fi
exec $PYTHON -m carft_mega.compare "${args[@]}" "${extra[@]}" "$@"
