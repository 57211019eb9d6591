"""ClusterController: the detached, named singleton that owns the store.

A thin shell over :class:`~novacron.controlplane.ControlPlane`: it takes the state directory's owner
lock, opens the store, runs the reconcile loop on a thread and forwards calls. Killed at any
moment, Ray restarts it and it rebuilds everything from the store.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from actors.fleet import RayFleet
from novacron.access import Caller, redact_logs
from novacron.auth import AuditResult, AuthServices
from novacron.config import ADMIN_TOKEN_FILE, Settings, write_secret
from novacron.controlplane import ControlPlane
from novacron.errors import InvalidRequest, NovaCronError
from novacron.evacuation import Evacuator
from novacron.model import MigrationProgress
from novacron.rebalancing import Rebalancer, RebalanceSettings
from novacron.secured import PUBLIC_METHODS, SecuredPlane
from novacron.states import MigrationPhase, VMState
from novacron.store import OwnerLock, Store

log = logging.getLogger("novacron.actors.controller")


class ClusterController:
    """Admission, placement, reconciliation; the only writer of the store."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings(**settings)
        self.owner = OwnerLock(self.settings.state_dir)
        self.owner.acquire(timeout_s=30)
        self.store = Store(self.settings.store_path)
        self.fleet = RayFleet(self.settings.namespace, str(self.settings.state_dir),
                              heartbeat_interval_s=self.settings.heartbeat_interval_s,
                              stop_timeout_s=self.settings.stop_timeout_s)
        self.plane = ControlPlane(self.store, self.fleet,
                                  heartbeat_interval_s=self.settings.heartbeat_interval_s,
                                  heartbeat_misses=self.settings.heartbeat_misses,
                                  converge_timeout_s=self.settings.converge_timeout_s)
        redact_logs()
        self.evacuator = Evacuator(self.plane)
        self.rebalancer = Rebalancer(self.plane, RebalanceSettings.from_settings(self.settings))
        self.secured = SecuredPlane(self.plane, AuthServices.create(self.store,
                                                                    oidc=self.settings.oidc),
                                    evacuator=self.evacuator, rebalancer=self.rebalancer)
        token = self.secured.auth.first_start()
        if token is not None:
            write_secret(self.settings.state_dir / ADMIN_TOKEN_FILE, token.get_secret_value())
            log.info("admin token written to %s", self.settings.state_dir / ADMIN_TOKEN_FILE)
        self.plane.start()
        self._stop = threading.Event()
        threading.Thread(target=self._reconcile_loop, name="reconcile", daemon=True).start()
        log.info("controller up (pid %d, store %s)", os.getpid(), self.settings.store_path)

    def _reconcile_loop(self) -> None:
        passes = (("reconcile", self.plane.reconcile_once), ("drain", self.evacuator.advance),
                  ("rebalance", self.rebalancer.tick))
        while not self._stop.wait(self.settings.reconcile_interval_s):
            for what, run in passes:
                try:
                    run()
                except NovaCronError as exc:
                    log.warning("%s pass failed: %s", what, exc.message)
                except Exception:
                    log.exception("%s pass failed", what)

    # -- liveness -------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "state_dir": str(self.settings.state_dir),
                "store": str(self.settings.store_path), "hosts": self.store.count("host")}

    # -- what users call (the HTTP API and driver scripts), all through the gate --------------
    def call(self, method: str, caller: Caller, *args: Any, **kwargs: Any) -> Any:
        """Run the user-facing operation ``method`` for ``caller`` (see SecuredPlane)."""
        if method not in PUBLIC_METHODS:
            raise InvalidRequest(f"no operation {method!r}", details={"method": method})
        return getattr(self.secured, method)(caller, *args, **kwargs)

    def audit_denial(self, entry: dict[str, Any]) -> None:
        """Record a denial decided elsewhere (an API replica's read)."""
        self.secured.auth.audit.append(**{**entry, "result": AuditResult(entry["result"])})

    def get_vm_record(self, vm_id: str) -> dict[str, Any] | None:
        """The VM as a plain dict (for the lean VMActor), or None once deleted."""
        record = self.store.get("vm", vm_id)
        return None if record is None else {**record.data, "revision": record.revision}

    # -- agents ---------------------------------------------------------------------------------
    def report_vm(self, vm_id: str, epoch: int, observed: dict[str, Any]) -> None:
        self.plane.report_vm(vm_id, epoch, observed)

    def heartbeat(self, host: str, stats: dict[str, Any], guests: list[dict[str, Any]]) -> None:
        self.plane.heartbeat(host, stats, guests)

    # -- migrations (their MigrationActors) --------------------------------------------------
    def migration_context(self, migration_id: str) -> dict[str, Any]:
        """The migration, its VM and both hosts as plain dicts."""
        m = self.plane.get_migration(migration_id)
        return {"migration": m.model_dump(mode="json"),
                "vm": self.plane.get_vm(m.vm).model_dump(mode="json"),
                "source": self.plane.get_host(m.source).model_dump(mode="json"),
                "target": self.plane.get_host(m.target).model_dump(mode="json")}

    def migration_admit(self, migration_id: str) -> bool:
        return self.plane.admit_migration(migration_id)

    def migration_update(self, migration_id: str, *, phase: str | None = None,
                         progress: MigrationProgress | None = None,
                         checkpoint: dict[str, Any] | None = None,
                         outcome: dict[str, Any] | None = None) -> dict[str, Any]:
        m = self.plane.update_migration(
            migration_id, phase=MigrationPhase(phase) if phase is not None else None,
            progress=progress, checkpoint=checkpoint, outcome=outcome)
        return m.model_dump(mode="json")

    def migration_switch(self, migration_id: str, state: str, guest_id: str | None,
                         image: str | None = None) -> None:
        self.plane.switch_migrated_vm(migration_id, VMState(state), guest_id, image=image)

    def migration_end(self, migration_id: str, phase: str, reason: str | None,
                      outcome: dict[str, Any]) -> None:
        """The migration's actor ends it; the actor is then let go."""
        self.plane.end_migration(migration_id, MigrationPhase(phase), reason=reason,
                                 outcome=outcome)
        self.fleet.forget_migration(migration_id)

    # -- shutdown -------------------------------------------------------------------------------
    def shutdown(self, stop_guests: bool = False) -> dict[str, int]:
        """Stop reconciling and kill every agent; with ``stop_guests`` first stop every guest."""
        self._stop.set()
        vms = self.plane.list_vms()
        stopped = self.fleet.shutdown([vm.id for vm in vms if vm.host],
                                      [h.name for h in self.plane.list_hosts()],
                                      stop_guests=stop_guests)
        self.store.close()
        self.owner.release()
        return {"vms": len(vms), "guests_stopped": stopped}
