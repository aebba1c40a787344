#!/usr/bin/env bash
# Install and start the real engines the tests run against, idempotently:
# a package already installed is not reinstalled, a daemon that already
# answers is reused. Usage: scripts/engines.sh docker [slurm]
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

for engine in "$@"; do
    case "$engine" in
        docker) docker_engine ;;
        *) log "unknown engine: $engine"; exit 2 ;;
    esac
done
