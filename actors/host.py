"""HostActor: one per host, on its node. Wraps a :class:`~novacron.agents.HostAgent` and beats."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from actors.reporter import ControllerReporter
from novacron.agents import HostAgent, make_driver

log = logging.getLogger("novacron.actors.host")


class HostActor:
    """Samples its host and guests every ``heartbeat_interval_s`` and reports to the controller."""

    def __init__(self, host: dict[str, Any], namespace: str, state_dir: str,
                 heartbeat_interval_s: float) -> None:
        self.agent = HostAgent(host["name"], make_driver(host, state_dir),
                               ControllerReporter(namespace))
        self.interval = heartbeat_interval_s
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="heartbeat", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.agent.beat()
            except Exception:
                log.exception("host %s: heartbeat failed", self.agent.host)
            self._stop.wait(self.interval)

    def info(self) -> dict[str, Any]:
        return self.agent.info()

    def pid(self) -> int:
        """This actor's process id (tests use it to see a restart)."""
        return os.getpid()

    def stop(self) -> None:
        """Stop beating (before the actor is killed on purpose)."""
        self._stop.set()
