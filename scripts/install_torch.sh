#!/usr/bin/env bash
# Install PyTorch into the given Python without ever pulling a CUDA build onto a CPU-only
# machine. Used by the Makefile and the Dockerfile, so both install the same way.
#   scripts/install_torch.sh PYTHON
# Environment: TORCH_VERSION (2.13.0), TORCH_BUILD=auto|cuda|cpu (auto: cuda when nvidia-smi
# lists a GPU), TORCH_CUDA_INDEX_URL (default: PyPI's CUDA build), TORCH_CPU_INDEX_URL.
set -euo pipefail
py=${1:-python3}
version=${TORCH_VERSION:-2.13.0}
build=${TORCH_BUILD:-auto}
cpu_index=${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}
cuda_index=${TORCH_CUDA_INDEX_URL:-}

if [ "$build" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then build=cuda; else build=cpu; fi
fi
if "$py" -c "import torch" >/dev/null 2>&1; then
  echo "torch $("$py" -c 'import torch; print(torch.__version__)') already installed"
  exit 0
fi
case "$build" in
  cuda)
    echo "installing torch==$version (CUDA build)"
    if [ -n "$cuda_index" ]; then
      "$py" -m pip install --no-cache-dir "torch==$version" --extra-index-url "$cuda_index"
    else
      "$py" -m pip install --no-cache-dir "torch==$version"
    fi
    ;;
  cpu)
    # A CPU wheel pip already knows of (find-links, a mirror) first; else PyTorch's CPU index.
    echo "installing torch==$version+cpu (no GPU)"
    "$py" -m pip install "torch==$version+cpu" 2>/dev/null \
      || "$py" -m pip install "torch==$version+cpu" --extra-index-url "$cpu_index"
    ;;
  *)
    echo "error: TORCH_BUILD=$build; use auto, cuda or cpu" >&2
    exit 2
    ;;
esac
