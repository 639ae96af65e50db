#!/usr/bin/env bash
# torchrun on one node, with the signal handling the trainer needs. Started by `srun` once
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
# Signals. torchrun handles SIGTERM/SIGINT/SIGHUP/SIGQUIT (it forwards them to the ranks
# and SIGKILLs them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default 30 s) but not SIGUSR1, whose
# default action would kill torchrun and orphan the ranks. So torchrun runs with SIGUSR1
# ignored, and this script sends SIGUSR1 to the ranks themselves (torchrun's children):
# each finishes its step, all agree, write a checkpoint and exit 0, and torchrun exits 0.
# The ranks inherit the ignored SIGUSR1 until the trainer installs its handler, so each
# rank is signalled once its handler shows in /proc/PID/status (polled every
# LLADA_USR1_POLL_S seconds, default 1, until torchrun exits): a signal that arrives while
# the ranks are still starting is not lost. This works whether SLURM signals only this
# task (srun forwarding) or every process of the step (proctrack/cgroup).
# The handlers below are called from traps only, which shellcheck cannot follow
# (SC2317: unreachable; SC2329 since shellcheck 0.11: never invoked).
# shellcheck disable=SC2317,SC2329
set -uo pipefail
module=${1:?usage: torchrun_node.sh MODULE [overrides...]}
shift
for var in NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT LLADA_RDZV_ID LLADA_PYTHON; do
  [[ -n ${!var:-} ]] || { echo "error: torchrun_node.sh: $var is not set (use launch/local.sh or launch/slurm/*.sbatch)" >&2; exit 2; }
done
node=${SLURMD_NODENAME:-$(hostname)}  # for messages

# Runs in a background subshell: SIGUSR1 is ignored there and, through exec, in torchrun
# (and in its ranks until the trainer installs its handler).
start_torchrun() {
  trap '' USR1
  exec "$LLADA_PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv_id="$LLADA_RDZV_ID" \
    --max_restarts="${LLADA_MAX_RESTARTS:-0}" \
    -m "$module" "$@"
}
start_torchrun "$@" &
torchrun_pid=$!

ranks() { pgrep -P "$torchrun_pid" 2>/dev/null || ps -o pid= --ppid "$torchrun_pid" 2>/dev/null || true; }

# True when PID has a SIGUSR1 handler installed (bit 10 of SigCgt in /proc/PID/status), or
# when /proc cannot tell. Before the trainer installs its handler, the rank ignores SIGUSR1.
catches_usr1() {
  local line
  line=$(grep '^SigCgt:' "/proc/$1/status" 2>/dev/null) || return 0
  (((16#${line##*[[:space:]]} >> 9) & 1))
}

# Sends SIGUSR1 once to every rank, as soon as the rank catches it; polls until torchrun
# exits (ranks that are still starting, or that torchrun restarts, are signalled later).
# Once only: a second SIGUSR1 while Python shuts down (handlers reset) would kill the rank.
signal_ranks() {
  trap '' USR1
  local -A done_pids=()
  local pid
  while kill -0 "$torchrun_pid" 2>/dev/null; do
    for pid in $(ranks); do
      if [[ -z ${done_pids[$pid]:-} ]] && catches_usr1 "$pid"; then
        kill -USR1 "$pid" 2>/dev/null || true
        done_pids[$pid]=1
      fi
    done
    sleep "${LLADA_USR1_POLL_S:-1}"
  done
}

interrupted=0
signaller=""
on_usr1() {
  interrupted=1
  echo "[$node] SIGUSR1: asking the ranks to checkpoint and exit" >&2
  if [[ -z $signaller ]]; then
    signal_ranks </dev/null >/dev/null 2>&1 &  # holds no pipe of the job's output open
    signaller=$!
  fi
}
on_term() {
  interrupted=1
  echo "[$node] SIG$1: forwarding to torchrun (the ranks checkpoint and exit)" >&2
  kill "-$1" "$torchrun_pid" 2>/dev/null || true
}
trap on_usr1 USR1
trap 'on_term TERM' TERM
trap 'on_term INT' INT

# `wait` returns early when a trapped signal arrives; wait again until torchrun has exited.
while :; do
  interrupted=0
  rc=0
  wait "$torchrun_pid" || rc=$?
  ((interrupted)) || break
done
if [[ -n $signaller ]]; then
  kill "$signaller" 2>/dev/null || true
  wait "$signaller" 2>/dev/null || true
fi
exit "$rc"
