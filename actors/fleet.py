"""The control plane's :class:`~novacron.controlplane.Fleet` over Ray actors."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError

from actors import names, options
from actors.host import HostActor
from actors.migration import MigrationActor
from actors.vm import VMActor
from novacron.agents import HostAgent, make_driver
from novacron.errors import NovaCronError, OperationTimeout, Unavailable
from novacron.model import VM, Host

log = logging.getLogger("novacron.actors.fleet")
_NODE_CACHE_S = 30.0
_CALL_TIMEOUT_S = 300.0
_PREFLIGHT_TIMEOUT_S = 60.0
_NAME_RELEASE_S = 10.0


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


def _wait(ref: Any, agent: str, method: str, timeout_s: float) -> Any:
    """The result of an agent's call: its NovaCron error raised as such, OperationTimeout
    when late, Unavailable when the agent's actor is gone."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except RayTaskError as exc:
        if isinstance(exc.cause, NovaCronError):
            raise exc.cause from None
        raise
    except GetTimeoutError as exc:
        raise OperationTimeout(f"{agent} did not finish {method} within {timeout_s:g} s"
                               ) from exc
    except (ActorDiedError, ActorUnavailableError) as exc:
        raise Unavailable(f"{agent} is not available for {method}") from exc


class RayFleet:
    """Creates, finds and calls HostActors and VMActors (detached, named, pinned to nodes).

    Asking a VM to converge returns at once: creating its actor takes a round trip to Ray's GCS,
    so one dispatcher thread does it, in order, off the caller's path.
    """

    def __init__(self, namespace: str, state_dir: str, *, heartbeat_interval_s: float,
                 stop_timeout_s: float) -> None:
        self._dispatch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="novacron-fleet")
        self.namespace = namespace
        self.state_dir = state_dir
        self.heartbeat_interval_s = heartbeat_interval_s
        self.stop_timeout_s = stop_timeout_s
        self._vm_actors: dict[str, Any] = {}
        self._host_nodes: set[str] = set()
        self._nodes_read_at = -_NODE_CACHE_S
        self._host_actor_cls: Any = ray.remote(HostActor)
        self._vm_actor_cls: Any = ray.remote(VMActor)
        self._migration_actor_cls: Any = ray.remote(MigrationActor)
        self._probe: Any = ray.remote(_probe)

    @staticmethod
    def _record(host: Host) -> dict[str, Any]:
        return host.model_dump(mode="json")

    def _node_of(self, host: str) -> str | None:
        """None when a Ray node advertises ``host``'s resource; else the controller's node (a
        logical host, such as the embedded default's simulated ones, lives beside it). Cached
        for a while: listing Ray's nodes is a round trip to the GCS."""
        now = time.monotonic()
        if now - self._nodes_read_at > _NODE_CACHE_S:
            alive = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
            self._host_nodes = {r for n in alive for r in n.get("Resources", {})
                                if r.startswith(names.HOST_RESOURCE_PREFIX)}
            self._nodes_read_at = now
        if names.host_resource(host) in self._host_nodes:
            return None
        node_id: str = ray.get_runtime_context().get_node_id()
        return node_id

    def probe_host(self, host: Host) -> dict[str, Any]:
        opts = options.probe_options(host.name, self._node_of(host.name))
        info: dict[str, Any] = ray.get(self._probe.options(**opts).remote(
            self._record(host), self.state_dir))
        return info

    def start_host(self, host: Host) -> None:
        self._host_actor(host)

    def _host_actor(self, host: Host) -> Any:
        """The host's actor, created if it does not run."""
        opts = options.host_options(self.namespace, host.name, self._node_of(host.name))
        return self._host_actor_cls.options(**opts).remote(
            self._record(host), self.namespace, self.state_dir, self.heartbeat_interval_s)

    def preflight_vm(self, vm: VM, host: Host) -> None:
        ref = self._host_actor(host).preflight.remote(vm.model_dump(mode="json"))
        _wait(ref, f"host {host.name}'s agent", "preflight", _PREFLIGHT_TIMEOUT_S)

    def stop_host(self, name: str) -> None:
        try:
            actor = ray.get_actor(names.host_actor(name), namespace=self.namespace)
        except ValueError:
            return
        try:  # let it stop beating and close its hypervisor connection first
            ray.get(actor.stop.remote(), timeout=10)
        except Exception:
            log.warning("host %s: its agent did not stop cleanly; killing it", name)
        ray.kill(actor, no_restart=True)

    def converge_vm(self, vm: VM, host: Host) -> None:
        try:
            self._dispatch.submit(self._send_converge, vm, host)
        except RuntimeError:  # shutting down: the next controller converges it
            log.debug("VM %s: not converged, the fleet is shutting down", vm.id)

    def _send_converge(self, vm: VM, host: Host) -> None:
        try:
            self._actor_of(vm, host).converge.remote(vm.model_dump(mode="json"))
        except Exception:
            log.exception("could not reach the agent of VM %s", vm.id)

    def _actor_of(self, vm: VM, host: Host) -> Any:
        actor: Any = self._vm_actors.get(vm.id)
        if actor is None:
            opts = options.vm_options(self.namespace, vm.id, host.name, self._node_of(host.name))
            actor = self._vm_actor_cls.options(**opts).remote(
                vm.id, self._record(host), self.namespace, self.state_dir, self.stop_timeout_s)
            self._vm_actors[vm.id] = actor
        return actor

    def call_vm(self, vm: VM, host: Host, method: str, *args: Any) -> Any:
        ref = getattr(self._actor_of(vm, host), method).remote(*args)
        return _wait(ref, f"VM {vm.id}'s agent", method, _CALL_TIMEOUT_S)

    def forget_vm(self, vm_id: str) -> None:
        try:
            self._dispatch.submit(self._kill_vm_actor, vm_id)
        except RuntimeError:  # shutting down: shutdown() kills every VM actor itself
            log.debug("VM %s: agent left to the shutdown", vm_id)

    def _kill_vm_actor(self, vm_id: str) -> None:
        """Kill the VM's actor and wait (briefly) for its name to be free: a migrated VM's
        next actor, on its new host, takes the same name."""
        name = names.vm_actor(vm_id)
        actor = self._vm_actors.pop(vm_id, None)
        if actor is None:
            try:
                actor = ray.get_actor(name, namespace=self.namespace)
            except ValueError:
                return
        ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + _NAME_RELEASE_S
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=self.namespace)
            except ValueError:
                return
            time.sleep(0.02)
        log.warning("the name of VM %s's killed actor was not released", vm_id)

    def run_migration(self, migration_id: str, source: str) -> None:
        opts = options.migration_options(self.namespace, migration_id, source,
                                         self._node_of(source))
        self._migration_actor_cls.options(**opts).remote(migration_id, self.namespace,
                                                         self.state_dir)

    def forget_migration(self, migration_id: str) -> None:
        """Kill a finished migration's actor, a second later: after the call that ended it has
        returned and its run has logged the end."""
        threading.Timer(1.0, self._kill_migration_actor, args=(migration_id,)).start()

    def _kill_migration_actor(self, migration_id: str) -> None:
        try:
            actor = ray.get_actor(names.migration_actor(migration_id), namespace=self.namespace)
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
        self._dispatch.shutdown(wait=True)
        for vm_id in vm_ids:
            self._kill_vm_actor(vm_id)
        for host in hosts:
            self.stop_host(host)
        return stopped
