"""Live smoke tests against real clouds: skipped unless asked for, and they cost money.

Run with the plugin loaded at start-up (so the flags exist), the host config of each cloud in an
environment variable, and real credentials behind its ``credentials`` reference::

    NOVACRON_LIVE_AWS_CONFIG='{"region": "eu-west-1", "default_image": "ami-...",
                               "instance_types": ["t3.*"]}' \\
    pytest -p tests.fakes.plugin --aws tests/unit/test_cloud_live.py

(``--azure`` with ``NOVACRON_LIVE_AZURE_CONFIG``, ``--gcp`` with ``NOVACRON_LIVE_GCP_CONFIG``.)
One small guest is defined, started, stopped and deleted on each cloud asked for.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from novacron.drivers.base import GuestConfig, driver_class
from novacron.errors import NotFound
from novacron.states import VMState

pytest_plugins = ["tests.fakes.plugin"]


@pytest.mark.parametrize("cloud", ["aws", "azure", "gcp"])
def test_live_smoke(cloud: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if not request.config.getoption(f"--{cloud}", default=False):
        pytest.skip(f"live {cloud} test: run with -p tests.fakes.plugin --{cloud}")
    raw = os.environ.get(f"NOVACRON_LIVE_{cloud.upper()}_CONFIG")
    if not raw:
        pytest.skip(f"set NOVACRON_LIVE_{cloud.upper()}_CONFIG to the host config (JSON)")
    driver = driver_class(cloud)(f"live-{cloud}", None, json.loads(raw), tmp_path)
    driver.connect()
    vm_id = f"vm-live-{uuid.uuid4().hex[:10]}"
    try:
        assert driver.host_info().cpus > 0
        driver.host_stats()
        driver.define(GuestConfig(vm_id=vm_id, name="novacron-smoke", cpus=1, memory_mib=512,
                                  disk_gib=10, epoch=1))
        assert driver.start(vm_id, epoch=1).state == VMState.RUNNING
        assert vm_id in {g.vm_id for g in driver.list()}
        assert driver.stop(vm_id, timeout_s=120).state == VMState.STOPPED
    finally:
        try:
            driver.stop(vm_id, force=True)
            driver.undefine(vm_id)
        except NotFound:
            pass
        driver.close()
