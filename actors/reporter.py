"""The agents' :class:`~novacron.agents.Reporter` over Ray: fire-and-forget controller calls."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ray

from actors import names


class ControllerReporter:
    """Sends reports to the named controller; the handle survives controller restarts."""

    def __init__(self, namespace: str) -> None:
        self.controller = ray.get_actor(names.CONTROLLER, namespace=namespace)

    def report_vm(self, vm_id: str, epoch: int, observed: Mapping[str, Any]) -> None:
        self.controller.report_vm.remote(vm_id, epoch, dict(observed))

    def heartbeat(self, host: str, stats: Mapping[str, Any],
                  guests: Sequence[Mapping[str, Any]]) -> None:
        self.controller.heartbeat.remote(host, dict(stats), [dict(g) for g in guests])
