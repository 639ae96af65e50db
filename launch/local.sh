#!/usr/bin/env bash
# Single-node, multi-process training with torchrun (GPU or CPU).
#
#   launch/local.sh [--nproc N] [--device auto|cuda|cpu] [pretrain|sft] [hydra overrides...]
#
#   launch/local.sh pretrain model=llada_1b run_dir=runs/1b            # one rank per GPU
#   launch/local.sh --nproc 2 --device cpu pretrain trainer.max_steps=20 run_dir=runs/cpu
#   launch/local.sh sft init_from=runs/1b/export data=sft_demo run_dir=runs/sft
#
# N defaults to the GPU count (1 on CPU). The task defaults to pretrain. Everything after
# the task is passed to Hydra unchanged. The run resumes from run_dir/checkpoints/latest when
# it exists. SIGUSR1 or SIGTERM to this script (its pid becomes llada-torchrun's: exec) makes
# the ranks checkpoint at the end of the current step and exit; it ends with one line naming
# the checkpoint and exit code 0. The ranks get LLADA_TERM_GRACE_S seconds (default 600) to
# save, after which they are killed (exit 128 + N). See launch/torchrun_node.sh.
# Environment: see launch/env.sh (LLADA_PYTHON, LLADA_DEVICE, GPUS_PER_NODE), MASTER_PORT
# (default: a free port).
set -euo pipefail
launch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/env.sh
source "$launch_dir/env.sh"

usage() { sed -n '2,/^set /{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
  case "$1" in
    --nproc | --nproc_per_node) GPUS_PER_NODE=${2:?--nproc needs a number}; shift 2 ;;
    --nproc=* | --nproc_per_node=*) GPUS_PER_NODE=${1#*=}; shift ;;
    --device) LLADA_DEVICE=${2:?--device needs auto, cuda or cpu}; shift 2 ;;
    --device=*) LLADA_DEVICE=${1#*=}; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
# the first argument names the task when it is one; Hydra overrides follow
if module=$(llada_entry_module "${1:-}"); then shift; else module=$(llada_entry_module pretrain); fi
llada_setup_env "$launch_dir"

# One node of a c10d rendezvous on localhost: the same torchrun wrapper as the SLURM jobs.
export NNODES=1 MASTER_ADDR=127.0.0.1 LLADA_RDZV_ID="local-$$"
if [[ -z ${MASTER_PORT:-} ]]; then
  MASTER_PORT=$("$LLADA_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export MASTER_PORT
echo "llada local launch: $GPUS_PER_NODE x $LLADA_DEVICE rank(s), $module, code $(llada_code_version)"
exec bash "$launch_dir/torchrun_node.sh" "$module" "$@"
