#!/usr/bin/env bash
# Stop the cluster that slurm/start_cluster.sh started: cancel its jobs, then stop exactly the recorded PIDs.
#
# TERM first, KILL after 15 s. Processes this script did not start (e.g. a munged that was already running)
# are left alone. Same knob as the start script: SLURM_BASE.
set -uo pipefail

BASE=${SLURM_BASE:-${TMPDIR:-/tmp}/csi-slurm}
PIDS=$BASE/pids
CONF=$BASE/etc/slurm.conf
export SLURM_CONF=$CONF

log() { echo "[stop_cluster $(date +%T)] $*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_recorded() {  # stop_recorded PIDFILE...: TERM them all, wait up to 15 s, KILL survivors
  local f pid pids=() names=()
  for f in "$@"; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null
      pids+=("$pid"); names+=("$(basename "$f" .pid)=$pid")
    fi
    rm -f "$f"
  done
  [ ${#pids[@]} = 0 ] && return 0
  for _ in $(seq 150); do
    local running=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    [ $running = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then log "pid $pid ignored TERM, sending KILL"; kill -KILL "$pid"; fi
  done
  log "stopped ${names[*]}"
}

# 1. cancel every job of this throwaway cluster; wait (30 s at most) until the queue is empty
if alive "$PIDS/slurmctld.pid" && [ -f "$CONF" ]; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086  # one job id per word
    scancel $jobs 2>/dev/null
    for _ in $(seq 60); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    [ -z "$(squeue -h -o %A 2>/dev/null)" ] || log "WARNING: jobs still queued: $(squeue -h -o '%A %T' | tr '\n' ' ')"
  fi
fi
# 2. daemons, in reverse start order, each only if start_cluster.sh recorded it
stop_recorded "$PIDS"/slurmd-*.pid
stop_recorded "$PIDS/slurmctld.pid"
stop_recorded "$PIDS/slurmdbd.pid"
stop_recorded "$PIDS/mysqld.pid"
stop_recorded "$PIDS/munged.pid"
# 3. our /etc/slurm/slurm.conf symlink (never someone else's file)
[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ] && rm -f /etc/slurm/slurm.conf
# 4. report, but do not kill, job step daemons left by an unclean job end: they are not ours to guess at
left=$(ps -eo pid=,comm= | awk '$2 ~ /^slurmstepd/ { print $1 }' | tr '\n' ' ')
[ -n "${left// /}" ] && log "WARNING: slurmstepd processes still alive: $left"
log "done"
exit 0
