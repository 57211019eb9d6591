"""The control plane's logic: admission, placement, desired-vs-actual reconciliation, liveness.

:class:`ControlPlane` owns the store and reaches hosts and VMs through a :class:`Fleet` (Ray actors
in production, see ``actors/fleet.py``; in-process agents in ``novacron/localfleet.py``). It holds
no state that the store does not: heartbeat times and in-flight operations are rebuilt on restart.

Every VM write is conditional on the revision read, and every agent report carries the VM's
placement epoch; a report from an older epoch (a stale actor, a fenced host) is ignored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from novacron import migrations as rules
from novacron.drivers.base import driver_class
from novacron.errors import (
    AlreadyExists,
    Conflict,
    HostUnreachable,
    InvalidRequest,
    InvalidTransition,
    NoCapacity,
    NotFound,
    NovaCronError,
    OperationTimeout,
    RevisionMismatch,
    Throttled,
    Unavailable,
)
from novacron.ids import HostName, MigrationId, VMId, new_id
from novacron.model import (
    VM,
    Host,
    HostCreate,
    Migration,
    MigrationCreate,
    MigrationProgress,
    Resources,
    VMCreate,
    VMSpec,
)
from novacron.placement import (
    Affinity,
    Decision,
    PlacementEngine,
    PlacementRequest,
    VMPlacementInfo,
)
from novacron.placement.fleet import TENANTS_LABEL
from novacron.states import (
    MIGRATION_DONE,
    SETTLED,
    HostState,
    MigrationPhase,
    PowerState,
    VMState,
    check_host_transition,
    check_migration_transition,
    check_vm_action,
    check_vm_transition,
)
from novacron.store import Delete, Put, Record, Store

log = logging.getLogger("novacron.controlplane")

_RETRIES = 8
_RESCAN_EVERY = 60
_MAX_BACKOFF_S = 300.0
AGENT_START_GRACE_S = 15.0  # extra time a new host's agent has for its first heartbeat


class Fleet(Protocol):
    """How the control plane reaches hosts and VMs."""

    def probe_host(self, host: Host) -> dict[str, Any]:
        """Connect to a new host's hypervisor; its HostInfo fields."""
        ...

    def start_host(self, host: Host) -> None:
        """Make sure the host's agent runs (idempotent)."""
        ...

    def stop_host(self, name: str) -> None:
        """Stop the host's agent. Its guests keep running."""
        ...

    def preflight_vm(self, vm: VM, host: Host) -> None:
        """Ask the host's agent to raise what creating ``vm`` (not recorded yet) there would
        meet (see Driver.preflight)."""
        ...

    def converge_vm(self, vm: VM, host: Host) -> None:
        """Ask the VM's agent to drive it to its desired state; returns at once."""
        ...

    def forget_vm(self, vm_id: str) -> None:
        """Stop the VM's agent (the VM is gone)."""
        ...

    def call_vm(self, vm: VM, host: Host, method: str, *args: Any) -> Any:
        """Call a method of the VM's agent and wait for its answer."""
        ...

    def run_migration(self, migration_id: str, source: str) -> None:
        """Make sure the agent of a migration out of ``source`` runs (idempotent); returns at
        once."""
        ...


def vm_from(record: Record) -> VM:
    return VM.model_validate({**record.data, "revision": record.revision})


def host_from(record: Record) -> Host:
    return Host.model_validate({**record.data, "revision": record.revision})


def migration_from(record: Record) -> Migration:
    return Migration.model_validate({**record.data, "revision": record.revision})


def _dump(obj: VM | Host | Migration) -> dict[str, Any]:
    return obj.model_dump(mode="json", exclude={"revision"})


def placement_request(spec: VMSpec, *, pinned: str | None = None,
                      tenant: str | None = None) -> PlacementRequest:
    """What the placement engine is asked for a VM of ``spec``."""
    policy = spec.placement
    return PlacementRequest(spec.resources, host=pinned, labels=dict(policy.host_labels),
                            group=policy.group, affinity=Affinity(policy.affinity),
                            hard=policy.hard, domain=policy.domain, tenant=tenant)


def back_from_unreachable(host: Host) -> HostState:
    """The state a host that reports again returns to: draining while its drain runs,
    maintenance if it was in maintenance, else up."""
    if host.draining:
        return HostState.DRAINING
    if host.state_before_unreachable == HostState.MAINTENANCE:
        return HostState.MAINTENANCE
    return HostState.UP


def unsettled(vm: VM) -> bool:
    """Whether the VM's observed state is not yet what was asked for."""
    return vm.pending is not None or vm.state != SETTLED[vm.desired]


class ControlPlane:
    """Admission, placement and reconciliation over one store. Thread-safe."""

    def __init__(self, store: Store, fleet: Fleet, *, heartbeat_interval_s: float = 1.0,
                 heartbeat_misses: int = 5, converge_timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.fleet = fleet
        self.heartbeat_timeout_s = heartbeat_interval_s * heartbeat_misses
        self.converge_timeout_s = converge_timeout_s
        self.clock = clock
        self._lock = threading.RLock()
        self._last_seen: dict[str, float] = {}
        self._host_stats: dict[str, dict[str, Any]] = {}
        self._inflight: dict[str, float] = {}
        # VMs not yet in their desired state: kept current on every write, so a reconcile pass
        # touches only these, plus a full rescan every ``_RESCAN_EVERY`` passes.
        self._unsettled: set[str] = set()
        self._failures: dict[str, int] = {}  # consecutive failed converges, for backoff
        self._passes = 0
        self._engine: PlacementEngine | None = None  # built on first use, kept current

    # -- startup ----------------------------------------------------------------------------
    def start(self) -> None:
        """Bring every stored host's agent up, then every VM's agent, which re-attaches to its
        guest and reports what it finds."""
        now = self.clock()
        for host in self.list_hosts():
            self._last_seen[host.name] = now  # a grace period after a (re)start
            try:
                self.fleet.start_host(host)
            except Exception:
                log.exception("could not start the agent of host %s", host.name)
        for vm in self.list_vms():
            self._track(vm)
            if vm.host is not None:
                self._inflight[vm.id] = now + self.converge_timeout_s
                self._converge(vm)
        for migration in self.list_migrations():
            if migration.phase not in MIGRATION_DONE:
                self._run_migration(migration)

    # -- hosts ------------------------------------------------------------------------------
    def register_host(self, req: HostCreate) -> Host:
        """Connect to a new host and add it; AlreadyExists if the name is taken."""
        driver_class(req.driver)  # an unknown driver is an InvalidRequest
        if self.store.get("host", req.name) is not None:
            raise AlreadyExists(f"a host named {req.name!r} already exists",
                                details={"host": req.name})
        labels = dict(req.labels)
        if req.tenant != "*":
            labels[TENANTS_LABEL] = req.tenant  # a dedicated host takes its tenant's VMs only
        draft = Host(name=HostName(req.name), driver=req.driver, uri=req.uri,
                     capacity=req.capacity or Resources.zero(), overcommit=req.overcommit,
                     labels=labels, config=dict(req.config), tenant=req.tenant)
        probed = self.fleet.probe_host(draft)
        capacity = req.capacity or Resources(cpus=probed["cpus"], memory_mib=probed["memory_mib"],
                                             disk_gib=probed["disk_gib"])
        host = draft.model_copy(update={"capacity": capacity})
        record = self.store.create("host", host.name, _dump(host))
        host = host_from(record)
        with self._lock:
            # its agent is a new process (maybe importing a cloud SDK): the first heartbeat
            # may come late, which is not a host going silent
            self._last_seen[host.name] = self.clock() + AGENT_START_GRACE_S
            if self._engine is not None:
                self._engine.update_host(host)
        self.fleet.start_host(host)
        log.info("host %s registered (%s, %s cpus, %s MiB)", host.name, host.driver,
                 capacity.cpus, capacity.memory_mib)
        return host

    def get_host(self, name: str) -> Host:
        record = self.store.get("host", name)
        if record is None:
            raise NotFound(f"no host named {name!r}", details={"host": name})
        return host_from(record)

    def list_hosts(self) -> list[Host]:
        return [host_from(r) for r in self.store.all("host")]

    def host_stats(self, name: str) -> dict[str, Any]:
        """The last sample a host sent (empty before its first heartbeat)."""
        return dict(self._host_stats.get(name, {}))

    def all_host_stats(self) -> dict[str, dict[str, Any]]:
        """The last sample of every host that has sent one."""
        return {name: dict(stats) for name, stats in self._host_stats.items()}

    def set_host_state(self, name: str, state: HostState) -> Host:
        """Move a host to ``state`` (maintenance, back up...) as its state machine allows; while
        a drain runs, the host's state is the drain's (Conflict)."""
        with self._lock:
            host = self.get_host(name)
            if host.draining and state != host.state:
                raise Conflict(f"host {name!r} is being drained; cancel the drain first "
                               f"(novacron host drain {name} --cancel)", details={"host": name})
            check_host_transition(host.state, state)
            return self._write_host(host.model_copy(update={"state": state}))

    def update_host(self, name: str, change: Callable[[Host], Host]) -> Host:
        """Store ``change(host)`` for host ``name``, read and written under the lock (for
        processes kept on the host record, such as drains: ``novacron.evacuation``)."""
        with self._lock:
            host = self.get_host(name)
            changed = change(host)
            if changed == host:
                return host
            check_host_transition(host.state, changed.state)
            return self._write_host(changed)

    def delete_host(self, name: str) -> None:
        """Remove an empty host; Conflict while VMs are on it."""
        with self._lock:
            host = self.get_host(name)
            count = self.store.count("vm", where={"host": name})
            if count:
                raise Conflict(f"host {name!r} still has {count} VM(s); move or delete them first",
                               details={"host": name, "vms": count})
            self.store.delete("host", name, expected_revision=host.revision)
            self._last_seen.pop(name, None)
            self._host_stats.pop(name, None)
            if self._engine is not None:
                self._engine.remove_host(name)
        self.fleet.stop_host(name)

    def _write_host(self, host: Host) -> Host:
        written = host_from(self.store.put("host", host.name, _dump(host),
                                           expected_revision=host.revision))
        if self._engine is not None:
            self._engine.update_host(written)
        return written

    def place(self, request: PlacementRequest) -> Decision:
        """Where the placement engine would put ``request`` now; nothing is reserved."""
        with self._lock:
            return self._placement().place(request)

    def _placement(self) -> PlacementEngine:
        """The placement engine over every host and the VMs on them (built once, then kept
        current by each write)."""
        if self._engine is None:
            self._engine = PlacementEngine.from_hosts(self.list_hosts(), {
                h: [VMPlacementInfo(vm.id, vm.spec.placement.group) for vm in vms]
                for h, vms in self._vms_by_host().items()})
        return self._engine

    # -- VMs --------------------------------------------------------------------------------
    def create_vm(self, req: VMCreate, *, tenant: str = "default",
                  request_id: str | None = None,
                  admit: Callable[[VMSpec, str], None] | None = None) -> VM:
        """Admit, place and record a new VM; its agent then defines (and starts) it.

        ``request_id`` makes a retried create return the VM the first attempt made. ``admit``
        (e.g. a quota check) runs under the same lock as the write, so two creates cannot both
        pass it and then overshoot together. On a host whose driver :attr:`preflights`, what
        the create would meet there (a cloud instance type that does not exist, a provider
        quota) is raised before anything is recorded: asked outside the lock, then placed again.
        """
        name_key = f"{tenant}/{req.name}"
        spec = VMSpec.model_validate(req.model_dump(exclude={"host", "start", "tenant"}))
        vm_id = VMId(new_id("vm"))
        checked: set[str] = set()  # hosts that passed this VM's preflight
        unchecked: tuple[VM, Host] | None = None
        for _ in range(_RETRIES):
            if unchecked is not None:  # a provider round trip: never under the lock
                self._preflight(*unchecked)
                checked.add(unchecked[1].name)
                unchecked = None
            with self._lock:
                taken = self.store.get("vmname", name_key)
                if taken is not None:
                    if request_id and taken.data.get("request_id") == request_id:
                        return self.get_vm(taken.data["vm"])
                    raise AlreadyExists(f"a VM named {req.name!r} already exists",
                                        details={"name": req.name, "vm": taken.data["vm"]})
                if req.host is not None:
                    self.get_host(req.host)  # NotFound for an unknown host
                if admit is not None:
                    admit(spec, tenant)
                engine = self._placement()
                decision = engine.place(placement_request(spec, pinned=req.host, tenant=tenant))
                host = self.get_host(decision.host)
                if host.revision != decision.revision:
                    engine.update_host(host)  # the engine's view was stale: place again
                    continue
                vm = VM(id=vm_id, name=req.name, tenant=tenant, spec=spec,
                        desired=PowerState.RUNNING if req.start else PowerState.STOPPED,
                        host=host.name, epoch=1)
                if host.name not in checked and driver_class(host.driver).preflights:
                    unchecked = (vm, host)
                    continue
                allocated = host.allocated + spec.resources
                try:
                    written = self.store.commit([
                        Put("vm", vm.id, _dump(vm), 0),
                        Put("vmname", name_key, {"vm": vm.id, "request_id": request_id}, 0),
                        Put("host", host.name,
                            _dump(host.model_copy(update={"allocated": allocated})),
                            host.revision),
                    ])
                except RevisionMismatch:
                    self._engine = None  # the host changed under us: place again
                    continue
                record, _, host_record = written
                assert record is not None
                assert host_record is not None
                engine.allocate(host.name, spec.resources, group=spec.placement.group,
                                revision=host_record.revision)
                vm = vm_from(record)
                self._track(vm)
                self._inflight[vm.id] = self.clock() + self.converge_timeout_s
            log.info("VM %s (%s) placed on %s", vm.id, vm.name, host.name)
            self._converge(vm)
            return vm
        raise Conflict("placement kept racing with other changes; try again")

    def _preflight(self, vm: VM, host: Host) -> None:
        """Raise what creating ``vm`` on ``host`` would meet. A provider or agent that cannot
        answer now refuses nothing: the VM's own agent then meets, and reports, the same."""
        try:
            self.fleet.preflight_vm(vm, host)
        except (HostUnreachable, Throttled, OperationTimeout, Unavailable) as exc:
            log.warning("VM %s: host %s could not be asked before the create: %s", vm.name,
                        host.name, exc.message)

    def plan(self, specs: list[VMSpec], *, tenant: str = "default",
             pinned: list[str | None] | None = None) -> list[dict[str, Any]]:
        """Where each VM would go, placed together as one batch; nothing is written.

        One VM gets the full explanation (hosts that fit, score per weigher); a batch is placed
        largest first, each placement counting against the next. Refusals say, per filter, how
        many hosts they removed.
        """
        pins = pinned or [None] * len(specs)
        requests = [placement_request(s, pinned=p, tenant=tenant) for s, p in zip(specs, pins,
                                                                                 strict=True)]
        engine = PlacementEngine.from_hosts(self.list_hosts(), {
            h: [VMPlacementInfo(vm.id, vm.spec.placement.group) for vm in vms]
            for h, vms in self._vms_by_host().items()})
        if len(requests) == 1:
            try:
                results: list[Decision | NoCapacity] = [engine.place(requests[0])]
            except NoCapacity as exc:
                results = [exc]
        else:
            results = engine.place_batch(requests)
        out: list[dict[str, Any]] = []
        for spec, result in zip(specs, results, strict=True):
            if isinstance(result, NoCapacity):
                out.append({"name": spec.name, "host": None, "error": result.to_dict()})
            else:
                out.append({"name": spec.name, "host": result.host, "score": result.score,
                            "explanation": result.explanation,
                            "breakdown": dict(result.breakdown)})
        return out

    def _vms_by_host(self) -> dict[str, list[VM]]:
        by_host: dict[str, list[VM]] = {}
        for vm in self.list_vms():
            if vm.host is not None:
                by_host.setdefault(vm.host, []).append(vm)
        return by_host

    def get_vm(self, vm_id: str) -> VM:
        record = self.store.get("vm", vm_id)
        if record is None:
            raise NotFound(f"no VM with id {vm_id!r}", details={"vm": vm_id})
        return vm_from(record)

    def find_vm(self, ref: str, *, tenant: str = "default") -> VM:
        """A VM by id or by name."""
        record = self.store.get("vm", ref)
        if record is None:
            named = self.store.get("vmname", f"{tenant}/{ref}")
            if named is not None:
                record = self.store.get("vm", named.data["vm"])
        if record is None:
            raise NotFound(f"no VM with id or name {ref!r}", details={"vm": ref})
        return vm_from(record)  # (secured.no_vm says the same for a VM the caller cannot see)

    def list_vms(self, *, host: str | None = None, tenant: str | None = None) -> list[VM]:
        where = {k: v for k, v in (("host", host), ("tenant", tenant)) if v is not None}
        return [vm_from(r) for r in self.store.all("vm", where=where)]

    def vm_action(self, vm_id: str, action: str, *, force: bool = False) -> VM:
        """Ask for start, stop, reboot, pause or resume; InvalidTransition if the state forbids."""
        with self._lock:
            vm = self.get_vm(vm_id)
            self._refuse_if_deleting(vm)
            desired = check_vm_action(action, vm.state)
            pending = "reboot" if action == "reboot" else (
                "force_stop" if action == "stop" and force else None)
            vm = self._write_vm(vm.model_copy(update={"desired": desired, "pending": pending}))
            self._inflight[vm.id] = self.clock() + self.converge_timeout_s
        log.info("VM %s: %s requested", vm.id, action)
        self._converge(vm)
        return vm

    def snapshot(self, vm_id: str, op: str, name: str | None = None) -> Any:
        """Create, list, revert or delete snapshots of a VM through its agent."""
        vm = self.get_vm(vm_id)
        self._refuse_if_deleting(vm)
        if vm.host is None:
            raise InvalidTransition(f"VM {vm.name!r} is not on a host yet",
                                    details={"vm": vm.id, "state": vm.state.value})
        return self.fleet.call_vm(vm, self.get_host(vm.host), "snapshot", op, name)

    def delete_vm(self, vm_id: str) -> VM:
        """Ask for the VM to be removed (its guest is stopped and undefined, then the record)."""
        with self._lock:
            vm = self.get_vm(vm_id)
            self._refuse_if_deleting(vm)
            check_vm_transition(vm.state, VMState.DELETING)
            vm = self._write_vm(vm.model_copy(update={"desired": PowerState.DELETED,
                                                      "state": VMState.DELETING,
                                                      "pending": None}))
            if vm.host is None:
                self._finish_delete(vm)
                return vm
            self._inflight[vm.id] = self.clock() + self.converge_timeout_s
        self._converge(vm)
        return vm

    @staticmethod
    def _refuse_if_deleting(vm: VM) -> None:
        if vm.desired == PowerState.DELETED:
            raise InvalidTransition(f"VM {vm.name!r} is being deleted",
                                    details={"vm": vm.id, "state": vm.state.value})
        if vm.migration is not None:
            raise InvalidTransition(f"VM {vm.name!r} is migrating ({vm.migration}); wait for it "
                                    "or cancel it", details={"vm": vm.id,
                                                             "migration": vm.migration})

    def _write_vm(self, vm: VM) -> VM:
        vm = vm.model_copy(update={"updated_at": self.clock()})
        vm = vm_from(self.store.put("vm", vm.id, _dump(vm), expected_revision=vm.revision))
        self._track(vm)
        return vm

    def _track(self, vm: VM) -> None:
        if unsettled(vm):
            self._unsettled.add(vm.id)
        else:
            self._unsettled.discard(vm.id)

    def _converge(self, vm: VM) -> None:
        if vm.host is None or vm.migration is not None:  # a migration drives it meanwhile
            return
        try:
            host = self.get_host(vm.host)
        except NotFound:
            log.error("VM %s is on unknown host %s", vm.id, vm.host)
            return
        if host.state == HostState.UNREACHABLE:
            return
        try:
            self.fleet.converge_vm(vm, host)
        except Exception:
            log.exception("could not reach the agent of VM %s", vm.id)

    def _finish_delete(self, vm: VM) -> None:
        ops: list[Put | Delete] = [Delete("vm", vm.id, vm.revision),
                                   Delete("vmname", f"{vm.tenant}/{vm.name}", missing_ok=True)]
        host_record = self.store.get("host", vm.host) if vm.host else None
        if host_record is not None:
            host = host_from(host_record)
            ops.append(Put("host", host.name, _dump(host.model_copy(
                update={"allocated": host.allocated - vm.spec.resources})), host.revision))
        written = self.store.commit(ops)
        if self._engine is not None and host_record is not None and written[2] is not None:
            self._engine.release(written[2].key, vm.spec.resources, group=vm.spec.placement.group,
                                 revision=written[2].revision)
        self._inflight.pop(vm.id, None)
        self._unsettled.discard(vm.id)
        log.info("VM %s (%s) deleted", vm.id, vm.name)
        try:
            self.fleet.forget_vm(vm.id)
        except Exception:
            log.exception("could not stop the agent of VM %s", vm.id)

    # -- migrations -----------------------------------------------------------------------------
    def get_migration(self, migration_id: str) -> Migration:
        record = self.store.get("migration", migration_id)
        if record is None:
            raise NotFound(f"no migration with id {migration_id!r}",
                           details={"migration": migration_id})
        return migration_from(record)

    def list_migrations(self, *, tenant: str | None = None) -> list[Migration]:
        where = {"tenant": tenant} if tenant is not None else None
        return [migration_from(r) for r in self.store.all("migration", where=where)]

    def _check_migration(self, vm: VM, req: MigrationCreate) -> tuple[Host, Host]:
        """The source and target hosts, or the reason the migration is refused."""
        if vm.host is None:
            raise InvalidTransition(f"VM {vm.name!r} is not on a host yet",
                                    details={"vm": vm.id, "state": vm.state.value})
        self._refuse_if_deleting(vm)
        source, target = self.get_host(vm.host), self.get_host(req.target_host)
        if source.name == target.name:
            raise InvalidRequest(f"VM {vm.name!r} is already on {target.name}",
                                 details={"vm": vm.id, "host": target.name})
        movable = {"cold": (VMState.RUNNING, VMState.STOPPED, VMState.PAUSED),
                   "warm": (VMState.RUNNING,), "live": (VMState.RUNNING,)}[req.mode]
        if vm.state not in movable or unsettled(vm):
            raise InvalidTransition(
                f"cannot {req.mode}-migrate VM {vm.name!r} while it is {vm.state.value}"
                f"{' (changing)' if unsettled(vm) else ''}; {req.mode} migration needs it "
                f"{' or '.join(s.value for s in movable)}",
                details={"vm": vm.id, "state": vm.state.value, "mode": req.mode})
        if source.state == HostState.UNREACHABLE:
            raise InvalidTransition(f"source host {source.name} is unreachable",
                                    details={"host": source.name})
        rules.check_supported(req.mode, req.policy, source.driver, target.driver)
        return source, target

    def create_migration(self, vm_id: str, req: MigrationCreate) -> Migration:
        """Check, record and start a migration of ``vm_id`` (refused up front with the reason);
        the target's capacity is reserved until it ends. With ``req.dry_run`` only the cost
        model's prediction is returned (as an unsaved record), nothing moves."""
        for _ in range(_RETRIES):
            with self._lock:
                vm = self.get_vm(vm_id)
                source, target = self._check_migration(vm, req)
                engine = self._placement()
                decision = engine.place(placement_request(vm.spec, pinned=target.name,
                                                          tenant=vm.tenant))
                if target.revision != decision.revision:
                    engine.update_host(target)
                    continue
                now = self.clock()
                migration = Migration(
                    id=MigrationId(new_id("mig")), vm=vm.id, tenant=vm.tenant,
                    source=source.name, target=target.name, mode=req.mode, policy=req.policy,
                    prediction=rules.prediction(vm, req.mode, req.policy).to_dict(),
                    created_at=now, updated_at=now)
                if req.dry_run:
                    return migration
                allocated = target.allocated + vm.spec.resources
                try:
                    written = self.store.commit([
                        Put("migration", migration.id, _dump(migration), 0),
                        Put("vm", vm.id, _dump(vm.model_copy(update={
                            "migration": migration.id, "state": VMState.MIGRATING,
                            "updated_at": now})), vm.revision),
                        Put("host", target.name,
                            _dump(target.model_copy(update={"allocated": allocated})),
                            target.revision),
                    ])
                except RevisionMismatch:
                    self._engine = None
                    continue
                mig_record, vm_record, host_record = written
                assert mig_record is not None
                assert vm_record is not None
                assert host_record is not None
                engine.allocate(target.name, vm.spec.resources, group=vm.spec.placement.group,
                                revision=host_record.revision)
                self._track(vm_from(vm_record))
                migration = migration_from(mig_record)
            log.info("migration %s: %s VM %s from %s to %s", migration.id, migration.mode,
                     vm.id, source.name, target.name)
            try:
                self.fleet.run_migration(migration.id, migration.source)
            except NovaCronError as exc:
                self.end_migration(migration.id, MigrationPhase.FAILED, reason=exc.message)
                raise
            return migration
        raise Conflict("the target kept changing under the migration; try again")

    def _run_migration(self, migration: Migration) -> None:
        try:
            self.fleet.run_migration(migration.id, migration.source)
        except Exception:
            log.exception("could not start the agent of migration %s", migration.id)

    def request_migration(self, migration_id: str, what: str) -> Migration:
        """Ask a running migration to ``cancel`` (roll back) or ``force-complete`` (switch
        over at its next pass whatever the downtime)."""
        flag = {"cancel": "cancel_requested", "force-complete": "force_complete"}.get(what)
        if flag is None:
            raise InvalidRequest(f"unknown migration action {what!r}", details={"action": what})
        with self._lock:
            migration = self.get_migration(migration_id)
            late = (MIGRATION_DONE | {MigrationPhase.SWITCHOVER, MigrationPhase.CANCELLING}
                    if what == "cancel" else MIGRATION_DONE | {MigrationPhase.CANCELLING})
            if migration.phase in late:
                raise InvalidTransition(f"cannot {what} migration {migration.id}: it is "
                                        f"{migration.phase.value}",
                                        details={"migration": migration.id,
                                                 "phase": migration.phase.value})
            if what == "force-complete" and migration.mode != "live":
                raise InvalidRequest("only a live migration can be forced to complete",
                                     details={"migration": migration.id})
            return self._write_migration(migration.model_copy(update={flag: True}))

    def _write_migration(self, migration: Migration) -> Migration:
        migration = migration.model_copy(update={"updated_at": self.clock()})
        return migration_from(self.store.put("migration", migration.id, _dump(migration),
                                             expected_revision=migration.revision))

    def update_migration(self, migration_id: str, *, phase: MigrationPhase | None = None,
                         progress: MigrationProgress | None = None,
                         checkpoint: Mapping[str, Any] | None = None,
                         outcome: Mapping[str, Any] | None = None) -> Migration:
        """What a migration's agent checkpoints: its phase, progress and resume data."""
        with self._lock:
            migration = self.get_migration(migration_id)
            update: dict[str, Any] = {}
            if phase is not None and phase != migration.phase:
                check_migration_transition(migration.phase, phase)
                update["phase"] = phase
                if phase == MigrationPhase.PREPARING:
                    update["started_at"] = self.clock()
            if progress is not None:
                update["progress"] = rules.advance(migration.progress, progress)
            if checkpoint is not None:
                update["checkpoint"] = {**migration.checkpoint, **checkpoint}
            if outcome is not None:
                update["outcome"] = {**migration.outcome, **outcome}
            return self._write_migration(migration.model_copy(update=update))

    def admit_migration(self, migration_id: str) -> bool:
        """Move a pending migration to ``preparing`` if the limits allow it now."""
        with self._lock:
            migration = self.get_migration(migration_id)
            if migration.phase != MigrationPhase.PENDING:
                return migration.phase not in MIGRATION_DONE
            if not rules.can_admit(migration, self.list_migrations()):
                return False
            self.update_migration(migration_id, phase=MigrationPhase.PREPARING)
            return True

    def switch_migrated_vm(self, migration_id: str, state: VMState, guest_id: str | None, *,
                           image: str | None = None) -> VM:
        """Switchover, in one commit: the VM moves to the target with epoch + 1 (fencing every
        report and start of the source side) and its allocation leaves the source (the target's
        was reserved when the migration began); with ``image`` (its disk imported there) its
        spec names that image from now on. Idempotent."""
        with self._lock:
            migration = self.get_migration(migration_id)
            vm = self.get_vm(migration.vm)
            if vm.host == migration.target and vm.migration is None:
                return vm  # done already (a restarted agent repeating itself)
            if vm.migration != migration.id or migration.phase != MigrationPhase.SWITCHOVER:
                raise InvalidTransition(f"migration {migration.id} cannot switch VM {vm.id} "
                                        f"over in phase {migration.phase.value}",
                                        details={"migration": migration.id})
            source = self.get_host(migration.source)
            now = self.clock()
            spec = vm.spec if image is None else vm.spec.model_copy(update={"image": image})
            moved = vm.model_copy(update={
                "host": migration.target, "epoch": vm.epoch + 1, "state": state, "spec": spec,
                "guest_id": guest_id, "migration": None, "observed_at": now, "updated_at": now,
                "last_error": None})
            released = source.allocated - vm.spec.resources
            written = self.store.commit([
                Put("vm", vm.id, _dump(moved), vm.revision),
                Put("host", source.name, _dump(source.model_copy(
                    update={"allocated": released})), source.revision),
            ])
            vm_record = written[0]
            assert vm_record is not None
            self._engine = None  # group membership moved host: rebuild on next use
            vm = vm_from(vm_record)
            self._track(vm)
        log.info("VM %s switched over to %s (epoch %d)", vm.id, vm.host, vm.epoch)
        try:
            self.fleet.forget_vm(vm.id)  # the source's agent; the next converge makes one there
        except Exception:
            log.exception("could not stop the old agent of VM %s", vm.id)
        self._converge(vm)
        return vm

    def end_migration(self, migration_id: str, phase: MigrationPhase, *,
                      reason: str | None = None,
                      outcome: Mapping[str, Any] | None = None) -> Migration:
        """Finish a migration: ``completed`` after its switchover; ``rolled-back`` or ``failed``
        give the VM back to its source (agents converge it again) and free the target's
        reservation, in one commit. Idempotent."""
        with self._lock:
            migration = self.get_migration(migration_id)
            if migration.phase in MIGRATION_DONE:
                return migration
            check_migration_transition(migration.phase, phase)
            done = migration.model_copy(update={
                "phase": phase, "reason": reason, "updated_at": self.clock(),
                "outcome": {**migration.outcome, **(outcome or {})}})
            ops: list[Put | Delete] = [Put("migration", migration.id, _dump(done),
                                           migration.revision)]
            vm_record = self.store.get("vm", migration.vm)
            vm = vm_from(vm_record) if vm_record is not None else None
            if phase != MigrationPhase.COMPLETED and vm is not None \
                    and vm.migration == migration.id:
                ops.append(Put("vm", vm.id, _dump(vm.model_copy(update={
                    "migration": None, "state": VMState.UNKNOWN, "last_error": reason,
                    "updated_at": self.clock()})), vm.revision))
                target = self.get_host(migration.target)
                ops.append(Put("host", target.name, _dump(target.model_copy(update={
                    "allocated": target.allocated - vm.spec.resources})), target.revision))
            written = self.store.commit(ops)
            if len(written) > 1:
                self._engine = None
                assert written[1] is not None
                vm = vm_from(written[1])
                self._track(vm)
                self._inflight[vm.id] = self.clock() + self.converge_timeout_s
            result = migration_from(written[0]) if written[0] is not None else done
        log.info("migration %s %s%s", migration.id, phase.value, f": {reason}" if reason else "")
        if len(ops) > 1 and vm is not None:
            self._converge(vm)
        return result

    # -- what agents report -------------------------------------------------------------------
    def report_vm(self, vm_id: str, epoch: int, observed: Mapping[str, Any]) -> None:
        """Record what a VM's agent (or its host's heartbeat) observed, if still current."""
        with self._lock:
            record = self.store.get("vm", vm_id)
            if record is None:
                return
            vm = vm_from(record)
            if epoch != vm.epoch:
                log.warning("VM %s: ignored a report from epoch %s (current %s)", vm_id, epoch,
                            vm.epoch)
                return
            if vm.migration is not None:
                return  # its migration reports the VM's state until it ends
            seen_at = float(observed.get("time", self.clock()))
            if seen_at < vm.observed_at:
                return  # an older observation arrived late
            state = VMState(observed["state"])
            error = None if observed.get("transient") else observed.get("error")
            if state == VMState.DELETED:
                if vm.desired == PowerState.DELETED:
                    self._finish_delete(vm)
                    return
                # The guest vanished (the agent defines it again), or could not be defined.
                state = VMState.ERROR if error else VMState.PENDING
            try:
                check_vm_transition(vm.state, state)
            except InvalidTransition as exc:
                log.warning("VM %s: ignored observation: %s", vm_id, exc.message)
                return
            update: dict[str, Any] = {"state": state, "observed_at": seen_at}
            if not observed.get("transient"):
                update["guest_id"] = observed.get("guest_id")
                update["last_error"] = error
                update["last_error_code"] = observed.get("error_code") if error else None
                if observed.get("done") is not None and observed.get("done") == vm.pending:
                    update["pending"] = None
                self._inflight.pop(vm_id, None)
                if error:
                    # Retry later, backing off: a missing image will not appear in 250 ms.
                    failures = self._failures.get(vm_id, 0) + 1
                    self._failures[vm_id] = failures
                    self._inflight[vm_id] = self.clock() + min(_MAX_BACKOFF_S, 2.0 ** failures)
                else:
                    self._failures.pop(vm_id, None)
            if all(getattr(vm, k) == v for k, v in update.items() if k != "observed_at"):
                return
            vm = self._write_vm(vm.model_copy(update=update))
        if vm.state != state:
            return
        if not observed.get("transient") and observed.get("error") is None and unsettled(vm):
            self._converge(vm)  # the world moved again since this agent's run

    def heartbeat(self, host: str, stats: Mapping[str, Any],
                  guests: Sequence[Mapping[str, Any]]) -> None:
        """A host's periodic sample: marks it alive and reconciles what its guests are doing."""
        with self._lock:
            record = self.store.get("host", host)
            if record is None:
                return
            self._last_seen[host] = self.clock()
            self._host_stats[host] = dict(stats)
            current = host_from(record)
            if current.state == HostState.UNREACHABLE:
                self._write_host(current.model_copy(update={
                    "state": back_from_unreachable(current), "state_before_unreachable": None}))
                log.info("host %s is reachable again", host)
            for guest in guests:
                vm_record = self.store.get("vm", str(guest["vm_id"]))
                if vm_record is None or vm_record.data.get("host") != host:
                    continue
                vm = vm_from(vm_record)
                if vm.id in self._inflight or vm.state.value == guest["state"]:
                    continue
                self.report_vm(vm.id, vm.epoch, guest)

    # -- reconciliation -----------------------------------------------------------------------
    def reconcile_once(self) -> None:
        """One pass: mark silent hosts unreachable, push unsettled VMs toward desired state."""
        now = self.clock()
        unreachable: set[str] = set()
        for host in self.list_hosts():
            last = self._last_seen.setdefault(host.name, now)
            if now - last > self.heartbeat_timeout_s:
                unreachable.add(host.name)
                if host.state != HostState.UNREACHABLE:
                    self._mark_unreachable(host)
                try:
                    self.fleet.start_host(host)  # its agent may have died for good
                except Exception:
                    log.exception("could not restart the agent of host %s", host.name)
        self._passes += 1
        if self._passes % _RESCAN_EVERY == 0:
            for vm in self.list_vms():
                self._track(vm)
        for vm_id in list(self._unsettled):
            record = self.store.get("vm", vm_id)
            if record is None:
                self._unsettled.discard(vm_id)
                continue
            vm = vm_from(record)
            if vm.host in unreachable or not unsettled(vm):
                continue
            deadline = self._inflight.get(vm.id)
            if deadline is not None and deadline > now:
                continue
            with self._lock:
                self._inflight[vm.id] = now + self.converge_timeout_s
            self._converge(vm)

    def _mark_unreachable(self, host: Host) -> None:
        with self._lock:
            log.warning("host %s missed its heartbeats: unreachable", host.name)
            self._write_host(host.model_copy(update={"state": HostState.UNREACHABLE,
                                                     "state_before_unreachable": host.state}))
            for vm in self.list_vms(host=host.name):
                if vm.state not in (VMState.UNKNOWN, VMState.PENDING):
                    self._write_vm(vm.model_copy(update={"state": VMState.UNKNOWN}))

    def status(self) -> dict[str, Any]:
        """Counts for ``novacron status`` and readiness."""
        by_state = self.store.count_by("vm", "state")
        hosts = self.store.count_by("host", "state")
        return {"hosts": sum(hosts.values()), "hosts_up": hosts.get(HostState.UP.value, 0),
                "vms": sum(by_state.values()), "vms_by_state": by_state,
                "revision": self.store.head_revision()}
