"""HostActor: one per host, on its node. Wraps a :class:`~novacron.agents.HostAgent`: beats, and
passes on the guest events its driver pushes."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from actors.reporter import ControllerReporter
from novacron.agents import HostAgent, make_driver
from novacron.errors import NovaCronError

log = logging.getLogger("novacron.actors.host")


class HostActor:
    """Samples its host and guests every ``heartbeat_interval_s`` and reports to the controller;
    with an event-pushing driver, also reports each guest change as it happens."""

    def __init__(self, host: dict[str, Any], namespace: str, state_dir: str,
                 heartbeat_interval_s: float) -> None:
        self.agent = HostAgent(host["name"], make_driver(host, state_dir),
                               ControllerReporter(namespace))
        self.interval = heartbeat_interval_s
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._beats.start()
        if self.agent.watch():
            log.info("host %s: watching guest events", self.agent.host)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.agent.beat()
            except NovaCronError as exc:  # e.g. the hypervisor is restarting
                log.warning("host %s: heartbeat failed: %s", self.agent.host, exc.message)
            except Exception:
                log.exception("host %s: heartbeat failed", self.agent.host)
            self._stop.wait(self.interval)

    def info(self) -> dict[str, Any]:
        return self.agent.info()

    def preflight(self, vm: dict[str, Any]) -> None:
        """Raise what creating ``vm`` here would meet (on this node: the host's credentials
        are resolved here)."""
        self.agent.preflight(vm)

    def pid(self) -> int:
        """This actor's process id (tests use it to see a restart)."""
        return os.getpid()

    def stop(self) -> None:
        """Stop beating and watching and close the driver (before the actor is killed on
        purpose). Guests keep running."""
        self._stop.set()
        self._beats.join(timeout=10.0)
        self.agent.close()
