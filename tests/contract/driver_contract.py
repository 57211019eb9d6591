"""The contract every driver passes: subclass :class:`DriverContract` and provide ``driver``.

The ``driver`` fixture yields a connected driver for one host; the suite defines guests with ids
from ``vm_id`` and removes whatever it defined afterwards. Operations a driver does not declare as
capabilities must raise NotSupported with a reason.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest

from novacron.drivers.base import Capability, Driver, GuestConfig
from novacron.errors import NotFound, NotSupported, StaleEpoch
from novacron.states import VMState


class DriverContract:
    """Shared tests; a subclass supplies the ``driver`` fixture."""

    @pytest.fixture
    def driver(self) -> Iterator[Driver]:  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.fixture
    def vm_id(self, driver: Driver) -> Iterator[str]:
        vm = f"vm-contract-{uuid.uuid4().hex[:10]}"
        yield vm
        with contextlib.suppress(NotFound, NotSupported):
            driver.stop(vm, force=True)
        driver.undefine(vm, delete_storage=True)

    def config(self, vm_id: str, epoch: int = 1) -> GuestConfig:
        return GuestConfig(vm_id=vm_id, name=f"contract-{vm_id[-6:]}", cpus=1, memory_mib=64,
                           disk_gib=1, epoch=epoch)

    def test_host_info_is_positive(self, driver: Driver) -> None:
        info = driver.host_info()
        assert info.cpus > 0
        assert info.memory_mib > 0
        assert info.hypervisor

    def test_missing_capabilities_have_reasons(self, driver: Driver) -> None:
        missing = driver.missing_capabilities()
        assert set(missing).isdisjoint(driver.capabilities)
        assert all(reason.strip() for reason in missing.values())
        for cap in missing:
            with pytest.raises(NotSupported, match=r"\w"):
                driver.require(cap)

    def test_define_is_idempotent_and_stopped(self, driver: Driver, vm_id: str) -> None:
        first = driver.define(self.config(vm_id))
        again = driver.define(self.config(vm_id))
        assert first.vm_id == again.vm_id == vm_id
        assert driver.get(vm_id).state == VMState.STOPPED
        assert vm_id in {g.vm_id for g in driver.list()}

    def test_start_stop_cycle(self, driver: Driver, vm_id: str) -> None:
        driver.define(self.config(vm_id))
        running = driver.start(vm_id, epoch=1)
        assert running.state == VMState.RUNNING
        assert driver.start(vm_id, epoch=1).state == VMState.RUNNING  # idempotent
        assert driver.get(vm_id).state == VMState.RUNNING
        assert driver.stats(vm_id).cpu_time_s >= 0
        assert driver.stop(vm_id, timeout_s=20).state == VMState.STOPPED
        assert driver.start(vm_id, epoch=1).state == VMState.RUNNING
        assert driver.stop(vm_id, force=True).state == VMState.STOPPED
        assert driver.stop(vm_id, force=True).state == VMState.STOPPED  # idempotent

    def test_pause_resume(self, driver: Driver, vm_id: str) -> None:
        driver.define(self.config(vm_id))
        driver.start(vm_id, epoch=1)
        if Capability.PAUSE not in driver.capabilities:
            with pytest.raises(NotSupported):
                driver.pause(vm_id)
            return
        assert driver.pause(vm_id).state == VMState.PAUSED
        assert driver.get(vm_id).state == VMState.PAUSED
        assert driver.resume(vm_id).state == VMState.RUNNING

    def test_reboot_keeps_running(self, driver: Driver, vm_id: str) -> None:
        driver.define(self.config(vm_id))
        driver.start(vm_id, epoch=1)
        if Capability.REBOOT not in driver.capabilities:
            with pytest.raises(NotSupported):
                driver.reboot(vm_id)
            return
        assert driver.reboot(vm_id).state == VMState.RUNNING

    def test_stale_epoch_is_refused(self, driver: Driver, vm_id: str) -> None:
        driver.define(self.config(vm_id, epoch=2))
        driver.start(vm_id, epoch=2)
        driver.stop(vm_id, force=True)
        with pytest.raises(StaleEpoch):
            driver.start(vm_id, epoch=1)
        assert driver.get(vm_id).state == VMState.STOPPED

    def test_undefine_removes_and_is_idempotent(self, driver: Driver, vm_id: str) -> None:
        driver.define(self.config(vm_id))
        driver.undefine(vm_id, delete_storage=True)
        with pytest.raises(NotFound):
            driver.get(vm_id)
        driver.undefine(vm_id, delete_storage=True)
        assert vm_id not in {g.vm_id for g in driver.list()}

    def test_unknown_guest_is_not_found(self, driver: Driver) -> None:
        ghost = f"vm-ghost-{uuid.uuid4().hex[:8]}"
        with pytest.raises(NotFound):
            driver.get(ghost)
        with pytest.raises(NotFound):
            driver.start(ghost, epoch=1)
        with pytest.raises(NotFound):
            driver.stats(ghost)
