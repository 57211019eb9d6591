#!/usr/bin/env bash
# Install NovaCron into ./.venv (created if missing) with the given extras, e.g.
#
#   scripts/install.sh            # the runtime only
#   scripts/install.sh dev,aws    # plus extras
#
# Needs Python 3.11+. On a fresh Debian/Ubuntu machine it installs what is missing with apt-get
# (python3-venv, or python3.11 where the system Python is older).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}

log() { echo "install: $*" >&2; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
apt_install() {
    command -v apt-get >/dev/null || { log "please install: $*"; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get install -y -qq "$@" >/dev/null 2>&1 \
        || { as_root apt-get update -qq && as_root apt-get install -y -qq "$@" >/dev/null; }
}
version_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

python=${PYTHON:-}
if [[ -z "$python" ]]; then
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null && version_ok "$candidate"; then
            python=$candidate
            break
        fi
    done
fi
if [[ -z "$python" ]]; then
    log "no Python 3.11+ found; installing python3.11"
    apt_install python3.11 python3.11-venv
    python=python3.11
fi

if [[ ! -x .venv/bin/python ]]; then
    if ! "$python" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        log "installing the venv module for $python"
        apt_install "$(basename "$python")-venv" || apt_install python3-venv
        "$python" -m venv .venv
    fi
fi
.venv/bin/python -m pip install -q --upgrade pip
spec="."
[[ -n "$extras" ]] && spec=".[${extras}]"
log "installing NovaCron ${extras:+with $extras }into .venv"
.venv/bin/python -m pip install -q -e "$spec"
