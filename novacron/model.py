"""Records shared by the store, the actors and the HTTP API (pydantic models).

Requests (``VMCreate``, ``HostCreate``) are validated strictly: unknown fields, negative or absurd
sizes and malformed names are refused with a message that says which field was wrong.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from novacron.ids import HostName, MigrationId, VMId
from novacron.states import DRAIN_ACTIVE, DrainState, HostState, MigrationPhase, PowerState, VMState

__all__ = [
    "VM",
    "Drain",
    "DrainState",
    "Host",
    "HostCreate",
    "HostName",
    "HostState",
    "Migration",
    "MigrationCreate",
    "MigrationPhase",
    "MigrationPolicy",
    "MigrationProgress",
    "Overcommit",
    "PlacementPolicy",
    "PowerState",
    "Resources",
    "VMCreate",
    "VMId",
    "VMSpec",
    "VMState",
    "Workload",
]

Name = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"),
]
"""A name: 1-63 characters, letters, digits, '.', '_' or '-', starting with a letter or digit."""

LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9./_-]{0,62}$")]
Labels = Annotated[dict[LabelKey, Annotated[str, StringConstraints(max_length=253)]],
                   Field(max_length=64)]

MAX_CPUS = 1024
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB
MAX_DISK_GIB = 1024 * 1024  # 1 PiB


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    """An amount of each schedulable resource."""

    cpus: float = Field(ge=0, le=MAX_CPUS * 64)
    memory_mib: int = Field(ge=0, le=MAX_MEMORY_MIB * 64)
    disk_gib: int = Field(ge=0, le=MAX_DISK_GIB * 64)
    gpus: int = Field(default=0, ge=0, le=1024)

    def __add__(self, other: Resources) -> Resources:
        return Resources(cpus=self.cpus + other.cpus, memory_mib=self.memory_mib + other.memory_mib,
                         disk_gib=self.disk_gib + other.disk_gib, gpus=self.gpus + other.gpus)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(cpus=max(0.0, self.cpus - other.cpus),
                         memory_mib=max(0, self.memory_mib - other.memory_mib),
                         disk_gib=max(0, self.disk_gib - other.disk_gib),
                         gpus=max(0, self.gpus - other.gpus))

    @classmethod
    def zero(cls) -> Resources:
        return cls(cpus=0, memory_mib=0, disk_gib=0)


class Overcommit(_Strict):
    """How far each resource of a host may be promised beyond its physical size."""

    cpu: float = Field(default=4.0, ge=1.0, le=64.0)
    memory: float = Field(default=1.0, ge=1.0, le=4.0)
    disk: float = Field(default=1.0, ge=1.0, le=16.0)


class Workload(_Strict):
    """What a simulated guest does while it runs (ignored by real hypervisors)."""

    dirty_rate_mib_s: float = Field(default=0.0, ge=0, le=100_000)
    cpu_busy: float = Field(default=0.0, ge=0, le=1)
    disk_write_mib_s: float = Field(default=0.0, ge=0, le=10_000)


class PlacementPolicy(_Strict):
    """Where a VM may go: a host-label selector and its group's affinity rule."""

    group: Name | None = None  # VMs of one group are kept together or apart
    affinity: Literal["affinity", "anti-affinity"] = "anti-affinity"
    hard: bool = True  # a hard rule refuses placement; a soft one only weighs against it
    domain: LabelKey | None = None  # the failure-domain label (rack, zone); None: per host
    host_labels: Labels = Field(default_factory=dict)  # hosts must carry these labels


class VMSpec(_Strict):
    """What a VM is: its shape, image and labels."""

    name: Name
    cpus: int = Field(ge=1, le=MAX_CPUS)
    memory_mib: int = Field(ge=16, le=MAX_MEMORY_MIB)
    disk_gib: int = Field(default=1, ge=0, le=MAX_DISK_GIB)
    image: str | None = Field(default=None, min_length=1, max_length=1024)
    labels: Labels = Field(default_factory=dict)
    workload: Workload = Field(default_factory=Workload)
    placement: PlacementPolicy = Field(default_factory=PlacementPolicy)

    @property
    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, memory_mib=self.memory_mib, disk_gib=self.disk_gib)


class VMCreate(VMSpec):
    """``POST /api/v1/vms``: a spec, an optional host to pin it to, and whether to start it."""

    host: Name | None = None
    start: bool = True
    tenant: Name | None = None  # default: the caller's own tenant


class VM(BaseModel):
    """A VM record: the desired state a user asked for and the actual state last observed."""

    model_config = ConfigDict(extra="forbid")

    id: VMId
    name: str
    tenant: str = "default"
    spec: VMSpec
    desired: PowerState
    state: VMState = VMState.PENDING
    host: HostName | None = None
    epoch: int = 0  # rises on every placement, restart and migration switchover (fencing)
    guest_id: str | None = None  # the driver's handle of the running guest (pid, domain uuid...)
    pending: str | None = None  # a one-off action awaiting its agent: "reboot" or "force_stop"
    migration: str | None = None  # the migration moving it: its agents stand aside meanwhile
    last_error: str | None = None
    last_error_code: str | None = None  # the error's code (not_found, no_capacity...)
    observed_at: float = 0.0  # when the state was last observed (late, older reports are ignored)
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    revision: int = 0


class HostCreate(_Strict):
    """``POST /api/v1/hosts``: a host to manage."""

    name: Name
    driver: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")] = "sim"
    uri: Annotated[str, StringConstraints(min_length=1, max_length=2048)] | None = None
    capacity: Resources | None = None
    overcommit: Overcommit = Field(default_factory=Overcommit)
    labels: Labels = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    tenant: Annotated[str, StringConstraints(pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,62})$")] \
        = "*"  # "*": shared, managed by cluster admins; else dedicated to one tenant


class Drain(BaseModel):
    """A host's evacuation: its VMs leave through migrations (``novacron.evacuation``).

    Kept on the host record, so it survives a controller restart and shows on every read of the
    host. ``migrating`` maps each VM to the migration this drain started for it; ``waiting`` and
    ``blocked`` say why a VM has not left yet (waiting passes by itself; blocked needs a change,
    such as free capacity, and is retried every pass).
    """

    model_config = ConfigDict(extra="forbid")

    state: DrainState = DrainState.RUNNING
    started_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    moved: list[str] = Field(default_factory=list)  # VM ids this drain moved off the host
    migrating: dict[str, str] = Field(default_factory=dict)  # VM id -> migration id in flight
    starting: dict[str, float] = Field(default_factory=dict)  # VM id -> when its start was asked
    waiting: dict[str, str] = Field(default_factory=dict)  # VM id -> what it waits for
    blocked: dict[str, str] = Field(default_factory=dict)  # VM id -> why it cannot move
    failures: dict[str, int] = Field(default_factory=dict)  # VM id -> its failed migrations
    remaining: int = 0  # VMs still on the host
    message: str = ""  # one line: where the drain stands, or how it ended

    @property
    def active(self) -> bool:
        return self.state in DRAIN_ACTIVE


class Host(BaseModel):
    """A host record: its capacity, what is promised on it, and its state."""

    model_config = ConfigDict(extra="forbid")

    name: HostName
    driver: str
    uri: str | None = None
    capacity: Resources
    overcommit: Overcommit = Field(default_factory=Overcommit)
    allocated: Resources = Field(default_factory=Resources.zero)
    labels: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    tenant: str = "*"
    state: HostState = HostState.UP
    drain: Drain | None = None  # the host's current or last drain
    # what an unreachable host was before it went silent (maintenance is kept when it is back)
    state_before_unreachable: HostState | None = None
    created_at: float = Field(default_factory=time.time)
    revision: int = 0

    @property
    def limit(self) -> Resources:
        """Capacity after overcommit: the most that may be promised on this host."""
        oc = self.overcommit
        return Resources(cpus=self.capacity.cpus * oc.cpu,
                         memory_mib=int(self.capacity.memory_mib * oc.memory),
                         disk_gib=int(self.capacity.disk_gib * oc.disk),
                         gpus=self.capacity.gpus)

    @property
    def schedulable(self) -> bool:
        return self.state == HostState.UP

    @property
    def draining(self) -> bool:
        """Whether a drain is moving this host's VMs away now."""
        return self.drain is not None and self.drain.active


MigrationMode = Literal["cold", "warm", "live"]


class MigrationPolicy(_Strict):
    """How a migration moves the VM."""

    auto_converge: bool = False  # throttle the guest's CPU in steps when pre-copy lags
    post_copy: bool = False
    bandwidth_mib_s: float | None = Field(default=None, gt=0, le=1_000_000)
    max_downtime_ms: int = Field(default=300, ge=1, le=600_000)
    compress: bool = False
    xbzrle: bool = False
    verify: bool = False  # compare memory digests while paused (a longer downtime)
    # memory over this many parallel connections (libvirt/QEMU multifd); 0: one connection
    parallel: int = Field(default=0, ge=0, le=64)


class MigrationCreate(_Strict):
    """``POST /api/v1/migrations``: move ``vm`` (id or name) to ``target_host``."""

    vm: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    target_host: Name
    mode: MigrationMode = "live"
    policy: MigrationPolicy = Field(default_factory=MigrationPolicy)
    dry_run: bool = False  # only predict the cost; nothing moves


class MigrationProgress(BaseModel):
    """How far a migration is; ``percent`` never decreases."""

    model_config = ConfigDict(extra="forbid")

    percent: float = 0.0
    bytes_sent: int = 0
    bytes_remaining: int = 0
    rate: float = 0.0  # bytes/s measured over the last pass
    eta_s: float | None = None
    dirty_rate: float = 0.0  # bytes/s the guest dirtied during the last pass
    iteration: int = 0
    throttle_pct: int = 0


class Migration(BaseModel):
    """A migration record: what is moved where, its phase and progress, and how it ended."""

    model_config = ConfigDict(extra="forbid")

    id: MigrationId
    vm: VMId
    tenant: str = "default"
    source: HostName
    target: HostName
    mode: MigrationMode
    policy: MigrationPolicy = Field(default_factory=MigrationPolicy)
    phase: MigrationPhase = MigrationPhase.PENDING
    reason: str | None = None  # why it failed or was rolled back
    cancel_requested: bool = False
    force_complete: bool = False  # switch over at the next pass, whatever the downtime
    progress: MigrationProgress = Field(default_factory=MigrationProgress)
    prediction: dict[str, Any] = Field(default_factory=dict)
    outcome: dict[str, Any] = Field(default_factory=dict)  # downtime_ms, total_s, bytes...
    checkpoint: dict[str, Any] = Field(default_factory=dict)  # what a restarted actor resumes
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    updated_at: float = Field(default_factory=time.time)
    revision: int = 0
