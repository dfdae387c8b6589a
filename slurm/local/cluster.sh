#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests and the demo (Debian, as root).
#
#   slurm/local/cluster.sh start [--nodes N]   install slurm-wlm + munge if missing, start munged,
#                                  slurmctld and slurmd; prints `export SLURM_CONF=...`
#   slurm/local/cluster.sh stop [--nodes N]    stop the daemons this script started (pid files)
#   slurm/local/cluster.sh status [--nodes N]  sinfo
#
# --nodes 1 (the default): one slurmd on this host. --nodes N (2..9): a separate cluster of N
# compute nodes, each its own host as far as SLURM and torch.distributed can tell: slurmd
# runs in a network namespace mcpt-nK (its own UTS hostname mcpt-nK, address 10.77.0.1K,
# /etc/netns/mcpt-nK/hosts), joined by veth pairs to the bridge mcpt-br0 (10.77.0.1, the
# controller mcpt-ctl, in this namespace). `stop --nodes N` also kills what still runs in
# those namespaces and removes the namespaces, the bridge and /etc/netns/mcpt-nK; every
# thing it made is listed in its state folder (made.txt) and only those are removed.
#
# State lives in $SLURM_LOCAL_DIR (default /tmp/megatron-cpt-slurm; with --nodes N, that
# name + "-Nn"). Exit code 0 only when every node answers `sinfo` as idle; otherwise the
# reason is printed and the exit code is 1.
# It acts only on the slurmctld/slurmd it started (pid files in that folder) and refuses to
# start where a real SLURM is configured (/etc/slurm/slurm.conf, another $SLURM_CONF, or
# daemons it did not start): on a login or compute node, use that cluster instead.
set -euo pipefail

ACTION="${1:-start}"
NODES=1
if [ "${2:-}" = --nodes ]; then NODES="${3:-}"; fi
case "$NODES" in [1-9]) ;; *) echo "usage: $0 start|stop|status [--nodes 1..9]" >&2; exit 2 ;; esac
BASE="${SLURM_LOCAL_DIR:-/tmp/megatron-cpt-slurm}"
DIR="$BASE"
if [ "$NODES" -gt 1 ]; then DIR="$BASE-${NODES}n"; fi
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
SUBNET=10.77.0      # the multi-node cluster's private network (bridge mcpt-br0)
BRIDGE=mcpt-br0
CTL=mcpt-ctl        # the controller's name on that network: $SUBNET.1, this namespace

fail() { echo "local SLURM cluster: $*" >&2; exit 1; }

# pid of our daemon from its pid file $DIR/$1.pid (comm $2, default $1) when it still runs
our_pid() {
  local pid
  pid="$(cat "$DIR/$1.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${2:-$1}" ] \
     && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then echo "$pid"; fi
}

# the pids in the pid files of every cluster this script runs (one-node and multi-node)
known_pids() {
  cat "$BASE"/*.pid "$BASE"-[1-9]n/*.pid 2>/dev/null || true
}

# whether pid is one of our daemons, a process they forked, or a zombie (slurmctld forks children that keep
# its name, e.g. slurmscriptd or a short-lived helper; seen by pgrep while another cluster starts)
ours_or_child() {
  local pid="$1" known
  # a zombie is not a daemon: the parent a daemon forks away from stays <defunct> where no init
  # reaps orphans (containers)
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] && return 0
  known="$(known_pids)"
  while [ -n "$pid" ] && [ "$pid" -gt 1 ]; do
    if echo "$known" | grep -qx "$pid"; then return 0; fi
    pid="$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null || true)"
  done
  return 1
}

refuse_real_slurm() {
  for conf in /etc/slurm/slurm.conf /etc/slurm-llnl/slurm.conf; do
    if [ -e "$conf" ]; then
      fail "refusing to start: a real SLURM is configured here ($conf); use it, or unset it"
    fi
  done
  case "${SLURM_CONF:-}" in
    ""|"$BASE/slurm.conf"|"$BASE"-[1-9]n/slurm.conf) ;;  # none, or one of this script's clusters
    *) fail "refusing to start: SLURM_CONF=$SLURM_CONF names another cluster; unset it to start the local one" ;;
  esac
  for daemon in slurmctld slurmd; do
    for pid in $(pgrep -x "$daemon" || true); do
      if ! ours_or_child "$pid"; then
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

# ---- multi-node (--nodes N): one namespace per compute node on a private bridge
node_name() { echo "mcpt-n$1"; }
node_addr() { echo "$SUBNET.1$1"; }

write_conf_multi() {
  mkdir -p "$DIR"/{state,spool,log}
  local cpus mem_mb k names=""
  cpus="$(nproc)"
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 / NODES ))
  for k in $(seq 1 "$NODES"); do names="$names${names:+,}$(node_name "$k")"; done
  # Every node declares this host's CPUs (they share them): config_overrides keeps slurmd
  # from draining a node whose hardware is the same as its neighbour's.
  cat > "$CONF" <<CONF
ClusterName=megatron-cpt-local-${NODES}n
SlurmctldHost=$CTL($SUBNET.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SlurmctldPort=6827
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
CONF
  for k in $(seq 1 "$NODES"); do
    echo "NodeName=$(node_name "$k") NodeAddr=$(node_addr "$k") NodeHostname=$(node_name "$k") CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" >> "$CONF"
  done
  echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >> "$CONF"
}

made() { echo "$1" >> "$DIR/made.txt"; }  # what stop removes, one "kind name" a line

# The hosts file every node sees (ip netns exec bind-mounts /etc/netns/NS/hosts on /etc/hosts).
hosts_file() {
  local k
  echo "127.0.0.1 localhost"
  echo "$SUBNET.1 $CTL"
  for k in $(seq 1 "$NODES"); do echo "$(node_addr "$k") $(node_name "$k")"; done
}

make_network() {
  local k ns
  command -v ip >/dev/null || fail "no \`ip\` (iproute2): cannot make the node namespaces"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge 2>"$DIR/log/net.err" \
      || fail "cannot create bridge $BRIDGE: $(head -1 "$DIR/log/net.err") (needs root / CAP_NET_ADMIN)"
    made "link $BRIDGE"
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
  if [ ! -d /etc/netns ]; then mkdir /etc/netns; made "etc /etc/netns"; fi
  for k in $(seq 1 "$NODES"); do
    ns="$(node_name "$k")"
    if ! ip netns list | grep -qw "^$ns"; then
      ip netns add "$ns" 2>"$DIR/log/net.err" \
        || fail "cannot create network namespace $ns: $(head -1 "$DIR/log/net.err")"
      made "netns $ns"
      ip link add "$ns-h" type veth peer name "$ns-c" 2>"$DIR/log/net.err" \
        || fail "cannot create veth pair $ns-h: $(head -1 "$DIR/log/net.err")"
      ip link set "$ns-c" netns "$ns"
      ip link set "$ns-h" master "$BRIDGE"
      ip link set "$ns-h" up
      ip -n "$ns" link set lo up
      ip -n "$ns" link set "$ns-c" name eth0
      ip -n "$ns" addr add "$(node_addr "$k")/24" dev eth0
      ip -n "$ns" link set eth0 up
    fi
    if [ ! -d "/etc/netns/$ns" ]; then
      mkdir -p "/etc/netns/$ns"
      made "etc /etc/netns/$ns"
    fi
    hosts_file > "/etc/netns/$ns/hosts"
  done
}

start_multi() {
  local k ns
  refuse_real_slurm
  install
  mkdir -p "$DIR/log"
  [ "$(id -u)" = 0 ] || fail "the $NODES-node cluster needs root (network namespaces, a bridge)"
  write_conf_multi
  start_munge
  export SLURM_CONF="$CONF"
  make_network
  # the controller is $CTL (its own UTS name) on the bridge, in this network namespace
  if [ -z "$(our_pid slurmctld)" ]; then
    unshare --uts sh -c "hostname $CTL && exec slurmctld -f '$CONF'" \
      || fail "slurmctld did not start; see $DIR/log/slurmctld.log"
  fi
  # each slurmd: its node's network namespace, its own hostname and /etc/hosts (a private
  # mount namespace; /sys and its cgroups stay this host's, which `ip netns exec` would hide)
  for k in $(seq 1 "$NODES"); do
    ns="$(node_name "$k")"
    mkdir -p "$DIR/spool/$ns"
    if [ -z "$(our_pid "slurmd-$ns" slurmd)" ]; then
      nsenter --net="/run/netns/$ns" unshare --mount --uts sh -c \
        "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $ns && exec slurmd -f '$CONF' -N $ns" \
        || fail "slurmd of $ns did not start; see $DIR/log/slurmd-$ns.log"
    fi
  done
  wait_idle_multi
  echo "export SLURM_CONF=$CONF"
}

wait_idle_multi() {
  local states k
  for _ in $(seq 1 60); do
    states="$(SLURM_CONF="$CONF" sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)"
    if [ "$(echo "$states" | grep -oE '=(idle|mixed|allocated)' | wc -l)" = "$NODES" ]; then return 0; fi
    for k in $(seq 1 "$NODES"); do
      case "$states" in *"$(node_name "$k")=down"*|*"$(node_name "$k")=drain"*)
        SLURM_CONF="$CONF" scontrol update nodename="$(node_name "$k")" state=resume >/dev/null 2>&1 || true ;;
      esac
    done
    sleep 1
  done
  fail "the $NODES nodes never all became idle (last: ${states:-none}); see $DIR/log/"
}

stop_multi() {
  local k ns pid kind name
  for k in $(seq 1 "$NODES"); do
    ns="$(node_name "$k")"
    pid="$(our_pid "slurmd-$ns" slurmd)"
    if [ -n "$pid" ]; then kill "$pid"; fi
  done
  pid="$(our_pid slurmctld)"
  if [ -n "$pid" ]; then kill "$pid"; fi
  for _ in $(seq 1 30); do
    [ -z "$(our_pid slurmctld)$(for k in $(seq 1 "$NODES"); do our_pid "slurmd-$(node_name "$k")" slurmd; done)" ] && break
    sleep 0.5
  done
  rm -f "$DIR"/slurmctld.pid "$DIR"/slurmd-*.pid
  [ -f "$DIR/made.txt" ] || return 0
  # job steps left in our namespaces are ours too; then the namespaces, links and files
  while read -r kind name; do
    if [ "$kind" = netns ]; then
      for pid in $(ip netns pids "$name" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    fi
  done < "$DIR/made.txt"
  tac "$DIR/made.txt" | while read -r kind name; do
    case "$kind" in
      netns) ip netns del "$name" 2>/dev/null || true ;;
      link) ip link del "$name" 2>/dev/null || true ;;
      etc) case "$name" in
             /etc/netns/mcpt-n[0-9]*) rm -rf "$name" ;;
             /etc/netns) rmdir "$name" 2>/dev/null || true ;;  # only if empty
           esac ;;
    esac
  done
  rm -f "$DIR/made.txt"
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

if [ "$NODES" -gt 1 ]; then
  case "$ACTION" in
    start) start_multi ;;
    stop) stop_multi ;;
    status) SLURM_CONF="$CONF" sinfo -N -o '%N %T %o %c' ;;
    *) echo "usage: $0 start|stop|status [--nodes N]" >&2; exit 2 ;;
  esac
  exit 0
fi
case "$ACTION" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF="$CONF" sinfo ;;
  *) echo "usage: $0 start|stop|status [--nodes N]" >&2; exit 2 ;;
esac
