#!/usr/bin/env bash
# Here, where PyPI is reachable: fill .whl/ (git-ignored) with what benchmarks/gpu_check.py needs on the
# GPU machine, which has no internet. Carry that folder with the call (carry=[".whl"]).
#   - the megatron-core wheel for CPython 3.12 / x86-64 (2.6 MB; the image has torch, triton,
#     transformers, safetensors, numpy, packaging, psutil, pyyaml, tensorboard, matplotlib, tqdm);
#   - the gpt2 tokenizer (3.5 MB, vocabulary 50257, close to SmolLM2's 49152) for part 2's
#     SmolLM2-shaped run, from ../shared/models/tokenizers (the SmolLM2 GGUF, 94 MiB, cannot travel).
# It then checks that the tree that travels (tracked + untracked-not-ignored files + .whl) stays
# under the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
if ! compgen -G ".whl/megatron_core-0.16.1-*.whl" >/dev/null; then
  ${PYTHON:-python3} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat[@]}" -d .whl "megatron-core==0.16.1"
fi
tok=${CARFT_GPT2_TOKENIZER:-}
for cand in ../shared/models/tokenizers/gpt2 ../../shared/models/tokenizers/gpt2; do  # beside the checkout
  [ -z "$tok" ] && [ -f "$cand/tokenizer.json" ] && tok=$cand
done
if [ -n "$tok" ] && [ -f "$tok/tokenizer.json" ]; then
  mkdir -p .whl/tokenizer_gpt2
  install -m 644 "$tok"/tokenizer.json "$tok"/tokenizer_config.json .whl/tokenizer_gpt2/
else
  echo "fetch_gpu_wheels.sh: no gpt2 tokenizer found (set CARFT_GPT2_TOKENIZER): part 2's SmolLM2-shaped run uses the character tokenizer" >&2
fi
ls -la .whl .whl/tokenizer_gpt2 2>/dev/null || true
# What travels: tracked files, untracked files git does not ignore, and the carried .whl.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
total=$((tree + $(du -sb .whl | cut -f1)))
echo "the call carries $((total / 1024)) KiB (limit 65536 KiB)"
if [ "$total" -ge $((64 * 1024 * 1024)) ]; then
  echo "fetch_gpu_wheels.sh: over the device tool's 64 MiB: remove untracked files or ignore them" >&2
  exit 1
fi
