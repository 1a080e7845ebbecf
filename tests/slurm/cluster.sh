#!/usr/bin/env bash
# A real SLURM cluster on this one machine: munge + slurmctld + N slurmd "nodes" (n1, n2) on loopback.
#   cluster.sh start DIR [NODES]   install if missing, start, wait until idle; prints nothing else on success
#   cluster.sh stop DIR            stop every daemon by its pid file
# Needs root and apt (Debian). Exit code 3: this machine cannot host a cluster (the tests then skip).
set -euo pipefail
cmd=$1; dir=$(realpath -m "$2"); nodes=${3:-1}

stop() {
  for pid in "$dir"/run/slurmd-*.pid "$dir"/run/slurmctld.pid "$dir"/run/munged.pid; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  sleep 0.5
  for pid in "$dir"/run/slurmd-*.pid "$dir"/run/slurmctld.pid "$dir"/run/munged.pid; do
    [ -f "$pid" ] && kill -9 "$(cat "$pid")" 2>/dev/null || true
    rm -f "$pid"
  done
}

if [ "$cmd" = stop ]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || { echo "no slurm and no root apt to install it"; exit 3; }
  (apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 ||
   { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1; }) ||
   { echo "apt-get could not install slurm"; exit 3; }
fi
[ "$(id -u)" = 0 ] || { echo "slurmd needs root here"; exit 3; }

mkdir -p "$dir"/{run,log,state,spool,munge}
trap 'echo "cluster.sh: failed at line $LINENO"; tail -n 5 "$dir"/log/*.log 2>/dev/null; stop' ERR
chmod 0755 "$dir/munge" "$dir"
[ -f "$dir/munge/key" ] || { head -c 1024 /dev/urandom > "$dir/munge/key"; chmod 0400 "$dir/munge/key"; }
munged --key-file="$dir/munge/key" --socket="$dir/munge/sock" --pid-file="$dir/run/munged.pid" \
       --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" --force

host=$(hostname -s)
# Free ports, so a cluster still shutting down (or another one) never collides with this one.
read -r ctld_port node_ports <<< "$(python3 - "$nodes" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(1 + int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)"
read -r -a node_ports <<< "$node_ports"
topo=$(slurmd -C | head -n1 | sed 's/^NodeName=[^ ]* //')
grep -q " n1 n2$" /etc/hosts 2>/dev/null || echo "127.0.0.1 n1 n2" >> /etc/hosts
{
  echo "ClusterName=greentext"
  echo "SlurmctldHost=$host(127.0.0.1)"
  echo "SlurmctldPort=$ctld_port"
  echo "SlurmUser=root"
  echo "SlurmdUser=root"
  echo "AuthType=auth/munge"
  echo "CredType=cred/munge"
  # cred_expire is also how long a requeued job waits before it may start again (default 120 s).
  echo "AuthInfo=socket=$dir/munge/sock,cred_expire=10"
  echo "MailProg=/bin/true"
  echo "ProctrackType=proctrack/linuxproc"
  echo "TaskPlugin=task/none"
  echo "SelectType=select/cons_tres"
  echo "SelectTypeParameters=CR_Core"
  echo "SlurmdParameters=config_overrides"
  echo "MpiDefault=none"
  echo "ReturnToService=2"
  echo "KillWait=10"
  echo "MinJobAge=3600"
  # Schedule every second: with the defaults (60 s main loop, 30 s backfill) a job waits ~3 s to start and a requeued
  # one ~22 s (SLURM's own ~11 s hold after a requeue stays).
  echo "SchedulerParameters=bf_interval=1,sched_interval=1"
  echo "JobAcctGatherType=jobacct_gather/none"
  echo "AccountingStorageType=accounting_storage/none"
  echo "JobCompType=jobcomp/none"
  echo "StateSaveLocation=$dir/state"
  echo "SlurmdSpoolDir=$dir/spool/%n"
  echo "SlurmctldPidFile=$dir/run/slurmctld.pid"
  echo "SlurmdPidFile=$dir/run/slurmd-%n.pid"
  echo "SlurmctldLogFile=$dir/log/slurmctld.log"
  echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
  for i in $(seq 1 "$nodes"); do
    echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=${node_ports[$((i - 1))]} $topo"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
} > "$dir/slurm.conf"
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$dir/slurm.conf"
for i in $(seq 1 "$nodes"); do mkdir -p "$dir/spool/n$i"; slurmd -f "$dir/slurm.conf" -N "n$i"; done
for _ in $(seq 1 100); do
  idle=$(sinfo -h -o "%t %D" 2>/dev/null | awk '$1=="idle"{n+=$2} END{print n+0}')
  [ "$idle" -ge "$nodes" ] && exit 0
  sleep 0.2
done
echo "cluster did not become idle:"; sinfo 2>&1; tail -n 5 "$dir"/log/*.log; stop; exit 1
