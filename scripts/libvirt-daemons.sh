#!/usr/bin/env bash
# Start and stop the libvirt daemons the integration tests use.
#
#   bash scripts/libvirt-daemons.sh start|stop|status system|peer
#   bash scripts/libvirt-daemons.sh restart system   (tests reconnecting; guests keep running)
#
# system  virtlogd + libvirtd answering qemu:///system. Runs in a private mount namespace where
#         /etc/libvirt is a copy with qemu.conf user/group "root" (without it every domain start
#         on a host with an unusable /dev/kvm takes ~44 s); the host's /etc/libvirt is untouched.
# peer    a second libvirtd --listen, a migration target on this machine, reached as
#         qemu+tcp://$NOVACRON_PEER_ADDR/system (default 127.0.0.2). It runs inside `unshare -m`
#         with private tmpfs over /run/libvirt, /var/lib/libvirt and /var/log/libvirt, its own
#         copy of /etc/libvirt with its own host_uuid (libvirt refuses migration between equal
#         host UUIDs), auth_tcp="none", stdio_handler="file", its own migration address and port
#         range, and no cgroup controllers (both daemons would claim the same machine scope).
#
# `start` prints "started" or "running" (already up: left alone). `stop` ends only daemons this
# script started (it keeps their pid files under $NOVACRON_LIBVIRT_STATE) after destroying their
# novacron-* guests. Needs root and the packages from scripts/install-system-deps.sh.
set -euo pipefail

STATE=${NOVACRON_LIBVIRT_STATE:-/var/tmp/novacron-libvirt}
PEER_ADDR=${NOVACRON_PEER_ADDR:-127.0.0.2}
PEER_URI="qemu+tcp://$PEER_ADDR/system"
SYSTEM_URI="qemu:///system"

log() { echo "libvirt-daemons: $*" >&2; }
die() { log "$*"; exit 1; }

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for <seconds> <command...>: until the command succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

stop_pid() {  # stop_pid <pidfile>: TERM the process, KILL it after 15 s
    local pid
    alive "$1" || { rm -f "$1"; return 0; }
    pid=$(cat "$1")
    kill -TERM "$pid"
    if ! wait_for 15 bash -c "! kill -0 $pid"; then
        log "pid $pid ignored SIGTERM; killing it"
        kill -KILL "$pid"
    fi
    rm -f "$1"
}

destroy_guests() {  # destroy_guests <uri>: stop and remove the novacron-* guests of a daemon
    local name
    for name in $(virsh -c "$1" list --all --name 2>/dev/null | grep '^novacron-' || true); do
        virsh -c "$1" destroy "$name" >/dev/null 2>&1 || true
        virsh -c "$1" undefine "$name" --snapshots-metadata >/dev/null 2>&1 || true
    done
}

config_copy() {  # config_copy <dir>: a fresh copy of /etc/libvirt with root-run QEMU
    rm -rf "$1"
    mkdir -p "$1"
    cp -a /etc/libvirt/. "$1/"
    printf 'user = "root"\ngroup = "root"\n' >>"$1/qemu.conf"
    printf 'log_outputs = "3:file:%s/libvirtd.log"\n' "$(dirname "$1")" >>"$1/libvirtd.conf"
}

start_system() {
    local dir=$STATE/system
    if virsh -c "$SYSTEM_URI" version >/dev/null 2>&1; then
        echo running
        return
    fi
    mkdir -p "$dir" /run/libvirt
    if ! alive "$dir/virtlogd.pid" && ! alive /run/virtlogd.pid; then
        virtlogd -d --pid-file "$dir/virtlogd.pid"
        wait_for 10 test -S /run/libvirt/virtlogd-sock || die "virtlogd did not start"
    fi
    # Made once and kept: persistent domains and pools are saved in it (a restart keeps them).
    [[ -f "$dir/etc/libvirtd.conf" ]] || config_copy "$dir/etc"
    unshare -m --propagation private bash -c \
        "mount --bind '$dir/etc' /etc/libvirt && exec libvirtd -d --pid-file '$dir/libvirtd.pid'"
    wait_for 20 virsh -c "$SYSTEM_URI" version \
        || die "libvirtd did not answer on $SYSTEM_URI; see $dir/libvirtd.log"
    echo started
}

stop_system() {
    local dir=$STATE/system
    if ! alive "$dir/libvirtd.pid" && ! alive "$dir/virtlogd.pid"; then
        log "system daemons were not started by this script; left alone"
        return
    fi
    if alive "$dir/libvirtd.pid"; then
        destroy_guests "$SYSTEM_URI"
        stop_pid "$dir/libvirtd.pid"
    fi
    stop_pid "$dir/virtlogd.pid"
}

start_peer() {
    local dir=$STATE/peer
    if alive "$dir/libvirtd.pid" && virsh -c "$PEER_URI" version >/dev/null 2>&1; then
        echo running
        return
    fi
    mkdir -p "$dir"
    # A fresh copy each start: the peer's state lives on tmpfs and goes with it.
    config_copy "$dir/etc"
    [[ -f "$dir/host_uuid" ]] || cat /proc/sys/kernel/random/uuid >"$dir/host_uuid"
    cat >>"$dir/etc/libvirtd.conf" <<EOF
listen_tls = 0
listen_tcp = 1
listen_addr = "$PEER_ADDR"
tcp_port = "16509"
auth_tcp = "none"
host_uuid = "$(cat "$dir/host_uuid")"
EOF
    cat >>"$dir/etc/qemu.conf" <<EOF
stdio_handler = "file"
migration_address = "$PEER_ADDR"
migration_host = "$PEER_ADDR"
migration_port_min = 49252
migration_port_max = 49299
cgroup_controllers = [ ]
EOF
    mkdir -p /run/libvirt /var/lib/libvirt /var/log/libvirt
    unshare -m --propagation private bash -c "
        set -e
        mount -t tmpfs -o mode=0755 novacron-peer-run /run/libvirt
        mount -t tmpfs -o mode=0755 novacron-peer-lib /var/lib/libvirt
        mount -t tmpfs -o mode=0755 novacron-peer-log /var/log/libvirt
        mount --bind '$dir/etc' /etc/libvirt
        mkdir -p /var/lib/libvirt/qemu /var/lib/libvirt/images /var/log/libvirt/qemu
        exec libvirtd -d --listen --pid-file '$dir/libvirtd.pid'"
    wait_for 20 virsh -c "$PEER_URI" version \
        || die "peer libvirtd did not answer on $PEER_URI; see $dir/libvirtd.log"
    echo started
}

stop_peer() {
    local dir=$STATE/peer
    if ! alive "$dir/libvirtd.pid"; then
        rm -f "$dir/libvirtd.pid"
        return
    fi
    destroy_guests "$PEER_URI"
    stop_pid "$dir/libvirtd.pid"
}

status() {  # status <uri>
    if virsh -c "$1" version >/dev/null 2>&1; then echo running; else echo stopped; fi
}

[[ $# -eq 2 ]] || die "usage: $0 start|stop|restart|status system|peer"
[[ $(id -u) -eq 0 ]] || die "needs root"
action=$1 which=$2
case "$which" in
    system) uri=$SYSTEM_URI ;;
    peer) uri=$PEER_URI ;;
    *) die "unknown daemon $which (system or peer)" ;;
esac
command -v libvirtd >/dev/null || die "libvirtd is not installed (bash scripts/install-system-deps.sh)"
case "$action" in
    start) "start_$which" ;;
    stop) "stop_$which" ;;
    restart)  # the system libvirtd this script started; its guests keep running
        [[ $which == system ]] || die "only the system daemon can be restarted"
        alive "$STATE/system/libvirtd.pid" || die "system libvirtd was not started by this script"
        stop_pid "$STATE/system/libvirtd.pid"
        start_system ;;
    status) status "$uri" ;;
    *) die "unknown action $action" ;;
esac
