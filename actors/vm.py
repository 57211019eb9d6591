"""VMActor: one per VM, on its host's node. Wraps a :class:`~novacron.agents.VMAgent`.

Deliberately lean (no pydantic, no numpy): a fleet runs thousands of these. On (re)start it asks
the controller for the VM's record, re-attaches to the guest (which outlives this process) and
converges.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import ray

from actors.reporter import ControllerReporter
from novacron.agents import VMAgent, make_driver

log = logging.getLogger("novacron.actors.vm")


class VMActor:
    """Drives one VM toward its desired state."""

    def __init__(self, vm_id: str, host: dict[str, Any], namespace: str, state_dir: str,
                 stop_timeout_s: float) -> None:
        reporter = ControllerReporter(namespace)
        self.agent = VMAgent(vm_id, make_driver(host, state_dir), reporter,
                             stop_timeout_s=stop_timeout_s)
        threading.Thread(target=self._rebuild, args=(reporter,), daemon=True).start()

    def _rebuild(self, reporter: ControllerReporter) -> None:
        try:
            ref: Any = reporter.controller.get_vm_record.remote(self.agent.vm_id)
            vm: dict[str, Any] | None = ray.get(ref)
        except Exception:
            log.exception("VM %s: could not read its record", self.agent.vm_id)
            return
        if vm is not None:
            self.agent.converge(vm)

    def converge(self, vm: dict[str, Any]) -> dict[str, Any]:
        return self.agent.converge(vm)

    def observe(self) -> dict[str, Any]:
        return self.agent.observe()

    def snapshot(self, op: str, name: str | None = None) -> Any:
        return self.agent.snapshot(op, name)

    def stop_guest(self) -> bool:
        """Force the guest off (``novacron down --stop-guests``); False if it was not running."""
        return self.agent.power_off()

    def pid(self) -> int:
        """This actor's process id (tests use it to see a restart)."""
        return os.getpid()
