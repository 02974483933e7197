#!/usr/bin/env bash
# The quick start: SFT then CARFT on the embedded synthetic arithmetic task with a tiny model built
# in code and a character tokenizer. Offline, no downloads; a few minutes on a laptop CPU.
# Prints the test accuracy after SFT and after CARFT; curves in runs/quickstart/curves.png.
#
#   bash examples/quickstart.sh
#   bash examples/quickstart.sh contrastive.signal=none     # the same with ReFT
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}
# A fresh run each time (checkpoint.resume=none; an earlier run's checkpoints are moved, not
# deleted, to $OUT/checkpoints.replaced-<time>/); pass checkpoint.resume=auto to continue one.
exec ${PYTHON:-python} -m carft_mega.train --config examples/configs/quickstart.yaml out_dir="$OUT" \
  checkpoint.resume=none "$@"
