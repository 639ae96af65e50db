# syntax=docker/dockerfile:1
# llada-train on CUDA: torch (CUDA build), DeepSpeed, optional flash-attn, this package.
#
#   docker build -t llada-train .
#   docker build -t llada-train:fa --build-arg INSTALL_FLASH_ATTN=1 --build-arg MAX_JOBS=16 .
#   docker build -t llada-train:cu126 --build-arg CUDA_VERSION=12.6.3 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
#   docker run --gpus all --ipc=host -v /data:/data llada-train \
#       llada-pretrain run_dir=/data/runs/x data.path=/data/shards data.tokenizer=/data/tokenizer.json
#   docker run --gpus all --ipc=host -v /data:/data llada-train \
#       /opt/llada-train/launch/local.sh pretrain run_dir=/data/runs/x ...   # one rank per GPU
#
# Build args: CUDA_VERSION / UBUNTU_VERSION pick the nvidia/cuda devel base (nvcc is needed to
# build flash-attn and DeepSpeed's JIT ops); TORCH_VERSION and TORCH_INDEX_URL pick the torch
# build (keep the index's CUDA version, cuXYZ, equal to CUDA_VERSION's major.minor);
# INSTALL_FLASH_ATTN=1 builds flash-attn (long: MAX_JOBS parallel compiles, about 4 GB of RAM
# each) for TORCH_CUDA_ARCH_LIST.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG INSTALL_FLASH_ATTN=0
ARG FLASH_ATTN_VERSION=2.8.3
ARG MAX_JOBS=8
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions

# git: the trainer records the commit in run_info.jsonl; pdsh + ssh: the DeepSpeed
# launcher's multi-node path; libaio: DeepSpeed's async I/O (NVMe offload) op.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       python3 python3-dev python3-venv git ninja-build pdsh openssh-client libaio-dev procps \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && git config --system --add safe.directory /opt/llada-train

WORKDIR /opt/llada-train

# Same install steps as the Makefile: scripts/install_torch.sh PY, then pip install -c constraints.txt -e .
# A docker build sees no GPU, so the CUDA build is asked for explicitly.
COPY scripts/install_torch.sh scripts/install_torch.sh
RUN TORCH_BUILD=cuda TORCH_VERSION="${TORCH_VERSION}" TORCH_CUDA_INDEX_URL="${TORCH_INDEX_URL}" \
       scripts/install_torch.sh /opt/venv/bin/python \
    && python -c "import torch; assert torch.version.cuda, torch.__version__; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

COPY . /opt/llada-train
# flash-attn's build needs torch at build time (--no-build-isolation); versions of the
# package's own dependencies are pinned by constraints.txt, as in the Makefile.
# hadolint ignore=DL3013  # pinned by the constraints file, which hadolint does not read
RUN python -m pip install --no-cache-dir -c constraints.txt -e . \
    && if [ "${INSTALL_FLASH_ATTN}" = "1" ]; then \
         python -m pip install --no-cache-dir -c constraints.txt packaging psutil \
         && MAX_JOBS="${MAX_JOBS}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
            python -m pip install --no-cache-dir -c constraints.txt --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
       fi \
    && python -c "import deepspeed, llada_train.cli.pretrain, llada_train.cli.sft"

LABEL org.opencontainers.image.title="llada-train" \
      org.opencontainers.image.description="Pretrain and fine-tune LLaDA masked-diffusion LMs with DeepSpeed ZeRO"

# Relative paths (run_dir=runs/x) land here: mount a volume and use absolute paths instead.
WORKDIR /workspace
CMD ["llada-pretrain", "--help"]
