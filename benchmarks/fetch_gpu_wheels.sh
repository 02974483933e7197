#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels that benchmarks/gpu_check.sh needs on a GPU
# machine that has no internet: megatron-core for CPython 3.12 / x86-64. Everything else it needs
# (torch, triton, transformers, safetensors, numpy, packaging) is in the GPU image already.
# The wheels go to .whl/ (git-ignored); carry that folder to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
${PYTHON:-python3} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${plat[@]}" -d .whl "megatron-core==0.16.1"
ls -la .whl
