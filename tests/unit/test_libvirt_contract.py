"""The shared driver contract against libvirt's in-process test hypervisor (``test:///default``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is not installed (pip install "
                    "'novacron[libvirt]'; needs the libvirt-dev and pkg-config packages)")

from novacron.drivers.base import Driver
from novacron.drivers.libvirt import LibvirtDriver
from tests.contract.driver_contract import DriverContract


class TestLibvirtContract(DriverContract):
    @pytest.fixture
    def driver(self, tmp_path: Path) -> Iterator[Driver]:
        drv = LibvirtDriver("test-host", "test:///default", {"pool_path": "/novacron"},
                            tmp_path)
        drv.connect()
        yield drv
        drv.close()
