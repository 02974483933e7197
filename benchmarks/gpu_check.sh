#!/usr/bin/env bash
# Every check that needs a GPU, in one prepared run sized for a short device lease (~8 minutes on an
# H100/H200): build the extension with its CUDA part, run the `gpu`-marked tests, the three kernel
# benchmarks, and the quick start on the GPU (every trainer stage on the CUDA paths). Each step has
# its own time limit and log, and a failing step does not stop the next.
#
#   bash benchmarks/fetch_gpu_wheels.sh      # here, once: wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh             # there (the device tool: carry .whl, OUT set)
#
# Logs go to $OUT (default runs/gpu_check): build.log, gpu_tests.log, bench_*.log (+ .csv),
# quickstart.log, quickstart_metrics.jsonl, env.txt, summary.txt. Copy the numbers into
# docs/benchmarks.md with the device, versions and commit printed in env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
summary="$OUT/summary.txt"
: >"$summary"

step() {  # step NAME LIMIT_S LOG CMD...: run with a time limit, record rc and seconds
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)" | tee -a "$summary"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s; last lines:" | tee -a "$summary"
  tail -n 4 "$log" | sed 's/^/   | /' | tee -a "$summary"
}

if compgen -G ".whl/*.whl" >/dev/null; then  # megatron-core and friends, carried as wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
  nvcc --version 2>&1 | tail -n 1
  $PY - <<'PY'
import importlib
for name in ("torch", "triton", "megatron.core", "transformer_engine", "flash_attn", "transformers"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001 - a report, not a failure
        print(f"{name}: not importable ({type(e).__name__})")
import torch
print("cuda:", torch.version.cuda, "device:", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$summary"

# The extension with its CUDA part (sm_90 only: the build is the slow part of this script).
export CARFT_CUDA_ARCHS=${CARFT_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
step build 300 "$OUT/build.log" $PY -m pip install -v --no-build-isolation --no-deps -e .
step gpu_tests 240 "$OUT/gpu_tests.log" $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests
step bench_lcs 120 "$OUT/bench_lcs.log" $PY benchmarks/bench_lcs.py --no-ref --csv "$OUT/bench_lcs.csv"
step bench_cot_head 180 "$OUT/bench_cot_head.log" $PY benchmarks/bench_cot_head.py --values 576,4096 \
  --csv "$OUT/bench_cot_head.csv"
step bench_advantages 60 "$OUT/bench_advantages.log" $PY benchmarks/bench_advantages.py --seq 1024 4096 \
  --csv "$OUT/bench_advantages.csv"
step quickstart 300 "$OUT/quickstart.log" env PYTHON="$PY" OUT=/tmp/qs bash examples/quickstart.sh \
  logging.progress_bar=false
cp /tmp/qs/metrics.jsonl "$OUT/quickstart_metrics.jsonl" 2>/dev/null || true
echo "done; logs in $OUT" | tee -a "$summary"
