# shellcheck shell=bash
# What launch/slurm/pretrain.sbatch and sft.sbatch share (sourced; runs in the batch
# script, on the job's first node):
#
#   llada_slurm_run pretrain|sft [hydra overrides...]
#
# 1. Rendezvous: the master is the first host of `scontrol show hostnames
#    $SLURM_JOB_NODELIST`; `srun` starts one task per node (launch/torchrun_node.sh), which
#    runs torchrun with the c10d rendezvous backend and GPUS_PER_NODE ranks.
# 2. Pre-emption: SLURM sends SIGUSR1 to this script (#SBATCH --signal=B:USR1@120, i.e. 120 s
#    before the time limit; SLURM may send it up to 60 s earlier than asked). The trap
#    forwards it to srun, srun to every node's task, torchrun_node.sh to the ranks; they
#    checkpoint at the end of the current step and exit 0. Then this script runs
#    `scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue with the same script
#    and arguments, and the next start resumes from run_dir/checkpoints/latest.
#    The step in flight plus the checkpoint must fit in the lead time: raise the 120 for
#    large models or slow file systems. A warning that lands during start-up, before the
#    launcher handles signals, ends the start (exit 138) and is requeued all the same; so
#    keep the time limit minus the lead well above a start-up plus 60 s, or every start of
#    a requeued job can end that way (seen with --time=3 --signal=B:USR1@150).
# 3. SIGTERM (scancel, pre-emption by a higher-priority job) is forwarded the same way: the
#    ranks checkpoint and exit, and the job is not requeued by this script. When SLURM
#    signals every process of the step itself (proctrack/cgroup), torchrun ignores it and
#    torchrun_node.sh still hands it to the ranks; SLURM's SIGKILL follows KillWait seconds
#    later. `scancel --batch --signal=TERM JOB` signals only this script: it hands SIGUSR1
#    to the ranks (see the traps below), they checkpoint, the job ends 0, no SIGKILL follows.
#
# Environment (export before sbatch; sbatch passes the submitting shell's environment):
#   GPUS_PER_NODE, LLADA_PYTHON, LLADA_DEVICE   see launch/env.sh
#   LLADA_ROOT      the checkout on a file system every node sees (default: the directory
#                   sbatch was run from, SLURM_SUBMIT_DIR)
#   MASTER_PORT     rendezvous port on the first node (default 20000 + job id % 20000)
#   LLADA_SRUN_ARGS extra srun options, e.g. "--label" or, for containers (pyxis),
#                   "--container-image=IMAGE --container-mounts=/scratch:/scratch"
#   LLADA_MAX_RESTARTS  torchrun --max_restarts (default 0: a failed rank fails the job)
#
# NCCL (GPU jobs). Defaults are set only when the variable is unset:
#   NCCL_DEBUG=WARN         INFO prints the transports and rings chosen: use it once when
#                           bringing up a new cluster or when a job hangs at start.
#   NCCL_SOCKET_IFNAME      the interface for NCCL's bootstrap and socket transport when nodes
#                           have several (e.g. ib0, eth0, or "^lo,docker0" to exclude some).
#   NCCL_IB_HCA             InfiniBand adapters to use (e.g. mlx5_0,mlx5_1; default all).
#   NCCL_IB_DISABLE=1       only on clusters without InfiniBand/RoCE (falls back to TCP).
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a failed or timed-out collective aborts the job
#                           instead of hanging it until the time limit (default here).
#   TORCH_NCCL_TRACE_BUFFER_SIZE=2000 TORCH_NCCL_DUMP_ON_TIMEOUT=1  flight recorder for hangs.
#   AWS EFA: FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1 with the aws-ofi-nccl plugin installed.

llada_slurm_run() {
  local task=${1:?usage: llada_slurm_run pretrain|sft [overrides...]}
  shift
  local module
  module=$(llada_entry_module "$task") || llada_die "unknown task '$task': use pretrain or sft"
  [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] ||
    llada_die "not inside a SLURM job: submit with sbatch (single node without SLURM: launch/local.sh)"
  llada_setup_env "$LLADA_ROOT/launch"

  local -a hosts
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  ((${#hosts[@]})) || llada_die "scontrol show hostnames '$SLURM_JOB_NODELIST' listed no host"
  export MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export NNODES=${SLURM_JOB_NUM_NODES:-${#hosts[@]}}
  # a fresh rendezvous for every (re)start of the job
  export LLADA_RDZV_ID="llada-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}"
  if [[ $LLADA_DEVICE == cuda ]]; then
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  fi
  # Slurm >= 22.05: srun no longer inherits --cpus-per-task from sbatch
  if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
  fi

  echo "llada slurm job $SLURM_JOB_ID (start $((${SLURM_RESTART_COUNT:-0} + 1))): $task on" \
    "$NNODES node(s) x $GPUS_PER_NODE $LLADA_DEVICE rank(s); master $MASTER_ADDR:$MASTER_PORT;" \
    "code $(llada_code_version) at $LLADA_ROOT; python $LLADA_PYTHON"
  echo "llada overrides:$(printf ' %q' "$@")"

  local -a srun_extra=()
  read -r -a srun_extra <<<"${LLADA_SRUN_ARGS:-}"
  srun --export=ALL --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
    --kill-on-bad-exit=1 "${srun_extra[@]}" \
    bash "$LLADA_ROOT/launch/torchrun_node.sh" "$module" "$@" &
  _llada_srun_pid=$!
  _llada_usr1=0
  _llada_interrupted=0
  # Always SIGUSR1 to srun: srun passes it to every task, but answers SIGTERM by killing the
  # step at once (seen on Slurm 22.05) and a single SIGINT with a status report. The ranks
  # treat SIGUSR1 and SIGTERM alike: checkpoint, exit 0.
  trap '_llada_forward USR1 USR1' USR1
  trap '_llada_forward TERM USR1' TERM
  trap '_llada_forward INT USR1' INT

  local rc
  while :; do  # `wait` returns early when a trapped signal arrives: wait again
    _llada_interrupted=0
    rc=0
    wait "$_llada_srun_pid" || rc=$?
    ((_llada_interrupted)) || break
  done
  trap - USR1 TERM INT

  if ((_llada_usr1)); then
    if ((rc == 0)); then
      echo "llada: training checkpointed after SIGUSR1; requeueing job $SLURM_JOB_ID"
    else
      echo "llada: training exited with $rc after SIGUSR1; requeueing job $SLURM_JOB_ID" \
        "anyway (it resumes from the last checkpoint)" >&2
    fi
    scontrol requeue "$SLURM_JOB_ID" ||
      llada_die "scontrol requeue $SLURM_JOB_ID failed (is the job submitted with --requeue?)"
    return 0
  fi
  return "$rc"
}

# $1: the signal received, $2: the one sent to srun (which forwards it to every task).
_llada_forward() {
  _llada_interrupted=1
  if [[ $1 == USR1 ]]; then _llada_usr1=1; fi
  echo "llada: SIG$1 received by the batch script: sending SIG$2 to the ranks" >&2
  kill "-$2" "$_llada_srun_pid" 2>/dev/null || true
}
