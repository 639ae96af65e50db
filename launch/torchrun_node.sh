#!/usr/bin/env bash
# llada-torchrun on one node. Started by `srun` once
# per node (launch/slurm/common.sh) and by launch/local.sh; not meant to be run by hand:
#
#   torchrun_node.sh MODULE [hydra overrides...]
#
# torchrun joins the c10d rendezvous at $MASTER_ADDR:$MASTER_PORT (in a SLURM job the first
# node hosts the store) and starts $GPUS_PER_NODE ranks on this node; global ranks are
# assigned by the rendezvous. Reads NNODES, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT,
# LLADA_RDZV_ID and LLADA_PYTHON from the environment (exported by the caller; srun passes
# it on with --export=ALL).
#
# The launcher is llada-torchrun (llada_train/cli/torchrun.py): torchrun itself, ending a
# run with one line instead of torchrun's reports. Signals: SIGTERM or SIGUSR1 (srun forwards
# them to this task; under proctrack/cgroup SLURM sends them to every process of the step) is
# handed to the ranks, which checkpoint at the end of their step and exit; they get
# LLADA_TERM_GRACE_S seconds (default 600, the time an 8B checkpoint needs on a slow file
# system) before they are killed. The launcher then prints one line naming the checkpoint
# and exits 0, or 128 + N when the ranks had to be killed. SIGINT, SIGHUP, SIGQUIT stop the
# ranks. Under SLURM the job's KillWait still bounds the grace after a SIGTERM that SLURM
# sends itself: ask for SIGUSR1 ahead of the time limit (#SBATCH --signal=B:USR1@N).
set -euo pipefail
module=${1:?usage: torchrun_node.sh MODULE [overrides...]}
shift
for var in NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT LLADA_RDZV_ID LLADA_PYTHON; do
  [[ -n ${!var:-} ]] || { echo "error: torchrun_node.sh: $var is not set (use launch/local.sh or launch/slurm/*.sbatch)" >&2; exit 2; }
done

exec "$LLADA_PYTHON" -m llada_train.cli.torchrun \
  --nnodes="$NNODES" \
  --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv_id="$LLADA_RDZV_ID" \
  --max_restarts="${LLADA_MAX_RESTARTS:-0}" \
  -m "$module" "$@"
