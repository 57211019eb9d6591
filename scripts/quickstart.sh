#!/usr/bin/env bash
# Install NovaCron and start it on its embedded default: a local Ray instance, the controller with
# its SQLite store in ~/.novacron, four simulated hosts, the HTTP API on 127.0.0.1:8000 and the Ray
# dashboard on 127.0.0.1:8265; then run a short demo. The cluster keeps running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/novacron up "$@"
.venv/bin/novacron demo
echo
echo "NovaCron keeps running. Use it with: .venv/bin/novacron --help   (or source .venv/bin/activate)"
echo "Stop it with:                       .venv/bin/novacron down"
