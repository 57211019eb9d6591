"""The embedded simulated hypervisor: every guest is a real OS process with real memory and disk.

Simulated, and honest about it: no instruction is emulated and no guest OS boots. Each guest is a
small stdlib-only process (:mod:`novacron.drivers.simguest`) that maps its RAM from a sparse
shared-memory file, writes to it (and to a sparse disk image) at its workload's rates, burns the
CPU share it is told to, and publishes counters. Pausing really stops it (SIGSTOP), stopping really
ends it, and migration moves real bytes. The guest outlives the driver object and the process
(e.g. a Ray actor) that started it; a new driver re-attaches through the pidfile.

Files of guest ``<vm>`` on host ``<host>``::

    <state_dir>/sim/<host>/<vm>/config.json   its definition and the epoch it last started with
                                /pid          its pid (written by its launcher)
                                /guest.log    its stdout and stderr
                                /disk.img     sparse disk image of disk_gib GiB
                                /.lock        serialises driver operations across processes
                                /incoming     while a guest waits for a migration's handover
    <memory_dir>/<host>/<vm>.mem              RAM: memory_mib MiB, sparse (exists while it runs)
                        <vm>.gen              write generation of each 4 KiB page (uint32)
                        <vm>.ctl              4 KiB control/status header
                        <vm>.dgen             write generation of each 64 KiB disk block (uint32)

``memory_dir`` defaults to /dev/shm/novacron when /dev/shm is writable, else <state_dir>/sim-memory.

For the migration engine (see the protocol in :mod:`novacron.drivers.simguest`):
:meth:`SimDriver.memory_paths` gives the files; :func:`read_generations` snapshots a generation
array (of the memory pages or of the disk blocks) and :func:`dirty_pages` diffs two snapshots;
:meth:`SimDriver.read_status` and :meth:`SimDriver.set_workload` read the header and steer the
workload (``throttle_pct`` for auto-converge). On the target, :meth:`SimDriver.prepare_incoming`
creates empty memory files to copy pages into and starts the guest on them, waiting, and
:meth:`SimDriver.start_incoming` hands the migrated guest over to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import mmap
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from novacron.drivers import simguest
from novacron.drivers.base import (
    Capability,
    Driver,
    GuestConfig,
    GuestInfo,
    GuestStats,
    HostInfo,
    HostStats,
    register,
)
from novacron.drivers.simguest import (
    CONTROL_SIZE,
    DISK_BLOCK,
    EPOCH_OFFSET,
    GENERATION_SIZE,
    IDENTITY,
    IDENTITY_FIELDS,
    IDENTITY_OFFSET,
    LAYOUT_VERSION,
    MAGIC,
    PAGE_SIZE,
    STATUS,
    STATUS_FIELDS,
    STATUS_OFFSET,
    WORKLOAD,
    WORKLOAD_FIELDS,
    WORKLOAD_OFFSET,
    Phase,
)
from novacron.errors import (
    Conflict,
    GuestError,
    InvalidRequest,
    InvalidTransition,
    NotFound,
    OperationTimeout,
    StaleEpoch,
)
from novacron.states import VMState

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = logging.getLogger("novacron.drivers.sim")

HYPERVISOR = "novacron-sim"
SIM_VERSION = f"layout-{LAYOUT_VERSION}"
DEFAULT_CAPACITY: Mapping[str, float] = {"cpus": 16, "memory_mib": 65536, "disk_gib": 1024}
# Workload keys of GuestConfig.workload, their defaults and allowed ranges.
DEFAULT_WORKLOAD: Mapping[str, float] = {
    "dirty_rate_mib_s": 1.0,
    "cpu_busy": 0.0,
    "disk_write_mib_s": 0.0,
    "populate_fraction": 0.1,
}
_WORKLOAD_RANGES: Mapping[str, tuple[float, float]] = {
    "dirty_rate_mib_s": (0.0, math.inf),
    "cpu_busy": (0.0, 1.0),
    "disk_write_mib_s": (0.0, math.inf),
    "throttle_pct": (0.0, 99.0),
    "populate_fraction": (0.0, 1.0),
}

_CONFIG = "config.json"
_PIDFILE = "pid"
_LOG = "guest.log"
_DISK = "disk.img"
_LOCK = ".lock"
_INCOMING = "incoming"
_CONFIG_FORMAT = 1
_GUEST_MODULE = simguest.__name__
_PACKAGE_ROOT = str(Path(simguest.__file__).resolve().parents[2])  # the dir holding novacron/
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_POLL_S = 0.01
_FAST_POLL_S = 0.0005  # waits within a migration's downtime (pause, handover)
_SIGNAL_WAIT_S = 5.0  # how long a SIGSTOP, SIGCONT or SIGKILL may take to show in /proc
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_DEAD = frozenset({"Z", "X", "x"})  # /proc states of a process that has exited
_GIB = 1024**3
_MIB = 1024**2
_DOUBLE = struct.Struct("<d")

# State letter of a live guest's /proc/<pid>/stat -> VM state; None: the guest's phase decides.
_PROCESS_STATES: Mapping[str, VMState | None] = {
    "R": None,  # running
    "S": None,  # sleeping between ticks
    "D": None,  # in a disk write
    "T": VMState.PAUSED,  # stopped by SIGSTOP
    "t": VMState.PAUSED,  # stopped by a tracer
}
# Phase the guest publishes -> VM state, while its process is not stopped.
_PHASE_STATES: Mapping[int, VMState] = {
    Phase.LAUNCHED: VMState.STARTING,
    Phase.BOOTING: VMState.STARTING,
    Phase.RUNNING: VMState.RUNNING,
    Phase.STOPPING: VMState.STOPPING,
    Phase.INCOMING: VMState.PAUSED,  # as libvirt shows an incoming domain: paused (migration)
}


@dataclass(frozen=True)
class SimPaths:
    """Where one guest's files are."""

    guest_dir: Path
    config: Path
    pidfile: Path
    log: Path
    disk: Path
    memory: Path
    generations: Path
    control: Path
    disk_generations: Path
    incoming: Path  # marker: a guest launched here waits for a migration's handover


@dataclass(frozen=True)
class SimStatus:
    """A guest's control/status header: identity, counters and workload."""

    memory_pages: int
    epoch: int
    pid: int
    phase: Phase
    boot_count: int
    ticks: int
    pages_dirtied_total: int
    touched_pages: int
    disk_bytes_written: int
    heartbeat_ns: int
    dirty_rate_mib_s: float
    cpu_busy: float
    disk_write_mib_s: float
    throttle_pct: float
    populate_fraction: float


@dataclass(frozen=True)
class _Process:
    """A live guest process as /proc shows it."""

    pid: int
    state: str
    cpu_time_s: float
    started_ticks: int  # clock ticks after host boot: tells a reused pid apart


def read_generations(path: Path) -> npt.NDArray[np.uint32]:
    """A snapshot (a copy) of a guest's generation array: one uint32 per 4 KiB page of memory
    (``generations``) or per 64 KiB block of disk (``disk_generations``).

    Copied element by element from a mapping, so each generation is read whole (read(2) and
    memcpy may move bytes singly and tear a word the guest is updating).
    """
    import numpy as np

    if path.stat().st_size == 0:  # a guest without a disk
        return np.zeros(0, dtype=np.uint32)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        live = np.frombuffer(mm, dtype=np.uint32)
        snapshot = np.add(live, np.uint32(0), dtype=np.uint32)
        del live  # release the buffer before the mapping closes
    return snapshot


def dirty_pages(before: npt.NDArray[np.uint32], after: npt.NDArray[np.uint32], *,
                pending: npt.NDArray[np.intp] | None = None) -> npt.NDArray[np.intp]:
    """Indices of the pages (or disk blocks) written since snapshot ``before`` (changed, or a
    write in progress), sorted, with those of ``pending`` (dirty already) among them."""
    import numpy as np

    if before.shape != after.shape:
        raise InvalidRequest(f"generation snapshots differ in size: {before.shape} vs "
                             f"{after.shape}")
    dirty = (before != after) | ((after & 1) == 1)
    if pending is not None:
        dirty[pending] = True  # a mask, not a sorted union: several times faster, in a pause
    return np.flatnonzero(dirty)


@register
class SimDriver(Driver):
    """Guests as local OS processes with shared-memory RAM (see the module docstring)."""

    name: ClassVar[str] = "sim"
    stats_in_heartbeat = True

    def __init__(self, host: str, uri: str | None, config: Mapping[str, Any],
                 state_dir: Path) -> None:
        super().__init__(host, uri, config, state_dir)
        _check_name("host", host)
        try:
            capacity = {**DEFAULT_CAPACITY, **self.config.get("capacity", {})}
            self._capacity = HostInfo(cpus=float(capacity["cpus"]),
                                      memory_mib=int(capacity["memory_mib"]),
                                      disk_gib=int(capacity["disk_gib"]),
                                      hypervisor=HYPERVISOR, version=SIM_VERSION)
            self._boot_timeout_s = float(self.config.get("boot_timeout_s", 30.0))
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad sim driver config for host {host}: {exc}",
                                 details={"host": host}) from None
        if min(self._capacity.cpus, self._capacity.memory_mib, self._capacity.disk_gib) <= 0:
            raise InvalidRequest(f"sim host {host} capacity must be positive: {capacity}",
                                 details={"host": host})
        memory_dir = self.config.get("memory_dir")
        self._root = (self.state_dir / "sim" / host).resolve()
        self._memory_root = (Path(memory_dir) if memory_dir
                             else _default_memory_dir(self.state_dir)).resolve() / host

    # -- what it can do ---------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[Capability]:
        """Everything but snapshots, consoles, images and pushed events."""
        return frozenset({Capability.PAUSE, Capability.REBOOT, Capability.COLD_MIGRATION,
                          Capability.LIVE_MIGRATION, Capability.MEMORY_ACCESS,
                          Capability.DISK_ACCESS})

    def missing_capabilities(self) -> dict[Capability, str]:
        """Why the sim driver lacks the rest."""
        reasons = {
            Capability.SNAPSHOT: "sim guests keep no snapshots: their disk is one flat sparse "
                                 "image and their memory lives only while they run",
            Capability.CONSOLE: "sim guests run no OS and have no console; their output is in "
                                f"{self._root}/<vm>/{_LOG}",
            Capability.IMAGE_IMPORT: "sim guests boot no image: their disk starts as an empty "
                                     "sparse file",
            Capability.EVENTS: "the sim driver is polled: guest state is read from /proc and "
                               "the guest's status header",
        }
        return {c: reasons.get(c, f"the sim driver does not support {c.value}")
                for c in Capability if c not in self.capabilities}

    # -- connection and host ----------------------------------------------------------------
    def connect(self) -> None:
        """Create the host's state and memory directories."""
        self._root.mkdir(parents=True, exist_ok=True)
        self._memory_root.mkdir(parents=True, exist_ok=True)

    def host_info(self) -> HostInfo:
        """The capacity from the driver config."""
        return self._capacity

    def host_stats(self) -> HostStats:
        """Guest CPU (average share since each started), memory touched, guest counts."""
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        cpu_share = cpu_time = touched = 0.0
        running = defined = 0
        for info in self.list():
            defined += 1
            if info.state not in (VMState.RUNNING, VMState.PAUSED, VMState.STARTING,
                                  VMState.STOPPING):
                continue
            proc = self._process(info.vm_id)
            if proc is None:
                continue
            running += 1
            cpu_time += proc.cpu_time_s
            age_s = uptime - proc.started_ticks / _CLOCK_TICKS
            cpu_share += proc.cpu_time_s / max(age_s, _POLL_S)
            status = self._status_or_none(info.vm_id)
            touched += status.touched_pages * PAGE_SIZE if status else 0
        return HostStats(
            cpu_load=min(1.0, cpu_share / self._capacity.cpus),
            memory_used_mib=int(touched // _MIB),
            guests=defined,
            extra={"running_guests": float(running), "guest_cpu_time_s": cpu_time,
                   "memory_touched_mib": touched / _MIB},
        )

    # -- guests -----------------------------------------------------------------------------
    def define(self, config: GuestConfig) -> GuestInfo:
        """Write config.json and create the sparse disk image; an existing guest is returned."""
        _check_config(config)
        with self._lock(config.vm_id, create=True):
            paths = self.memory_paths(config.vm_id, must_exist=False)
            if paths.config.exists():
                return self._info(self._load(config.vm_id))
            if not paths.disk.exists():
                _create_sparse(paths.disk, config.disk_gib * _GIB)
            self._save(config)
            log.info("defined guest %s on %s (%d MiB, %d GiB disk)", config.vm_id, self.host,
                     config.memory_mib, config.disk_gib)
            return self._info(config)

    def start(self, vm_id: str, epoch: int) -> GuestInfo:
        """Boot the guest process on fresh memory; a running guest is returned as is."""
        return self._start(vm_id, epoch)

    def start_incoming(self, vm_id: str, epoch: int) -> GuestInfo:
        """Hand a migrated guest over: the guest waiting since :meth:`prepare_incoming` (started
        now if it is gone) takes over the memory, generations and control header a migrator
        wrote, with ``epoch``, unthrottled. A guest handed over already is returned as is.

        The new epoch is made durable just after the guest runs (the fsync would lengthen the
        downtime), before the incoming marker goes: a call repeated after a crash in between
        hands over again (a no-op for a running guest) and writes it then.
        """
        with self._lock(vm_id):
            config, new_epoch = self._claim_epoch(vm_id, epoch)
            paths = self.memory_paths(vm_id)
            proc = self._process(vm_id)
            if not paths.incoming.exists():
                if proc is None:
                    raise InvalidTransition(f"guest {vm_id} on {self.host} has no incoming "
                                            "migration (call prepare_incoming first)",
                                            details={"vm_id": vm_id, "host": self.host})
                if new_epoch:
                    self._save(config)
                _poke(paths.control, EPOCH_OFFSET, epoch.to_bytes(8, "little"))
                return self._info(config)
            self._check_incoming(paths, config)
            if proc is None:
                paths.pidfile.unlink(missing_ok=True)
                pid = self._launch(paths, incoming=True)
            else:
                pid = proc.pid
            _signal(pid, signal.SIGUSR1)
            self._await_phase(vm_id, pid, Phase.RUNNING, poll_s=_FAST_POLL_S)
            if new_epoch:
                self._save(config)
            paths.incoming.unlink()
            log.info("handed guest %s over on %s to pid %d (epoch %d)", vm_id, self.host, pid,
                     epoch)
            return self._info(config)

    def prepare_incoming(self, vm_id: str) -> SimPaths:
        """Create zeroed memory and generation files and a control header to migrate a guest
        into, and start the guest on them, waiting for :meth:`start_incoming` (so that a process
        start is no part of the downtime); a guest waiting from an earlier call is replaced."""
        with self._lock(vm_id):
            config = self._load(vm_id)
            paths = self.memory_paths(vm_id)
            proc = self._process(vm_id)
            if proc is not None:
                if not paths.incoming.exists():
                    raise InvalidTransition(f"guest {vm_id} on {self.host} is running; an "
                                            "incoming migration needs it stopped",
                                            details={"vm_id": vm_id, "host": self.host})
                _kill(vm_id, proc, signal.SIGKILL)
            self._kill_strays(vm_id)
            self._create_memory(paths, config)
            paths.incoming.touch()
            paths.pidfile.unlink(missing_ok=True)
            pid = self._launch(paths, incoming=True)
            self._await_phase(vm_id, pid, Phase.INCOMING)
            return paths

    def stop(self, vm_id: str, *, force: bool = False, timeout_s: float = 30.0) -> GuestInfo:
        """SIGTERM and wait (SIGKILL after ``timeout_s``), or SIGKILL at once with ``force``."""
        with self._lock(vm_id):
            self._load(vm_id)
            proc = self._process(vm_id)
            if proc is not None:
                if force:
                    _kill(vm_id, proc, signal.SIGKILL)
                else:
                    _signal(proc.pid, signal.SIGTERM)
                    _signal(proc.pid, signal.SIGCONT)  # a paused guest must run to exit
                    if not _await_exit(proc, timeout_s):
                        log.warning("guest %s (pid %d) ignored SIGTERM for %.1f s; killing it",
                                    vm_id, proc.pid, timeout_s)
                        _kill(vm_id, proc, signal.SIGKILL)
                log.info("stopped guest %s (pid %d)%s", vm_id, proc.pid,
                         " by force" if force else "")
            self._kill_strays(vm_id)
            self._release(vm_id)
        return self.get(vm_id)

    def reboot(self, vm_id: str) -> GuestInfo:
        """SIGHUP: the guest boots again in the same process (boot_count + 1)."""
        with self._lock(vm_id):
            proc = self._require_running(vm_id, "reboot", paused_ok=False)
            before = self.read_status(vm_id).boot_count
            _signal(proc.pid, signal.SIGHUP)
            self._await_phase(vm_id, proc.pid, Phase.RUNNING, after_boot=before)
            log.info("rebooted guest %s (pid %d)", vm_id, proc.pid)
        return self.get(vm_id)

    def pause(self, vm_id: str) -> GuestInfo:
        """SIGSTOP: the guest process stops running; its memory stays."""
        return self._freeze(vm_id, pause=True)

    def resume(self, vm_id: str) -> GuestInfo:
        """SIGCONT a paused guest."""
        return self._freeze(vm_id, pause=False)

    def undefine(self, vm_id: str, *, delete_storage: bool = True) -> None:
        """Remove a stopped guest; its memory always, its directory and disk with storage."""
        _check_name("vm_id", vm_id)
        paths = self.memory_paths(vm_id, must_exist=False)
        if not paths.guest_dir.is_dir():
            self._release(vm_id)
            return
        with contextlib.suppress(NotFound), self._lock(vm_id):
            proc = self._process(vm_id)
            if proc is not None:
                raise Conflict(f"guest {vm_id} on {self.host} is running (pid {proc.pid}); "
                               "stop it before undefining it",
                               details={"vm_id": vm_id, "host": self.host, "pid": proc.pid})
            self._release(vm_id)
            if delete_storage:
                shutil.rmtree(paths.guest_dir)
            else:
                paths.config.unlink(missing_ok=True)
            log.info("undefined guest %s on %s%s", vm_id, self.host,
                     " and deleted its storage" if delete_storage else "")

    def get(self, vm_id: str) -> GuestInfo:
        """The guest's state from its pidfile, /proc and its status header."""
        return self._info(self._load(vm_id))

    def list(self) -> list[GuestInfo]:
        """Every guest defined on this host; one with a corrupt file shows as ERROR."""
        if not self._root.is_dir():
            return []
        guests = []
        for guest_dir in sorted(self._root.iterdir()):
            if not (guest_dir / _CONFIG).is_file():
                continue
            try:
                guests.append(self.get(guest_dir.name))
            except NotFound:  # undefined meanwhile
                continue
            except GuestError as exc:
                log.warning("%s", exc.message)
                guests.append(GuestInfo(vm_id=guest_dir.name, state=VMState.ERROR,
                                        reason=exc.message))
        return guests

    def stats(self, vm_id: str) -> GuestStats:
        """CPU time from /proc; memory touched and disk bytes from the status header."""
        self._load(vm_id)
        proc = self._process(vm_id)
        status = self._status_or_none(vm_id) if proc else None
        if proc is None or status is None:
            return GuestStats()
        return GuestStats(cpu_time_s=proc.cpu_time_s,
                          memory_touched_bytes=status.touched_pages * PAGE_SIZE,
                          disk_written_bytes=status.disk_bytes_written)

    # -- helpers for the migration engine ---------------------------------------------------
    def memory_paths(self, vm_id: str, *, must_exist: bool = True) -> SimPaths:
        """The guest's files (memory, generations, control, disk...); NotFound if undefined."""
        _check_name("vm_id", vm_id)
        guest_dir = self._root / vm_id
        paths = SimPaths(guest_dir=guest_dir, config=guest_dir / _CONFIG,
                         pidfile=guest_dir / _PIDFILE, log=guest_dir / _LOG,
                         disk=guest_dir / _DISK,
                         memory=self._memory_root / f"{vm_id}.mem",
                         generations=self._memory_root / f"{vm_id}.gen",
                         control=self._memory_root / f"{vm_id}.ctl",
                         disk_generations=self._memory_root / f"{vm_id}.dgen",
                         incoming=guest_dir / _INCOMING)
        if must_exist and not paths.config.is_file():
            raise NotFound(f"no guest {vm_id} on sim host {self.host}",
                           details={"vm_id": vm_id, "host": self.host})
        return paths

    def read_status(self, vm_id: str) -> SimStatus:
        """The guest's control/status header (exists while it runs or is prepared)."""
        path = self.memory_paths(vm_id).control
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != CONTROL_SIZE:
                    raise GuestError(f"status header {path} is corrupt: {size} bytes, expected "
                                     f"{CONTROL_SIZE}", details={"vm_id": vm_id,
                                                                 "path": str(path)})
                with mmap.mmap(f.fileno(), CONTROL_SIZE, access=mmap.ACCESS_READ) as data:
                    # unpack_from loads each aligned field whole, straight from the mapping
                    identity = dict(zip(IDENTITY_FIELDS,
                                        IDENTITY.unpack_from(data, IDENTITY_OFFSET), strict=True))
                    status = dict(zip(STATUS_FIELDS, STATUS.unpack_from(data, STATUS_OFFSET),
                                      strict=True))
                    workload = dict(zip(WORKLOAD_FIELDS,
                                        WORKLOAD.unpack_from(data, WORKLOAD_OFFSET), strict=True))
        except FileNotFoundError:
            raise InvalidTransition(f"guest {vm_id} on {self.host} is not running: it has no "
                                    f"status header {path}",
                                    details={"vm_id": vm_id, "host": self.host}) from None
        if (identity["magic"], identity["version"]) != (MAGIC, LAYOUT_VERSION):
            raise GuestError(f"status header {path} is corrupt: bad magic or layout version",
                             details={"vm_id": vm_id, "path": str(path)})
        try:
            phase = Phase(status.pop("phase"))
        except ValueError:
            raise GuestError(f"status header {path} is corrupt: unknown phase",
                             details={"vm_id": vm_id, "path": str(path)}) from None
        return SimStatus(memory_pages=identity["memory_pages"], epoch=identity["epoch"],
                         phase=phase, **status, **workload)

    def set_workload(self, vm_id: str, **values: float) -> SimStatus:
        """Change a running guest's workload now (dirty_rate_mib_s, cpu_busy, disk_write_mib_s,
        throttle_pct for auto-converge, populate_fraction for the next boot); not persisted."""
        _check_workload(values, runtime=True)
        self.read_status(vm_id)
        for key, value in values.items():
            _poke(self.memory_paths(vm_id).control,
                  WORKLOAD_OFFSET + 8 * WORKLOAD_FIELDS.index(key), _DOUBLE.pack(value))
        return self.read_status(vm_id)

    # -- internals: records -----------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, vm_id: str, *, create: bool = False) -> Iterator[None]:
        """Hold the guest's lock file (across threads and processes) for one operation."""
        _check_name("vm_id", vm_id)
        guest_dir = self._root / vm_id
        if create:
            guest_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(guest_dir / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise NotFound(f"no guest {vm_id} on sim host {self.host}",
                           details={"vm_id": vm_id, "host": self.host}) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load(self, vm_id: str) -> GuestConfig:
        """The guest's config.json (its epoch: the one it was last started with)."""
        path = self.memory_paths(vm_id).config
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != _CONFIG_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            config = GuestConfig(
                vm_id=str(data["vm_id"]), name=str(data["name"]), cpus=int(data["cpus"]),
                memory_mib=int(data["memory_mib"]), disk_gib=int(data["disk_gib"]),
                image=data["image"], labels=dict(data["labels"]),
                workload={k: float(v) for k, v in data["workload"].items()},
                epoch=int(data["epoch"]))
            if config.vm_id != vm_id:
                raise ValueError(f"it describes guest {config.vm_id!r}")
            _check_config(config)
        except FileNotFoundError:
            raise NotFound(f"no guest {vm_id} on sim host {self.host}",
                           details={"vm_id": vm_id, "host": self.host}) from None
        except (ValueError, KeyError, TypeError, AttributeError, InvalidRequest,
                UnicodeDecodeError) as exc:
            raise GuestError(f"guest config {path} is corrupt: {exc}; fix or remove it",
                             details={"vm_id": vm_id, "path": str(path)}) from None
        return config

    def _save(self, c: GuestConfig) -> None:
        data = {"format": _CONFIG_FORMAT, "vm_id": c.vm_id, "name": c.name, "cpus": c.cpus,
                "memory_mib": c.memory_mib, "disk_gib": c.disk_gib, "image": c.image,
                "labels": dict(c.labels), "workload": dict(c.workload), "epoch": c.epoch}
        path = self.memory_paths(c.vm_id, must_exist=False).config
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- internals: processes ---------------------------------------------------------------
    def _pid(self, vm_id: str) -> int | None:
        """The pid in the guest's pidfile, None without one; GuestError if it is corrupt."""
        path = self.memory_paths(vm_id, must_exist=False).pidfile
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise GuestError(f"pidfile {path} is unreadable: {exc}",
                             details={"vm_id": vm_id, "path": str(path)}) from None
        if not text.isdigit() or int(text) <= 0:
            raise GuestError(f"pidfile {path} is corrupt ({text[:40]!r} is not a process id); "
                             f"remove it once no process runs with {path.parent} in its "
                             "command line", details={"vm_id": vm_id, "path": str(path)})
        return int(text)

    def _process(self, vm_id: str) -> _Process | None:
        """The guest's live process, verified by its command line (pids get reused)."""
        pid = self._pid(vm_id)
        return None if pid is None else _live_process(pid, self._root / vm_id)

    def _kill_strays(self, vm_id: str) -> None:
        """SIGKILL processes of this guest that its pidfile does not name: a launch whose
        caller died before the pidfile was settled (e.g. a migration's target end killed while
        preparing an incoming guest) leaves one behind, which nothing else would stop."""
        guest_dir = self._root / vm_id
        tracked = self._pid(vm_id)
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != tracked:
                proc = _live_process(int(entry), guest_dir)
                if proc is not None:
                    log.warning("killing stray process %d of guest %s on %s", proc.pid, vm_id,
                                self.host)
                    _kill(vm_id, proc, signal.SIGKILL)

    def _require_running(self, vm_id: str, action: str, *, paused_ok: bool) -> _Process:
        self._load(vm_id)
        proc = self._process(vm_id)
        paused = proc is not None and _PROCESS_STATES.get(proc.state) == VMState.PAUSED
        if proc is None or (paused and not paused_ok):
            raise InvalidTransition(f"cannot {action} guest {vm_id} on {self.host}: it is "
                                    f"{'paused' if paused else 'stopped'}",
                                    details={"vm_id": vm_id, "action": action})
        return proc

    def _claim_epoch(self, vm_id: str, epoch: int) -> tuple[GuestConfig, bool]:
        """The guest's config with ``epoch``, and whether that epoch is new (the caller saves
        it); StaleEpoch if the guest started with a later one."""
        config = self._load(vm_id)
        if epoch < config.epoch:
            raise StaleEpoch(f"refusing to start guest {vm_id} with epoch {epoch}: it was "
                             f"started with epoch {config.epoch}",
                             details={"vm_id": vm_id, "epoch": epoch,
                                      "current_epoch": config.epoch})
        return replace(config, epoch=epoch), epoch > config.epoch

    def _start(self, vm_id: str, epoch: int) -> GuestInfo:
        with self._lock(vm_id):
            config, new_epoch = self._claim_epoch(vm_id, epoch)
            if new_epoch:
                self._save(config)
            paths = self.memory_paths(vm_id)
            proc = self._process(vm_id)
            if proc is not None:
                with contextlib.suppress(FileNotFoundError):
                    _poke(paths.control, EPOCH_OFFSET, epoch.to_bytes(8, "little"))
                return self._info(config)
            self._create_memory(paths, config)
            paths.pidfile.unlink(missing_ok=True)
            pid = self._launch(paths, incoming=False)
            self._await_phase(vm_id, pid, Phase.RUNNING)
            log.info("started guest %s on %s as pid %d (epoch %d)", vm_id, self.host, pid,
                     epoch)
            return self._info(config)

    def _create_memory(self, paths: SimPaths, config: GuestConfig) -> None:
        """Fresh, zeroed, sparse memory and generation files and a new control header."""
        pages = config.memory_mib * _MIB // PAGE_SIZE
        paths.memory.parent.mkdir(parents=True, exist_ok=True)
        _create_sparse(paths.memory, pages * PAGE_SIZE)
        _create_sparse(paths.generations, pages * GENERATION_SIZE)
        _create_sparse(paths.disk_generations, _disk_blocks(config) * GENERATION_SIZE)
        header = bytearray(CONTROL_SIZE)
        IDENTITY.pack_into(header, IDENTITY_OFFSET, MAGIC, LAYOUT_VERSION, PAGE_SIZE,
                           zlib.crc32(config.vm_id.encode()), pages, config.epoch)
        workload = {**DEFAULT_WORKLOAD, **config.workload, "throttle_pct": 0.0}
        WORKLOAD.pack_into(header, WORKLOAD_OFFSET, *(workload[k] for k in WORKLOAD_FIELDS))
        tmp = paths.control.with_name(f".{paths.control.name}.tmp")
        tmp.write_bytes(header)
        os.replace(tmp, paths.control)

    def _check_incoming(self, paths: SimPaths, config: GuestConfig) -> None:
        """The files a migrator filled must match the guest's size; in the header, reset the
        pid and phase (the guest publishes its own as it takes over), set the epoch and lift a
        migration's throttle."""
        pages = config.memory_mib * _MIB // PAGE_SIZE
        expected = {paths.memory: pages * PAGE_SIZE,
                    paths.generations: pages * GENERATION_SIZE, paths.control: CONTROL_SIZE,
                    paths.disk_generations: _disk_blocks(config) * GENERATION_SIZE}
        for path, size in expected.items():
            actual = path.stat().st_size if path.exists() else None
            if actual != size:
                raise InvalidTransition(
                    f"cannot start guest {config.vm_id} as incoming: {path} has "
                    f"{actual} bytes, expected {size} (call prepare_incoming first)",
                    details={"vm_id": config.vm_id, "path": str(path)})
        status = self.read_status(config.vm_id)
        if status.memory_pages != pages:
            raise InvalidTransition(f"cannot start guest {config.vm_id} as incoming: "
                                    f"{paths.control} describes {status.memory_pages} pages, "
                                    f"expected {pages}",
                                    details={"vm_id": config.vm_id})
        _poke(paths.control, STATUS_OFFSET, bytes(16))  # pid and phase: not taken over yet
        _poke(paths.control, EPOCH_OFFSET, config.epoch.to_bytes(8, "little"))
        _poke(paths.control, WORKLOAD_OFFSET + 8 * WORKLOAD_FIELDS.index("throttle_pct"),
              _DOUBLE.pack(0.0))

    def _launch(self, paths: SimPaths, *, incoming: bool) -> int:
        """Run the guest detached (setsid here, a second fork in the guest); return its pid."""
        argv = [sys.executable, "-m", _GUEST_MODULE, "--dir", str(paths.guest_dir),
                "--memory", str(paths.memory), "--generations", str(paths.generations),
                "--control", str(paths.control), "--disk", str(paths.disk),
                "--disk-generations", str(paths.disk_generations)]
        if incoming:
            argv.append("--incoming")
        path = os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
        with open(paths.log, "ab") as out:
            launcher = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        close_fds=True, cwd="/",
                                        env={**os.environ, "PYTHONPATH": path})
        try:
            code = launcher.wait(timeout=self._boot_timeout_s)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
            raise OperationTimeout(f"the launcher of guest {paths.guest_dir.name} hung; see "
                                   f"{paths.log}", details={"log": _tail(paths.log)}) from None
        pid = self._pid(paths.guest_dir.name)
        if code != 0 or pid is None:
            raise GuestError(f"guest {paths.guest_dir.name} failed to launch (exit {code}); "
                             f"see {paths.log}", details={"log": _tail(paths.log)})
        return pid

    def _await_phase(self, vm_id: str, pid: int, phase: Phase, *, after_boot: int | None = None,
                     poll_s: float = _POLL_S) -> None:
        """Wait until the guest publishes ``phase`` (and, with ``after_boot``, has booted
        again)."""
        paths = self.memory_paths(vm_id)
        deadline = time.monotonic() + self._boot_timeout_s
        while True:
            if _live_process(pid, paths.guest_dir) is None:
                raise GuestError(f"guest {vm_id} (pid {pid}) exited before reaching phase "
                                 f"{phase.name}; see {paths.log}",
                                 details={"log": _tail(paths.log)})
            status = self._status_or_none(vm_id)
            if (status is not None and status.pid == pid and status.phase == phase
                    and (after_boot is None or status.boot_count > after_boot)):
                return
            if time.monotonic() > deadline:
                proc = _live_process(pid, paths.guest_dir)
                if proc is not None:
                    _kill(vm_id, proc, signal.SIGKILL)
                raise OperationTimeout(f"guest {vm_id} (pid {pid}) did not reach phase "
                                       f"{phase.name} within {self._boot_timeout_s:.0f} s and "
                                       f"was killed; see {paths.log}",
                                       details={"log": _tail(paths.log)})
            time.sleep(poll_s)

    def _freeze(self, vm_id: str, *, pause: bool) -> GuestInfo:
        action = "pause" if pause else "resume"
        with self._lock(vm_id):
            proc = self._require_running(vm_id, action, paused_ok=True)
            _signal(proc.pid, signal.SIGSTOP if pause else signal.SIGCONT)
            deadline = time.monotonic() + _SIGNAL_WAIT_S
            guest_dir = self._root / vm_id
            while True:
                now = _live_process(proc.pid, guest_dir)
                if now is None or (_PROCESS_STATES.get(now.state) == VMState.PAUSED) == pause:
                    break
                if time.monotonic() > deadline:
                    raise GuestError(f"guest {vm_id} (pid {proc.pid}) did not {action}",
                                     details={"vm_id": vm_id, "pid": proc.pid})
                time.sleep(_FAST_POLL_S)
            log.info("%sd guest %s (pid %d)", action, vm_id, proc.pid)
        return self.get(vm_id)

    def _release(self, vm_id: str) -> None:
        """Forget a guest process that is gone: its pidfile, memory files and incoming marker."""
        paths = self.memory_paths(vm_id, must_exist=False)
        for path in (paths.pidfile, paths.memory, paths.generations, paths.control,
                     paths.disk_generations, paths.incoming):
            path.unlink(missing_ok=True)

    def _status_or_none(self, vm_id: str) -> SimStatus | None:
        try:
            return self.read_status(vm_id)
        except (InvalidTransition, GuestError):
            return None

    def _info(self, config: GuestConfig) -> GuestInfo:
        vm_id = config.vm_id
        pid = self._pid(vm_id)
        proc = None if pid is None else _live_process(pid, self._root / vm_id)
        if proc is None:
            if pid is not None:
                return GuestInfo(vm_id=vm_id, state=VMState.ERROR, epoch=config.epoch,
                                 reason=f"the guest process {pid} died without being stopped; "
                                        f"see {self._root / vm_id / _LOG}")
            return GuestInfo(vm_id=vm_id, state=VMState.STOPPED, epoch=config.epoch)
        state = _PROCESS_STATES.get(proc.state, VMState.UNKNOWN)
        reason = "" if proc.state in _PROCESS_STATES else f"process state {proc.state!r}"
        if state is None:
            status = self._status_or_none(vm_id)
            if status is None:
                state, reason = VMState.RUNNING, "its status header is unreadable"
            else:
                state = _PHASE_STATES.get(status.phase, VMState.UNKNOWN)
        return GuestInfo(vm_id=vm_id, state=state, guest_id=str(proc.pid), epoch=config.epoch,
                         reason=reason)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _live_process(pid: int, guest_dir: Path) -> _Process | None:
    """Process ``pid`` if it is alive (not exiting) and runs the guest of ``guest_dir``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if _GUEST_MODULE.encode() not in argv:
        return None  # another program, or an exiting process (its cmdline is empty)
    if b"--dir" not in argv or argv.index(b"--dir") + 1 >= len(argv) or \
            argv[argv.index(b"--dir") + 1] != os.fsencode(guest_dir):
        return None
    fields = _stat(pid)
    if fields is None or fields[0] in _DEAD:
        return None
    return _Process(pid=pid, state=fields[0],
                    cpu_time_s=(int(fields[11]) + int(fields[12])) / _CLOCK_TICKS,
                    started_ticks=int(fields[19]))


def _exited(proc: _Process) -> bool:
    """Whether ``proc`` is gone: no such pid, a zombie, or the pid now names another process."""
    fields = _stat(proc.pid)
    return fields is None or fields[0] in _DEAD or int(fields[19]) != proc.started_ticks


def _await_exit(proc: _Process, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not _exited(proc):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _kill(vm_id: str, proc: _Process, sig: signal.Signals) -> None:
    _signal(proc.pid, sig)
    if not _await_exit(proc, _SIGNAL_WAIT_S):
        raise GuestError(f"guest {vm_id} (pid {proc.pid}) survived {sig.name}",
                         details={"vm_id": vm_id, "pid": proc.pid})


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _poke(control: Path, offset: int, data: bytes) -> None:
    """Write ``data`` into a control header through a mapping, so aligned words land whole."""
    with open(control, "r+b") as f, mmap.mmap(f.fileno(), CONTROL_SIZE) as mm:
        mm[offset:offset + len(data)] = data


def _disk_blocks(config: GuestConfig) -> int:
    """The number of DISK_BLOCK blocks of a guest's disk (one generation each)."""
    return -(-config.disk_gib * _GIB // DISK_BLOCK)


def _create_sparse(path: Path, size: int) -> None:
    """Create (or empty) ``path`` as a sparse file of ``size`` bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _default_memory_dir(state_dir: Path) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm / "novacron"
    return state_dir / "sim-memory"


def _check_name(kind: str, value: str) -> None:
    if not _NAME_RE.match(value):
        raise InvalidRequest(f"bad {kind} {value!r}: use 1-128 letters, digits, '.', '_', '-' "
                             "(not starting with a symbol)", details={kind: value})


def _check_workload(values: Mapping[str, float], *, runtime: bool) -> None:
    allowed = set(_WORKLOAD_RANGES) if runtime else set(DEFAULT_WORKLOAD)
    for key, value in values.items():
        if key not in allowed:
            raise InvalidRequest(f"unknown sim workload key {key!r}; expected one of "
                                 f"{', '.join(sorted(allowed))}", details={"key": key})
        low, high = _WORKLOAD_RANGES[key]
        if not isinstance(value, int | float) or not low <= value <= high:
            raise InvalidRequest(f"sim workload {key} must be a number in [{low}, {high}], "
                                 f"not {value!r}", details={"key": key})


def _check_config(config: GuestConfig) -> None:
    _check_name("vm_id", config.vm_id)
    if config.cpus < 1 or config.memory_mib < 1 or config.disk_gib < 0:
        raise InvalidRequest(f"guest {config.vm_id} needs cpus >= 1, memory_mib >= 1 and "
                             "disk_gib >= 0", details={"vm_id": config.vm_id})
    _check_workload(config.workload, runtime=False)
