#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests and the demo (Debian, as root).
#
#   slurm/local/cluster.sh start   install slurm-wlm + munge if missing, start munged,
#                                  slurmctld and slurmd; prints `export SLURM_CONF=...`
#   slurm/local/cluster.sh stop    stop the daemons this script started (their pid files)
#   slurm/local/cluster.sh status  sinfo
#
# State lives in $SLURM_LOCAL_DIR (default /tmp/megatron-cpt-slurm). Exit code 0 only when
# the node answers `sinfo` as idle; otherwise the reason is printed and the exit code is 1.
# It acts only on the slurmctld/slurmd it started (pid files in that folder) and refuses to
# start where a real SLURM is configured (/etc/slurm/slurm.conf, another $SLURM_CONF, or
# daemons it did not start): on a login or compute node, use that cluster instead.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/megatron-cpt-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"

fail() { echo "local SLURM cluster: $*" >&2; exit 1; }

# pid of our daemon $1 (from its pid file) when it still runs, else nothing
our_pid() {
  local pid
  pid="$(cat "$DIR/$1.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] \
     && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then echo "$pid"; fi
}

refuse_real_slurm() {
  for conf in /etc/slurm/slurm.conf /etc/slurm-llnl/slurm.conf; do
    if [ -e "$conf" ]; then
      fail "refusing to start: a real SLURM is configured here ($conf); use it, or unset it"
    fi
  done
  if [ -n "${SLURM_CONF:-}" ] && [ "$SLURM_CONF" != "$CONF" ]; then
    fail "refusing to start: SLURM_CONF=$SLURM_CONF names another cluster; unset it to start the local one"
  fi
  for daemon in slurmctld slurmd; do
    for pid in $(pgrep -x "$daemon" || true); do
      if [ "$pid" != "$(our_pid "$daemon")" ]; then
        fail "refusing to start: $daemon pid $pid was not started by this script (no $DIR/$daemon.pid)"
      fi
    done
  done
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || fail "slurm-wlm/munge missing and not root: install them (apt-get install slurm-wlm munge)"
  command -v apt-get >/dev/null || fail "slurm-wlm/munge missing and no apt-get on this machine"
  echo "installing slurm-wlm and munge from Debian ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || fail "apt-get update failed"
  apt-get install -y -qq slurm-wlm munge >/dev/null || fail "apt-get install slurm-wlm munge failed"
}

write_conf() {
  mkdir -p "$DIR"/{state,spool,log}
  local cpus mem_mb
  cpus="$(nproc)"
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
  cat > "$CONF" <<CONF
ClusterName=megatron-cpt-local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  mkdir -p /etc/munge /var/run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /var/run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  chmod 755 /var/run/munge
  if id munge >/dev/null 2>&1; then
    su -s /bin/sh munge -c "munged" 2>/dev/null || munged --force
  else
    munged --force
  fi
  pgrep -x munged >/dev/null || fail "munged did not start"
}

wait_idle() {
  for _ in $(seq 1 60); do
    state="$(SLURM_CONF="$CONF" sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)"
    case "$state" in
      idle|mixed|allocated) return 0 ;;
      down*|drain*) SLURM_CONF="$CONF" scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  fail "node $HOST never became idle (last state: ${state:-none}); see $DIR/log/"
}

start() {
  refuse_real_slurm
  install
  write_conf
  start_munge
  export SLURM_CONF="$CONF"
  if [ -z "$(our_pid slurmctld)" ]; then
    slurmctld -f "$CONF" || fail "slurmctld did not start; see $DIR/log/slurmctld.log"
  fi
  if [ -z "$(our_pid slurmd)" ]; then
    slurmd -f "$CONF" || fail "slurmd did not start; see $DIR/log/slurmd.log"
  fi
  wait_idle
  echo "export SLURM_CONF=$CONF"
}

stop() {
  local pid
  for daemon in slurmd slurmctld; do
    pid="$(our_pid "$daemon")"
    if [ -n "$pid" ]; then
      kill "$pid"
      for _ in $(seq 1 30); do [ -z "$(our_pid "$daemon")" ] && break; sleep 0.5; done
    fi
    rm -f "$DIR/$daemon.pid"
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF="$CONF" sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
