"""The simulated hypervisor passes the shared driver contract."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from novacron.drivers.base import Driver
from novacron.errors import NovaCronError
from tests.contract.driver_contract import DriverContract
from tests.unit.test_sim_driver import kill_guests, make_driver


class TestSimDriverContract(DriverContract):
    @pytest.fixture
    def driver(self, tmp_path: Path) -> Iterator[Driver]:
        driver = make_driver(tmp_path, host="sim-contract")
        yield driver
        for info in driver.list():
            with contextlib.suppress(NovaCronError):
                driver.stop(info.vm_id, force=True)
        kill_guests(tmp_path / "state")
