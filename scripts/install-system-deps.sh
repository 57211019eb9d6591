#!/usr/bin/env bash
# Install the system packages the libvirt integration tier needs (idempotent).
#
#   bash scripts/install-system-deps.sh
#
# Installs, with apt-get, whatever is missing of: libvirt-daemon-system, libvirt-dev, pkg-config,
# qemu-system-x86, qemu-utils, busybox-static, cpio, rsync. Fetches the guest kernel package
# (linux-image-cloud-amd64 and the versioned image it depends on) with `apt-get download` into
# $NOVACRON_DEB_CACHE (default /var/cache/novacron/debs); it is never installed. Runs
# `apt-get update` at most once, and only when a package is missing. Without root or apt-get it
# says what is missing and exits 0, so the tests that need these packages skip with that reason.
set -euo pipefail

PACKAGES=(libvirt-daemon-system libvirt-dev pkg-config qemu-system-x86 qemu-utils
          busybox-static cpio rsync)
KERNEL_META=linux-image-cloud-amd64
DEB_CACHE=${NOVACRON_DEB_CACHE:-/var/cache/novacron/debs}

log() { echo "install-system-deps: $*" >&2; }

installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
kernel_debs=("$DEB_CACHE"/linux-image-*-cloud-amd64_*.deb)
[[ -e "${kernel_debs[0]}" ]] || kernel_missing=1

if [[ ${#missing[@]} -eq 0 && -z "${kernel_missing:-}" ]]; then
    log "all present"
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    log "cannot install (needs root and apt-get); missing: ${missing[*]} ${kernel_missing:+$KERNEL_META}"
    exit 0
fi

updated=
apt_update_once() {
    if [[ -z "$updated" ]]; then
        apt-get update -qq
        updated=1
    fi
}

export DEBIAN_FRONTEND=noninteractive
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        apt_update_once
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

if [[ -n "${kernel_missing:-}" ]]; then
    mkdir -p "$DEB_CACHE"
    kernel_pkg() {
        apt-cache depends "$KERNEL_META" 2>/dev/null \
            | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
    }
    pkg=$(kernel_pkg)
    if [[ -z "$pkg" ]]; then
        apt_update_once
        pkg=$(kernel_pkg)
    fi
    [[ -n "$pkg" ]] || { log "apt knows no $KERNEL_META"; exit 1; }
    log "downloading $pkg into $DEB_CACHE"
    (cd "$DEB_CACHE" && { apt-get download -qq -o APT::Sandbox::User=root "$pkg" \
        || { apt_update_once; apt-get download -qq -o APT::Sandbox::User=root "$pkg"; }; })
fi
log "done"
