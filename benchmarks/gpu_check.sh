#!/usr/bin/env bash
# The prepared GPU check, for one device call of at most 10 minutes (the steps, budgets and files are in
# benchmarks/gpu_check.py, which this runs with the machine's python3). Here, once and before each call:
#
#   bash benchmarks/fetch_gpu_wheels.sh            # megatron-core cp312 wheel + gpt2 tokenizer -> .whl/
#   python benchmarks/gpu_check.py --print-command # the call to make, with this checkout's commit
#
# There (the device tool sets OUT; carry .whl):
#
#   CARFT_GIT_SHA=<sha> bash benchmarks/gpu_check.sh            # part 1: build, gpu tests, kernel benchmarks
#   CARFT_GIT_SHA=<sha> bash benchmarks/gpu_check.sh --part 2   # optional: trainer timings, MFU
#
# $OUT receives summary.txt (printed last) and gpu_check.tar.gz (all logs and CSVs), both rewritten
# after every step. `--dry-run` runs the same flow with fake steps (tests/test_gpu_check.py does, in CI).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
