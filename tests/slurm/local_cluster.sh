#!/usr/bin/env bash
# A throwaway SLURM cluster on this one machine, for tests: N emulated nodes, each a
# `slurmd -N <name>` on its own port, one slurmctld, one munged, all rooted in DIR.
#
#   local_cluster.sh start DIR [NODES]   install packages if missing, start, wait for idle nodes
#   local_cluster.sh stop DIR            cancel jobs, stop everything started from DIR
#   local_cluster.sh env DIR             print the variables a client needs (SLURM_CONF=...)
#
# Exit codes: 0 ok; 77 this machine cannot host the cluster (not root, or apt cannot install
# Debian's munge/slurmctld/slurmd/slurm-client), the caller should skip; anything else is a failure.
#
# What persists after `stop`: only the apt packages (if they were installed here). Nothing is
# written to /etc: config, munge key, sockets, spool, state and logs all live under DIR, and the
# emulated nodes use NodeAddr=127.0.0.1, so no /etc/hosts line is needed. The daemons run with
# LOCAL_SLURM_CLUSTER=DIR in their environment; `stop` ends exactly the processes that carry it
# (daemons and the slurmstepd they fork) plus their descendants (job processes), nothing else.
set -euo pipefail

usage() { echo "usage: $0 start|stop|env DIR [NODES]" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
cmd=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
nodes=${3:-2}
# Declared CPUs per emulated node; more than exist is fine (SlurmdParameters=config_overrides).
cpus=${LOCAL_SLURM_CPUS_PER_NODE:-4}
conf=$dir/etc/slurm.conf
node_prefix=${LOCAL_SLURM_NODE_PREFIX:-mbnode}

log() { echo "local_cluster: $*" >&2; }

have_packages() {
    command -v munged >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null
}

install_packages() {
    have_packages && return 0
    if [[ $(id -u) -ne 0 ]]; then
        log "SKIP: SLURM is not installed and installing it needs root (uid $(id -u))"
        exit 77
    fi
    log "installing munge slurmctld slurmd slurm-client with apt-get"
    # Debian's postinst scripts may try to start the system services; they find no
    # /etc/slurm/slurm.conf and stay down (containers usually forbid starting them anyway).
    if ! (DEBIAN_FRONTEND=noninteractive apt-get update -qq \
          && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq munge slurmctld slurmd slurm-client) \
          > "$dir/apt.log" 2>&1; then
        tail -n 20 "$dir/apt.log" >&2
        log "SKIP: apt-get could not install munge slurmctld slurmd slurm-client (log: $dir/apt.log)"
        exit 77
    fi
    have_packages || { log "SKIP: packages installed but binaries missing"; exit 77; }
}

free_ports() {  # N distinct TCP ports that were free a moment ago
    local n=$1 port out=()
    while [[ ${#out[@]} -lt $n ]]; do
        port=$(( 20000 + RANDOM % 30000 ))
        [[ " ${out[*]-} " == *" $port "* ]] && continue
        # A refused connection means nobody listens there.
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then out+=("$port"); fi
    done
    echo "${out[@]}"
}

write_config() {
    local ports ctld_port i host
    read -r -a ports <<< "$(free_ports $((nodes + 1)))"
    ctld_port=${ports[0]}
    host=$(hostname -s)
    {
        echo "# Written by tests/slurm/local_cluster.sh; everything lives under $dir."
        echo "ClusterName=mblocal"
        # Job ids start at a random offset: two test clusters on one host (parallel CI runs) must
        # not both run a job 1, whose rendezvous port (10000 + id) and id torchrun would share.
        echo "FirstJobId=$(( 1000 + RANDOM % 40000 ))"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=$ctld_port"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=socket=$dir/munge/munge.socket.2"
        echo "StateSaveLocation=$dir/state"
        echo "SlurmdSpoolDir=$dir/spool/%n"
        echo "SlurmctldPidFile=$dir/run/slurmctld.pid"
        echo "SlurmdPidFile=$dir/run/slurmd-%n.pid"
        echo "SlurmctldLogFile=$dir/log/slurmctld.log"
        echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
        echo "SlurmctldDebug=info"
        echo "SlurmdDebug=info"
        # Signals go to every process of a step (like proctrack/cgroup on real clusters), so a
        # USR1 reaches the torchrun agent and the ranks alike: the case the launcher must survive.
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "MpiDefault=none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "SlurmdParameters=config_overrides"
        echo "SchedulerType=sched/backfill"
        echo "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0"
        echo "EnforcePartLimits=ALL"
        echo "JobRequeue=1"
        echo "ReturnToService=2"
        echo "MailProg=/bin/true"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "JobCompType=jobcomp/none"
        echo "KillWait=10"
        echo "InactiveLimit=0"
        echo "MinJobAge=3600"
        echo "SlurmctldTimeout=30"
        echo "SlurmdTimeout=60"
        for ((i = 1; i <= nodes; i++)); do
            echo "NodeName=$node_prefix$i NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[$i]} CPUs=$cpus RealMemory=4000 State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > "$conf"
}

start_daemon() {  # name, command...: run in the background in its own session, record its pid
    local name=$1; shift
    LOCAL_SLURM_CLUSTER=$dir SLURM_CONF=$conf setsid "$@" > "$dir/log/$name.out" 2>&1 < /dev/null &
    echo "$! $name" >> "$dir/run/pids"
}

wait_idle() {
    local deadline=$((SECONDS + ${LOCAL_SLURM_START_TIMEOUT:-60})) states
    while (( SECONDS < deadline )); do
        states=$(SLURM_CONF=$conf sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr '\n' ' ')
        if [[ $states == "idle " ]] && [[ $(SLURM_CONF=$conf sinfo -h -N -o '%N' | wc -l) -eq $nodes ]]; then
            return 0
        fi
        sleep 0.2
    done
    log "nodes not idle after ${LOCAL_SLURM_START_TIMEOUT:-60} s (states: ${states:-none})"
    tail -n 20 "$dir"/log/*.log >&2 || true
    return 1
}

start() {
    install_packages
    if [[ -s $dir/run/pids ]]; then log "$dir already has a running cluster; stop it first"; exit 1; fi
    mkdir -p "$dir"/{etc,state,spool,run,log}
    # munged refuses keys and sockets that others could read or write.
    install -d -m 0700 "$dir/munge-key"
    install -d -m 0755 "$dir/munge"
    dd if=/dev/urandom of="$dir/munge-key/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$dir/munge-key/munge.key"
    local i
    for ((i = 1; i <= nodes; i++)); do mkdir -p "$dir/spool/$node_prefix$i"; done
    : > "$dir/run/pids"
    write_config

    LOCAL_SLURM_CLUSTER=$dir munged --force --socket="$dir/munge/munge.socket.2" \
        --key-file="$dir/munge-key/munge.key" --pid-file="$dir/run/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    echo "$(cat "$dir/run/munged.pid") munged" >> "$dir/run/pids"

    start_daemon slurmctld slurmctld -D -i -f "$conf"
    for ((i = 1; i <= nodes; i++)); do
        start_daemon "slurmd-$node_prefix$i" slurmd -D -N "$node_prefix$i" -f "$conf"
    done
    if ! wait_idle; then stop; exit 1; fi
    log "cluster up: $nodes nodes ($(SLURM_CONF=$conf sinfo -h -N -o '%N' | tr '\n' ' ')), SLURM_CONF=$conf"
    print_env
}

print_env() {
    echo "SLURM_CONF=$conf"
}

# Every pid whose environment carries our marker, and all their descendants.
cluster_pids() {
    local marked=() pid
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        [[ $pid == "$$" ]] && continue
        if { tr '\0' '\n' < "/proc/$pid/environ"; } 2>/dev/null | grep -qxF "LOCAL_SLURM_CLUSTER=$dir"; then
            marked+=("$pid")
        fi
    done
    [[ ${#marked[@]} -eq 0 ]] && return 0
    # Walk the parent links once: a process belongs to us if any ancestor is marked.
    local -A parent=()
    local stat ppid
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        ppid=$(cut -d' ' -f2 <<< "${stat##*) }")
        parent[$pid]=$ppid
    done
    local -A mine=()
    for pid in "${marked[@]}"; do mine[$pid]=1; done
    local p
    for pid in "${!parent[@]}"; do
        p=$pid
        while [[ -n ${parent[$p]-} && $p != 1 && $p != 0 ]]; do
            if [[ -n ${mine[$p]-} ]]; then mine[$pid]=1; break; fi
            p=${parent[$p]}
        done
    done
    unset "mine[$$]"
    echo "${!mine[@]}"
}

terminate() {  # pids...: TERM, wait up to 10 s, then KILL what is left
    [[ $# -eq 0 ]] && return 0
    kill -TERM "$@" 2>/dev/null || true
    local deadline=$((SECONDS + 10)) alive pid
    while (( SECONDS < deadline )); do
        alive=()
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        [[ ${#alive[@]} -eq 0 ]] && return 0
        sleep 0.2
    done
    kill -KILL "${alive[@]}" 2>/dev/null || true
}

stop() {
    [[ -f $conf ]] || { log "no cluster in $dir"; return 0; }
    local jobs deadline
    if command -v squeue >/dev/null; then
        jobs=$(SLURM_CONF=$conf timeout 10 squeue -h -o '%A' 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            SLURM_CONF=$conf timeout 10 scancel --full --signal=KILL $jobs 2>/dev/null || true
            SLURM_CONF=$conf timeout 10 scancel $jobs 2>/dev/null || true
            deadline=$((SECONDS + 20))
            while (( SECONDS < deadline )) && [[ -n $(SLURM_CONF=$conf timeout 5 squeue -h -o '%A' -t R,CG 2>/dev/null || true) ]]; do
                sleep 0.5
            done
        fi
    fi
    # Job processes first (descendants), then the daemons and slurmstepd.
    local pids
    read -r -a pids <<< "$(cluster_pids)"
    terminate "${pids[@]}"
    if [[ -f $dir/run/pids ]]; then
        local recorded=()
        while read -r pid _; do kill -0 "$pid" 2>/dev/null && recorded+=("$pid"); done < "$dir/run/pids"
        terminate "${recorded[@]}"
        : > "$dir/run/pids"
    fi
    read -r -a pids <<< "$(cluster_pids)"
    if [[ ${#pids[@]} -gt 0 ]]; then
        log "still running after stop: ${pids[*]}"
        return 1
    fi
    log "cluster in $dir stopped"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    env) print_env ;;
    *) usage ;;
esac
