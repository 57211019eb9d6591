"""The per-VM and per-host agents: what a VMActor and a HostActor do, without Ray.

An agent owns a driver and talks to the control plane through a :class:`Reporter`. The actors in
``actors/`` only construct agents and forward calls. This module imports no third-party package, so
a VMActor process stays small.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Protocol

from novacron.drivers.base import (
    Capability,
    Driver,
    GuestConfig,
    GuestEvent,
    GuestInfo,
    driver_class,
)
from novacron.errors import InvalidRequest, NotFound, NovaCronError, StaleEpoch
from novacron.states import PowerState, VMState

log = logging.getLogger("novacron.agents")


class Reporter(Protocol):
    """How agents tell the control plane what they observed."""

    def report_vm(self, vm_id: str, epoch: int, observed: Mapping[str, Any]) -> None: ...

    def heartbeat(self, host: str, stats: Mapping[str, Any],
                  guests: Sequence[Mapping[str, Any]]) -> None: ...


def make_driver(host: Mapping[str, Any], state_dir: str) -> Driver:
    """Build and connect the driver of a host record (a dict as stored)."""
    cls = driver_class(str(host["driver"]))
    driver = cls(str(host["name"]), host.get("uri"), host.get("config") or {}, Path(state_dir))
    driver.connect()
    return driver


def guest_config(vm: Mapping[str, Any]) -> GuestConfig:
    """The driver's view of a VM record (a dict as stored)."""
    spec = vm["spec"]
    return GuestConfig(vm_id=vm["id"], name=spec["name"], cpus=spec["cpus"],
                       memory_mib=spec["memory_mib"], disk_gib=spec["disk_gib"],
                       image=spec.get("image"), labels=spec.get("labels") or {},
                       workload=spec.get("workload") or {}, epoch=vm["epoch"])


def observation(info: GuestInfo | None, *, error: str | None = None,
                done: str | None = None) -> dict[str, Any]:
    """What an agent reports: the guest's state, handle and the time it was seen."""
    if info is None:
        return {"state": VMState.DELETED.value, "guest_id": None, "time": time.time(),
                "error": error, "done": done}
    data = asdict(info)
    data["state"] = info.state.value
    data.update(time=time.time(), error=error, done=done)
    return data


def _plain(value: object) -> Any:
    """A driver's dataclass result as plain data (for Ray and JSON)."""
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


class VMAgent:
    """Drives one VM's guest toward the desired state it is given; idempotent."""

    def __init__(self, vm_id: str, driver: Driver, reporter: Reporter, *,
                 stop_timeout_s: float = 30.0) -> None:
        self.vm_id = vm_id
        self.driver = driver
        self.reporter = reporter
        self.stop_timeout_s = stop_timeout_s
        self.epoch = 0
        self.revision = 0  # of the newest command run: an older one arriving late is ignored
        self._lock = threading.Lock()

    def observe(self) -> dict[str, Any]:
        """The guest's state now (re-attaches to a guest that outlived a previous agent)."""
        try:
            return observation(self.driver.get(self.vm_id))
        except NotFound:
            return observation(None)

    def power_off(self) -> bool:
        """Force the guest off without changing what was asked for; False if it was not on."""
        with self._lock:
            try:
                info = self.driver.get(self.vm_id)
            except NotFound:
                return False
            if info.state == VMState.STOPPED:
                return False
            self.driver.stop(self.vm_id, force=True)
            return True

    def snapshot(self, op: str, name: str | None = None) -> Any:
        """Snapshot operations: ``create``, ``list``, ``revert`` or ``delete`` (with ``name``)."""
        with self._lock:
            d = self.driver
            if op == "list":
                return [_plain(s) for s in d.snapshot_list(self.vm_id)]
            if name is None:
                raise InvalidRequest(f"snapshot {op} needs a snapshot name")
            if op == "create":
                return _plain(d.snapshot_create(self.vm_id, name))
            if op == "revert":
                result = observation(d.snapshot_revert(self.vm_id, name))
                self.reporter.report_vm(self.vm_id, self.epoch, result)
                return result
            if op == "delete":
                d.snapshot_delete(self.vm_id, name)
                return None
            raise InvalidRequest(f"unknown snapshot operation {op!r}")

    def converge(self, vm: Mapping[str, Any]) -> dict[str, Any]:
        """Drive the guest to ``vm["desired"]``; report and return what was observed."""
        with self._lock:
            epoch = int(vm["epoch"])
            if epoch < self.epoch:
                raise StaleEpoch(f"VM {self.vm_id}: epoch {epoch} is older than {self.epoch}",
                                 details={"vm": self.vm_id, "epoch": epoch,
                                          "current": self.epoch})
            revision = int(vm.get("revision", 0))
            if epoch == self.epoch and revision < self.revision:
                return self.observe()  # a command overtaken by a newer one
            self.epoch, self.revision = epoch, revision
            pending = vm.get("pending")
            try:
                info = self._converge(vm, PowerState(vm["desired"]), pending)
                result = observation(info, done=pending)
            except NovaCronError as exc:
                log.warning("VM %s: %s", self.vm_id, exc.message)
                current = self.observe()
                result = {**current, "error": exc.message, "error_code": exc.code,
                          "done": pending}
            self.reporter.report_vm(self.vm_id, epoch, result)
            return result

    def _converge(self, vm: Mapping[str, Any], desired: PowerState,
                  pending: str | None) -> GuestInfo | None:
        d = self.driver
        try:
            info: GuestInfo | None = d.get(self.vm_id)
        except NotFound:
            info = None
        if desired == PowerState.DELETED:
            if info is not None:
                if info.state != VMState.STOPPED:
                    d.stop(self.vm_id, force=True)
                d.undefine(self.vm_id, delete_storage=True)
            return None
        if info is None:
            info = d.define(guest_config(vm))
        state = info.state
        if desired in (PowerState.RUNNING, PowerState.PAUSED):
            if state in (VMState.STOPPED, VMState.ERROR, VMState.UNKNOWN):
                self._report_transient(vm, VMState.STARTING)
                info = d.start(self.vm_id, int(vm["epoch"]))
            elif state == VMState.PAUSED and desired == PowerState.RUNNING:
                info = d.resume(self.vm_id)
            if pending == "reboot" and info.state == VMState.RUNNING:
                info = d.reboot(self.vm_id)
            if desired == PowerState.PAUSED and info.state == VMState.RUNNING:
                info = d.pause(self.vm_id)
        elif desired == PowerState.STOPPED and state != VMState.STOPPED:
            force = pending == "force_stop"
            if not force:
                self._report_transient(vm, VMState.STOPPING)
            info = d.stop(self.vm_id, force=force, timeout_s=self.stop_timeout_s)
        return info

    def _report_transient(self, vm: Mapping[str, Any], state: VMState) -> None:
        self.reporter.report_vm(self.vm_id, int(vm["epoch"]),
                                {"state": state.value, "time": time.time(), "transient": True})


class HostAgent:
    """Samples one host and its guests and sends them to the control plane as heartbeats.

    Once :meth:`watch` is called on a driver that pushes events (:attr:`Capability.EVENTS`),
    each guest change is also sent the moment the driver reports it: as a heartbeat carrying
    that one guest and the last sample, which the control plane applies unless an operation on
    the VM is in flight (its VMAgent reports that outcome itself). Polling alone would leave a
    guest that stopped on its own unnoticed until the next beat.
    """

    def __init__(self, host: str, driver: Driver, reporter: Reporter) -> None:
        self.host = host
        self.driver = driver
        self.reporter = reporter
        self._stats: dict[str, Any] | None = None
        self._sampling = threading.Lock()
        self._unsubscribe: Callable[[], None] | None = None

    def info(self) -> dict[str, Any]:
        """The host's physical size and hypervisor."""
        return asdict(self.driver.host_info())

    def preflight(self, vm: Mapping[str, Any]) -> None:
        """Raise what creating the VM record ``vm`` (a dict as stored, not stored yet) on this
        host would meet (see :meth:`Driver.preflight`)."""
        self.driver.preflight(guest_config(vm))

    def sample(self) -> dict[str, Any]:
        """Sample the host's usage now; ``time`` says when."""
        with self._sampling:
            self._stats = {**asdict(self.driver.host_stats()), "time": time.time()}
            return self._stats

    def beat(self) -> None:
        """Take one sample (with each running guest's counters where they are cheap to read)
        and send it."""
        stats = self.sample()
        now = time.time()
        listed = self.driver.list()
        guests = [{**asdict(g), "state": g.state.value, "time": now} for g in listed]
        if self.driver.stats_in_heartbeat:  # beside the sample's count of guests
            stats = {**stats, "guest_stats": self._guest_stats(listed)}
        self.reporter.heartbeat(self.host, stats, guests)

    def _guest_stats(self, guests: list[GuestInfo]) -> dict[str, dict[str, Any]]:
        counters: dict[str, dict[str, Any]] = {}
        for guest in guests:
            if guest.state not in (VMState.RUNNING, VMState.PAUSED):
                continue
            try:
                counters[guest.vm_id] = asdict(self.driver.stats(guest.vm_id))
            except NovaCronError as exc:  # it stopped meanwhile, or its driver hiccuped
                log.debug("host %s: no stats for %s: %s", self.host, guest.vm_id, exc.message)
        return counters

    def watch(self) -> bool:
        """Send each guest change as the driver pushes it (idempotent); False when the driver
        has no events and is only polled."""
        if Capability.EVENTS not in self.driver.capabilities:
            return False
        if self._unsubscribe is None:
            self._unsubscribe = self.driver.subscribe(self._on_event)
        return True

    def _on_event(self, event: GuestEvent) -> None:
        """Runs on the driver's event thread."""
        guest = {"vm_id": event.vm_id, "state": event.state.value, "guest_id": event.guest_id,
                 "epoch": event.epoch, "reason": event.reason, "time": event.at}
        log.debug("host %s: guest %s %s (%s)", self.host, event.vm_id, event.event,
                  event.state.value)
        stats = self._stats if self._stats is not None else self.sample()
        self.reporter.heartbeat(self.host, stats, [guest])

    def close(self) -> None:
        """Stop watching and release the driver's connection. Guests keep running."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.driver.close()
