# shellcheck shell=bash
# Sourced by every launch script (local.sh, deepspeed_launch.sh, slurm/*): where the code
# and its Python are, which device the ranks use, how many ranks a node runs, and the
# entry module of a task name. Works with or without SLURM.
#
# Environment it reads (all optional):
#   LLADA_ROOT     repository root (default: the folder above launch/)
#   LLADA_PYTHON   the Python with llada-train installed (default: $LLADA_ROOT/.venv/bin/python
#                  when it exists, else python3 on PATH, as in the Docker image)
#   LLADA_DEVICE   auto | cuda | cpu (default auto: cuda when the node has a GPU, see
#                  llada_gpu_count).
#                  cpu hides GPUs and makes DeepSpeed use its CPU accelerator (gloo backend).
#   GPUS_PER_NODE  ranks per node (default: the node's GPUs, from SLURM_GPUS_ON_NODE or
#                  SLURM_GPUS_PER_NODE inside a job, else nvidia-smi; 1 on CPU)
#   OMP_NUM_THREADS  default 1 (torchrun sets it too; the deepspeed launcher does not)

llada_die() {
  echo "error: $*" >&2
  exit 2
}

# The entry module of a task name: pretrain | sft.
llada_entry_module() {
  case "$1" in
    pretrain) echo llada_train.cli.pretrain ;;
    sft) echo llada_train.cli.sft ;;
    *) return 1 ;;
  esac
}

# GPUs this node's ranks can use: SLURM's allocation when there is one, else nvidia-smi.
llada_gpu_count() {
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ ${SLURM_GPUS_PER_NODE:-} =~ ([0-9]+)$ ]]; then  # "8" or "a100:8"
    echo "${BASH_REMATCH[1]}"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# Sets and exports LLADA_ROOT, LLADA_PYTHON, LLADA_DEVICE, GPUS_PER_NODE and the
# device's environment. $1: the launch/ folder of this checkout.
llada_setup_env() {
  local launch_dir=$1
  LLADA_ROOT=${LLADA_ROOT:-$(cd "$launch_dir/.." && pwd)}
  # An explicit LLADA_PYTHON is taken as is: it may name a path inside a container.
  if [[ -z ${LLADA_PYTHON:-} ]]; then
    if [[ -x $LLADA_ROOT/.venv/bin/python ]]; then
      LLADA_PYTHON=$LLADA_ROOT/.venv/bin/python
    else
      LLADA_PYTHON=$(command -v python3) ||
        llada_die "no Python found: set LLADA_PYTHON to the interpreter with llada-train installed"
    fi
  fi

  LLADA_DEVICE=${LLADA_DEVICE:-auto}
  if [[ $LLADA_DEVICE == auto ]]; then
    if (($(llada_gpu_count) > 0)); then LLADA_DEVICE=cuda; else LLADA_DEVICE=cpu; fi
  fi
  case "$LLADA_DEVICE" in
    cuda)
      GPUS_PER_NODE=${GPUS_PER_NODE:-$(llada_gpu_count)}
      ;;
    cpu)
      # CPU ranks talk over gloo; DeepSpeed needs its CPU accelerator named explicitly
      # when a CUDA build of torch is installed.
      export CUDA_VISIBLE_DEVICES=""
      export DS_ACCELERATOR=cpu
      GPUS_PER_NODE=${GPUS_PER_NODE:-1}
      ;;
    *) llada_die "LLADA_DEVICE=$LLADA_DEVICE; use auto, cuda or cpu" ;;
  esac
  [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
    llada_die "GPUS_PER_NODE=${GPUS_PER_NODE} (no GPU found?): set GPUS_PER_NODE or LLADA_DEVICE=cpu"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export PYTHONUNBUFFERED=1  # rank output reaches the job log as it happens
  export LLADA_ROOT LLADA_PYTHON LLADA_DEVICE GPUS_PER_NODE
}

# Code version for the job log (the trainer also records it in run_info.jsonl).
llada_code_version() {
  local commit
  commit=$(git -C "$LLADA_ROOT" rev-parse --short HEAD 2>/dev/null) || {
    echo "unknown (not a git checkout)"
    return
  }
  if [[ -n $(git -C "$LLADA_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    commit+=" (dirty)"
  fi
  echo "$commit"
}
