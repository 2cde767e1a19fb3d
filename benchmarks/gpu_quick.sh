#!/usr/bin/env bash
# Trains the paper's full-width ResNet-18 BadNets and Blend subjects on a CUDA GPU and runs RNP
# on them (benchmarks/grids/gpu-quick.yaml), from the repository root of a checkout with rnp
# installed. The cell records land in benchmarks/results/grid-gpu-quick/ (commit them); with
# $OUT set (the device tool's output folder) they are copied there too. Rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
rnp bench benchmarks/grids/gpu-quick.yaml --device cuda --quiet \
    --cache "${RNP_ZOO:-$HOME/.cache/rnp/zoo-gpu}" "$@"
if [ -n "${OUT:-}" ]; then
    cp -r benchmarks/results/grid-gpu-quick "$OUT/"
fi
