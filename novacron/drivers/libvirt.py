"""The libvirt driver: KVM/QEMU (also Xen, ESXi and libvirt's test hypervisor) via libvirt-python.

A host is registered with a libvirt URI: ``qemu:///system``, ``qemu+ssh://user@host/system``,
``qemu+tcp://host/system``, ``test:///default`` (libvirt's in-process test hypervisor),
``xen://...`` or ``esx://...``. What the hypervisor behind a URI cannot do is declared as a missing
capability with the reason.

Guests are domains named ``novacron-<vm_id>``. Their XML is built from the typed objects of
:mod:`novacron.drivers.libvirt_xml`; NovaCron's own record (vm id, placement epoch, the volumes it
created) lives in the domain's ``<metadata>``, so a restarted actor re-attaches and ``start``
refuses a stale epoch. Disks are qcow2 volumes in a storage pool, overlays on a template image
when the guest has one. Lifecycle events arrive through libvirt's event loop (one thread per
process) and are handed to subscribers from a dispatcher thread; a dropped connection (libvirtd
restarted, keepalive timed out) is re-opened in the background and subscribers get every guest's
current state again. Errors are mapped by libvirt error code in
:mod:`novacron.drivers.libvirt_errors`.

Host ``config`` keys (all optional):

``pool`` / ``pool_path``
    storage pool of guest disks (``novacron``), created as a directory pool at ``pool_path``
    (``/var/lib/libvirt/images/novacron``) when missing.
``image_pool``
    pool searched for an image given by bare volume name (default: ``pool``). An image is a
    volume name, ``pool/volume``, or an absolute path (a pool's volume, or a file on a local host).
``disk_allocation_ratio``
    thin-provisioning ratio: a new disk needs ``capacity / ratio`` bytes free in the pool (1.0).
``domain_type``
    ``kvm`` or ``qemu`` (TCG) for QEMU hosts; by default ``kvm`` when the host offers it.
``network``
    ``network:<name>`` (default ``network:default``), ``bridge:<name>``, ``user`` or ``none``.
``kernel`` / ``initrd`` / ``cmdline``
    direct kernel boot for every guest of the host; a guest's labels ``libvirt.kernel``,
    ``libvirt.initrd`` and ``libvirt.cmdline`` override them. Without a kernel a guest boots from
    its disk.
``console_log_dir``
    directory where each guest's serial console is also appended to ``novacron-<vm_id>.log``.
``machine`` / ``cpu_mode`` / ``disk_bus``
    the domain's machine type, ``<cpu mode>`` (e.g. ``host-model``) and disk bus (``virtio``).
``balloon_stats_period_s``
    how often QEMU refreshes balloon memory statistics (2).
``username`` / ``password``
    credentials for URIs that ask for them (SASL over TCP, ESXi).
``keepalive_interval_s`` / ``keepalive_count``
    libvirt keepalive: the connection is declared dead after ``interval * (count + 1)`` s (5, 3).
``migration_uri``
    the URI other hosts' libvirtd reach this host's libvirtd at, for migrations to it (like
    Nova's ``live_migration_inbound_addr``), e.g. ``qemu+tcp://kvm-2.example/system``; by
    default the host's own URI, which must then name a remote host (not ``qemu:///system``).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from novacron.drivers.base import (
    Capability,
    Driver,
    GuestConfig,
    GuestEvent,
    GuestInfo,
    GuestStats,
    HostInfo,
    HostStats,
    register,
)
from novacron.errors import (
    AlreadyExists,
    DriverError,
    HostUnreachable,
    InvalidRequest,
    InvalidTransition,
    NotFound,
    NotSupported,
    NovaCronError,
    StaleEpoch,
)
from novacron.states import VMState

try:
    import libvirt
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise NotSupported(
        "the libvirt driver needs libvirt-python: pip install 'novacron[libvirt]'"
        " (building it needs the libvirt-dev and pkg-config packages)",
        details={"driver": "libvirt"}) from _exc

from novacron.drivers.libvirt_errors import is_code, map_error, pool_full, translate
from novacron.drivers.libvirt_xml import (
    DISK_BUSES,
    NS,
    NS_PREFIX,
    Backing,
    Disk,
    Domain,
    Interface,
    KernelBoot,
    Metadata,
    Pool,
    Serial,
    Snapshot,
    Volume,
)

log = logging.getLogger("novacron.drivers.libvirt")

DOMAIN_PREFIX = "novacron-"
GIB = 1024**3
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_UUID_NAMESPACE = uuid.UUID("6f1d6c0e-3b1e-4b5e-9a53-6e6f76616372")
_QCOW2_MAGIC = b"QFI\xfb"

# -- state mapping ---------------------------------------------------------------------------

_STATES: dict[int, tuple[str, VMState]] = {
    libvirt.VIR_DOMAIN_NOSTATE: ("nostate", VMState.UNKNOWN),
    libvirt.VIR_DOMAIN_RUNNING: ("running", VMState.RUNNING),
    libvirt.VIR_DOMAIN_BLOCKED: ("blocked", VMState.RUNNING),
    libvirt.VIR_DOMAIN_PAUSED: ("paused", VMState.PAUSED),
    libvirt.VIR_DOMAIN_SHUTDOWN: ("shutdown", VMState.STOPPING),
    libvirt.VIR_DOMAIN_SHUTOFF: ("shutoff", VMState.STOPPED),
    libvirt.VIR_DOMAIN_CRASHED: ("crashed", VMState.ERROR),
    libvirt.VIR_DOMAIN_PMSUSPENDED: ("pmsuspended", VMState.PAUSED),
}

# (state, reason) -> (reason name, the VM state when it differs from the state's own)
_REASONS: dict[int, dict[int, tuple[str, VMState | None]]] = {
    libvirt.VIR_DOMAIN_RUNNING: {
        libvirt.VIR_DOMAIN_RUNNING_UNKNOWN: ("unknown", None),
        libvirt.VIR_DOMAIN_RUNNING_BOOTED: ("booted", None),
        libvirt.VIR_DOMAIN_RUNNING_MIGRATED: ("migrated", None),
        libvirt.VIR_DOMAIN_RUNNING_RESTORED: ("restored", None),
        libvirt.VIR_DOMAIN_RUNNING_FROM_SNAPSHOT: ("from_snapshot", None),
        libvirt.VIR_DOMAIN_RUNNING_UNPAUSED: ("unpaused", None),
        libvirt.VIR_DOMAIN_RUNNING_MIGRATION_CANCELED: ("migration_canceled", None),
        libvirt.VIR_DOMAIN_RUNNING_SAVE_CANCELED: ("save_canceled", None),
        libvirt.VIR_DOMAIN_RUNNING_WAKEUP: ("wakeup", None),
        libvirt.VIR_DOMAIN_RUNNING_CRASHED: ("crashed", VMState.ERROR),
        libvirt.VIR_DOMAIN_RUNNING_POSTCOPY: ("postcopy", VMState.MIGRATING),
        libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED: ("postcopy_failed", VMState.ERROR),
    },
    libvirt.VIR_DOMAIN_BLOCKED: {libvirt.VIR_DOMAIN_BLOCKED_UNKNOWN: ("unknown", None)},
    libvirt.VIR_DOMAIN_PAUSED: {
        libvirt.VIR_DOMAIN_PAUSED_UNKNOWN: ("unknown", None),
        libvirt.VIR_DOMAIN_PAUSED_USER: ("user", None),
        libvirt.VIR_DOMAIN_PAUSED_MIGRATION: ("migration", VMState.MIGRATING),
        libvirt.VIR_DOMAIN_PAUSED_SAVE: ("save", None),
        libvirt.VIR_DOMAIN_PAUSED_DUMP: ("dump", None),
        libvirt.VIR_DOMAIN_PAUSED_IOERROR: ("ioerror", VMState.ERROR),
        libvirt.VIR_DOMAIN_PAUSED_WATCHDOG: ("watchdog", VMState.ERROR),
        libvirt.VIR_DOMAIN_PAUSED_FROM_SNAPSHOT: ("from_snapshot", None),
        libvirt.VIR_DOMAIN_PAUSED_SHUTTING_DOWN: ("shutting_down", VMState.STOPPING),
        libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT: ("snapshot", None),
        libvirt.VIR_DOMAIN_PAUSED_CRASHED: ("crashed", VMState.ERROR),
        libvirt.VIR_DOMAIN_PAUSED_STARTING_UP: ("starting_up", VMState.STARTING),
        libvirt.VIR_DOMAIN_PAUSED_POSTCOPY: ("postcopy", VMState.MIGRATING),
        libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED: ("postcopy_failed", VMState.ERROR),
    },
    libvirt.VIR_DOMAIN_SHUTDOWN: {
        libvirt.VIR_DOMAIN_SHUTDOWN_UNKNOWN: ("unknown", None),
        libvirt.VIR_DOMAIN_SHUTDOWN_USER: ("user", None),
    },
    libvirt.VIR_DOMAIN_SHUTOFF: {
        libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN: ("unknown", None),
        libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: ("shutdown", None),
        libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: ("destroyed", None),
        libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: ("crashed", VMState.ERROR),
        libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: ("migrated", None),
        libvirt.VIR_DOMAIN_SHUTOFF_SAVED: ("saved", None),
        libvirt.VIR_DOMAIN_SHUTOFF_FAILED: ("failed", VMState.ERROR),
        libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: ("from_snapshot", None),
        libvirt.VIR_DOMAIN_SHUTOFF_DAEMON: ("daemon", None),
    },
    libvirt.VIR_DOMAIN_CRASHED: {
        libvirt.VIR_DOMAIN_CRASHED_UNKNOWN: ("unknown", None),
        libvirt.VIR_DOMAIN_CRASHED_PANICKED: ("panicked", None),
    },
    libvirt.VIR_DOMAIN_PMSUSPENDED: {libvirt.VIR_DOMAIN_PMSUSPENDED_UNKNOWN: ("unknown", None)},
}

_EVENTS: dict[int, str] = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}


def map_state(state: int, reason: int) -> tuple[VMState, str]:
    """The VM state and a ``state:reason`` text for a ``virDomainGetState`` pair.

    Unmapped values become UNKNOWN, never an error.
    """
    if state not in _STATES:
        return VMState.UNKNOWN, f"state-{state}:reason-{reason}"
    state_name, vm_state = _STATES[state]
    reason_name, override = _REASONS.get(state, {}).get(reason, (f"reason-{reason}", None))
    return override or vm_state, f"{state_name}:{reason_name}"


# -- URIs and capabilities -------------------------------------------------------------------

_HYPERVISORS = ("qemu", "test", "xen", "esx", "vpx")
_TRANSPORTS = ("", "ssh", "libssh", "libssh2", "tcp", "tls", "unix", "ext")

_NO_MEMORY = ("NovaCron reads no guest memory on a libvirt host; libvirt's own live migration"
              " moves it")
_MISSING: dict[str, dict[Capability, str]] = {
    "qemu": {Capability.MEMORY_ACCESS: _NO_MEMORY},
    "test": {
        Capability.MEMORY_ACCESS: _NO_MEMORY,
        Capability.LIVE_MIGRATION: "libvirt's test driver (test:///) simulates guests inside"
                                   " the client process; there is no daemon to migrate to",
        Capability.COLD_MIGRATION: "libvirt's test driver (test:///) simulates guests inside"
                                   " the client process; there is no daemon to migrate to",
        Capability.DISK_ACCESS: "libvirt's test driver has no volume upload/download streams",
        Capability.CONSOLE: "libvirt's test driver has no guest consoles",
    },
    "xen": {
        Capability.MEMORY_ACCESS: _NO_MEMORY,
        Capability.SNAPSHOT: "libvirt's libxl (Xen) driver does not implement domain snapshots",
    },
    "esx": {
        Capability.MEMORY_ACCESS: _NO_MEMORY,
        Capability.LIVE_MIGRATION: "libvirt's ESX driver has no peer-to-peer migration; an"
                                   " esx:// URI reaches a single ESXi host (use vCenter vMotion)",
        Capability.COLD_MIGRATION: "libvirt's ESX driver has no peer-to-peer migration; an"
                                   " esx:// URI reaches a single ESXi host",
        Capability.EVENTS: "libvirt's ESX driver delivers no domain events; state is polled",
        Capability.CONSOLE: "libvirt's ESX driver has no console streams",
        Capability.DISK_ACCESS: "libvirt's ESX driver has no volume upload/download streams",
    },
    "vpx": {
        Capability.MEMORY_ACCESS: _NO_MEMORY,
        Capability.LIVE_MIGRATION: "libvirt's ESX driver has no peer-to-peer migration"
                                   " (use vCenter vMotion)",
        Capability.COLD_MIGRATION: "libvirt's ESX driver has no peer-to-peer migration",
        Capability.EVENTS: "libvirt's ESX driver delivers no domain events; state is polled",
        Capability.CONSOLE: "libvirt's ESX driver has no console streams",
        Capability.DISK_ACCESS: "libvirt's ESX driver has no volume upload/download streams",
    },
}
_DOMAIN_TYPES = {"test": "test", "xen": "xen", "esx": "vmware", "vpx": "vmware"}


@dataclass(frozen=True)
class LibvirtURI:
    """A parsed libvirt connection URI."""

    raw: str
    hypervisor: str  # qemu, test, xen, esx or vpx
    transport: str  # "" for the hypervisor's default
    host: str

    @classmethod
    def parse(cls, uri: str | None) -> LibvirtURI:
        """Parse and check ``uri``; InvalidRequest for anything this driver cannot use."""
        if not uri:
            raise InvalidRequest("a libvirt host needs a URI such as qemu:///system",
                                 details={"uri": uri})
        parts = urlsplit(uri)
        hypervisor, _, transport = parts.scheme.partition("+")
        if hypervisor not in _HYPERVISORS or transport not in _TRANSPORTS:
            raise InvalidRequest(
                f"unsupported libvirt URI {uri!r}: the scheme must be one of"
                f" {', '.join(_HYPERVISORS)}, optionally with +ssh, +tcp, +tls, +unix",
                details={"uri": uri})
        return cls(raw=uri, hypervisor=hypervisor, transport=transport,
                   host=parts.hostname or "")

    @property
    def local(self) -> bool:
        """Whether the hypervisor's files are this machine's files."""
        return self.hypervisor == "test" or (not self.host and self.transport in ("", "unix"))

    def connect_uri(self) -> str:
        """The URI to open: over ssh, ``no_tty=1`` so a missing key fails instead of prompting."""
        if self.transport not in ("ssh", "libssh", "libssh2"):
            return self.raw
        parts = urlsplit(self.raw)
        query = dict(parse_qsl(parts.query))
        query.setdefault("no_tty", "1")
        return urlunsplit(parts._replace(query=urlencode(query)))


# -- host configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class HostConfig:
    """The driver's ``config`` mapping, checked (see the module docstring for each key)."""

    pool: str = "novacron"
    pool_path: str = "/var/lib/libvirt/images/novacron"
    image_pool: str = ""
    disk_allocation_ratio: float = 1.0
    domain_type: str = ""
    network: str = "network:default"
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    console_log_dir: str = ""
    machine: str = ""
    cpu_mode: str = ""
    disk_bus: str = "virtio"
    balloon_stats_period_s: int = 2
    username: str = ""
    password: str = field(default="", repr=False)
    keepalive_interval_s: int = 5
    keepalive_count: int = 3
    migration_uri: str = ""

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> HostConfig:
        """Check ``config``: unknown keys and wrong types are InvalidRequest."""
        fields = cls.__dataclass_fields__
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise InvalidRequest(
                f"unknown libvirt driver config keys {unknown};"
                f" expected some of {', '.join(sorted(fields))}", details={"keys": unknown})
        values: dict[str, Any] = {}
        for key, raw in config.items():
            kind = type(getattr(cls, key))
            try:
                if kind is str and not isinstance(raw, str):
                    raise TypeError(key)
                values[key] = kind(raw)
            except (TypeError, ValueError) as exc:
                raise InvalidRequest(f"libvirt driver config {key!r} must be a {kind.__name__}",
                                     details={"key": key}) from exc
        parsed = cls(**values)
        if parsed.domain_type not in ("", "kvm", "qemu"):
            raise InvalidRequest("domain_type must be kvm or qemu",
                                 details={"domain_type": parsed.domain_type})
        if parsed.disk_bus not in DISK_BUSES:
            raise InvalidRequest(f"disk_bus must be one of {', '.join(DISK_BUSES)}",
                                 details={"disk_bus": parsed.disk_bus})
        if parsed.disk_allocation_ratio <= 0:
            raise InvalidRequest("disk_allocation_ratio must be positive")
        parsed.interfaces()  # validates ``network``
        if parsed.migration_uri:
            LibvirtURI.parse(parsed.migration_uri)
        return parsed

    def interfaces(self) -> tuple[Interface, ...]:
        """The network interfaces every guest gets."""
        kind, _, source = self.network.partition(":")
        if kind == "none":
            return ()
        if kind == "user":
            return (Interface(kind="user"),)
        if kind in ("network", "bridge") and source:
            return (Interface(kind="network" if kind == "network" else "bridge", source=source),)
        raise InvalidRequest(
            f"bad network {self.network!r}: expected network:<name>, bridge:<name>, user or none",
            details={"network": self.network})


# -- events ----------------------------------------------------------------------------------


EventCallback = Callable[[GuestEvent], None]
_RESYNC = -1  # a queued "event" asking for every guest's state (after a reconnect)


class _EventLoop:
    """libvirt's default event loop, run by one daemon thread per process."""

    _lock = threading.Lock()
    _started = False

    @classmethod
    def ensure_running(cls) -> None:
        with cls._lock:
            if cls._started:
                return
            # libvirt's own stderr reports are silenced: every error is raised and logged here.
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=cls._run, name="libvirt-event-loop", daemon=True).start()
            cls._started = True

    @staticmethod
    def _run() -> None:
        while True:
            if libvirt.virEventRunDefaultImpl() < 0:
                log.error("libvirt event loop iteration failed")
                time.sleep(0.1)


# -- migration job statistics ----------------------------------------------------------------

COMPRESSION_METHODS = ("xbzrle", "mt")  # libvirt's memory compression methods for migration

_JOB_TYPES = {
    libvirt.VIR_DOMAIN_JOB_NONE: "none",
    libvirt.VIR_DOMAIN_JOB_BOUNDED: "bounded",
    libvirt.VIR_DOMAIN_JOB_UNBOUNDED: "unbounded",
    libvirt.VIR_DOMAIN_JOB_COMPLETED: "completed",
    libvirt.VIR_DOMAIN_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_JOB_CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class JobStats:
    """Progress of a domain's job (a migration), from ``virDomainGetJobStats``.

    ``raw`` keeps every field libvirt reported (``memory_dirty_rate``, ``disk_total``, ...).
    """

    type: str
    operation: int = 0
    elapsed_ms: int = 0
    data_total: int = 0
    data_processed: int = 0
    data_remaining: int = 0
    downtime_ms: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether the job is still running."""
        return self.type in ("bounded", "unbounded")

    @property
    def progress(self) -> float:
        """Share of the data moved, 0..1."""
        return self.data_processed / self.data_total if self.data_total else 0.0

    @classmethod
    def from_libvirt(cls, stats: Mapping[str, Any]) -> JobStats:
        """Build from the dict libvirt-python returns."""
        downtime = stats.get("downtime")
        return cls(
            type=_JOB_TYPES.get(int(stats.get("type", 0)), str(stats.get("type"))),
            operation=int(stats.get("operation", 0)),
            elapsed_ms=int(stats.get("time_elapsed", 0)),
            data_total=int(stats.get("data_total", 0)),
            data_processed=int(stats.get("data_processed", 0)),
            data_remaining=int(stats.get("data_remaining", 0)),
            downtime_ms=None if downtime is None else int(downtime),
            raw=dict(stats),
        )


# -- the driver ------------------------------------------------------------------------------


def domain_name(vm_id: str) -> str:
    """The libvirt domain name of a VM."""
    return f"{DOMAIN_PREFIX}{vm_id}"


def migration_uri(uri: str | None, config: Mapping[str, Any]) -> str:
    """The URI other hosts' libvirtd reach a host at, for migrations to it: its config's
    ``migration_uri``, else its own URI when that names a remote host; NotSupported, saying
    what to set, when neither does."""
    settings = HostConfig.parse(config)
    target = LibvirtURI.parse(settings.migration_uri or uri)
    if target.local:
        raise NotSupported(
            f"a host registered as {target.raw} cannot be reached by another host's libvirtd;"
            " set its config migration_uri (e.g. qemu+tcp://<address>/system)",
            details={"uri": target.raw})
    return target.raw


def _check_vm_id(vm_id: str) -> None:
    if not _NAME_RE.match(vm_id):
        raise InvalidRequest(f"bad vm id {vm_id!r}: 1-63 letters, digits, '.', '_' or '-'",
                             details={"vm_id": vm_id})


@register
class LibvirtDriver(Driver):
    """A libvirt host. See the module docstring for URIs and config keys."""

    name: ClassVar[str] = "libvirt"
    stats_in_heartbeat = True

    def __init__(self, host: str, uri: str | None, config: Mapping[str, Any],
                 state_dir: Path) -> None:
        super().__init__(host, uri, config, state_dir)
        self.target = LibvirtURI.parse(uri)
        self.settings = HostConfig.parse(config)
        self._conn: Any = None
        self._conn_lock = threading.RLock()
        self._guest_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._guest_locks_lock = threading.Lock()
        self._closing = False
        self._callback_ids: list[int] = []
        self._subscribers: list[EventCallback] = []
        self._events: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self._dispatcher: threading.Thread | None = None
        self._changed = threading.Condition()
        self._migrating: set[str] = set()
        self._cpu_sample: tuple[float, float] | None = None

    # -- capabilities ------------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[Capability]:
        """Everything but what the URI's hypervisor lacks."""
        return frozenset(Capability) - set(_MISSING[self.target.hypervisor])

    def missing_capabilities(self) -> dict[Capability, str]:
        """What the URI's hypervisor lacks, each with the reason."""
        return dict(_MISSING[self.target.hypervisor])

    # -- connection --------------------------------------------------------------------------
    def connect(self) -> None:
        """Open the connection (idempotent): keepalive, close callback and lifecycle events."""
        with self._conn_lock:
            self._closing = False
            if self._conn is not None:
                return
            self._open()

    def close(self) -> None:
        """Drop the connection and stop delivering events. Guests keep running."""
        with self._conn_lock:
            self._closing = True
            conn, self._conn = self._conn, None
            ids, self._callback_ids = self._callback_ids, []
        if conn is not None:
            self._release(conn, ids)
        if self._dispatcher is not None:
            self._events.put(None)
            self._dispatcher.join(timeout=5)
            self._dispatcher = None

    def subscribe(self, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback`` with a :class:`GuestEvent` after each guest state change; returns
        a function that unsubscribes. Callbacks run on the driver's dispatcher thread."""
        self.require(Capability.EVENTS)
        self._subscribers.append(callback)
        self.connect()
        return lambda: self._subscribers.remove(callback)

    def _open(self) -> None:
        _EventLoop.ensure_running()
        auth = [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_USERNAME,
                 libvirt.VIR_CRED_PASSPHRASE], self._credentials, None]
        try:
            conn = libvirt.openAuth(self.target.connect_uri(), auth, 0)
        except libvirt.libvirtError as err:
            mapped = map_error(err, f"cannot connect to {self.target.raw}", uri=self.target.raw)
            if type(mapped) in (DriverError, NotFound, InvalidTransition):
                mapped = HostUnreachable(mapped.message, details=mapped.details)
            raise mapped from err
        try:
            if self.target.hypervisor != "test":
                conn.setKeepAlive(self.settings.keepalive_interval_s,
                                  self.settings.keepalive_count)
            conn.registerCloseCallback(self._on_close, None)
            if Capability.EVENTS in self.capabilities:
                self._callback_ids = [conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)]
        except libvirt.libvirtError as err:
            self._release(conn, self._callback_ids)
            self._callback_ids = []
            raise map_error(err, f"cannot set up the connection to {self.target.raw}",
                            uri=self.target.raw) from err
        self._conn = conn
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(target=self._dispatch, daemon=True,
                                                name=f"libvirt-events-{self.host}")
            self._dispatcher.start()
        log.info("connected to %s (%s)", self.target.raw, self.host)

    @staticmethod
    def _release(conn: Any, callback_ids: list[int]) -> None:
        """Unregister everything from ``conn`` and close it, ignoring a dead peer."""
        for callback_id in callback_ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _credentials(self, creds: list[list[Any]], _opaque: object) -> int:
        for cred in creds:
            if cred[0] in (libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_USERNAME):
                cred[4] = self.settings.username or None
            elif cred[0] == libvirt.VIR_CRED_PASSPHRASE:
                cred[4] = self.settings.password or None
            else:
                return -1
        return 0

    def _on_close(self, conn: Any, reason: int, _opaque: object) -> None:
        """libvirt's close callback (event loop thread): reconnect on another thread."""
        log.warning("connection to %s closed (reason %d)", self.target.raw, reason)
        if not self._closing:
            threading.Thread(target=self._reconnect, args=(conn,), daemon=True,
                             name=f"libvirt-reconnect-{self.host}").start()

    def _reconnect(self, dead: Any) -> None:
        """Drop the dead connection, re-open with backoff, then resync every guest."""
        with self._conn_lock:
            if self._conn is not dead:
                return
            self._conn = None
            ids, self._callback_ids = self._callback_ids, []
        self._release(dead, ids)
        delay = 0.2
        while not self._closing:
            try:
                with self._conn_lock:
                    if self._closing:
                        return
                    if self._conn is None:
                        self._open()
                self._events.put(("", _RESYNC))
                return
            except NovaCronError as err:
                log.info("reconnecting to %s failed (%s); retry in %.1f s",
                         self.target.raw, err.message, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _c(self) -> Any:
        """The open connection, opened (or re-opened) on demand."""
        conn = self._conn
        if conn is None:
            self.connect()
            conn = self._conn
        return conn

    @contextlib.contextmanager
    def _guest_lock(self, vm_id: str) -> Iterator[None]:
        """Serialize define/start/undefine of one guest."""
        with self._guest_locks_lock:
            lock = self._guest_locks[vm_id]
        with lock:
            yield

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, _detail: int,
                      _opaque: object) -> None:  # libvirt's callback signature
        """libvirt's lifecycle callback (event loop thread): only queue, never call libvirt."""
        name = dom.name()
        if name.startswith(DOMAIN_PREFIX):
            self._events.put((name[len(DOMAIN_PREFIX):], event))

    def _dispatch(self) -> None:
        """Wake what waits for a state change; for subscribers, turn each queued event into
        GuestEvents with the guest's current state (read only when someone subscribes: every
        agent of the host has a connection, and each sees every guest's events)."""
        while (item := self._events.get()) is not None:
            with self._changed:
                self._changed.notify_all()
            subscribers = list(self._subscribers)
            if not subscribers:
                continue
            vm_id, event = item
            try:
                events = self._resync() if event == _RESYNC else self._event(vm_id, event)
            except NovaCronError as err:
                log.info("cannot read guest state after event %s: %s", item, err.message)
                continue
            for guest_event in events:
                for callback in subscribers:
                    try:
                        callback(guest_event)
                    except Exception:
                        log.exception("event subscriber %r failed", callback)

    def _event(self, vm_id: str, event: int) -> builtins.list[GuestEvent]:
        """The guest's state after ``event``; nothing when the domain only has a NovaCron name
        (its metadata is not guest ``vm_id``'s: someone else's domain)."""
        name = _EVENTS.get(event, f"event-{event}")
        try:
            dom = self._lookup(vm_id)
            meta = None if dom is None else self._metadata(dom)
            if dom is not None and (meta is None or meta.vm_id != vm_id):
                return []
            info = None if dom is None else self._info(dom, vm_id, meta)
        except NotFound:  # undefined while being read
            info = None
        if info is None:
            return [GuestEvent(vm_id=vm_id, state=VMState.DELETED, reason="undefined",
                               event=name)]
        return [GuestEvent(vm_id=vm_id, state=info.state, reason=info.reason, event=name,
                           epoch=info.epoch, guest_id=info.guest_id)]

    def _resync(self) -> list[GuestEvent]:
        return [GuestEvent(vm_id=g.vm_id, state=g.state, reason=g.reason, event="resync",
                           epoch=g.epoch, guest_id=g.guest_id) for g in self.list()]

    def _wait_inactive(self, dom: Any, timeout_s: float) -> bool:
        """Wait (woken by lifecycle events, rechecking each second) until ``dom`` is off."""
        deadline = time.monotonic() + timeout_s
        while True:
            with translate("cannot read guest state"):
                if not dom.isActive():
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                self._changed.wait(min(remaining, 1.0))

    # -- host --------------------------------------------------------------------------------
    def host_info(self) -> HostInfo:
        """CPUs and memory from ``virNodeGetInfo``; disk is the guest pool's capacity (the pool
        is set up first: a host registered before its pool exists would offer no disk)."""
        conn = self._c()
        with translate("cannot read host info", host=self.host):
            _model, memory_mib, cpus, *_ = conn.getInfo()
            hv_type = conn.getType().lower()
            hv_version = conn.getVersion()
            lib_version = conn.getLibVersion()
        pool = self.ensure_pool()
        return HostInfo(
            cpus=float(cpus),
            memory_mib=int(memory_mib),
            disk_gib=pool.capacity_bytes // GIB,
            hypervisor=hv_type,
            version=f"{hv_type} {_version(hv_version)}, libvirt {_version(lib_version)}",
        )

    def host_stats(self) -> HostStats:
        """CPU load since the previous sample (or over 0.2 s), memory in use, NovaCron guests."""
        conn = self._c()
        with translate("cannot read host stats", host=self.host):
            sample = self._cpu_times(conn)
            if self._cpu_sample is None:
                time.sleep(0.2)
                self._cpu_sample, sample = sample, self._cpu_times(conn)
            busy = sample[0] - self._cpu_sample[0]
            total = sample[1] - self._cpu_sample[1]
            self._cpu_sample = sample
            memory_used_mib = self._memory_used_mib(conn)
        guests = self.list()
        active = sum(g.state in (VMState.RUNNING, VMState.PAUSED, VMState.MIGRATING)
                     for g in guests)
        extra: dict[str, float] = {"guests_defined": float(len(guests))}
        pool = self._pool_info_or_none(self.settings.pool)
        if pool is not None:
            extra["pool_available_gib"] = pool.available_bytes / GIB
        return HostStats(cpu_load=busy / total if total > 0 else 0.0,
                         memory_used_mib=memory_used_mib, guests=active, extra=extra)

    @staticmethod
    def _cpu_times(conn: Any) -> tuple[float, float]:
        times = conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS, 0)
        idle = times.get("idle", 0) + times.get("iowait", 0)
        busy = times.get("user", 0) + times.get("kernel", 0)
        return float(busy), float(busy + idle)

    @staticmethod
    def _memory_used_mib(conn: Any) -> int:
        try:
            mem = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
        except libvirt.libvirtError as err:
            if not is_code(err, libvirt.VIR_ERR_NO_SUPPORT):
                raise
            # Hypervisors without node memory stats (the test driver): total minus free.
            return max(0, int(conn.getInfo()[1]) - int(conn.getFreeMemory()) // 2**20)
        free = mem.get("free", 0) + mem.get("buffers", 0) + mem.get("cached", 0)
        return int((mem.get("total", 0) - free) // 1024)

    # -- guests ------------------------------------------------------------------------------
    def define(self, config: GuestConfig) -> GuestInfo:
        """Define the guest with its disk (an overlay on ``config.image`` if given); nothing is
        left behind if any step fails."""
        _check_vm_id(config.vm_id)
        with self._guest_lock(config.vm_id):
            existing = self._lookup(config.vm_id)
            if existing is not None:
                self._check_ours(existing, config.vm_id)
                return self._info(existing, config.vm_id)
            boot = self._kernel_boot(config)
            interfaces = self.settings.interfaces()
            created: list[str] = []
            try:
                disks: list[Disk] = []
                if config.image or config.disk_gib > 0:
                    volume = self._create_guest_disk(config)
                    created.append(volume.path)
                    disks.append(Disk(path=volume.path, target="vda",
                                      bus=DISK_BUSES[self.settings.disk_bus],
                                      format=volume.format))
                domain = Domain(
                    name=domain_name(config.vm_id),
                    uuid=str(uuid.uuid5(_UUID_NAMESPACE, config.vm_id)),
                    memory_mib=config.memory_mib,
                    vcpus=config.cpus,
                    domain_type=self._domain_type(),
                    title=config.name,
                    machine=self.settings.machine or None,
                    cpu_mode=self.settings.cpu_mode or None,
                    kernel_boot=boot,
                    disks=tuple(disks),
                    interfaces=interfaces,
                    serial=self._serial(config.vm_id),
                    balloon_stats_period_s=(self.settings.balloon_stats_period_s
                                            if self.target.hypervisor == "qemu" else None),
                    metadata=Metadata(vm_id=config.vm_id, epoch=config.epoch, name=config.name,
                                      volumes=tuple(created)),
                )
                with translate(f"cannot define guest {config.vm_id}", vm_id=config.vm_id):
                    dom = self._c().defineXMLFlags(domain.to_xml(),
                                                   libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            except BaseException:
                for path in created:
                    self._delete_volume_path(path)
                raise
            log.info("defined %s on %s", domain.name, self.host)
            return self._info(dom, config.vm_id)

    def start(self, vm_id: str, epoch: int) -> GuestInfo:
        """Start the guest under ``epoch`` (recorded in its metadata); StaleEpoch if older."""
        with self._guest_lock(vm_id):
            dom, meta = self._guest(vm_id)
            if epoch < meta.epoch:
                raise StaleEpoch(
                    f"guest {vm_id} was started with epoch {meta.epoch}; refusing epoch {epoch}",
                    details={"vm_id": vm_id, "epoch": epoch, "current_epoch": meta.epoch})
            if epoch > meta.epoch:
                self._set_metadata(dom, Metadata(vm_id=vm_id, epoch=epoch, name=meta.name,
                                                 volumes=meta.volumes))
            with translate(f"cannot start guest {vm_id}", vm_id=vm_id):
                if not dom.isActive():
                    dom.create()
            return self._info(dom, vm_id)

    def stop(self, vm_id: str, *, force: bool = False, timeout_s: float = 30.0) -> GuestInfo:
        """ACPI shutdown, destroyed after ``timeout_s``; destroyed at once with ``force``.

        A paused guest is resumed first so that it can handle the shutdown request.
        """
        dom, _meta = self._guest(vm_id)
        with translate(f"cannot stop guest {vm_id}", vm_id=vm_id):
            if not dom.isActive():
                return self._info(dom, vm_id)
            if not force:
                if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                    self._ignore_inactive(dom.resume)
                self._ignore_inactive(dom.shutdown)
                if self._wait_inactive(dom, timeout_s):
                    return self._info(dom, vm_id)
                log.warning("guest %s ignored shutdown for %.0f s; destroying it",
                            vm_id, timeout_s)
            self._ignore_inactive(dom.destroy)
        return self._info(dom, vm_id)

    def reboot(self, vm_id: str) -> GuestInfo:
        """Ask the guest OS to reboot (ACPI; the guest must handle it)."""
        self.require(Capability.REBOOT)
        dom, _meta = self._active(vm_id, "reboot")
        with translate(f"cannot reboot guest {vm_id}", vm_id=vm_id):
            dom.reboot(0)
        return self._info(dom, vm_id)

    def pause(self, vm_id: str) -> GuestInfo:
        """Suspend the guest's vCPUs (idempotent)."""
        self.require(Capability.PAUSE)
        dom, _meta = self._active(vm_id, "pause")
        with translate(f"cannot pause guest {vm_id}", vm_id=vm_id):
            if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
                dom.suspend()
        return self._info(dom, vm_id)

    def resume(self, vm_id: str) -> GuestInfo:
        """Resume a paused guest (idempotent)."""
        self.require(Capability.PAUSE)
        dom, _meta = self._active(vm_id, "resume")
        with translate(f"cannot resume guest {vm_id}", vm_id=vm_id):
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
        return self._info(dom, vm_id)

    def undefine(self, vm_id: str, *, delete_storage: bool = True) -> None:
        """Remove a stopped guest, its snapshot metadata and (with ``delete_storage``) the
        volumes NovaCron created for it. Succeeds when the guest is already gone.

        The volumes go first, while the domain still records them, so a retry after a failure
        finishes the job. Nothing is deleted for a guest this host does not have: its volumes
        may be on storage shared with the host that runs it.
        """
        _check_vm_id(vm_id)
        with self._guest_lock(vm_id):
            dom = self._lookup(vm_id)
            if dom is None:
                return
            meta = self._check_ours(dom, vm_id)
            with translate(f"cannot undefine guest {vm_id}", vm_id=vm_id):
                if dom.isActive():
                    raise InvalidTransition(f"guest {vm_id} is running; stop it first",
                                            details={"vm_id": vm_id})
            if delete_storage:
                for path in meta.volumes:
                    self._delete_volume_path(path)
            with translate(f"cannot undefine guest {vm_id}", vm_id=vm_id):
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                  | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            log.info("undefined %s on %s", domain_name(vm_id), self.host)

    def get(self, vm_id: str) -> GuestInfo:
        """The guest's state, reason, epoch and domain UUID."""
        dom, meta = self._guest(vm_id)
        return self._info(dom, vm_id, meta)

    def list(self) -> list[GuestInfo]:
        """Every guest with NovaCron metadata on this host."""
        with translate("cannot list guests", host=self.host):
            domains = self._c().listAllDomains(0)
        guests = []
        for dom in domains:
            name = dom.name()
            if not name.startswith(DOMAIN_PREFIX):
                continue
            vm_id = name[len(DOMAIN_PREFIX):]
            try:
                meta = self._metadata(dom)
                if meta is not None and meta.vm_id == vm_id:
                    guests.append(self._info(dom, vm_id, meta))
            except NotFound:
                continue  # undefined meanwhile
        return guests

    def stats(self, vm_id: str) -> GuestStats:
        """CPU time, resident memory, block and network byte counters."""
        rec = self.domain_stats(vm_id)
        count = int(rec.get("block.count", 0))
        nets = int(rec.get("net.count", 0))

        def total(prefix: str, n: int, key: str) -> int:
            return sum(int(rec.get(f"{prefix}.{i}.{key}", 0)) for i in range(n))

        memory_kib = rec.get("balloon.rss", rec.get("balloon.current", 0))
        return GuestStats(
            cpu_time_s=int(rec.get("cpu.time", 0)) / 1e9,
            memory_touched_bytes=int(memory_kib) * 1024,
            disk_read_bytes=total("block", count, "rd.bytes"),
            disk_written_bytes=total("block", count, "wr.bytes"),
            net_rx_bytes=total("net", nets, "rx.bytes"),
            net_tx_bytes=total("net", nets, "tx.bytes"),
        )

    def domain_stats(self, vm_id: str) -> dict[str, Any]:
        """Every statistic libvirt has for the guest (``virConnectGetAllDomainStats`` keys such
        as ``cpu.time``, ``balloon.rss``, ``block.0.wr.bytes``, ``net.0.rx.bytes``)."""
        dom, _meta = self._guest(vm_id)
        with translate(f"cannot read stats of guest {vm_id}", vm_id=vm_id):
            records = self._c().domainListGetStats([dom], 0)
            rec: dict[str, Any] = dict(records[0][1]) if records else {}
            if "cpu.time" not in rec:  # hypervisors without bulk CPU/balloon stats
                _state, _max_kib, memory_kib, _vcpus, cpu_ns = dom.info()
                rec.setdefault("cpu.time", cpu_ns)
                rec.setdefault("balloon.current", memory_kib)
        return rec

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot_create(self, vm_id: str, name: str, *, description: str = "") -> Snapshot:
        """Take an internal snapshot (disks, and memory when the guest runs)."""
        self.require(Capability.SNAPSHOT)
        if not _NAME_RE.match(name):
            raise InvalidRequest(f"bad snapshot name {name!r}", details={"snapshot": name})
        dom, _meta = self._guest(vm_id)
        if self._snapshot_or_none(dom, name) is not None:
            raise AlreadyExists(f"guest {vm_id} already has a snapshot {name!r}",
                                details={"vm_id": vm_id, "snapshot": name})
        with translate(f"cannot snapshot guest {vm_id}", vm_id=vm_id, snapshot=name):
            snap = dom.snapshotCreateXML(Snapshot(name=name, description=description).to_xml(),
                                         libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
            return Snapshot.from_xml(snap.getXMLDesc(0))

    def snapshot_list(self, vm_id: str) -> builtins.list[Snapshot]:
        """The guest's snapshots, oldest first."""
        self.require(Capability.SNAPSHOT)
        dom, _meta = self._guest(vm_id)
        with translate(f"cannot list snapshots of guest {vm_id}", vm_id=vm_id):
            snaps = [Snapshot.from_xml(s.getXMLDesc(0)) for s in dom.listAllSnapshots(0)]
        return sorted(snaps, key=lambda s: (s.created_at, s.name))

    def snapshot_revert(self, vm_id: str, name: str) -> GuestInfo:
        """Return the guest to the snapshot (running again if it was running when taken)."""
        self.require(Capability.SNAPSHOT)
        dom, _meta = self._guest(vm_id)
        snap = self._snapshot_or_none(dom, name)
        if snap is None:
            raise NotFound(f"guest {vm_id} has no snapshot {name!r}",
                           details={"vm_id": vm_id, "snapshot": name})
        with translate(f"cannot revert guest {vm_id}", vm_id=vm_id, snapshot=name):
            dom.revertToSnapshot(snap, 0)
        return self._info(dom, vm_id)

    def snapshot_delete(self, vm_id: str, name: str) -> None:
        """Delete the snapshot (its children stay); succeeds if it is already gone."""
        self.require(Capability.SNAPSHOT)
        dom, _meta = self._guest(vm_id)
        snap = self._snapshot_or_none(dom, name)
        if snap is not None:
            with translate(f"cannot delete snapshot of {vm_id}", vm_id=vm_id, snapshot=name):
                snap.delete(0)

    # -- storage -----------------------------------------------------------------------------
    def ensure_pool(self, name: str | None = None, path: str | None = None) -> Pool:
        """The directory pool ``name`` (default: the guest pool), defined, built, started and
        autostarted at ``path`` if missing, started if inactive."""
        name = name or self.settings.pool
        spec = Pool(name=name, path=path or self.settings.pool_path)
        with translate(f"cannot set up storage pool {name!r}", pool=name):
            pool = _ensure_dir_pool(self._c(), spec, self.host, check_path=path is not None)
            return Pool.from_xml(pool.XMLDesc(0))

    def pool_info(self, name: str | None = None) -> Pool:
        """A pool's path and sizes (refreshed)."""
        pool = self._pool(name)
        with translate(f"cannot read storage pool {pool.name()!r}"):
            pool.refresh(0)
            return Pool.from_xml(pool.XMLDesc(0))

    def list_volumes(self, pool: str | None = None) -> builtins.list[Volume]:
        """The volumes of a pool."""
        p = self._pool(pool)
        volumes = []
        with translate(f"cannot list volumes of pool {p.name()!r}"):
            p.refresh(0)  # another host may have changed shared storage
            for vol in p.listAllVolumes(0):
                try:
                    volumes.append(Volume.from_xml(vol.XMLDesc(0)))
                except libvirt.libvirtError as err:
                    if not is_code(err, libvirt.VIR_ERR_NO_STORAGE_VOL):  # deleted meanwhile
                        raise
        return sorted(volumes, key=lambda v: v.name)

    def volume_info(self, name: str, *, pool: str | None = None) -> Volume:
        """One volume."""
        vol = self._volume(name, pool)
        with translate(f"cannot read volume {name!r}"):
            return Volume.from_xml(vol.XMLDesc(0))

    def create_volume(self, name: str, capacity_bytes: int, *, pool: str | None = None,
                      format: str = "qcow2", backing: Backing | None = None) -> Volume:
        """A new volume (an overlay on ``backing`` if given); NoCapacity if the pool is full."""
        p = self._pool(pool) if pool else self._guest_pool()
        spec = Volume(name=name, capacity_bytes=capacity_bytes, format=format, backing=backing)
        with translate(f"cannot create volume {name!r}", volume=name):
            info = Pool.from_xml(p.XMLDesc(0))
            needed = math.ceil(capacity_bytes / self.settings.disk_allocation_ratio)
            if info.available_bytes < needed:
                raise pool_full(info.name, needed, info.available_bytes)
            if self._child_or_none(p.storageVolLookupByName, name) is not None:
                raise AlreadyExists(f"pool {info.name!r} already has a volume {name!r}",
                                    details={"pool": info.name, "volume": name})
            vol = p.createXML(spec.to_xml(), 0)
            return Volume.from_xml(vol.XMLDesc(0))

    def delete_volume(self, name: str, *, pool: str | None = None) -> None:
        """Delete a volume; succeeds if it is already gone."""
        p = self._pool(pool)
        vol = self._child_or_none(p.storageVolLookupByName, name)
        if vol is not None:
            with translate(f"cannot delete volume {name!r}", volume=name):
                vol.delete(0)

    def delete_volume_path(self, path: str) -> None:
        """Delete the volume at ``path`` (in whichever pool); succeeds if there is none."""
        self._delete_volume_path(path)

    def resize_volume(self, name: str, capacity_bytes: int, *,
                      pool: str | None = None) -> Volume:
        """Grow a volume that no running guest uses (shrinking is refused)."""
        vol = self._volume(name, pool)
        with translate(f"cannot resize volume {name!r}", volume=name):
            current = Volume.from_xml(vol.XMLDesc(0))
            self._check_growth(current, capacity_bytes)
            vol.resize(capacity_bytes, 0)
            return Volume.from_xml(vol.XMLDesc(0))

    def resize_disk(self, vm_id: str, capacity_gib: int, *, target: str = "vda") -> Volume:
        """Grow a guest's disk; live (``virDomainBlockResize``) when the guest runs."""
        dom, _meta = self._guest(vm_id)
        disk = self._guest_disk(dom, target)
        vol = self._volume_by_path(disk.path)
        if vol is None:
            raise NotFound(f"disk {target} of guest {vm_id} is in no storage pool",
                           details={"vm_id": vm_id, "path": disk.path})
        with translate(f"cannot resize disk {target} of guest {vm_id}", vm_id=vm_id):
            current = Volume.from_xml(vol.XMLDesc(0))
            capacity = capacity_gib * GIB
            self._check_growth(current, capacity)
            if dom.isActive():
                dom.blockResize(target, capacity, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
            else:
                vol.resize(capacity, 0)
            return Volume.from_xml(vol.XMLDesc(0))

    def guest_volumes(self, vm_id: str) -> builtins.list[Volume]:
        """The volumes behind a guest's disks (what a migration has to move)."""
        dom, _meta = self._guest(vm_id)
        with translate(f"cannot read disks of guest {vm_id}", vm_id=vm_id):
            disks = Domain.from_xml(dom.XMLDesc(0)).disks
            volumes = [(d.path, self._volume_by_path(d.path)) for d in disks]
            missing = [path for path, vol in volumes if vol is None]
            if missing:
                raise NotFound(f"disks of guest {vm_id} are in no storage pool: {missing}",
                               details={"vm_id": vm_id, "paths": missing})
            return [Volume.from_xml(vol.XMLDesc(0)) for _path, vol in volumes]

    def upload_volume(self, name: str, source: IO[bytes], *, pool: str | None = None,
                      offset: int = 0, length: int = 0) -> int:
        """Write ``source`` into the volume file from ``offset`` through a libvirt stream (to
        its end, or ``length`` bytes); returns the bytes sent."""
        self.require(Capability.DISK_ACCESS)
        vol = self._volume(name, pool)
        sent = 0

        def read(_stream: Any, nbytes: int, _opaque: object) -> bytes:
            nonlocal sent
            chunk = source.read(nbytes)
            sent += len(chunk)
            return chunk

        with self._stream(f"cannot upload into volume {name!r}") as stream:
            vol.upload(stream, offset, length, 0)
            stream.sendAll(read, None)
        return sent

    def download_volume(self, name: str, sink: IO[bytes], *, pool: str | None = None,
                        offset: int = 0, length: int = 0) -> int:
        """Read the volume file from ``offset`` (to its end, or ``length`` bytes) into ``sink``
        through a libvirt stream; returns the bytes received."""
        self.require(Capability.DISK_ACCESS)
        vol = self._volume(name, pool)
        received = 0

        def write(_stream: Any, data: bytes, _opaque: object) -> int:
            nonlocal received
            received += len(data)
            return sink.write(data)

        with self._stream(f"cannot download volume {name!r}") as stream:
            vol.download(stream, offset, length, 0)
            stream.recvAll(write, None)
        return received

    # -- migration ---------------------------------------------------------------------------
    def migrate_live(self, vm_id: str, dest_uri: str, *, copy_storage: bool = False,
                     compressed: bool = False, compression: Sequence[str] = (),
                     parallel: int = 0, auto_converge: bool = False, post_copy: bool = False,
                     bandwidth_mib_s: int | None = None, max_downtime_ms: int | None = None,
                     allow_unsafe: bool = False, epoch: int | None = None) -> GuestInfo:
        """Live-migrate a running guest to ``dest_uri`` (as the source libvirtd reaches it)
        peer-to-peer, persisting it there and undefining it here; blocks until done.

        ``copy_storage`` copies every disk (copy-storage-all): the destination volumes are
        created first, and removed again if the migration fails; on success the source volumes
        are deleted. Without it the disks must be on storage both hosts share (libvirt refuses
        storage it cannot see as shared unless ``allow_unsafe``). ``compressed`` compresses the
        memory stream with the ``compression`` methods (``xbzrle``, ``mt``; libvirt's default,
        xbzrle, when empty). ``auto_converge`` lets QEMU throttle the guest's vCPUs when
        pre-copy does not converge; ``post_copy`` allows :meth:`start_post_copy`. ``epoch`` is
        recorded on the destination. Returns the guest as the destination sees it.
        """
        self.require(Capability.LIVE_MIGRATION)
        dest = LibvirtURI.parse(dest_uri)
        self._check_migration_options(dest, copy_storage=copy_storage,
                                      compressed=compressed or bool(compression),
                                      parallel=parallel, bandwidth_mib_s=bandwidth_mib_s,
                                      max_downtime_ms=max_downtime_ms)
        unknown = sorted(set(compression) - set(COMPRESSION_METHODS))
        if unknown:
            raise InvalidRequest(f"unknown compression method(s) {unknown}; libvirt offers"
                                 f" {', '.join(COMPRESSION_METHODS)}",
                                 details={"compression": unknown})
        dom, meta = self._active(vm_id, "live-migrate")
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
        params: dict[str, Any] = {}
        if copy_storage:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
        if compressed or compression:
            flags |= libvirt.VIR_MIGRATE_COMPRESSED
            if compression:
                params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] = list(compression)
        if auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if post_copy:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if parallel:
            flags |= libvirt.VIR_MIGRATE_PARALLEL
            params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = parallel
        if allow_unsafe:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        if bandwidth_mib_s is not None:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib_s
        return self._migrate(dom, vm_id, dest, flags, params, meta, epoch=epoch,
                             copy_storage=copy_storage, max_downtime_ms=max_downtime_ms)

    def migrate_offline(self, vm_id: str, dest_uri: str, *,
                        epoch: int | None = None) -> GuestInfo:
        """Move a stopped guest's definition to ``dest_uri`` (undefined here). Its disks must
        already be there: copy them with :meth:`download_volume`/:meth:`upload_volume`."""
        self.require(Capability.COLD_MIGRATION)
        dest = LibvirtURI.parse(dest_uri)
        dom, meta = self._guest(vm_id)
        with translate(f"cannot read state of guest {vm_id}", vm_id=vm_id):
            if dom.isActive():
                raise InvalidTransition(f"guest {vm_id} is running; stop it or migrate it live",
                                        details={"vm_id": vm_id})
        flags = (libvirt.VIR_MIGRATE_OFFLINE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
        return self._migrate(dom, vm_id, dest, flags, {}, meta, epoch=epoch,
                             copy_storage=False, max_downtime_ms=None)

    def job_stats(self, vm_id: str, *, completed: bool = False) -> JobStats:
        """The guest's current job (a migration) or, with ``completed``, its last finished
        one (on a migration's destination this includes the downtime; reading keeps it)."""
        dom, _meta = self._guest(vm_id)
        flags = (libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                 | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED) if completed else 0
        with translate(f"cannot read job stats of guest {vm_id}", vm_id=vm_id):
            return JobStats.from_libvirt(dom.jobStats(flags))

    def abort_job(self, vm_id: str) -> bool:
        """Abort the guest's running job (a migration); False if none was running."""
        dom, _meta = self._guest(vm_id)
        try:
            dom.abortJob()
        except libvirt.libvirtError as err:
            if is_code(err, libvirt.VIR_ERR_OPERATION_INVALID):
                return False
            raise map_error(err, f"cannot abort the job of guest {vm_id}", vm_id=vm_id) from err
        log.info("aborted the job of %s on %s", domain_name(vm_id), self.host)
        return True

    def host_uuid(self) -> str:
        """The host UUID this libvirtd goes by (libvirt refuses to migrate between two daemons
        with the same one: it takes them for one host)."""
        with translate("cannot read host capabilities", host=self.host):
            caps = ET.fromstring(self._c().getCapabilities())
        return caps.findtext("host/uuid") or ""

    def storage_shared_with(self, vm_id: str, dest_uri: str) -> bool:
        """Whether the libvirtd at ``dest_uri`` sees the guest's disks as this host does (a
        live migration moves only the memory) or not (every disk must be copied). Checked as
        Nova does: a probe file made in each disk's pool on the destination (the pool is set
        up there with the same path if missing) must show up here. NotSupported when some
        disks are shared and others are not."""
        dest = LibvirtURI.parse(dest_uri)
        pools = {p.name: p for p in (self._pool_of(v.path) for v in self.guest_volumes(vm_id))}
        seen: dict[str, bool] = {}
        with self._peer(dest) as peer:
            for pool in pools.values():
                probe = Volume(name=f"novacron-probe-{uuid.uuid4().hex}", capacity_bytes=0,
                               format="raw")
                with translate(f"cannot probe storage pool {pool.name!r} on {dest.raw}",
                               pool=pool.name, dest_uri=dest.raw):
                    made = _ensure_dir_pool(peer, pool, dest.raw).createXML(probe.to_xml(), 0)
                try:
                    seen[pool.name] = self._volume_by_path(made.path()) is not None
                finally:
                    with contextlib.suppress(libvirt.libvirtError):
                        made.delete(0)
                    with translate(f"cannot refresh storage pool {pool.name!r}"):
                        self._pool(pool.name).refresh(0)  # forget the probe here too
        if len(set(seen.values())) > 1:
            raise NotSupported(
                f"guest {vm_id} has disks both on storage {dest.raw} shares"
                f" ({[p for p, shared in seen.items() if shared]}) and on storage it does not;"
                " libvirt copies all disks or none", details={"vm_id": vm_id, "pools": seen})
        return all(seen.values())

    def start_post_copy(self, vm_id: str) -> None:
        """Switch the guest's running migration (started with ``post_copy``) to post-copy: it
        runs on the destination from now on, which pulls the rest of its memory on demand.
        A migration in post-copy can no longer be aborted."""
        dom, _meta = self._guest(vm_id)
        with translate(f"cannot switch the migration of guest {vm_id} to post-copy",
                       vm_id=vm_id):
            dom.migrateStartPostCopy(0)
        log.info("switched the migration of %s on %s to post-copy", domain_name(vm_id),
                 self.host)

    def _check_migration_options(self, dest: LibvirtURI, *, copy_storage: bool,
                                 compressed: bool, parallel: int, bandwidth_mib_s: int | None,
                                 max_downtime_ms: int | None) -> None:
        if dest.hypervisor != self.target.hypervisor:
            raise InvalidRequest(
                f"cannot migrate from a {self.target.hypervisor} host to a {dest.hypervisor}"
                " host", details={"dest_uri": dest.raw})
        if self.target.hypervisor != "qemu" and (copy_storage or compressed or parallel):
            raise NotSupported(
                "copy_storage, compressed and parallel migration need QEMU"
                f" (this host is {self.target.hypervisor})",
                details={"driver": self.name, "host": self.host})
        if parallel < 0 or (bandwidth_mib_s is not None and bandwidth_mib_s <= 0) or (
                max_downtime_ms is not None and max_downtime_ms <= 0):
            raise InvalidRequest("parallel must be >= 0; bandwidth_mib_s and max_downtime_ms"
                                 " must be positive")

    def _migrate(self, dom: Any, vm_id: str, dest: LibvirtURI, flags: int,
                 params: dict[str, Any], meta: Metadata, *, epoch: int | None,
                 copy_storage: bool, max_downtime_ms: int | None) -> GuestInfo:
        """Run a peer-to-peer migration. The destination gets the guest's storage pools (same
        names and paths) so that it can manage the guest's volumes afterwards."""
        volumes = self.guest_volumes(vm_id)
        with self._peer(dest) as peer:
            peer_pools: dict[str, Any] = {}
            created: list[Any] = []
            self._migrating.add(vm_id)
            started = time.monotonic()
            try:
                with translate(f"cannot prepare storage on {dest.raw}", dest_uri=dest.raw):
                    for volume in volumes:
                        pool = self._pool_of(volume.path)
                        if pool.name not in peer_pools:
                            peer_pools[pool.name] = _ensure_dir_pool(peer, pool, dest.raw)
                        if copy_storage:  # an empty volume of the same size to copy into
                            spec = Volume(name=volume.name, capacity_bytes=volume.capacity_bytes,
                                          format=volume.format)
                            created.append(peer_pools[pool.name].createXML(spec.to_xml(), 0))
                with translate(f"cannot migrate guest {vm_id} to {dest.raw}", vm_id=vm_id,
                               dest_uri=dest.raw):
                    if max_downtime_ms is not None:
                        dom.migrateSetMaxDowntime(max_downtime_ms, 0)
                    dom.migrateToURI3(dest.raw, params, flags)
            except BaseException:
                for vol in created:
                    with contextlib.suppress(libvirt.libvirtError):
                        vol.delete(0)
                raise
            finally:
                self._migrating.discard(vm_id)
            log.info("migrated %s from %s to %s in %.2f s", domain_name(vm_id), self.host,
                     dest.raw, time.monotonic() - started)
            if copy_storage:
                for volume in volumes:
                    self._delete_volume_path(volume.path)
            with translate(f"cannot find guest {vm_id} on {dest.raw}", vm_id=vm_id):
                for peer_pool in peer_pools.values():
                    peer_pool.refresh(0)  # shared storage: learn the guest's files
                moved = peer.lookupByName(domain_name(vm_id))
                if epoch is not None and epoch != meta.epoch:
                    new_meta = Metadata(vm_id=vm_id, epoch=epoch, name=meta.name,
                                        volumes=meta.volumes)
                    moved.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, new_meta.to_xml(),
                                      NS_PREFIX, NS, _affect(moved))
                state, reason = moved.state()
            vm_state, why = map_state(state, reason)
            return GuestInfo(vm_id=vm_id, state=vm_state, guest_id=moved.UUIDString(),
                             epoch=meta.epoch if epoch is None else epoch, reason=why)

    def _pool_of(self, path: str) -> Pool:
        """The pool holding the volume at ``path``."""
        with translate(f"cannot read the pool of {path}"):
            pool = self._c().storageVolLookupByPath(path).storagePoolLookupByVolume()
            return Pool.from_xml(pool.XMLDesc(0))

    @contextlib.contextmanager
    def _peer(self, dest: LibvirtURI) -> Iterator[Any]:
        """A short-lived connection to a migration destination, with this host's credentials."""
        auth = [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_USERNAME,
                 libvirt.VIR_CRED_PASSPHRASE], self._credentials, None]
        with translate(f"cannot connect to {dest.raw}", dest_uri=dest.raw):
            peer = libvirt.openAuth(dest.connect_uri(), auth, 0)
        try:
            yield peer
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                peer.close()

    # -- helpers -----------------------------------------------------------------------------
    def _lookup(self, vm_id: str) -> Any:
        """The guest's domain, or None."""
        return self._child_or_none(self._c().lookupByName, domain_name(vm_id))

    def _guest(self, vm_id: str) -> tuple[Any, Metadata]:
        """The guest's domain and NovaCron metadata; NotFound unless it is NovaCron's guest."""
        _check_vm_id(vm_id)
        dom = self._lookup(vm_id)
        meta = None if dom is None else self._metadata(dom)
        if dom is None or meta is None or meta.vm_id != vm_id:
            raise NotFound(f"no guest {vm_id} on host {self.host}",
                           details={"vm_id": vm_id, "host": self.host})
        return dom, meta

    def _active(self, vm_id: str, action: str) -> tuple[Any, Metadata]:
        dom, meta = self._guest(vm_id)
        with translate(f"cannot read state of guest {vm_id}", vm_id=vm_id):
            if not dom.isActive():
                raise InvalidTransition(f"cannot {action} guest {vm_id}: it is not running",
                                        details={"vm_id": vm_id, "action": action})
        return dom, meta

    @staticmethod
    def _child_or_none(lookup: Callable[[str], Any], name: str) -> Any:
        """``lookup(name)``, or None when libvirt says there is no such object."""
        try:
            return lookup(name)
        except libvirt.libvirtError as err:
            mapped = map_error(err, f"cannot look up {name!r}", name=name)
            if isinstance(mapped, NotFound):
                return None
            raise mapped from err

    def _metadata(self, dom: Any) -> Metadata | None:
        try:
            xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0)
        except libvirt.libvirtError as err:
            if is_code(err, libvirt.VIR_ERR_NO_DOMAIN_METADATA):
                return None
            raise map_error(err, f"cannot read metadata of {dom.name()}") from err
        return Metadata.from_xml(xml)

    def _check_ours(self, dom: Any, vm_id: str) -> Metadata:
        """NovaCron's metadata of ``dom``; AlreadyExists if the domain is someone else's."""
        meta = self._metadata(dom)
        if meta is None or meta.vm_id != vm_id:
            raise AlreadyExists(
                f"domain {dom.name()} exists on {self.host} but is not NovaCron's guest {vm_id}",
                details={"vm_id": vm_id, "domain": dom.name(), "host": self.host})
        return meta

    def _set_metadata(self, dom: Any, meta: Metadata) -> None:
        with translate(f"cannot record metadata of {dom.name()}"):
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, meta.to_xml(), NS_PREFIX, NS,
                            _affect(dom))

    def _info(self, dom: Any, vm_id: str, meta: Metadata | None = None) -> GuestInfo:
        with translate(f"cannot read state of guest {vm_id}", vm_id=vm_id):
            state, reason = dom.state()
            guest_id = dom.UUIDString()
        meta = meta or self._metadata(dom)
        vm_state, why = map_state(state, reason)
        if vm_id in self._migrating and vm_state in (VMState.RUNNING, VMState.PAUSED):
            vm_state = VMState.MIGRATING
        return GuestInfo(vm_id=vm_id, state=vm_state, guest_id=guest_id,
                         epoch=0 if meta is None else meta.epoch, reason=why)

    @staticmethod
    def _ignore_inactive(call: Callable[[], Any]) -> None:
        """Run a state change that fails harmlessly when the guest stopped meanwhile."""
        try:
            call()
        except libvirt.libvirtError as err:
            if not is_code(err, libvirt.VIR_ERR_OPERATION_INVALID):
                raise

    def _domain_type(self) -> str:
        if self.target.hypervisor in _DOMAIN_TYPES:
            return _DOMAIN_TYPES[self.target.hypervisor]
        if self.settings.domain_type:
            return self.settings.domain_type
        with translate("cannot read host capabilities"):
            caps = ET.fromstring(self._c().getCapabilities())
        return "kvm" if caps.find("guest/arch/domain[@type='kvm']") is not None else "qemu"

    def _serial(self, vm_id: str) -> Serial:
        if not self.settings.console_log_dir:
            return Serial()
        return Serial(log_file=os.path.join(self.settings.console_log_dir,
                                            f"{domain_name(vm_id)}.log"))

    def _kernel_boot(self, config: GuestConfig) -> KernelBoot | None:
        labels = config.labels
        kernel = labels.get("libvirt.kernel", self.settings.kernel)
        if not kernel:
            return None
        boot = KernelBoot(kernel=kernel,
                          initrd=labels.get("libvirt.initrd", self.settings.initrd) or None,
                          cmdline=labels.get("libvirt.cmdline", self.settings.cmdline))
        if self.target.local and self.target.hypervisor != "test":
            for path in (boot.kernel, boot.initrd):
                if path and not os.path.isfile(path):
                    raise NotFound(f"boot file {path} is missing on host {self.host}",
                                   details={"path": path, "vm_id": config.vm_id})
        return boot

    def _guest_pool(self) -> Any:
        """The guest pool, created if missing."""
        self.ensure_pool()
        return self._pool(self.settings.pool)

    def _pool_or_none(self, name: str) -> Any:
        return self._child_or_none(self._c().storagePoolLookupByName, name)

    def _pool_info_or_none(self, name: str) -> Pool | None:
        pool = self._pool_or_none(name)
        if pool is None:
            return None
        with translate(f"cannot read storage pool {name!r}"):
            return Pool.from_xml(pool.XMLDesc(0))

    def _pool(self, name: str | None) -> Any:
        name = name or self.settings.pool
        pool = self._pool_or_none(name)
        if pool is None:
            raise NotFound(f"no storage pool {name!r} on host {self.host}",
                           details={"pool": name, "host": self.host})
        return pool

    def _volume(self, name: str, pool: str | None) -> Any:
        p = self._pool(pool)
        vol = self._child_or_none(p.storageVolLookupByName, name)
        if vol is None:
            raise NotFound(f"no volume {name!r} in pool {p.name()!r}",
                           details={"volume": name, "pool": p.name()})
        return vol

    def _resolve_image(self, image: str) -> tuple[Backing, int]:
        """The backing file and virtual size of an image: a volume name, ``pool/volume``, or
        an absolute path (a pool's volume, or a file when the host is this machine)."""
        missing = NotFound(f"image {image!r} not found on host {self.host}",
                           details={"image": image, "host": self.host})
        if image.startswith("/"):
            vol = self._child_or_none(self._c().storageVolLookupByPath, image)
            if vol is None:
                if not (self.target.local and os.path.isfile(image)):
                    raise missing
                with open(image, "rb") as fh:
                    fmt = "qcow2" if fh.read(4) == _QCOW2_MAGIC else "raw"
                return Backing(path=image, format=fmt), _image_size(image, fmt)
        else:
            pool_name, _, vol_name = image.rpartition("/")
            pool = self._pool_or_none(pool_name or self.settings.image_pool
                                      or self.settings.pool)
            vol = None if pool is None else self._child_or_none(pool.storageVolLookupByName,
                                                                vol_name)
            if vol is None:
                raise missing
        with translate(f"cannot read image {image!r}"):
            info = Volume.from_xml(vol.XMLDesc(0))
        return Backing(path=info.path, format=info.format), info.capacity_bytes

    def _create_guest_disk(self, config: GuestConfig) -> Volume:
        """The guest's disk volume. An existing volume of that name is never reused or deleted
        (AlreadyExists): on shared storage it may be the disk of the guest on another host."""
        pool = self._guest_pool()
        name = f"{domain_name(config.vm_id)}-disk0.qcow2"
        capacity = config.disk_gib * GIB
        backing = None
        if config.image:
            backing, image_bytes = self._resolve_image(config.image)
            capacity = max(capacity, image_bytes)
        return self.create_volume(name, capacity, pool=pool.name(), backing=backing)

    def _volume_by_path(self, path: str) -> Any:
        """The volume at ``path``, or None; refreshes the pools of its directory on a miss
        (files another host made on shared storage are unknown until then)."""
        conn = self._c()
        vol = self._child_or_none(conn.storageVolLookupByPath, path)
        if vol is not None:
            return vol
        with translate(f"cannot refresh the pools of {path}"):
            for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
                if Pool.from_xml(pool.XMLDesc(0)).path == os.path.dirname(path):
                    pool.refresh(0)
        return self._child_or_none(conn.storageVolLookupByPath, path)

    def _delete_volume_path(self, path: str) -> None:
        vol = self._volume_by_path(path)
        if vol is not None:
            with translate(f"cannot delete volume {path}", path=path):
                vol.delete(0)

    def _guest_disk(self, dom: Any, target: str) -> Disk:
        with translate(f"cannot read disks of {dom.name()}"):
            disks = Domain.from_xml(dom.XMLDesc(0)).disks
        for disk in disks:
            if disk.target == target:
                return disk
        raise NotFound(f"{dom.name()} has no disk {target}", details={"target": target})

    def _check_growth(self, current: Volume, capacity_bytes: int) -> None:
        if capacity_bytes < current.capacity_bytes:
            raise InvalidRequest(
                f"volume {current.name} is {current.capacity_bytes} bytes; shrinking it to"
                f" {capacity_bytes} is refused", details={"volume": current.name})

    def _snapshot_or_none(self, dom: Any, name: str) -> Any:
        return self._child_or_none(dom.snapshotLookupByName, name)

    @contextlib.contextmanager
    def _stream(self, context: str) -> Iterator[Any]:
        """A libvirt stream, finished after the block or aborted on error."""
        with translate(context):
            stream = self._c().newStream(0)
        try:
            with translate(context):
                yield stream
                stream.finish()
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise


def _ensure_dir_pool(conn: Any, spec: Pool, where: str, *, check_path: bool = True) -> Any:
    """The pool ``spec.name`` on ``conn``: defined, built, started and autostarted at
    ``spec.path`` if missing, started if inactive. With ``check_path``, an existing pool must be
    at ``spec.path``. Raises libvirt errors."""
    try:
        pool = conn.storagePoolLookupByName(spec.name)
    except libvirt.libvirtError as err:
        if not is_code(err, libvirt.VIR_ERR_NO_STORAGE_POOL):
            raise
        pool = conn.storagePoolDefineXML(spec.to_xml(), 0)
        try:
            pool.build(0)
            pool.create(0)
            pool.setAutostart(1)
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                pool.undefine()
            raise
        log.info("created storage pool %s at %s on %s", spec.name, spec.path, where)
        return pool
    if not pool.isActive():
        pool.create(0)
    if check_path and (found := Pool.from_xml(pool.XMLDesc(0)).path) != spec.path:
        raise InvalidRequest(
            f"storage pool {spec.name!r} on {where} is at {found}, not {spec.path}",
            details={"pool": spec.name, "path": found, "expected": spec.path})
    return pool


def _affect(dom: Any) -> int:
    """Flags that change a domain's persistent config, and its live state when it runs."""
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if dom.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    return int(flags)


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _image_size(path: str, fmt: str) -> int:
    """The virtual size of a local image file (qcow2 header field, or the raw file size)."""
    if fmt == "raw":
        return os.path.getsize(path)
    with open(path, "rb") as fh:
        header = fh.read(32)
    return int.from_bytes(header[24:32], "big")
