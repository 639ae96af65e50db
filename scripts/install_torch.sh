#!/usr/bin/env bash
# Install PyTorch into the given Python without ever pulling a CUDA build onto a CPU-only
# machine. Used by the Makefile and the Dockerfile, so both install the same way.
#   scripts/install_torch.sh PYTHON        (TORCH_VERSION, TORCH_CPU_INDEX_URL override)
set -euo pipefail
py=${1:-python3}
version=${TORCH_VERSION:-2.13.0}
cpu_index=${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}

if "$py" -c "import torch" >/dev/null 2>&1; then
  echo "torch $("$py" -c 'import torch; print(torch.__version__)') already installed"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "GPU found: installing torch==$version (CUDA build)"
  "$py" -m pip install "torch==$version"
else
  # A local CPU wheel (pip find-links) is taken first; else PyTorch's CPU-only index.
  echo "no GPU: installing torch==$version+cpu"
  "$py" -m pip install "torch==$version+cpu" --extra-index-url "$cpu_index"
fi
