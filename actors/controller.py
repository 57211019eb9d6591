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
from novacron.config import Settings
from novacron.controlplane import ControlPlane
from novacron.errors import NovaCronError
from novacron.model import VM, Host, HostCreate, VMCreate
from novacron.states import HostState
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
        self.plane.start()
        self._stop = threading.Event()
        threading.Thread(target=self._reconcile_loop, name="reconcile", daemon=True).start()
        log.info("controller up (pid %d, store %s)", os.getpid(), self.settings.store_path)

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self.settings.reconcile_interval_s):
            try:
                self.plane.reconcile_once()
            except NovaCronError as exc:
                log.warning("reconcile pass failed: %s", exc.message)
            except Exception:
                log.exception("reconcile pass failed")

    # -- liveness -------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "state_dir": str(self.settings.state_dir),
                "store": str(self.settings.store_path)}

    def status(self) -> dict[str, Any]:
        return self.plane.status()

    # -- hosts ----------------------------------------------------------------------------------
    def register_host(self, req: HostCreate) -> Host:
        return self.plane.register_host(req)

    def get_host(self, name: str) -> Host:
        return self.plane.get_host(name)

    def list_hosts(self) -> list[Host]:
        return self.plane.list_hosts()

    def host_stats(self, name: str) -> dict[str, Any]:
        return self.plane.host_stats(name)

    def all_host_stats(self) -> dict[str, dict[str, Any]]:
        return self.plane.all_host_stats()

    def set_host_state(self, name: str, state: HostState) -> Host:
        return self.plane.set_host_state(name, state)

    def delete_host(self, name: str) -> None:
        self.plane.delete_host(name)

    # -- VMs ------------------------------------------------------------------------------------
    def create_vm(self, req: VMCreate, tenant: str = "default",
                  request_id: str | None = None) -> VM:
        return self.plane.create_vm(req, tenant=tenant, request_id=request_id)

    def get_vm(self, vm_id: str) -> VM:
        return self.plane.get_vm(vm_id)

    def find_vm(self, ref: str) -> VM:
        return self.plane.find_vm(ref)

    def get_vm_record(self, vm_id: str) -> dict[str, Any] | None:
        """The VM as a plain dict (for the lean VMActor), or None once deleted."""
        record = self.store.get("vm", vm_id)
        return None if record is None else {**record.data, "revision": record.revision}

    def list_vms(self, host: str | None = None) -> list[VM]:
        return self.plane.list_vms(host=host)

    def vm_action(self, vm_id: str, action: str, force: bool = False) -> VM:
        return self.plane.vm_action(vm_id, action, force=force)

    def snapshot(self, vm_id: str, op: str, name: str | None = None) -> Any:
        return self.plane.snapshot(vm_id, op, name)

    def delete_vm(self, vm_id: str) -> VM:
        return self.plane.delete_vm(vm_id)

    # -- agents ---------------------------------------------------------------------------------
    def report_vm(self, vm_id: str, epoch: int, observed: dict[str, Any]) -> None:
        self.plane.report_vm(vm_id, epoch, observed)

    def heartbeat(self, host: str, stats: dict[str, Any], guests: list[dict[str, Any]]) -> None:
        self.plane.heartbeat(host, stats, guests)

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
