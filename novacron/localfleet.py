"""A :class:`~novacron.controlplane.Fleet` that runs the agents in this process, on threads.

The same agents and drivers as the Ray actors, without Ray: used by the unit tier to exercise the
control plane and the HTTP routes end to end in milliseconds. Production uses ``actors.fleet``.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from novacron.agents import HostAgent, Reporter, VMAgent, make_driver
from novacron.errors import NotSupported
from novacron.model import VM, Host

log = logging.getLogger("novacron.localfleet")


class LocalFleet:
    """Agents on threads: heartbeats on a timer thread, converges on a small pool."""

    def __init__(self, state_dir: Path, *, heartbeat_interval_s: float = 1.0,
                 stop_timeout_s: float = 30.0) -> None:
        self.state_dir = state_dir
        self.heartbeat_interval_s = heartbeat_interval_s
        self.stop_timeout_s = stop_timeout_s
        self.reporter: Reporter | None = None
        self._hosts: dict[str, HostAgent] = {}
        self._vms: dict[str, VMAgent] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="novacron-vm")
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._beat_loop, name="novacron-heartbeats",
                                       daemon=True)
        self._beats.start()

    def bind(self, reporter: Reporter) -> None:
        """Where agents send reports (the control plane)."""
        self.reporter = reporter

    def _reporter(self) -> Reporter:
        if self.reporter is None:
            raise RuntimeError("LocalFleet.bind() was not called")
        return self.reporter

    def _host_record(self, host: Host) -> dict[str, Any]:
        return host.model_dump(mode="json")

    def probe_host(self, host: Host) -> dict[str, Any]:
        driver = make_driver(self._host_record(host), str(self.state_dir))
        try:
            info = HostAgent(host.name, driver, self._reporter()).info()
        finally:
            driver.close()
        return info

    def start_host(self, host: Host) -> None:
        if host.name not in self._hosts:
            driver = make_driver(self._host_record(host), str(self.state_dir))
            self._hosts[host.name] = HostAgent(host.name, driver, self._reporter())

    def stop_host(self, name: str) -> None:
        agent = self._hosts.pop(name, None)
        if agent is not None:
            agent.driver.close()

    def preflight_vm(self, vm: VM, host: Host) -> None:
        self.start_host(host)
        self._hosts[host.name].preflight(vm.model_dump(mode="json"))

    def _agent(self, vm: VM, host: Host) -> VMAgent:
        agent = self._vms.get(vm.id)
        if agent is None:
            driver = make_driver(self._host_record(host), str(self.state_dir))
            agent = VMAgent(vm.id, driver, self._reporter(), stop_timeout_s=self.stop_timeout_s)
            self._vms[vm.id] = agent
        return agent

    def converge_vm(self, vm: VM, host: Host) -> None:
        self._pool.submit(self._run, self._agent(vm, host), vm.model_dump(mode="json"))

    def call_vm(self, vm: VM, host: Host, method: str, *args: Any) -> Any:
        return getattr(self._agent(vm, host), method)(*args)

    @staticmethod
    def _run(agent: VMAgent, vm: dict[str, Any]) -> None:
        try:
            agent.converge(vm)
        except Exception:
            log.exception("converge of VM %s failed", agent.vm_id)

    def forget_vm(self, vm_id: str) -> None:
        agent = self._vms.pop(vm_id, None)
        if agent is not None:
            agent.driver.close()

    def run_migration(self, migration_id: str, source: str) -> None:
        raise NotSupported("migrations run on the Ray runtime (a MigrationActor each); the "
                           "in-process fleet cannot run them", details={"migration": migration_id})

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            for agent in list(self._hosts.values()):
                try:
                    agent.beat()
                except Exception:
                    log.exception("heartbeat of host %s failed", agent.host)

    def close(self) -> None:
        """Stop the agents (guests keep running)."""
        self._stop.set()
        self._beats.join(timeout=5)
        self._pool.shutdown(wait=True)
        for name in list(self._hosts):
            self.stop_host(name)
        for vm_id in list(self._vms):
            self.forget_vm(vm_id)
