#!/usr/bin/env bash
# Set up sdxl-trainer in ./.venv: CPU PyTorch first on machines without an NVIDIA GPU
# (a plain `torch` requirement would pull a multi-GB CUDA build), then the package.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --test   # runtime + test tools
# TORCH_INDEX_URL, if set, is passed to pip as --index-url for the torch install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install --quiet "torch==${TORCH_VERSION}"
  else
    $PIP install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
  fi
fi

if [ "${1:-}" = "--test" ]; then
  $PIP install --quiet -e ".[test]"
else
  $PIP install --quiet -e .
fi
.venv/bin/python -c "import torch, diffusers, transformers, accelerate; print(f'sdxl-trainer ready: torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}')"
