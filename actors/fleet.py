"""The control plane's :class:`~novacron.controlplane.Fleet` over Ray actors."""

from __future__ import annotations

import logging
from typing import Any

import ray

from actors import names, options
from actors.host import HostActor
from actors.vm import VMActor
from novacron.agents import HostAgent, make_driver
from novacron.model import VM, Host

log = logging.getLogger("novacron.actors.fleet")


def _probe(host: dict[str, Any], state_dir: str) -> dict[str, Any]:
    """Runs on the host's node: connect its driver and read its size."""

    class _Silent:
        def report_vm(self, *_: Any) -> None: ...

        def heartbeat(self, *_: Any) -> None: ...

    driver = make_driver(host, state_dir)
    try:
        return HostAgent(host["name"], driver, _Silent()).info()
    finally:
        driver.close()


class RayFleet:
    """Creates, finds and calls HostActors and VMActors (detached, named, pinned to nodes)."""

    def __init__(self, namespace: str, state_dir: str, *, heartbeat_interval_s: float,
                 stop_timeout_s: float) -> None:
        self.namespace = namespace
        self.state_dir = state_dir
        self.heartbeat_interval_s = heartbeat_interval_s
        self.stop_timeout_s = stop_timeout_s
        self._vm_actors: dict[str, Any] = {}
        self._host_actor_cls: Any = ray.remote(HostActor)
        self._vm_actor_cls: Any = ray.remote(VMActor)
        self._probe: Any = ray.remote(_probe)

    @staticmethod
    def _record(host: Host) -> dict[str, Any]:
        return host.model_dump(mode="json")

    def probe_host(self, host: Host) -> dict[str, Any]:
        record = self._record(host)
        if not any(names.host_resource(host.name) in n.get("Resources", {})
                   for n in ray.nodes() if n.get("Alive")):  # type: ignore[no-untyped-call]
            # A logical host (no Ray node of its own): it lives on the controller's node.
            record["node_id"] = ray.get_runtime_context().get_node_id()
        info: dict[str, Any] = ray.get(
            self._probe.options(**options.probe_options(record)).remote(record, self.state_dir))
        return {**info, "node_id": record.get("node_id")}

    def start_host(self, host: Host) -> None:
        record = self._record(host)
        self._host_actor_cls.options(**options.host_options(self.namespace, record)).remote(
            record, self.namespace, self.state_dir, self.heartbeat_interval_s)

    def stop_host(self, name: str) -> None:
        try:
            actor = ray.get_actor(names.host_actor(name), namespace=self.namespace)
        except ValueError:
            return
        ray.kill(actor, no_restart=True)

    def converge_vm(self, vm: VM, host: Host) -> None:
        actor: Any = self._vm_actors.get(vm.id)
        if actor is None:
            record = self._record(host)
            actor = self._vm_actor_cls.options(
                **options.vm_options(self.namespace, vm.id, record)).remote(
                vm.id, record, self.namespace, self.state_dir, self.stop_timeout_s)
            self._vm_actors[vm.id] = actor
        actor.converge.remote(vm.model_dump(mode="json"))

    def forget_vm(self, vm_id: str) -> None:
        actor = self._vm_actors.pop(vm_id, None)
        if actor is None:
            try:
                actor = ray.get_actor(names.vm_actor(vm_id), namespace=self.namespace)
            except ValueError:
                return
        ray.kill(actor, no_restart=True)

    def shutdown(self, vm_ids: list[str], hosts: list[str], *, stop_guests: bool) -> int:
        """Kill every agent actor; guests keep running unless ``stop_guests``. Returns guests
        stopped."""
        stopped = 0
        if stop_guests:
            refs: list[Any] = []
            for vm_id in vm_ids:
                try:
                    actor = ray.get_actor(names.vm_actor(vm_id), namespace=self.namespace)
                except ValueError:
                    continue
                refs.append(actor.stop_guest.remote())
            for ref in refs:
                try:
                    stopped += int(ray.get(ref, timeout=60))
                except Exception:
                    log.exception("could not stop a guest")
        for vm_id in vm_ids:
            self.forget_vm(vm_id)
        for host in hosts:
            self.stop_host(host)
        return stopped
