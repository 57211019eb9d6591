"""The Driver protocol every hypervisor and cloud driver implements, and the driver registry.

A driver manages the guests of one host (a libvirt daemon, a cloud region, a simulated hypervisor).
It declares what it can do as :class:`Capability` flags; an operation it cannot do raises
:class:`~novacron.errors.NotSupported` with the reason, never a silent no-op.

Every method is idempotent where the operation allows it (defining a guest that exists returns it;
undefining one that is gone succeeds), so actors can retry after a restart. Starting a guest takes
the VM's placement epoch; a driver refuses an epoch older than the one it last started the guest
with (:class:`~novacron.errors.StaleEpoch`), which fences a stale actor.

This module imports no third-party package: the VMActor process stays lean.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from novacron.errors import InvalidRequest, NotSupported
from novacron.states import VMState


class Capability(StrEnum):
    """Something a driver may be able to do."""

    PAUSE = "pause"
    REBOOT = "reboot"
    SNAPSHOT = "snapshot"
    COLD_MIGRATION = "cold_migration"
    LIVE_MIGRATION = "live_migration"
    MEMORY_ACCESS = "memory_access"  # guest memory and its dirty log can be read (sim pre-copy)
    DISK_ACCESS = "disk_access"  # the guest's disk image can be read and written in place
    CONSOLE = "console"
    IMAGE_IMPORT = "image_import"
    EVENTS = "events"  # pushes guest state changes instead of being polled only


@dataclass(frozen=True)
class GuestConfig:
    """What a driver needs to define a guest."""

    vm_id: str
    name: str
    cpus: int
    memory_mib: int
    disk_gib: int
    image: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    workload: Mapping[str, float] = field(default_factory=dict)
    epoch: int = 0


@dataclass(frozen=True)
class GuestInfo:
    """A guest as its driver sees it now."""

    vm_id: str
    state: VMState
    guest_id: str | None = None  # the driver's own handle: a pid, a domain UUID, an instance id
    epoch: int = 0
    reason: str = ""


@dataclass(frozen=True)
class GuestEvent:
    """A guest's state right after its hypervisor reported a change, pushed by drivers with
    :attr:`Capability.EVENTS`. ``event`` names the change (``started``, ``stopped``,
    ``undefined``...; ``resync`` when every guest is sent again after a reconnect)."""

    vm_id: str
    state: VMState
    reason: str
    event: str
    epoch: int = 0
    guest_id: str | None = None
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class GuestStats:
    """Counters of one guest (monotonic since the guest was started)."""

    cpu_time_s: float = 0.0
    memory_touched_bytes: int = 0
    disk_read_bytes: int = 0
    disk_written_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0


@dataclass(frozen=True)
class HostInfo:
    """The physical size of a host and what runs it."""

    cpus: float
    memory_mib: int
    disk_gib: int
    hypervisor: str
    version: str = ""


@dataclass(frozen=True)
class HostStats:
    """A sample of a host's usage."""

    cpu_load: float = 0.0  # 0..1 of the host's cpus
    memory_used_mib: int = 0
    guests: int = 0
    extra: Mapping[str, float] = field(default_factory=dict)


class Driver(ABC):
    """Manages the guests of one host. Subclasses register themselves with :func:`register`."""

    name: ClassVar[str]
    # Whether per-guest counters are cheap enough to read on every heartbeat (a local
    # hypervisor); cloud drivers read theirs from the provider's monitoring service instead.
    stats_in_heartbeat: ClassVar[bool] = False
    # Whether :meth:`preflight` asks anything: the control plane skips the round trip to the
    # host's agent for drivers that have nothing to check before a create.
    preflights: ClassVar[bool] = False

    def __init__(self, host: str, uri: str | None, config: Mapping[str, Any],
                 state_dir: Path) -> None:
        self.host = host
        self.uri = uri
        self.config = dict(config)
        self.state_dir = Path(state_dir)

    # -- what it can do ---------------------------------------------------------------------
    @property
    @abstractmethod
    def capabilities(self) -> frozenset[Capability]:
        """What this driver can do on this host."""

    def missing_capabilities(self) -> dict[Capability, str]:
        """Each capability this driver lacks here, with the reason."""
        return {c: f"the {self.name} driver does not support {c.value}"
                for c in Capability if c not in self.capabilities}

    def require(self, capability: Capability) -> None:
        """Raise NotSupported, with the reason, unless this driver has ``capability``."""
        if capability not in self.capabilities:
            reason = self.missing_capabilities().get(
                capability, f"the {self.name} driver does not support {capability.value}")
            raise NotSupported(reason, details={"driver": self.name, "host": self.host,
                                                "capability": capability.value})

    # -- connection and host ----------------------------------------------------------------
    def connect(self) -> None:  # noqa: B027 - optional hook
        """Open the connection to the hypervisor or cloud (idempotent)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection. Guests keep running."""

    @abstractmethod
    def host_info(self) -> HostInfo:
        """The host's physical size and hypervisor."""

    @abstractmethod
    def host_stats(self) -> HostStats:
        """A sample of the host's usage."""

    # -- guests -----------------------------------------------------------------------------
    def preflight(self, config: GuestConfig) -> None:  # noqa: B027 - optional hook
        """Raise, cheaply and before anything is recorded or created, the error that defining
        and first starting ``config``'s guest would meet (drivers with :attr:`preflights`: an
        instance type the provider does not have, a provider quota). A local hypervisor has
        nothing to ask beforehand: its refusals (no such image, no room) come from the create
        itself, so by default nothing is checked."""

    @abstractmethod
    def define(self, config: GuestConfig) -> GuestInfo:
        """Create the guest (stopped); if it exists already, return it unchanged."""

    @abstractmethod
    def start(self, vm_id: str, epoch: int) -> GuestInfo:
        """Start a stopped guest; a running one is returned as is. Refuses a stale epoch."""

    @abstractmethod
    def stop(self, vm_id: str, *, force: bool = False, timeout_s: float = 30.0) -> GuestInfo:
        """Stop the guest: gracefully, forced after ``timeout_s``; at once with ``force``."""

    @abstractmethod
    def reboot(self, vm_id: str) -> GuestInfo:
        """Restart the guest's OS without stopping the guest."""

    @abstractmethod
    def pause(self, vm_id: str) -> GuestInfo:
        """Freeze the guest: it stops running but keeps its memory."""

    @abstractmethod
    def resume(self, vm_id: str) -> GuestInfo:
        """Unfreeze a paused guest."""

    @abstractmethod
    def undefine(self, vm_id: str, *, delete_storage: bool = True) -> None:
        """Remove a stopped guest (and its storage); succeeds if it is already gone."""

    @abstractmethod
    def get(self, vm_id: str) -> GuestInfo:
        """The guest's current state; NotFound if it is not defined here."""

    @abstractmethod
    def list(self) -> list[GuestInfo]:
        """Every NovaCron guest defined on this host."""

    @abstractmethod
    def stats(self, vm_id: str) -> GuestStats:
        """The guest's counters; NotFound if it is not defined here."""

    # -- events (drivers with Capability.EVENTS override this) ------------------------------
    def subscribe(self, callback: Callable[[GuestEvent], None]) -> Callable[[], None]:
        """Call ``callback`` with a :class:`GuestEvent` after each guest state change, on a
        thread of the driver's; returns a function that unsubscribes."""
        self.require(Capability.EVENTS)
        raise NotImplementedError(f"{self.name} declares events but does not push them")

    # -- snapshots (drivers with Capability.SNAPSHOT override these) -----------------------
    def snapshot_create(self, vm_id: str, name: str, *, description: str = "") -> object:
        """Take a snapshot called ``name``; returns a dataclass describing it."""
        self.require(Capability.SNAPSHOT)
        raise NotImplementedError(f"{self.name} declares snapshots but does not take them")

    def snapshot_list(self, vm_id: str) -> Sequence[object]:
        """The guest's snapshots, oldest first."""
        self.require(Capability.SNAPSHOT)
        raise NotImplementedError(f"{self.name} declares snapshots but does not list them")

    def snapshot_revert(self, vm_id: str, name: str) -> GuestInfo:
        """Return the guest to snapshot ``name``."""
        self.require(Capability.SNAPSHOT)
        raise NotImplementedError(f"{self.name} declares snapshots but does not revert them")

    def snapshot_delete(self, vm_id: str, name: str) -> None:
        """Delete snapshot ``name``; succeeds if it is already gone."""
        self.require(Capability.SNAPSHOT)
        raise NotImplementedError(f"{self.name} declares snapshots but does not delete them")


_MODULES: dict[str, str] = {
    "sim": "novacron.drivers.sim",
    "libvirt": "novacron.drivers.libvirt",
    "aws": "novacron.drivers.aws",
    "azure": "novacron.drivers.azure",
    "gcp": "novacron.drivers.gcp",
}
_CLASSES: dict[str, type[Driver]] = {}


def register(cls: type[Driver]) -> type[Driver]:
    """Class decorator: make a driver available under its ``name``."""
    _CLASSES[cls.name] = cls
    return cls


def driver_names() -> list[str]:
    """The names of every known driver."""
    return sorted(set(_MODULES) | set(_CLASSES))


def driver_class(name: str) -> type[Driver]:
    """The driver class called ``name``, imported on first use."""
    if name not in _CLASSES:
        if name not in _MODULES:
            raise InvalidRequest(
                f"unknown driver {name!r}; expected one of {', '.join(driver_names())}",
                details={"driver": name})
        importlib.import_module(_MODULES[name])
    return _CLASSES[name]
