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
# Signals. torchrun handles SIGTERM/SIGINT/SIGHUP/SIGQUIT (it forwards them to the ranks,
# SIGKILLs them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default 30 s, and exits 1 with a
# traceback) but not SIGUSR1, whose default action would kill torchrun and orphan the ranks.
# So torchrun runs with SIGUSR1 ignored, and on SIGUSR1 or SIGTERM this script signals the
# ranks themselves (torchrun's children; torchrun is left alone): each finishes its step, all
# agree, write a checkpoint and exit 0, and torchrun exits 0.
# The ranks inherit the ignored SIGUSR1 (and the default SIGTERM) until the trainer installs
# its handler, so each rank is signalled once its handler shows in /proc/PID/status (polled
# every LLADA_USR1_POLL_S seconds, default 1, until torchrun exits): a signal that arrives
# while the ranks are still starting is neither lost nor fatal. This works whether SLURM
# signals only this task (srun forwarding) or every process of the step (proctrack/cgroup).
# SIGTERM means the machine is going away: the ranks get LLADA_TERM_GRACE_S seconds (default
# 600, the time an 8B checkpoint needs on a slow file system) from the signal to finish, then
# are killed; the script ends with one line naming the checkpoint step and exits 0 (the
# checkpoint was written), or 143 when the grace ran out (resume from the last checkpoint).
# SIGINT (Ctrl-C) goes to torchrun as before.
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

# True when PID has a handler installed for signal number $2 (bit $2-1 of SigCgt in
# /proc/PID/status), or when /proc cannot tell. Before the trainer installs its handlers, a
# rank ignores SIGUSR1 and would die of SIGTERM.
catches() {
  local line
  line=$(grep '^SigCgt:' "/proc/$1/status" 2>/dev/null) || return 0
  (((16#${line##*[[:space:]]} >> ($2 - 1)) & 1))
}

# Sends signal $1 (USR1 or TERM) once to every rank, as soon as the rank catches it; polls
# until torchrun exits (ranks that are still starting, or that torchrun restarts, are
# signalled later). Once only: a second signal while Python shuts down (handlers reset) would
# kill the rank. After SIGTERM, ranks still running LLADA_TERM_GRACE_S seconds later are
# killed and this function returns 3.
signal_ranks() {
  trap '' USR1 TERM
  local sig=$1 num grace=${LLADA_TERM_GRACE_S:-600}
  num=$(kill -l "$sig")
  local -A done_pids=()
  local pid
  SECONDS=0
  while kill -0 "$torchrun_pid" 2>/dev/null; do
    if [[ $sig == TERM ]] && ((SECONDS >= grace)); then
      # torchrun first (listing its ranks before), so it prints no ChildFailedError wall
      pid=$(ranks)
      kill -KILL "$torchrun_pid" 2>/dev/null || true
      for pid in $pid; do kill -KILL "$pid" 2>/dev/null || true; done
      return 3
    fi
    for pid in $(ranks); do
      if [[ -z ${done_pids[$pid]:-} ]] && catches "$pid" "$num"; then
        kill "-$sig" "$pid" 2>/dev/null || true
        done_pids[$pid]=1
      fi
    done
    sleep "${LLADA_USR1_POLL_S:-1}"
  done
}

# The run_dir of the overrides (Hydra: the last one wins), else the task's default.
run_dir="runs/${module##*.}"
for arg in "$@"; do
  if [[ $arg =~ ^\+{0,2}run_dir=(.*)$ ]]; then run_dir=${BASH_REMATCH[1]}; fi
done

interrupted=0
signaller=""
pre_empted=""
on_signal() {
  interrupted=1
  if [[ -n $signaller ]]; then
    echo "[$node] SIG$1: the ranks were already asked to checkpoint and exit" >&2
    return
  fi
  pre_empted=$1
  local grace=""
  [[ $1 == TERM ]] && grace=" (within LLADA_TERM_GRACE_S=${LLADA_TERM_GRACE_S:-600} s)"
  echo "[$node] SIG$1: asking the ranks to checkpoint and exit$grace" >&2
  signal_ranks "$1" </dev/null >/dev/null 2>&1 &  # holds no pipe of the job's output open
  signaller=$!
}
on_int() {
  interrupted=1
  echo "[$node] SIGINT: forwarding to torchrun" >&2
  kill -INT "$torchrun_pid" 2>/dev/null || true
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap on_int INT

# `wait` returns early when a trapped signal arrives; wait again until torchrun has exited.
while :; do
  interrupted=0
  rc=0
  wait "$torchrun_pid" || rc=$?
  ((interrupted)) || break
done
signaller_rc=0
if [[ -n $signaller ]]; then
  kill "$signaller" 2>/dev/null || true
  wait "$signaller" 2>/dev/null || signaller_rc=$?
fi
if [[ $pre_empted == TERM ]]; then
  latest=$(cat "$run_dir/checkpoints/latest" 2>/dev/null) || latest=""
  if ((signaller_rc == 3)); then
    echo "[$node] SIGTERM: the ranks did not exit within LLADA_TERM_GRACE_S=${LLADA_TERM_GRACE_S:-600} s and were killed; the last complete checkpoint is ${latest:-none} in $run_dir/checkpoints" >&2
    exit 143
  fi
  if ((rc == 0)); then
    echo "[$node] SIGTERM: training stopped with checkpoint ${latest:-none} in $run_dir/checkpoints; run the same command to resume"
  fi
fi
exit "$rc"
