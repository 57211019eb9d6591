"""Drains: a host's VMs leave through migrations, and the host takes no new VM meanwhile.

:meth:`Evacuator.start` turns the host ``draining`` (placement skips it: no new VM, no migration
target), cancels migrations still heading to it, and records the drain on the host
(:class:`~novacron.model.Drain`). :meth:`Evacuator.advance`, called on every reconcile pass,
moves each draining host along:

* the drain's migrations that ended are counted: completed ones as moved; failed or rolled-back
  ones are retried, up to ``MAX_ATTEMPTS`` per VM;
* each VM still on the host gets a migration as the limits allow (``MAX_ACTIVE`` in the cluster,
  ``MAX_OUTBOUND`` per source), to the host the placement engine chooses with the source excluded:
  live for a running VM when both drivers can, else cold (stopped and paused VMs: cold);
* a VM that cannot leave says why: ``waiting`` passes by itself (it settles, its turn comes),
  ``blocked`` needs a change (no host fits, no migration path, the VM is in error) and is retried
  every pass; while only blocked VMs are left and nothing moves, the drain is ``blocked``;
* once the host is empty it goes to ``maintenance`` and the drain is ``completed``.

:meth:`Evacuator.cancel` asks the drain's migrations to roll back (those past their switchover
finish), puts the host back ``up`` and ends the drain ``cancelled``.

The drain lives on the host record only, so a restarted controller carries on where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from novacron import migrations as rules
from novacron.controlplane import ControlPlane, placement_request, unsettled
from novacron.errors import (
    Conflict,
    InvalidTransition,
    NoCapacity,
    NotFound,
    NotSupported,
    NovaCronError,
)
from novacron.model import VM, Drain, Host, Migration, MigrationCreate, MigrationPolicy
from novacron.states import (
    MIGRATION_DONE,
    DrainState,
    HostState,
    MigrationPhase,
    PowerState,
    VMState,
    check_drain_transition,
)

log = logging.getLogger("novacron.evacuation")

MAX_ATTEMPTS = 3  # failed migrations of one VM before the drain stops retrying it
_LATE = MIGRATION_DONE | {MigrationPhase.SWITCHOVER, MigrationPhase.CANCELLING}


class _NotStarted(Exception):
    """A migration was recorded, but its run could not be started (the record has failed)."""

    def __init__(self, error: NovaCronError) -> None:
        super().__init__(error.message)
        self.error = error


def can_migrate(mode: str, source_driver: str, target_driver: str) -> bool:
    """Whether NovaCron can run a ``mode`` migration between hosts of these drivers."""
    try:
        rules.check_supported(mode, MigrationPolicy(), source_driver, target_driver)
    except NotSupported:
        return False
    return True


class Evacuator:
    """Starts, advances and cancels drains. Thread-safe; one per control plane."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self._lock = threading.RLock()

    # -- what users ask -------------------------------------------------------------------------
    def start(self, name: str) -> Host:
        """Start draining host ``name`` (idempotent: a running drain is returned as is)."""
        with self._lock:
            host = self.plane.get_host(name)
            if host.draining:
                return host
            vms = self.plane.list_vms(host=name)
            if host.state == HostState.MAINTENANCE:
                if vms:
                    raise InvalidTransition(
                        f"host {name!r} is in maintenance with {len(vms)} VM(s), which stay put "
                        "there; activate it, then drain it",
                        details={"host": name, "state": host.state.value, "vms": len(vms)})
                if host.drain is not None and host.drain.state == DrainState.COMPLETED:
                    return host  # drained already
            now = self.plane.clock()
            drain = Drain(state=DrainState.RUNNING, started_at=now, updated_at=now,
                          remaining=len(vms), message=f"started: {len(vms)} VM(s) to move")
            if host.state == HostState.MAINTENANCE:  # empty: nothing to move
                drain = self._ended(drain, DrainState.COMPLETED, "completed: the host was empty")
                return self.plane.update_host(name, lambda h: h.model_copy(
                    update={"drain": drain}))
            self.plane.update_host(name, lambda h: h.model_copy(
                update={"state": HostState.DRAINING, "drain": drain}))
            log.info("host %s: drain started (%d VMs)", name, len(vms))
            for m in self.plane.list_migrations():
                if m.target == name and m.phase not in _LATE:
                    self._cancel_migration(m.id, f"host {name} is being drained")
            return self.advance_host(name)

    def cancel(self, name: str) -> Host:
        """Stop draining host ``name``: its migrations roll back and it is up again."""
        with self._lock:
            host = self.plane.get_host(name)
            drain = host.drain
            if drain is None:
                raise InvalidTransition(f"host {name!r} has no drain to cancel",
                                        details={"host": name})
            if drain.state == DrainState.CANCELLED:
                return host
            if not drain.active:
                raise InvalidTransition(f"the drain of host {name!r} has {drain.state.value}; "
                                        "there is nothing to cancel",
                                        details={"host": name, "drain": drain.state.value})
            migrations: dict[str, Migration] = {m.id: m for m in self.plane.list_migrations()}
            migrating = {**drain.migrating, **self._started(name, drain, migrations)}
            stopped = sum(self._cancel_migration(mig, f"the drain of {name} was cancelled")
                          for mig in migrating.values())
            finishing = len(migrating) - stopped
            message = (f"cancelled: {len(drain.moved)} VM(s) moved, {stopped} migration(s) "
                       f"rolling back" + (f", {finishing} finishing" if finishing else ""))
            done = self._ended(drain.model_copy(update={"migrating": migrating, "starting": {}}),
                               DrainState.CANCELLED, message)

            def back_up(h: Host) -> Host:
                state = HostState.UP if h.state == HostState.DRAINING else h.state
                return h.model_copy(update={"state": state, "drain": done})

            log.info("host %s: drain %s", name, message)
            return self.plane.update_host(name, back_up)

    # -- each reconcile pass --------------------------------------------------------------------
    def advance(self) -> None:
        """Move every running drain along (the controller's reconcile loop calls this)."""
        for host in self.plane.list_hosts():
            if not host.draining:
                continue
            try:
                self.advance_host(host.name)
            except NotFound:
                continue  # the host was removed meanwhile
            except NovaCronError as exc:
                log.warning("host %s: drain pass failed: %s", host.name, exc.message)

    def advance_host(self, name: str) -> Host:
        """One pass of host ``name``'s drain: count what ended, start what may start."""
        with self._lock:
            host = self.plane.get_host(name)
            drain = host.drain
            if drain is None or not drain.active:
                return host
            migrations: dict[str, Migration] = {m.id: m for m in self.plane.list_migrations()}
            moved, failures = list(drain.moved), dict(drain.failures)
            migrating = {**drain.migrating, **self._started(name, drain, migrations)}
            waiting: dict[str, str] = {}
            blocked: dict[str, str] = {}
            for vm_id, mig_id in list(migrating.items()):
                m = migrations.get(mig_id)
                if m is not None and m.phase not in MIGRATION_DONE:
                    continue
                del migrating[vm_id]
                if m is not None and m.phase == MigrationPhase.COMPLETED:
                    if vm_id not in moved:
                        moved.append(vm_id)
                    continue
                failures[vm_id] = failures.get(vm_id, 0) + 1
                why = (f"migration {mig_id} {m.phase.value}: {m.reason or 'no reason given'}"
                       if m is not None else f"migration {mig_id} is gone")
                self._failed(vm_id, failures[vm_id], why, waiting, blocked)
            vms = self.plane.list_vms(host=name)
            active = [m for m in migrations.values() if m.phase not in MIGRATION_DONE]
            incoming = [m for m in active if m.target == name]
            if not vms and not incoming and not migrating:  # every move has ended, too
                return self._complete(host, drain, moved, failures)
            outbound = sum(1 for m in active if m.source == name)
            running = len(active)
            turn: list[VM] = []
            for vm in sorted(vms, key=lambda v: (v.created_at, v.id)):
                if vm.id in migrating or vm.id in waiting or vm.id in blocked:
                    continue
                if self._held(vm, host, failures, drain, waiting, blocked):
                    continue
                if outbound >= rules.MAX_OUTBOUND or running >= rules.MAX_ACTIVE:
                    waiting[vm.id] = (f"its turn: {outbound} migration(s) out of {name} (limit "
                                      f"{rules.MAX_OUTBOUND}), {running} in the cluster (limit "
                                      f"{rules.MAX_ACTIVE})")
                    continue
                turn.append(vm)
                outbound += 1
                running += 1
            if turn:  # say first which VMs' migrations start, so a restart finds them
                asked = self.plane.clock()
                ahead = drain.model_copy(update={
                    "moved": moved, "migrating": migrating, "failures": failures,
                    "starting": {vm.id: asked for vm in turn}})
                self.plane.update_host(name, lambda h: h.model_copy(update={"drain": ahead}))
                drain = ahead
            hosts = self.plane.list_hosts() if turn else []
            for vm in turn:
                try:
                    migration = self._migrate(vm, host, hosts)
                except (NoCapacity, NotSupported) as exc:
                    blocked[vm.id] = exc.message
                except NotFound:
                    continue  # deleted meanwhile
                except Conflict as exc:  # it changed under us: its state, a revision
                    waiting[vm.id] = exc.message
                except _NotStarted as exc:
                    failures[vm.id] = failures.get(vm.id, 0) + 1
                    self._failed(vm.id, failures[vm.id], f"could not start its migration: "
                                 f"{exc.error.message}", waiting, blocked)
                except NovaCronError as exc:
                    blocked[vm.id] = exc.message
                else:
                    migrating[vm.id] = migration.id
                    log.info("host %s: drain moves VM %s to %s (%s, %s)", name, vm.id,
                             migration.target, migration.mode, migration.id)
            stuck = bool(blocked) and not migrating and not waiting and not incoming
            state = DrainState.BLOCKED if stuck else DrainState.RUNNING
            names: dict[str, str] = {vm.id: vm.name for vm in vms}
            message = self._summary(state, moved, migrating, waiting, blocked, len(vms), names)
            if incoming:
                message += f"; {len(incoming)} migration(s) still arriving"
            return self._write(host, drain, state, message, moved=moved, migrating=migrating,
                               waiting=waiting, blocked=blocked, failures=failures,
                               remaining=len(vms))

    @staticmethod
    def _started(name: str, drain: Drain, migrations: dict[str, Migration]) -> dict[str, str]:
        """The migrations of the VMs whose start the drain announced (``starting``): found by
        VM, source and time, so none is lost if the controller stopped before recording it."""
        found: dict[str, str] = {}
        for vm_id, asked in drain.starting.items():
            if vm_id in drain.migrating:
                continue
            ours = [m for m in migrations.values()
                    if m.vm == vm_id and m.source == name and m.created_at >= asked]
            if ours:
                found[vm_id] = max(ours, key=lambda m: m.created_at).id
        return found

    # -- internals ------------------------------------------------------------------------------
    def _held(self, vm: VM, host: Host, failures: dict[str, int], drain: Drain,
              waiting: dict[str, str], blocked: dict[str, str]) -> bool:
        """Whether ``vm`` cannot start its migration now; if so, notes why."""
        if vm.migration is not None:
            waiting[vm.id] = f"migrating ({vm.migration}, not started by this drain)"
        elif vm.desired == PowerState.DELETED:
            waiting[vm.id] = "being deleted"
        elif failures.get(vm.id, 0) >= MAX_ATTEMPTS:
            blocked[vm.id] = drain.blocked.get(vm.id) or f"{failures[vm.id]} migrations failed"
        elif vm.state == VMState.ERROR:
            blocked[vm.id] = f"the VM is in error: {vm.last_error or 'no error message'}"
        elif vm.state == VMState.UNKNOWN and host.state == HostState.UNREACHABLE:
            blocked[vm.id] = f"host {host.name} is unreachable"
        elif unsettled(vm):
            waiting[vm.id] = f"the VM is {vm.state.value}, settling to {vm.desired.value}"
        else:
            return False
        return True

    @staticmethod
    def _failed(vm_id: str, count: int, why: str, waiting: dict[str, str],
                blocked: dict[str, str]) -> None:
        if count >= MAX_ATTEMPTS:
            blocked[vm_id] = (f"{count} migrations failed, the last: {why}; move it by hand, "
                              "or cancel the drain and start it again")
        else:
            waiting[vm_id] = f"{why}; retrying ({count}/{MAX_ATTEMPTS} failed)"

    def _migrate(self, vm: VM, source: Host, hosts: list[Host]) -> Migration:
        """Start moving ``vm`` off ``source``: live if it runs and both drivers can, else cold,
        to where the placement engine would put it with ``source`` excluded."""
        modes = ("live", "cold") if vm.state == VMState.RUNNING else ("cold",)
        base = placement_request(vm.spec, tenant=vm.tenant)
        errors: list[NoCapacity | NotSupported] = []
        for mode in modes:
            excluded = {source.name} | {h.name for h in hosts
                                        if not can_migrate(mode, source.driver, h.driver)}
            if len(excluded) == len({h.name for h in hosts} | {source.name}):
                errors.append(NotSupported(f"no other host can take a {mode} migration from a "
                                           f"{source.driver} host"))
                continue
            request = dataclasses.replace(base, exclude_hosts=frozenset(excluded))
            try:
                decision = self.plane.place(request)
            except NoCapacity as exc:
                errors.append(exc)
                continue
            try:
                return self.plane.create_migration(vm.id, MigrationCreate(
                    vm=vm.id, target_host=decision.host, mode=mode))
            except NoCapacity as exc:  # the host filled up since: place it again next pass
                raise Conflict(f"{decision.host} filled up meanwhile ({exc.message}); placing it "
                               "again", details={"vm": vm.id}) from exc
            except (Conflict, NotFound):
                raise
            except NovaCronError as exc:
                raise _NotStarted(exc) from exc
        messages = list(dict.fromkeys(e.message for e in errors))
        text = messages[0] if len(messages) == 1 else "; ".join(
            f"{mode}: {e.message}" for mode, e in zip(modes, errors, strict=True))
        if any(isinstance(e, NoCapacity) for e in errors):
            raise NoCapacity(text, details={"vm": vm.id})
        raise NotSupported(text, details={"vm": vm.id})

    def _cancel_migration(self, migration_id: str, why: str) -> bool:
        """Ask a migration to roll back; False if it is too late (past its switchover)."""
        try:
            self.plane.request_migration(migration_id, "cancel")
        except (InvalidTransition, NotFound):
            return False
        log.info("migration %s cancelled: %s", migration_id, why)
        return True

    def _complete(self, host: Host, drain: Drain, moved: list[str],
                  failures: dict[str, int]) -> Host:
        if host.state != HostState.DRAINING:  # unreachable: finish once it is back
            return self._write(host, drain, DrainState.RUNNING,
                               f"{len(moved)} VM(s) moved; the host is empty and goes to "
                               f"maintenance once it is {HostState.DRAINING.value} again "
                               f"(now {host.state.value})", moved=moved, migrating={},
                               waiting={}, blocked={}, failures=failures, remaining=0)
        done = self._ended(drain.model_copy(update={
            "moved": moved, "migrating": {}, "waiting": {}, "blocked": {}, "failures": failures,
            "remaining": 0, "starting": {}}), DrainState.COMPLETED,
            f"completed: {len(moved)} VM(s) moved; the host is in maintenance")

        def to_maintenance(h: Host) -> Host:
            if h.state != HostState.DRAINING:
                return h  # it became unreachable meanwhile: the next pass finishes
            return h.model_copy(update={"state": HostState.MAINTENANCE, "drain": done})

        written = self.plane.update_host(host.name, to_maintenance)
        if written.state == HostState.MAINTENANCE:
            log.info("host %s: drain completed (%d VMs moved)", host.name, len(moved))
        return written

    def _ended(self, drain: Drain, state: DrainState, message: str) -> Drain:
        check_drain_transition(drain.state, state)
        now = self.plane.clock()
        return drain.model_copy(update={"state": state, "message": message, "updated_at": now,
                                        "finished_at": now})

    def _write(self, host: Host, drain: Drain, state: DrainState, message: str, *,
               moved: list[str], migrating: dict[str, str], waiting: dict[str, str],
               blocked: dict[str, str], failures: dict[str, int], remaining: int) -> Host:
        """Store the drain's progress if anything changed (a pass that changes nothing writes
        nothing, so the event log is not flooded)."""
        check_drain_transition(drain.state, state)
        new = drain.model_copy(update={
            "state": state, "message": message, "moved": moved, "migrating": migrating,
            "waiting": waiting, "blocked": blocked, "failures": failures,
            "remaining": remaining, "starting": {}})
        if new == drain:
            return host
        if state != drain.state:
            log.info("host %s: drain %s: %s", host.name, state.value, message)
        new = new.model_copy(update={"updated_at": self.plane.clock()})
        return self.plane.update_host(host.name, lambda h: h.model_copy(update={"drain": new}))

    @staticmethod
    def _summary(state: DrainState, moved: list[str], migrating: dict[str, str],
                 waiting: dict[str, str], blocked: dict[str, str], remaining: int,
                 names: dict[str, str]) -> str:
        counts = (f"{len(moved)} moved, {len(migrating)} migrating, {len(waiting)} waiting, "
                  f"{len(blocked)} blocked; {remaining} VM(s) left")
        if not blocked:
            return counts
        vm_id, why = next(iter(blocked.items()))
        first = f"{names.get(vm_id, vm_id)}: {why}"
        if state == DrainState.BLOCKED:
            return f"blocked: no VM can leave now ({first}); {counts}"
        return f"{counts} ({first})"
