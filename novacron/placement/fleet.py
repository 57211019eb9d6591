"""HostFleet: every host as a column of numpy arrays (struct of arrays), updated one host at a time.

Resources are rows of ``(4, N)`` arrays in the order of :data:`DIMS`. Allocations change a single
column in place and are appended to a change log, so cached scores can be patched for just the
hosts that changed (:meth:`HostFleet.changes_since`). Anything else (state, labels, capacity,
capabilities, hosts added or removed) bumps :attr:`HostFleet.epoch`, which invalidates every cache.
A host's ``size`` is its mean share of the fleet's largest CPU, memory and disk (0..1).

Adapters from :class:`novacron.model.Host`: the limit is ``Host.limit`` (capacity after overcommit);
a host's hourly cost is ``config["cost_per_hour"]``; a cloud host lists the instance types it can
start in ``config["instance_types"]`` (or the ``instance_types`` argument; the glob patterns a
cloud driver takes there are not types); hosts dedicated to some tenants carry the label
:data:`TENANTS_LABEL` (comma separated tenant names).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from novacron.errors import InvalidRequest, NotFound
from novacron.model import Host, Resources
from novacron.states import HostState

__all__ = [
    "DIMS",
    "STATES",
    "TENANTS_LABEL",
    "BoolArray",
    "Dynamic",
    "FleetSlice",
    "FloatArray",
    "HostFleet",
    "InstanceType",
    "IntArray",
    "VMPlacementInfo",
    "demand_vector",
]

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.intp]

DIMS: tuple[str, ...] = ("cpus", "memory_mib", "disk_gib", "gpus")
STATES: tuple[HostState, ...] = (HostState.UP, HostState.DRAINING, HostState.MAINTENANCE,
                                 HostState.UNREACHABLE)
"""Host states by their code in :attr:`HostFleet.state` (0 is up)."""
TENANTS_LABEL = "novacron.io/tenants"
_ABSENT = 2.0  # added to the utilisation of a dimension a host lacks, so min() skips it
_LOG_SLACK = 4  # the change log keeps at most this many entries per host


@dataclass(frozen=True, slots=True)
class InstanceType:
    """A machine shape a cloud host (a region) can start, and its price."""

    name: str
    cpus: float
    memory_mib: int
    gpus: int = 0
    price_per_hour: float = 0.0


@dataclass(frozen=True, slots=True)
class VMPlacementInfo:
    """What placement needs to know of a VM already on a host."""

    vm_id: str
    group: str | None = None


def demand_vector(resources: Resources) -> FloatArray:
    """``resources`` as a vector in the order of :data:`DIMS`."""
    return np.array([resources.cpus, resources.memory_mib, resources.disk_gib, resources.gpus],
                    dtype=np.float64)


def _resources(column: FloatArray) -> Resources:
    return Resources(cpus=round(float(column[0]), 6), memory_mib=round(float(column[1])),
                     disk_gib=round(float(column[2])), gpus=round(float(column[3])))


def _instance_types(host: Host) -> tuple[InstanceType, ...]:
    # Strings there are the cloud driver's glob patterns of the types it may start
    # (novacron.drivers.cloud), not shapes placement could size: only mappings are.
    raw = [t for t in host.config.get("instance_types") or () if not isinstance(t, str)]
    try:
        return tuple(InstanceType(**item) if isinstance(item, Mapping) else item for item in raw)
    except TypeError as exc:
        raise InvalidRequest(f"host {host.name}: bad instance_types entry: {exc}",
                             details={"host": host.name}) from exc


class HostFleet:
    """The hosts placement chooses from, as arrays.

    ``vms_by_host`` gives the VMs on each host (for per-host VM counts and group membership);
    ``capabilities`` the capabilities of each host by name, falling back to
    ``driver_capabilities`` by driver name; ``load`` the measured CPU load (0..1) of each host.
    """

    free: FloatArray  # limit - alloc, (D, N)
    free_frac: FloatArray  # free / limit, (D, N)
    free_norm: FloatArray  # Euclidean norm of free_frac, (N,)
    in_use: BoolArray  # the host has VMs or allocations, (N,)

    def __init__(self, hosts: Sequence[Host],
                 vms_by_host: Mapping[str, Sequence[VMPlacementInfo]] | None = None, *,
                 capabilities: Mapping[str, Collection[str]] | None = None,
                 driver_capabilities: Mapping[str, Collection[str]] | None = None,
                 instance_types: Mapping[str, Sequence[InstanceType]] | None = None,
                 load: Mapping[str, float] | None = None) -> None:
        caps = capabilities or {}
        self._driver_caps = {d: frozenset(c) for d, c in (driver_capabilities or {}).items()}
        types = instance_types or {}
        self._hosts: list[Host] = list(hosts)
        self._caps = [frozenset(caps.get(h.name, self._driver_caps.get(h.driver, ())))
                      for h in self._hosts]
        self._types = [tuple(types[h.name]) if h.name in types else _instance_types(h)
                       for h in self._hosts]
        self.epoch = 0
        self._log: list[int] = []
        self._log_base = 0
        self._build_static()
        n = len(self._hosts)
        self.alloc: FloatArray = np.zeros((len(DIMS), n))
        self.vm_count: FloatArray = np.zeros(n)
        self.load: FloatArray = np.zeros(n)
        self.revision: NDArray[np.int64] = np.zeros(n, dtype=np.int64)
        self.groups: dict[str, dict[int, int]] = {}
        for i, h in enumerate(self._hosts):
            self.alloc[:, i] = demand_vector(h.allocated)
            self.revision[i] = h.revision
            for vm in (vms_by_host or {}).get(h.name, ()):
                self.vm_count[i] += 1
                if vm.group is not None:
                    members = self.groups.setdefault(vm.group, {})
                    members[i] = members.get(i, 0) + 1
            self.load[i] = min(1.0, max(0.0, (load or {}).get(h.name, 0.0)))
        self._refresh_dynamic(None)

    # -- building ---------------------------------------------------------------------------
    def _build_static(self) -> None:
        hosts = self._hosts
        n = len(hosts)
        self.names: list[str] = [h.name for h in hosts]
        self.index: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        if len(self.index) != n:
            raise InvalidRequest("host names must be unique")
        self.limit: FloatArray = np.zeros((len(DIMS), n))  # rows contiguous: fast row sums
        for i, h in enumerate(hosts):
            self.limit[:, i] = demand_vector(h.limit)
        present = self.limit > 0
        self.inv_limit: FloatArray = np.divide(1.0, self.limit, out=np.zeros_like(self.limit),
                                               where=present)
        self.absent_big: FloatArray = np.where(present, 0.0, _ABSENT)
        self.inv_dims: FloatArray = 1.0 / np.maximum(present.sum(axis=0), 1)
        top = self.limit[:3].max(axis=1, initial=0.0)
        self.size: FloatArray = np.divide(self.limit[:3], top[:, None],
                                          out=np.zeros((3, n)), where=top[:, None] > 0).mean(axis=0)
        codes = {s: c for c, s in enumerate(STATES)}
        self.state: NDArray[np.int8] = np.array([codes[h.state] for h in hosts], dtype=np.int8)
        self.cost_per_hour: FloatArray = np.array(
            [float(h.config.get("cost_per_hour", 0.0)) for h in hosts], dtype=np.float64)
        self.capability_masks: dict[str, BoolArray] = {}
        for i, caps in enumerate(self._caps):
            for cap in caps:
                self.capability_masks.setdefault(cap, np.zeros(n, dtype=np.bool_))[i] = True
        self.label_values: dict[str, dict[str, int]] = {}
        self.label_codes: dict[str, NDArray[np.int32]] = {}
        for i, h in enumerate(hosts):
            for key, value in h.labels.items():
                values = self.label_values.setdefault(key, {})
                code = values.setdefault(value, len(values))
                self.label_codes.setdefault(key, np.full(n, -1, dtype=np.int32))[i] = code
        self.label_names: dict[str, list[str]] = {k: list(v) for k, v in self.label_values.items()}
        self.dedicated: BoolArray = np.zeros(n, dtype=np.bool_)
        tenant_hosts: dict[str, list[int]] = {}
        for i, h in enumerate(hosts):
            if TENANTS_LABEL in h.labels:
                self.dedicated[i] = True
                for tenant in h.labels[TENANTS_LABEL].split(","):
                    tenant_hosts.setdefault(tenant.strip(), []).append(i)
        self.tenant_hosts: dict[str, IntArray] = {
            t: np.array(ix, dtype=np.intp) for t, ix in tenant_hosts.items()}
        self.is_cloud: BoolArray = np.array([bool(t) for t in self._types], dtype=np.bool_)
        flat = [(i, t) for i, types in enumerate(self._types) for t in types]
        self.type_host: IntArray = np.array([i for i, _ in flat], dtype=np.intp)
        self.type_size: FloatArray = np.array(
            [[t.cpus for _, t in flat], [t.memory_mib for _, t in flat], [t.gpus for _, t in flat]],
            dtype=np.float64).reshape(3, -1)
        self.type_price: FloatArray = np.array([t.price_per_hour for _, t in flat],
                                               dtype=np.float64)
        self.epoch += 1

    def _refresh_dynamic(self, i: int | None) -> None:
        """Recompute the derived columns of host ``i`` (logging the change), or of every host."""
        if i is None:
            self.free = self.limit - self.alloc
            self.free_frac = self.free * self.inv_limit
            self.free_norm = np.sqrt((self.free_frac * self.free_frac).sum(axis=0))
            self.in_use = (self.vm_count > 0) | (self.alloc > 0).any(axis=0)
            return
        # One host in plain floats: the same arithmetic as above, much cheaper than numpy calls.
        alloc = self.alloc[:, i].tolist()
        free = [lim - a for lim, a in zip(self.limit[:, i].tolist(), alloc, strict=True)]
        frac = [x * inv for x, inv in zip(free, self.inv_limit[:, i].tolist(), strict=True)]
        self.free[:, i] = free
        self.free_frac[:, i] = frac
        self.free_norm[i] = math.sqrt(sum(x * x for x in frac))
        self.in_use[i] = self.vm_count[i] > 0 or any(a > 0 for a in alloc)
        self._log.append(i)
        if len(self._log) > _LOG_SLACK * max(len(self.names), 64):
            half = len(self._log) // 2
            del self._log[:half]
            self._log_base += half

    # -- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def index_of(self, name: str) -> int:
        """The column of host ``name``; NotFound if the fleet has no such host."""
        try:
            return self.index[name]
        except KeyError:
            raise NotFound(f"no host named {name!r} in the placement fleet",
                           details={"host": name}) from None

    def allocated(self, i: int) -> Resources:
        """What is promised on host ``i`` now (reservations included)."""
        return _resources(self.alloc[:, i])

    def host(self, name: str) -> Host:
        """Host ``name`` as a record, with its current allocation and revision."""
        i = self.index_of(name)
        return self._hosts[i].model_copy(
            update={"allocated": self.allocated(i), "revision": int(self.revision[i])})

    def hosts(self) -> list[Host]:
        """Every host as a record, with its current allocation and revision."""
        return [self.host(name) for name in self.names]

    @property
    def seq(self) -> int:
        """Position in the change log; pass it to :meth:`changes_since` later."""
        return self._log_base + len(self._log)

    def changes_since(self, seq: int) -> IntArray | None:
        """Hosts changed since ``seq`` (sorted, unique), or None if the log no longer reaches."""
        if seq < self._log_base:
            return None
        return np.array(sorted(set(self._log[seq - self._log_base:])), dtype=np.intp)

    def group_members(self, group: str) -> Mapping[int, int]:
        """How many VMs of ``group`` each host holds, by host column (hosts with none omitted)."""
        return self.groups.get(group, {})

    def label_of(self, i: int, key: str) -> str | None:
        """Host ``i``'s value of label ``key``."""
        codes = self.label_codes.get(key)
        if codes is None or codes[i] < 0:
            return None
        return self.label_names[key][int(codes[i])]

    # -- changing ---------------------------------------------------------------------------
    def allocate(self, name: str, resources: Resources, *, group: str | None = None,
                 revision: int | None = None) -> None:
        """Count ``resources`` (one VM, of ``group``) on host ``name``; ``revision`` if stored."""
        i = self.index_of(name)
        self.alloc[:, i] += demand_vector(resources)
        self.vm_count[i] += 1
        if group is not None:
            members = self.groups.setdefault(group, {})
            members[i] = members.get(i, 0) + 1
        if revision is not None:
            self.revision[i] = revision
        self._refresh_dynamic(i)

    def release(self, name: str, resources: Resources, *, group: str | None = None,
                revision: int | None = None) -> None:
        """Undo :meth:`allocate` of one VM (never below zero)."""
        i = self.index_of(name)
        self.alloc[:, i] = np.maximum(self.alloc[:, i] - demand_vector(resources), 0.0)
        self.vm_count[i] = max(0.0, self.vm_count[i] - 1)
        members = self.groups.get(group) if group is not None else None
        if members is not None and i in members:
            members[i] -= 1
            if members[i] <= 0:
                del members[i]
        if revision is not None:
            self.revision[i] = revision
        self._refresh_dynamic(i)

    def set_revision(self, name: str, revision: int) -> None:
        """Record that the store now holds host ``name`` at ``revision``."""
        self.revision[self.index_of(name)] = revision

    def set_load(self, name: str, load: float) -> None:
        """Record host ``name``'s measured CPU load (0..1)."""
        i = self.index_of(name)
        self.load[i] = min(1.0, max(0.0, load))
        self._refresh_dynamic(i)

    def update_host(self, host: Host, *, capabilities: Iterable[str] | None = None,
                    instance_types: Sequence[InstanceType] | None = None) -> None:
        """Replace (or add) a host with its latest record from the store.

        The record's allocation and revision replace the fleet's. Only when the allocation or
        revision alone changed are the caches kept; otherwise the static columns are rebuilt.
        Capabilities default to the host's current ones, or for a new host its driver's.
        """
        i = self.index.get(host.name)
        if i is None:
            self._hosts.append(host)
            self._caps.append(frozenset(capabilities) if capabilities is not None
                              else self._driver_caps.get(host.driver, frozenset()))
            self._types.append(tuple(instance_types) if instance_types is not None
                               else _instance_types(host))
            self._rebuild()
            i = self.index[host.name]
        else:
            old = self._hosts[i]
            caps = self._caps[i] if capabilities is None else frozenset(capabilities)
            if instance_types is not None:
                types = tuple(instance_types)
            elif host.config != old.config:
                types = _instance_types(host)
            else:
                types = self._types[i]
            self._hosts[i] = host
            same = (caps == self._caps[i] and types == self._types[i]
                    and _static_fields(old) == _static_fields(host))
            self._caps[i], self._types[i] = caps, types
            if not same:
                self._build_static()
        self.alloc[:, i] = demand_vector(host.allocated)
        self.revision[i] = host.revision
        self._refresh_dynamic(i)

    def remove_host(self, name: str) -> None:
        """Drop host ``name`` from the fleet."""
        i = self.index_of(name)
        del self._hosts[i], self._caps[i], self._types[i]
        self._rebuild(dropped=i)

    def _rebuild(self, dropped: int | None = None) -> None:
        """Rebuild every column after hosts were added or removed, keeping the dynamic state."""
        old_n = len(self.names)
        keep = [j for j in range(old_n) if j != dropped]
        remap = {j: k for k, j in enumerate(keep)}
        self._build_static()
        n = len(self.names)
        grow = n - len(keep)

        def carry(a: NDArray[Any]) -> NDArray[Any]:
            kept = a[..., keep]
            pad = np.zeros((*a.shape[:-1], grow), dtype=a.dtype)
            return np.concatenate([kept, pad], axis=-1)

        self.alloc, self.vm_count, self.load, self.revision = (
            carry(self.alloc), carry(self.vm_count), carry(self.load), carry(self.revision))
        self.groups = {g: {remap[j]: c for j, c in m.items() if j in remap}
                       for g, m in self.groups.items()}
        for k in range(len(keep), n):
            self.alloc[:, k] = demand_vector(self._hosts[k].allocated)
            self.revision[k] = self._hosts[k].revision
        self._refresh_dynamic(None)
        self._log.clear()
        self._log_base = 0

    def bounds(self, parts: int) -> list[tuple[int, int]]:
        """``parts`` contiguous column ranges covering the fleet."""
        cuts = np.linspace(0, len(self), max(1, parts) + 1).astype(int).tolist()
        return list(itertools.pairwise(cuts))

    def split(self, parts: int) -> list[FleetSlice]:
        """The fleet cut into :meth:`bounds` slices (for scoring on several workers).

        Group membership is not copied: the caller passes a ``GroupContext`` instead.
        """
        shards = []
        for lo, hi in self.bounds(parts):
            names = self.names[lo:hi]
            sub = FleetSlice(self._hosts[lo:hi],
                            capabilities=dict(zip(names, self._caps[lo:hi], strict=True)),
                            instance_types=dict(zip(names, self._types[lo:hi], strict=True)))
            sub.size[:] = self.size[lo:hi]  # sizes relative to the whole fleet
            sub.load_dynamic(self.dynamic(lo, hi))
            shards.append(sub)
        return shards

    def dynamic(self, lo: int = 0, hi: int | None = None) -> Dynamic:
        """A copy of the columns allocations change, for hosts ``lo`` to ``hi``."""
        cols = slice(lo, hi)
        return Dynamic(self.alloc[:, cols].copy(), self.vm_count[cols].copy(),
                       self.load[cols].copy(), self.revision[cols].copy())

    def load_dynamic(self, dynamic: Dynamic) -> None:
        """Replace the columns allocations change (from :meth:`dynamic` of a larger fleet)."""
        self.alloc = np.array(dynamic.alloc)
        self.vm_count = np.array(dynamic.vm_count)
        self.load = np.array(dynamic.load)
        self.revision = np.array(dynamic.revision)
        self._refresh_dynamic(None)
        self.epoch += 1


class FleetSlice(HostFleet):
    """Part of a fleet, to be scored elsewhere: it pickles its columns without the host records,
    so a worker unpickles it quickly. Once unpickled it can score, not return records."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_hosts=None, _caps=None, _types=None)
        return state


@dataclass(frozen=True, slots=True)
class Dynamic:
    """The columns allocations change: allocation, VM count, load and store revision."""

    alloc: FloatArray
    vm_count: FloatArray
    load: FloatArray
    revision: NDArray[np.int64]


def _static_fields(host: Host) -> tuple[object, ...]:
    return (host.capacity, host.overcommit, host.labels, host.state, host.config)
