#!/usr/bin/env bash
# Install and start the real engines the tests run against, idempotently:
# a package already installed is not reinstalled, a daemon that already
# answers is reused. Usage: scripts/engines.sh docker [slurm] [promtool]
# Needs root (CI machines are Debian 12, as root).
set -euo pipefail

log() { printf 'engines: %s\n' "$*" >&2; }

apt_install() {
    local missing=()
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

wait_for() {  # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

docker_engine() {
    apt_install docker.io busybox-static docker-compose
    if docker info >/dev/null 2>&1; then
        log "dockerd already answers: reusing it"
        return
    fi
    log "starting dockerd"
    setsid dockerd >/var/log/dockerd.log 2>&1 < /dev/null &
    wait_for 60 docker info || { tail -20 /var/log/dockerd.log >&2; log "dockerd did not start"; exit 1; }
}

# -- slurm: a single-node cluster on this host ---------------------------------
# The node is this machine; jobs run as root. Accounting is off (as on many
# small clusters): job state comes from squeue / scontrol, so the runner must
# not need sacct. The scheduler settings make small jobs start quickly here
# (see docs/runners.md, "Slurm"): scheduling on every submit and completion
# rather than on a timer, and a finished job kept visible for MinJobAge.
SLURM_CONF=/etc/slurm/slurm.conf
SLURM_MARK="# written by dspy-infra scripts/engines.sh"
SLURM_PARTITION_TUNING="OverSubscribe=FORCE:4"
SLURM_TUNING="MinJobAge=120
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0"

slurm_conf() {  # the configuration for this host, on stdout
    local host cpus mem_kb mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    # slurmd drains a node that has less memory than configured: leave a margin.
    mem_mb=$(( mem_kb / 1024 - 512 ))
    ((mem_mb > 256)) || mem_mb=256
    cat <<CONF
$SLURM_MARK for $host
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
$SLURM_TUNING
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP $SLURM_PARTITION_TUNING
CONF
}

slurm_answers() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

slurm_node_state() { sinfo -h -N -n "$(hostname -s)" -o '%T' 2>/dev/null | head -1; }

slurm_engine() {
    apt_install slurmctld slurmd slurm-client munge
    mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
    local wanted restart=0
    wanted=$(slurm_conf)
    if [[ ! -e $SLURM_CONF ]] || { grep -qF "$SLURM_MARK" "$SLURM_CONF" && [[ $(cat "$SLURM_CONF") != "$wanted" ]]; }; then
        log "writing $SLURM_CONF"
        printf '%s\n' "$wanted" >"$SLURM_CONF"
        restart=1
    elif ! grep -qF "$SLURM_MARK" "$SLURM_CONF"; then
        log "$SLURM_CONF was not written by this script: using it as it is"
    fi
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "starting munged"
        chown -R munge:munge /run/munge 2>/dev/null || true
        runuser -u munge -- munged --force 2>/dev/null || munged --force
        wait_for 10 bash -c 'munge -n | unmunge' || { log "munged did not start"; exit 1; }
    fi
    # A running slurmctld is reused (told of a new configuration); asking one
    # that is not running would cost the client's whole timeout (~10 s).
    if ! pgrep -x slurmctld >/dev/null; then
        log "starting slurmctld"
        slurmctld
    elif ((restart)); then
        log "configuration changed: reconfiguring the running daemons"
        scontrol reconfigure || true
    fi
    wait_for 30 slurm_answers || { tail -20 /var/log/slurm/slurmctld.log >&2; log "slurmctld does not answer"; exit 1; }
    if ! pgrep -x slurmd >/dev/null; then
        log "starting slurmd"
        slurmd
    fi
    local state resumed=-10 deadline=$((SECONDS + 60))
    while :; do
        state=$(slurm_node_state)
        case "$state" in
            idle|mixed|allocated|completing) break ;;
            down*|drain*|drained*|fail*|inval*)
                if ((SECONDS - resumed >= 5)); then
                    log "node is $state: resuming it"
                    scontrol update nodename="$(hostname -s)" state=resume || true
                    resumed=$SECONDS
                fi ;;
        esac
        if ((SECONDS >= deadline)); then
            tail -20 /var/log/slurm/slurmd.log >&2
            log "the Slurm node did not become idle (state: ${state:-unknown})"
            exit 1
        fi
        sleep 0.5
    done
    log "slurm ready: node $(hostname -s) is $state"
}

promtool_engine() {
    # Only the checker, not a Prometheus server: the binary from the Debian
    # package, unpacked, so that no daemon is installed or started.
    if command -v promtool >/dev/null 2>&1; then
        return
    fi
    log "installing promtool (from Debian's prometheus package)"
    local tmp
    tmp=$(mktemp -d)
    chmod 755 "$tmp"  # apt downloads as the _apt user
    (cd "$tmp" && apt-get update -qq && apt-get download -qq prometheus >/dev/null)
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
    install -m 0755 "$tmp/root/usr/bin/promtool" /usr/local/bin/promtool
    rm -rf "$tmp"
}

for engine in "$@"; do
    case "$engine" in
        docker) docker_engine ;;
        slurm) slurm_engine ;;
        promtool) promtool_engine ;;
        *) log "unknown engine: $engine"; exit 2 ;;
    esac
done
