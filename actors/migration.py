"""MigrationActor: one per migration, named ``mig:<id>``; moves a sim guest to another host.

Every phase is checkpointed in the migration's record through the controller, so a restarted
actor re-reads the record and carries on from the phase it finds; each step is idempotent (a
define, a delta sync, a full first pre-copy pass). Before the switchover a cancel, a timeout or an
error rolls back: the target is cleaned and the VM stays (or is started again) on its source.
The switchover starts the target guest with epoch + 1, then moves the record in one commit; from
then on the source's reports and starts are fenced off, and the source guest is destroyed.

Cold: stop the guest, delta-sync its disk image, start it on the target. Warm: delta-sync the
disk while the guest runs (up to three passes), then stop it, sync the rest and start it on the
target (memory is not moved: the guest boots again). Live: delta-sync the
disk while the guest runs, pre-copy its memory pass after pass (first every page ever written,
then the pages dirtied meanwhile, from the guest's write generations) until the rest fits the
downtime limit at the measured rate (``novacron.migration.precopy.decide``, with auto-converge
throttling the guest as an option), then pause it, copy the last dirty pages, the generations,
the control header and the disk delta, and start it ``--incoming`` on the target.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np
import ray

from actors import names
from actors.sync_tasks import sync_file
from novacron import migrations as rules
from novacron.agents import guest_config, make_driver
from novacron.drivers.sim import SimDriver, dirty_pages, read_generations
from novacron.errors import NotSupported, NovaCronError, OperationTimeout
from novacron.migration.delta import SyncCheckpoint, SyncReport
from novacron.migration.pages import PAGE_SIZE, copy_pages, memory_digest
from novacron.migration.precopy import Action, PassReport, PrecopyState, decide
from novacron.migration.throttle import TokenBucket
from novacron.model import VM, Host, Migration
from novacron.states import MIGRATION_DONE, MigrationPhase, VMState

log = logging.getLogger("novacron.actors.migration")

_P = MigrationPhase
_ORDER = [_P.PENDING, _P.PREPARING, _P.SYNCING_DISK, _P.PRECOPY, _P.STOP_AND_COPY, _P.SWITCHOVER]
_POLL_S = 0.25  # how often the record is re-read for a cancel, and progress written
_MIB = 1024**2
_WARM_PASSES = 3  # disk passes of a warm migration while the guest runs
_WARM_REST = 4 * _MIB  # a pass that sent less leaves a rest small enough to stop for


class _Stop(Exception):
    """Ends the run before the switchover: roll back, as ``phase`` says, for ``reason``."""

    def __init__(self, phase: MigrationPhase, reason: str) -> None:
        super().__init__(reason)
        self.phase = phase
        self.reason = reason


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
        try:
            _Run(self.migration_id, self.controller, self.state_dir).run()
        except Exception:
            log.exception("migration %s: the run failed", self.migration_id)


class _Run:
    """One pass of the migration's state machine from the phase its record holds."""

    def __init__(self, migration_id: str, controller: Any, state_dir: str) -> None:
        self.id = migration_id
        self.controller = controller
        self.state_dir = state_dir
        ctx: dict[str, Any] = self._call("migration_context", migration_id)
        self.m = Migration.model_validate(ctx["migration"])
        self.vm = VM.model_validate(ctx["vm"])
        self.source_host = Host.model_validate(ctx["source"])
        self.target_host = Host.model_validate(ctx["target"])
        self.src = self._driver(self.source_host)
        self.dst = self._driver(self.target_host)
        self.progress = self.m.progress
        self.bucket = (TokenBucket(self.m.policy.bandwidth_mib_s * _MIB)
                       if self.m.policy.bandwidth_mib_s else None)
        self.started = time.monotonic()
        self.deadline = self.started + rules.completion_timeout_s(self.vm)
        if self.m.started_at is not None:  # a restarted run keeps the first run's deadline
            self.deadline -= max(0.0, time.time() - self.m.started_at)
        self.last_progress = self.started
        self.last_poll = 0.0
        self.disk_bytes = 0
        self.disk_digest: str | None = None
        self.downtime_from: float | None = None  # when the guest stopped running on the source
        self.disk_written: int | None = None  # the guest's disk byte counter when a sync began

    # -- plumbing ---------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(getattr(self.controller, method).remote(*args, **kwargs))

    def _driver(self, host: Host) -> SimDriver:
        driver = make_driver(host.model_dump(mode="json"), self.state_dir)
        if not isinstance(driver, SimDriver):
            raise NotSupported(f"host {host.name} uses the {host.driver} driver; migrations "
                               "run between sim hosts only")
        return driver

    def _enter(self, phase: MigrationPhase) -> bool:
        """Checkpoint ``phase``; False if the record is past it already (a resumed run)."""
        if _ORDER.index(self.m.phase) >= _ORDER.index(phase):
            return self.m.phase == phase
        self._save(phase=phase)
        return True

    def _save(self, **fields: Any) -> None:
        data: dict[str, Any] = self._call("migration_update", self.id, **fields)
        self.m = Migration.model_validate(data)

    def _report(self, percent: float, **values: Any) -> None:
        """Update the progress; written to the record at most every ``_POLL_S``, and checks
        for a cancel and the timeouts then."""
        old = self.progress
        self.progress = self.progress.model_copy(update={"percent": percent, **values})
        now = time.monotonic()
        if (self.progress.bytes_sent > old.bytes_sent or self.progress.percent > old.percent
                or self.progress.iteration > old.iteration):
            self.last_progress = now
        if now - self.last_poll >= _POLL_S:
            self.last_poll = now
            self._save(progress=self.progress)
            self._check(now)

    def _check(self, now: float) -> None:
        if self.m.cancel_requested:
            raise _Stop(_P.ROLLED_BACK, "cancelled")
        if now > self.deadline:
            raise _Stop(_P.FAILED, str(OperationTimeout(
                f"not done within {rules.completion_timeout_s(self.vm):.0f} s "
                f"({rules.TIMEOUT_S_PER_GIB:.0f} s per GiB)")))
        if now - self.last_progress > rules.NO_PROGRESS_TIMEOUT_S:
            raise _Stop(_P.FAILED, f"no progress for {rules.NO_PROGRESS_TIMEOUT_S:.0f} s")

    def _poll(self) -> None:
        self._report(self.progress.percent)

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> None:
        if self.m.phase in MIGRATION_DONE:
            return
        try:
            if self.m.phase == _P.CANCELLING or (
                    self.m.cancel_requested and self.m.phase != _P.SWITCHOVER):
                raise _Stop(_P.ROLLED_BACK, "cancelled")
            if self.m.phase != _P.SWITCHOVER:
                self._prepare()
                {"cold": self._cold, "warm": self._warm, "live": self._live}[self.m.mode]()
            self._switchover()
        except _Stop as stop:
            self._rollback(stop.phase, stop.reason)
        except NovaCronError as exc:
            self._rollback(_P.FAILED, exc.message)
        except Exception as exc:
            log.exception("migration %s failed", self.id)
            self._rollback(_P.FAILED, f"{type(exc).__name__}: {exc}")

    def _prepare(self) -> None:
        while not self._call("migration_admit", self.id):
            time.sleep(_POLL_S)  # queued behind the cluster's or the source's limit
            self.deadline += _POLL_S  # the clocks start once it runs
            self.last_progress = time.monotonic()
            self._save()
            self._poll()
        self._save()
        self._enter(_P.PREPARING)
        if self.m.mode == "live" and self._node(self.source_host) != self._node(self.target_host):
            raise NotSupported("live migration between two Ray nodes needs a page stream, "
                               "which is not implemented; use cold")
        self.dst.define(guest_config(self.vm.model_dump(mode="json")))
        self._report(2.0)

    def _node(self, host: Host) -> str:
        """The Ray node a host's files live on (a logical host lives on this actor's node)."""
        resource = names.host_resource(host.name)
        for node in ray.nodes():  # type: ignore[no-untyped-call]
            if node.get("Alive") and resource in node.get("Resources", {}):
                return str(node["NodeID"])
        node_id: str = ray.get_runtime_context().get_node_id()
        return node_id

    def _sync_disk(self, low: float, high: float) -> SyncReport:
        """Delta-sync the disk image to the target, progress moving from ``low`` to ``high``."""
        src = self.src.memory_paths(self.vm.id).disk
        dst = self.dst.memory_paths(self.vm.id).disk
        nodes = {str(h.name): self._node(h) for h in (self.source_host, self.target_host)}

        def on_checkpoint(state: SyncCheckpoint) -> None:
            share = len(state.done) / max(1, state.geometry.n_ranges)
            self._report(low + (high - low) * share,
                         bytes_remaining=int(state.geometry.image_size * (1 - share)))

        report = sync_file(src, dst, parallelism=1, source_host=self.source_host.name,
                           target_host=self.target_host.name, host_nodes=nodes,
                           bandwidth_cap=self.bucket.rate if self.bucket else None,
                           on_checkpoint=on_checkpoint, durable=False)
        self.disk_bytes += report.bytes_sent
        self.disk_digest = report.image_digest
        self._report(high, bytes_sent=self.progress.bytes_sent + report.bytes_sent)
        return report

    def _cold(self) -> None:
        self._enter(_P.SYNCING_DISK)
        self._stop_and_sync(5.0, 95.0)

    def _stop_and_sync(self, low: float, high: float) -> None:
        """Stop the guest on the source (its downtime starts) and sync its whole disk."""
        self.downtime_from = time.monotonic()
        if self.src.get(self.vm.id).state != VMState.STOPPED:
            self.src.stop(self.vm.id, timeout_s=30.0)
        report = self._sync_disk(low, high)
        if not report.verified:
            raise _Stop(_P.FAILED, "the disk image changed while the guest was stopped")
        self._save(checkpoint={"disk_digest": report.image_digest})

    def _warm(self) -> None:
        if self._enter(_P.SYNCING_DISK):
            for n in range(_WARM_PASSES):  # while it runs: each pass sends what it wrote since
                report = self._sync_disk(5.0 + 20.0 * n, 25.0 + 20.0 * n)
                if report.bytes_sent < _WARM_REST:
                    break
        self._enter(_P.STOP_AND_COPY)
        self._stop_and_sync(85.0, 97.0)

    def _live(self) -> None:
        if self._enter(_P.SYNCING_DISK):
            self.disk_written = self.src.read_status(self.vm.id).disk_bytes_written
            self._sync_disk(3.0, 25.0)
        self._enter(_P.PRECOPY)
        src_paths = self.src.memory_paths(self.vm.id)
        dst_paths = self.dst.prepare_incoming(self.vm.id)
        policy = rules.precopy_policy(self.m.policy)
        state = PrecopyState()
        before = read_generations(src_paths.generations)
        pages = np.flatnonzero(before)
        total = max(1, len(pages))
        sent = self.progress.bytes_sent

        def counted(nbytes: int) -> None:
            nonlocal sent
            sent += nbytes
            self._report(self.progress.percent, bytes_sent=sent)

        while True:
            result = copy_pages(src_paths.memory, dst_paths.memory, pages, bucket=self.bucket,
                                on_batch=counted)
            after = read_generations(src_paths.generations)
            dirty = dirty_pages(before, after)
            before = after
            dirty_bytes = len(dirty) * PAGE_SIZE
            rate = result.rate or self.progress.rate or 1.0
            step = decide(policy, state, PassReport(result.bytes, result.seconds, dirty_bytes),
                          device_state_bytes=PAGE_SIZE, bandwidth=rate)
            state = step.state
            converged = 1 - min(1.0, len(dirty) / total)
            self._report(25.0 + 60.0 * converged, iteration=state.passes, rate=rate,
                         dirty_rate=dirty_bytes / max(result.seconds, 1e-3),
                         bytes_remaining=dirty_bytes, eta_s=dirty_bytes / rate,
                         throttle_pct=state.throttle_pct)
            self._check(time.monotonic())
            if step.action == Action.STOP_AND_COPY or self._forced():
                break
            if step.action == Action.ABORT:
                raise _Stop(_P.FAILED, f"pre-copy did not converge: {step.reason}")
            if step.action == Action.THROTTLE:
                self.src.set_workload(self.vm.id, throttle_pct=float(state.throttle_pct))
                log.info("migration %s: throttled the guest to %d %% (%s)", self.id,
                         state.throttle_pct, step.reason)
            pages = dirty
        self._stop_and_copy(before, dirty, expected_downtime=step.expected_downtime_s)

    def _forced(self) -> bool:
        self._save()
        return self.m.force_complete

    def _stop_and_copy(self, before: Any, pending: Any, *, expected_downtime: float) -> None:
        """Pause the source; copy ``pending`` (dirty, not sent yet) and whatever was written
        since generation snapshot ``before``, then the generations, header and disk delta."""
        self._enter(_P.STOP_AND_COPY)
        src_paths = self.src.memory_paths(self.vm.id)
        dst_paths = self.dst.memory_paths(self.vm.id)
        self.downtime_from = time.monotonic()
        self.src.pause(self.vm.id)  # returns once the guest is frozen
        final = read_generations(src_paths.generations)
        dirty = np.union1d(pending, dirty_pages(before, final))
        result = copy_pages(src_paths.memory, dst_paths.memory, dirty)
        dst_paths.generations.write_bytes(final.tobytes())
        dst_paths.control.write_bytes(src_paths.control.read_bytes())
        written = self.src.read_status(self.vm.id).disk_bytes_written
        if written != self.disk_written:  # it wrote to its disk since the sync began
            self._sync_disk(90.0, 97.0)
        outcome: dict[str, Any] = {"disk_digest": self.disk_digest,
                                   "final_pages": int(result.pages),
                                   "expected_downtime_ms": round(expected_downtime * 1000, 1)}
        if self.m.policy.verify:
            outcome["memory_digest"] = memory_digest(src_paths.memory)
            if memory_digest(dst_paths.memory) != outcome["memory_digest"]:
                raise _Stop(_P.FAILED, "target memory differs from the paused source's")
        self._save(outcome=outcome)
        self._report(97.0, bytes_sent=self.progress.bytes_sent + result.bytes,
                     bytes_remaining=0, eta_s=0.0)

    def _switchover(self) -> None:
        # Entered only once everything was copied, with the source stopped or paused: a
        # restarted run in this phase rolls forward (start_incoming and start are idempotent).
        self._enter(_P.SWITCHOVER)
        record = VM.model_validate(self._call("migration_context", self.id)["vm"])
        epoch = record.epoch + (0 if record.host == self.m.target else 1)
        if record.host != self.m.target:
            if self.m.mode == "live":
                info = self.dst.start_incoming(self.vm.id, epoch)
            elif record.desired.value in ("running", "paused"):
                info = self.dst.start(self.vm.id, epoch)
            else:
                info = self.dst.get(self.vm.id)
            self._call("migration_switch", self.id, info.state.value, info.guest_id)
        downtime_ms = (None if self.downtime_from is None
                       else (time.monotonic() - self.downtime_from) * 1000)
        self._destroy(self.src)
        outcome = {"total_s": round(time.monotonic() - self.started, 3),
                   "bytes": self.progress.bytes_sent, "epoch": epoch,
                   "memory_bytes": self.vm.spec.memory_mib * _MIB,
                   "disk_bytes_sent": self.disk_bytes}
        if downtime_ms is not None:
            outcome["downtime_ms"] = round(downtime_ms, 1)
        self.progress = self.progress.model_copy(update={"percent": 100.0, "eta_s": 0.0,
                                                         "bytes_remaining": 0})
        self._save(progress=self.progress)
        self._call("migration_end", self.id, _P.COMPLETED.value, None, outcome)
        log.info("migration %s completed: %s", self.id, outcome)

    def _destroy(self, driver: SimDriver) -> None:
        """Stop and undefine the guest on one side (its storage too); errors are logged."""
        try:
            driver.stop(self.vm.id, force=True)
            driver.undefine(self.vm.id, delete_storage=True)
        except NovaCronError as exc:
            if exc.code != "not_found":
                log.warning("migration %s: could not clean %s: %s", self.id, driver.host,
                            exc.message)

    def _rollback(self, phase: MigrationPhase, reason: str) -> None:
        """Give the VM back to its source: clean the target, unpause or unthrottle the source."""
        log.warning("migration %s: rolling back (%s)", self.id, reason)
        current = Migration.model_validate(self._call("migration_context", self.id)["migration"])
        if phase == _P.ROLLED_BACK and current.phase != _P.CANCELLING:
            self._call("migration_update", self.id, phase=_P.CANCELLING)
        record = VM.model_validate(self._call("migration_context", self.id)["vm"])
        if record.host == self.m.target:  # switched over already: there is nothing to undo
            self._destroy(self.src)
            self._call("migration_end", self.id, _P.COMPLETED.value, None, {})
            return
        self._destroy(self.dst)
        try:
            info = self.src.get(self.vm.id)
            if info.state in (VMState.RUNNING, VMState.PAUSED):
                self.src.set_workload(self.vm.id, throttle_pct=0.0)
            if info.state == VMState.PAUSED and record.desired.value == "running":
                self.src.resume(self.vm.id)
        except NovaCronError as exc:
            log.warning("migration %s: source guest: %s", self.id, exc.message)
        self._call("migration_end", self.id, phase.value, reason, {})
