"""Live migration between two libvirt hosts, done by libvirt itself.

The source's libvirtd migrates the guest peer-to-peer to the target's (reached at the target's
``migration_uri``, see :func:`novacron.drivers.libvirt.migration_uri`), persistent there and
undefined here, while this run polls the job's statistics for progress
(:mod:`novacron.migration.jobstats`) and watches for a cancel, the timeouts and a
force-complete. When the target sees the guest's disks too (shared storage, found with a probe
file as Nova does) only the memory moves; otherwise every disk is copied first
(copy-storage-all).

Policy: ``max_downtime_ms`` and ``bandwidth_mib_s`` go to libvirt; ``compress`` is QEMU's
multi-threaded compression and ``xbzrle`` its page-delta cache; ``auto_converge`` lets QEMU
throttle the guest's vCPUs; ``parallel`` opens that many connections (multifd);
``post_copy`` switches to post-copy once the first full memory pass did not converge (as Nova
does), or on force-complete. Without post-copy a force-complete pauses the guest so that the
rest goes at once.

Phases: syncing-disk until memory starts to move (disks are copied first), precopy, then
stop-and-copy once the source guest is paused for the last pass (or runs on the target in
post-copy), switchover when it is on the target. A cancel (or a timeout) aborts the job and
the guest keeps running on the source; if libvirt finished first, the migration completes. A
restarted run finds out what libvirt did before anything else: a job still running is watched
to its end; then the guest either runs on the target (roll forward) or on the source (it is
migrated again, within the first run's deadline).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from actors.migration.run import POLL_S, P, Run, Stop
from novacron.drivers.base import GuestInfo
from novacron.drivers.libvirt import LibvirtDriver, migration_uri
from novacron.errors import InvalidTransition, NotFound, NotSupported, NovaCronError
from novacron.migration.jobstats import completed_stats, job_outcome, job_progress
from novacron.states import VMState

log = logging.getLogger("novacron.actors.migration.libvirt")

_ACTIVE = (VMState.RUNNING, VMState.PAUSED, VMState.MIGRATING)


class LibvirtRun(Run):
    """Live migration between two libvirt hosts through libvirt's peer-to-peer migration."""

    modes = frozenset({"live"})
    src: LibvirtDriver
    dst: LibvirtDriver

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dest_uri: str | None = None
        self.unreachable: NovaCronError | None = None
        try:
            self.dest_uri = migration_uri(self.target_host.uri, self.target_host.config)
        except NovaCronError as exc:
            self.unreachable = exc  # the run fails with it; nothing may touch self.dst
        if self.dest_uri is not None and self.dest_uri != self.target_host.uri:
            self.dst.close()  # reach the target as the source's libvirtd does
            self.dst = LibvirtDriver(self.target_host.name, self.dest_uri,
                                     self.target_host.config, Path(self.state_dir))
            self.dst.connect()
        self.shared: bool | None = self.m.checkpoint.get("shared_storage")
        self.volumes: list[str] = list(self.m.checkpoint.get("volumes", []))  # disk paths
        self.stats: Mapping[str, Any] = {}  # the job's last statistics seen on the source
        self.thread: threading.Thread | None = None  # running libvirt's migration
        self.post_copy = False  # switched to post-copy (the guest runs on the target)
        self.paused_to_finish = False  # paused for a force-complete

    # -- the path's steps -------------------------------------------------------------------
    def prepare_target(self) -> None:
        """Check that the target is another libvirtd the source can reach, and whether the
        guest's disks are on storage both see (recorded: a resumed run reuses it). Defines
        nothing: libvirt does that when the guest arrives."""
        if self.unreachable is not None:
            raise self.unreachable
        assert self.dest_uri is not None
        if self.src.host_uuid() == self.dst.host_uuid():
            self.unreachable = NotSupported(
                f"hosts {self.m.source} and {self.m.target} are the same libvirtd",
                details={"dest_uri": self.dest_uri})
            raise self.unreachable
        if self.shared is None and self._where() == "source":
            self.shared = self.src.storage_shared_with(self.vm.id, self.dest_uri)
            self.volumes = [v.path for v in self.src.guest_volumes(self.vm.id)]
            self.save(checkpoint={"dest_uri": self.dest_uri, "shared_storage": self.shared,
                                  "volumes": self.volumes})
            log.info("migration %s: %s storage to %s", self.id,
                     "shared" if self.shared else "copying the disks of local", self.dest_uri)

    def transfer(self) -> None:
        resumed = not self.enter(P.SYNCING_DISK)  # from here on libvirt may be migrating
        self._watch_running_job()  # a restarted run: an earlier run's job may still run
        where = self._where()
        if where == "source":
            if resumed:
                self.outcome["migrated_again"] = True  # the earlier run's job ended unfinished
            self._migrate()
        elif where == "target" and resumed and not self.outcome.get("reattached"):
            self.outcome["found_on_target"] = True  # libvirt finished while no run watched
        elif where != "target":
            raise Stop(P.FAILED, f"the guest is {where}; NovaCron leaves it as it is")
        self.enter(P.STOP_AND_COPY)
        self._record_outcome()

    def start_on_target(self, epoch: int, desired: str) -> GuestInfo:
        """The guest already runs there: record the new epoch in its metadata (``start`` of an
        active guest only does that) and leave it as ``desired`` says."""
        info = self.dst.start(self.vm.id, epoch)
        if info.state == VMState.PAUSED and desired == "running":
            info = self.dst.resume(self.vm.id)  # paused for a force-complete
        elif info.state == VMState.RUNNING and desired == "paused":
            info = self.dst.pause(self.vm.id)
        return info

    def restore_source(self, desired: str) -> None:
        """The guest stayed on the source: make sure it runs (a force-complete or an aborted
        last pass may have left it paused)."""
        try:
            info = self.src.get(self.vm.id)
        except NotFound:
            log.error("migration %s: the guest is on neither host after the rollback", self.id)
            return
        if info.state in (VMState.PAUSED, VMState.MIGRATING) and desired == "running":
            self.src.resume(self.vm.id)

    def settle(self) -> bool:
        """Abort libvirt's job (again and again, until it ends: it may be just starting) and
        say whether the guest ended up on the target all the same."""
        if self.unreachable is not None:
            return False
        while (self.thread is not None and self.thread.is_alive()) or self._job_active():
            try:
                if self.src.abort_job(self.vm.id):
                    log.info("migration %s: aborted libvirt's job", self.id)
            except NovaCronError as exc:  # in post-copy: it can only finish
                log.info("migration %s: cannot abort libvirt's job: %s", self.id, exc.message)
            time.sleep(POLL_S / 2)
        return self._where() == "target"

    def destroy(self, driver: Any) -> None:
        """Remove what is left of the guest on one side: its definition, and its disks unless
        they are the shared ones the other side uses; on the target also the disk copies an
        interrupted copy-storage migration left. A guest that is active there is stopped only
        if the other side runs it too: NovaCron never stops the only copy."""
        if driver is self.dst and self.unreachable is not None:
            return  # self.dst may be the source's own libvirtd
        other = self.src if driver is self.dst else self.dst
        keep_disks = self.shared is not False
        try:
            info = driver.get(self.vm.id)
        except NotFound:
            if driver is self.dst and not keep_disks:
                for path in self.volumes:
                    self._quietly(lambda p=path: self.dst.delete_volume_path(p))
            return
        except NovaCronError as exc:
            log.warning("migration %s: could not clean %s: %s", self.id, driver.host,
                        exc.message)
            return
        if info.state in _ACTIVE:
            if self._state(other) not in _ACTIVE:
                log.error("migration %s: the guest is active on %s and not on %s; leaving it",
                          self.id, driver.host, other.host)
                return
            self._quietly(lambda: driver.stop(self.vm.id, force=True))
        self._quietly(lambda: driver.undefine(self.vm.id, delete_storage=not keep_disks))

    # -- the migration ----------------------------------------------------------------------
    def _migrate(self) -> None:
        """Run libvirt's migration on a thread and watch it; back once the guest runs on the
        target. A Stop (cancel, timeout) leaves the job to :meth:`settle`."""
        assert self.dest_uri is not None
        policy = self.m.policy
        compression = [m for m, on in (("mt", policy.compress), ("xbzrle", policy.xbzrle)) if on]
        outcome: dict[str, BaseException] = {}

        def migrate() -> None:
            try:
                self.src.migrate_live(
                    self.vm.id, str(self.dest_uri), copy_storage=not self.shared,
                    compression=compression, parallel=policy.parallel,
                    auto_converge=policy.auto_converge, post_copy=policy.post_copy,
                    bandwidth_mib_s=(math.ceil(policy.bandwidth_mib_s)
                                     if policy.bandwidth_mib_s else None),
                    max_downtime_ms=policy.max_downtime_ms, allow_unsafe=bool(self.shared))
            except BaseException as exc:
                outcome["error"] = exc

        log.info("migration %s: libvirt migrates %s to %s", self.id, self.vm.id, self.dest_uri)
        self.thread = threading.Thread(target=migrate, name=f"libvirt-migrate-{self.id}",
                                       daemon=True)
        self.thread.start()
        while self.thread.is_alive():
            self.thread.join(POLL_S / 2)
            self._step()
        error = outcome.get("error")
        if error is not None:
            if isinstance(error, NovaCronError) and self._where() == "target":
                log.warning("migration %s: libvirt reported %s, yet the guest runs on the "
                            "target", self.id, error.message)
                return
            raise error

    def _watch_running_job(self) -> None:
        """Follow a migration job an earlier run started (libvirt carries on without it) to
        its end."""
        if not self._job_active():
            return
        log.info("migration %s: re-attached to libvirt's running migration job", self.id)
        self.outcome["reattached"] = True
        while self._job_active():
            self._step()
            time.sleep(POLL_S / 2)

    def _step(self) -> None:
        """One look at the job: progress, phase, post-copy or force-complete; a Stop for a
        cancel or a timeout."""
        try:
            stats = self.src.job_stats(self.vm.id)
        except NovaCronError:  # the guest left the source (undefined there) meanwhile
            self.poll()
            return
        if not stats.active:
            self.poll()
            return
        self.stats = stats.raw
        step = job_progress(stats.raw)
        if step.phase == "precopy":
            self.enter(P.PRECOPY)
        if self._source_paused():
            self.enter(P.PRECOPY)
            self.enter(P.STOP_AND_COPY)
        policy = self.m.policy
        if policy.post_copy and not self.post_copy and (step.iteration >= 2
                                                        or self.m.force_complete):
            self._start_post_copy(step.iteration)
        elif self.m.force_complete and not policy.post_copy and not self.paused_to_finish:
            log.info("migration %s: forced to complete: pausing the guest", self.id)
            self.paused_to_finish = True
            self._quietly(lambda: self.src.pause(self.vm.id))
        self.report(step.percent, bytes_sent=step.bytes_sent,
                    bytes_remaining=step.bytes_remaining, rate=step.rate,
                    dirty_rate=step.dirty_rate, iteration=step.iteration, eta_s=step.eta_s,
                    throttle_pct=step.throttle_pct)

    def _start_post_copy(self, iteration: int) -> None:
        try:
            self.src.start_post_copy(self.vm.id)
        except NovaCronError as exc:  # not ready yet (still in setup): the next step retries
            log.info("migration %s: post-copy not started yet: %s", self.id, exc.message)
            return
        self.post_copy = True
        log.info("migration %s: switched to post-copy after %d memory pass(es)", self.id,
                 iteration)

    def _record_outcome(self) -> None:
        """The completed job's figures, as the target's libvirtd measured them (QEMU's
        downtime among them); the last ones seen on the source when it has none."""
        try:
            done = self.dst.job_stats(self.vm.id, completed=True)
            measured = (completed_stats(done.raw, self.stats, disks_copied=not self.shared)
                        if done.type == "completed" else self.stats)
        except NovaCronError as exc:
            log.warning("migration %s: no completed job statistics: %s", self.id, exc.message)
            measured = self.stats
        figures = job_outcome(measured)
        if "bytes_sent" in figures:
            self.report(97.0, bytes_sent=figures["bytes_sent"], bytes_remaining=0, eta_s=0.0)
        self.outcome.update(figures)
        self.outcome.update(shared_storage=self.shared,
                            disks_copied=0 if self.shared else len(self.volumes),
                            post_copy=self.post_copy,
                            paused_to_finish=self.paused_to_finish, dest_uri=self.dest_uri)
        self.save(outcome=self.outcome)

    # -- where the guest is -----------------------------------------------------------------
    def _where(self) -> str:
        """``source`` or ``target`` (where the guest is active, or else defined), or a
        description of anything else."""
        here, there = self._state(self.src), self._state(self.dst)
        if there in _ACTIVE and here not in _ACTIVE:
            return "target"
        if here in _ACTIVE and there is None:
            return "source"
        if here is not None and there is None:
            return "source"  # stopped on the source: migrate_live says why it cannot move
        if here is None and there is not None:
            return "target"
        if here is None:
            return "on neither host"
        return (f"on both hosts ({here.value if here else '-'} on {self.m.source}, "
                f"{there.value if there else '-'} on {self.m.target})")

    def _state(self, driver: LibvirtDriver) -> VMState | None:
        if driver is self.dst and self.unreachable is not None:
            return None
        try:
            return driver.get(self.vm.id).state
        except NotFound:
            return None

    def _job_active(self) -> bool:
        """Whether the source guest has a job running (not if it is shut off, or gone)."""
        try:
            return self.src.job_stats(self.vm.id).active
        except (NotFound, InvalidTransition):
            return False

    def _source_paused(self) -> bool:
        """Whether the source guest is paused by the migration (its last pass, or post-copy)."""
        try:
            info = self.src.get(self.vm.id)
        except NovaCronError:
            return False
        return info.reason in ("paused:migration", "paused:postcopy") or self.post_copy

    def _quietly(self, action: Any) -> None:
        try:
            action()
        except NovaCronError as exc:
            if exc.code != "not_found":
                log.warning("migration %s: %s", self.id, exc.message)
