"""MigrationActor: one per migration, named ``mig:<id>``; runs the migration on a thread.

The run's class depends on the pair of drivers (:data:`PATHS`, chosen by
:func:`novacron.migrations.path_for`); :mod:`actors.migration.run` holds what they share.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import ray

from actors import names
from actors.migration.cloud_import import ImportRun
from actors.migration.run import Run
from actors.migration.sim import SimRun
from novacron import migrations as rules
from novacron.errors import NovaCronError
from novacron.states import MigrationPhase

log = logging.getLogger("novacron.actors.migration")

PATHS: dict[str, type[Run]] = {"sim": SimRun, "cloud_import": ImportRun}
try:  # needs libvirt-python; without it no libvirt host can be registered either
    from actors.migration.libvirt import LibvirtRun

    PATHS["libvirt"] = LibvirtRun
except NovaCronError as _missing:  # pragma: no cover - depends on the environment
    log.info("libvirt migrations unavailable: %s", _missing.message)


class MigrationActor:
    """Runs one migration on a thread from its creation (or restart) to its end."""

    def __init__(self, migration_id: str, namespace: str, state_dir: str) -> None:
        self.migration_id = migration_id
        self.state_dir = state_dir
        self.controller = ray.get_actor(names.CONTROLLER, namespace=namespace)
        threading.Thread(target=self._main, name="migration", daemon=True).start()

    def pid(self) -> int:
        """This actor's process id (tests use it to see a restart)."""
        return os.getpid()

    def _main(self) -> None:
        run = self._build()
        if run is None:
            return
        try:
            run.run()
        except Exception:
            log.exception("migration %s: the run failed", self.migration_id)

    def _context(self) -> dict[str, Any]:
        ref: Any = self.controller.migration_context.remote(self.migration_id)
        context: dict[str, Any] = ray.get(ref)
        return context

    def _fail(self, reason: str) -> None:
        ray.get(self.controller.migration_end.remote(
            self.migration_id, MigrationPhase.FAILED.value, reason, {}))

    def _build(self) -> Run | None:
        """The run of this migration's path. A host whose driver cannot connect yet is retried
        with backoff; before the switchover the migration fails after ``NO_PROGRESS_TIMEOUT_S``
        of that (nothing moved yet, or the VM's agent restores its source), at the switchover
        it is retried until the host comes back (the guest may already run on the target)."""
        delay, waited = 1.0, 0.0
        while True:
            context = self._context()
            try:
                path = rules.path_for(context["source"]["driver"], context["target"]["driver"],
                                      context["migration"]["mode"])
            except NovaCronError as exc:  # refused up front, unless the hosts changed since
                self._fail(exc.message)
                return None
            try:
                return PATHS[path](self.migration_id, self.controller, self.state_dir, context)
            except NovaCronError as exc:
                switching = context["migration"]["phase"] == MigrationPhase.SWITCHOVER.value
                if not switching and waited >= rules.NO_PROGRESS_TIMEOUT_S:
                    self._fail(f"cannot reach a host of the migration: {exc.message}")
                    return None
                log.warning("migration %s: cannot start its run (%s); retrying in %.0f s",
                            self.migration_id, exc.message, delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 10.0)
