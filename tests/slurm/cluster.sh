#!/usr/bin/env bash
# A real one-node SLURM cluster (munged + slurmctld + slurmd, Debian's slurm-wlm 22.05) for
# tests/dist/test_slurm.py, with no systemd and no cgroups (containers, CI VMs). Needs root.
#
#   bash tests/slurm/cluster.sh install   # apt-get install slurm-wlm munge (skipped when slurmctld exists)
#   bash tests/slurm/cluster.sh start     # start the daemons (idempotent); waits until the node is idle
#   export SLURM_CONF=/tmp/blt-slurm/slurm.conf; sbatch ...; squeue; scontrol show job JOBID
#   bash tests/slurm/cluster.sh status    # the daemons and sinfo
#   bash tests/slurm/cluster.sh stop      # cancel the jobs, kill every process start began, leave nothing
#
# Everything (slurm.conf, munge key and socket, logs, spool, controller state) lives in
# $BLT_SLURM_DIR (default /tmp/blt-slurm); the node is this host with 2 CPUs and one partition "debug".
# Ports: $BLT_SLURM_PORT (slurmctld, default 6817) and the next one (slurmd).
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # the daemons live in sbin, which a plain `su` leaves out

DIR=${BLT_SLURM_DIR:-/tmp/blt-slurm}
CTLD_PORT=${BLT_SLURM_PORT:-6817}
CONF=$DIR/slurm.conf
NODE=$(hostname -s 2>/dev/null || uname -n)
export SLURM_CONF=$CONF

die() { echo "cluster.sh: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "'$1' must run as root ($2); try: sudo bash $0 $1"; }
need_slurm() {
    local b
    for b in slurmctld slurmd munged sbatch scontrol sinfo; do
        command -v "$b" >/dev/null || die "'$b' not found; install SLURM first: bash tests/slurm/cluster.sh install"
    done
}

# alive NAME: the daemon NAME that start began is still running (not a zombie, not a reused pid)
alive() {
    local pid stat
    [ -f "$DIR/pids/$1" ] && pid=$(cat "$DIR/pids/$1") && stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "${stat##*) }" != Z* ] && grep -qa "^$1" "/proc/$pid/cmdline" 2>/dev/null
}

install() {
    need_root install "it installs packages"
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        echo "slurm-wlm is already installed ($(slurmctld -V))"; return
    fi
    command -v apt-get >/dev/null ||
        die "apt-get not found: install SLURM 22.05+ (slurmctld, slurmd, the client) and munge by hand"
    # the packages' postinst must not start system daemons (no systemd here, and ours use their own config)
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-cache policy slurm-wlm 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge
    slurmctld -V
}

write_conf() {
    mkdir -p "$DIR"/{munge,ctld,spool,pids,log}
    chmod 711 "$DIR/munge"
    # RealMemory: 90% of this machine (a node that claims more than it has is drained)
    local mem
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat >"$CONF.new" <<EOF
# written by tests/slurm/cluster.sh start
ClusterName=blt
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups, no systemd, no accounting daemon
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
# the node as configured here, whatever slurmd detects (a CI machine may have more or fewer cores)
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# start pending (and requeued) jobs within a second or two of becoming eligible
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
# SIGTERM, then SIGKILL this many seconds later: the ranks need it to save their checkpoint
KillWait=20
# finished jobs stay visible to 'scontrol show job' this long
MinJobAge=600
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
InactiveLimit=0
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=2 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"
}

# spawn NAME CMD...: run a daemon in the foreground in its own session (its pid is the session id,
# which stop sweeps for anything it forked and left: slurmctld's slurmscriptd)
spawn() {
    local name=$1; shift
    setsid "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null &
    echo $! >"$DIR/pids/$name"
}

start() {
    need_root start "the daemons and jobs run as SlurmUser=root"
    need_slurm
    write_conf
    if ! alive munged; then
        local key=$DIR/munge/munge.key
        if [ ! -s "$key" ]; then
            if command -v mungekey >/dev/null; then mungekey --create --keyfile="$key"
            else dd if=/dev/urandom of="$key" bs=1024 count=1 status=none; fi
            chmod 400 "$key"
        fi
        rm -f "$DIR/munge/munge.socket.2"*
        spawn munged munged --foreground --force --key-file="$key" --socket="$DIR/munge/munge.socket.2" \
            --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
        for _ in $(seq 100); do [ -S "$DIR/munge/munge.socket.2" ] && break; sleep 0.1; done
        [ -S "$DIR/munge/munge.socket.2" ] || { tail -n 5 "$DIR/log/munged"*; die "munged did not start"; }
    fi
    # -c: a fresh controller state (no jobs from an earlier start)
    alive slurmctld || spawn slurmctld slurmctld -D -c -f "$CONF"
    alive slurmd || spawn slurmd slurmd -D -f "$CONF"
    local state=""
    for _ in $(seq 120); do
        state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
        [ "$state" = idle ] && break
        for d in slurmctld slurmd; do
            alive $d || { tail -n 20 "$DIR/log/$d.log" "$DIR/log/$d.out" 2>/dev/null; die "$d exited (logs above)"; }
        done
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log"
        die "node $NODE is '$state', not idle after 60 s (logs above)"
    fi
    echo "SLURM up: node $NODE idle; export SLURM_CONF=$CONF"
}

# session_pids SID...: the live processes in these sessions
session_pids() {
    local p stat state sid sids=" $* "
    [ $# -gt 0 ] || return 0
    for p in /proc/[0-9]*; do
        stat=$(cat "$p/stat" 2>/dev/null) || continue
        read -r state _ _ sid _ <<<"${stat##*) }"  # state ppid pgrp session, after "pid (comm) "
        if [ "$state" != Z ] && [[ "$sids" == *" $sid "* ]]; then echo "${p#/proc/}"; fi
    done
    return 0
}

# the processes of jobs on this cluster: slurmstepd and what it ran (their environment names our slurm.conf)
job_pids() {
    local p
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = $$ ] && continue
        grep -qzxF "SLURM_CONF=$CONF" "$p/environ" 2>/dev/null || continue
        if grep -qzE '^SLURM_JOB_ID=' "$p/environ" 2>/dev/null || grep -qa '^slurmstepd' "$p/cmdline" 2>/dev/null; then
            echo "${p#/proc/}"
        fi
    done
    return 0
}

stop() {
    [ -d "$DIR/pids" ] || { echo "nothing to stop"; return; }
    if alive slurmctld; then  # jobs first: slurmd leaves running job steps behind when it stops
        scancel --partition=debug --full --signal=KILL >/dev/null 2>&1 || true
        scancel --partition=debug >/dev/null 2>&1 || true
        for _ in $(seq 50); do [ -z "$(squeue -h -t R,CG,S 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    local name pids sids=()
    for name in slurmd slurmctld munged; do  # the sessions of the daemons that are ours and alive
        alive $name && sids+=("$(cat "$DIR/pids/$name")")
    done
    [ ${#sids[@]} -gt 0 ] && kill "${sids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
        pids=$(session_pids ${sids[@]+"${sids[@]}"})
        [ -z "$pids" ] && break
        sleep 0.2
    done
    # anything left: a daemon that hung, a job step the controller did not end
    pids="$(session_pids ${sids[@]+"${sids[@]}"}) $(job_pids)"
    [ -z "${pids// /}" ] || kill -9 $pids 2>/dev/null || true
    rm -f "$DIR"/pids/*
    echo "SLURM stopped"
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if alive $name; then echo "$name: running (pid $(cat "$DIR/pids/$name"))"; else echo "$name: stopped"; fi
    done
    alive slurmctld && sinfo && squeue
    alive slurmctld
}

case "${1:-}" in
    install|start|stop|status) "$1" ;;
    *) echo "usage: bash $0 install|start|stop|status  (state in \$BLT_SLURM_DIR, default /tmp/blt-slurm)" >&2
       exit 2 ;;
esac
