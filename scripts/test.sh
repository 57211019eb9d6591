#!/usr/bin/env bash
# Install everything the tests need (system packages with apt-get, Python packages into .venv) and
# run the whole suite: tests/unit (no Ray), tests/integration (local Ray, real libvirt/QEMU) and
# tests/e2e (HTTP over Ray Serve, the CLI). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
extras=dev,auth,aws,azure,gcp
if pkg-config --exists libvirt 2>/dev/null; then
    extras=$extras,libvirt
else
    echo "test: libvirt development files missing; the libvirt tests will skip" >&2
fi
scripts/install.sh "$extras"
exec .venv/bin/python -m pytest tests "$@"
