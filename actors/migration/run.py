"""What every migration run shares, whatever moves its bytes: admission, phases, progress,
cancel and timeouts, the switchover and the rollback.

A :class:`Run` reads its migration's record (through the controller) and carries on from the
phase it finds, so a restarted MigrationActor resumes. Subclasses (one per path, see
:mod:`actors.migration`) implement :meth:`Run.transfer`, :meth:`Run.start_on_target` and
:meth:`Run.restore_source`; each step they take must be idempotent.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from typing import Any, ClassVar

import ray

from actors import names
from novacron import migrations as rules
from novacron.agents import guest_config, make_driver
from novacron.drivers.base import Driver, GuestInfo
from novacron.errors import NovaCronError, OperationTimeout
from novacron.migration.throttle import TokenBucket
from novacron.model import VM, Host, Migration
from novacron.states import MIGRATION_DONE, MigrationPhase

log = logging.getLogger("novacron.actors.migration")

P = MigrationPhase
_ORDER = [P.PENDING, P.PREPARING, P.SYNCING_DISK, P.PRECOPY, P.STOP_AND_COPY, P.SWITCHOVER]
POLL_S = 0.25  # how often the record is re-read for a cancel, and progress written
MIB = 1024**2


class Stop(Exception):
    """Ends the run before the switchover: roll back, as ``phase`` says, for ``reason``."""

    def __init__(self, phase: MigrationPhase, reason: str) -> None:
        super().__init__(reason)
        self.phase = phase
        self.reason = reason


class Run:
    """One pass of a migration's state machine from the phase its record holds."""

    modes: ClassVar[frozenset[str]] = frozenset()  # the modes this path implements

    def __init__(self, migration_id: str, controller: Any, state_dir: str,
                 context: dict[str, Any]) -> None:
        self.id = migration_id
        self.controller = controller
        self.state_dir = state_dir
        self.m = Migration.model_validate(context["migration"])
        self.vm = VM.model_validate(context["vm"])
        self.source_host = Host.model_validate(context["source"])
        self.target_host = Host.model_validate(context["target"])
        self.src: Driver = make_driver(self.source_host.model_dump(mode="json"), state_dir)
        self.dst: Driver = make_driver(self.target_host.model_dump(mode="json"), state_dir)
        self.progress = self.m.progress
        self.bucket = (TokenBucket(self.m.policy.bandwidth_mib_s * MIB)
                       if self.m.policy.bandwidth_mib_s else None)
        self.started = time.monotonic()
        self.deadline = self.started + rules.completion_timeout_s(self.vm)
        if self.m.started_at is not None:  # a restarted run keeps the first run's deadline
            self.deadline -= max(0.0, time.time() - self.m.started_at)
        self.last_progress = self.started
        self.last_poll = 0.0
        self.downtime_from: float | None = None  # when the guest stopped running on the source
        self.vm_at_pause: VM | None = None  # the VM's record, read just before that
        self.save_times: deque[float] = deque(maxlen=5)  # how long the last writes took
        self.outcome: dict[str, Any] = {}  # totals the path adds to the final outcome
        self.target_image: str | None = None  # the VM's image on the target, if the path made one

    # -- plumbing ---------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(getattr(self.controller, method).remote(*args, **kwargs))

    def enter(self, phase: MigrationPhase, **fields: Any) -> bool:
        """Checkpoint ``phase`` (and other ``fields`` of :meth:`save`, in the same write); False
        if the record is past it already (a resumed run)."""
        if _ORDER.index(self.m.phase) >= _ORDER.index(phase):
            return self.m.phase == phase
        self.save(phase=phase, **fields)
        return True

    def save(self, **fields: Any) -> None:
        """Write ``fields`` (phase, progress, checkpoint, outcome) to the record; re-read it."""
        started = time.monotonic()
        data: dict[str, Any] = self._call("migration_update", self.id, **fields)
        self.save_times.append(time.monotonic() - started)
        self.m = Migration.model_validate(data)

    @property
    def checkpoint_s(self) -> float:
        """What a write to the record usually takes: the median of the last few (0 before
        any), so that a single slow one does not count."""
        return statistics.median(self.save_times) if self.save_times else 0.0

    def report(self, percent: float, **values: Any) -> None:
        """Update the progress; written to the record at most every ``POLL_S``, and checks
        for a cancel and the timeouts then."""
        old = self.progress
        self.progress = self.progress.model_copy(update={"percent": percent, **values})
        now = time.monotonic()
        if (self.progress.bytes_sent > old.bytes_sent or self.progress.percent > old.percent
                or self.progress.iteration > old.iteration):
            self.last_progress = now
        if now - self.last_poll >= POLL_S:
            self.last_poll = now
            self.save(progress=self.progress)
            self.check(now)

    def check(self, now: float) -> None:
        """Stop for a cancel request, the completion timeout or the no-progress timeout."""
        if self.m.cancel_requested:
            raise Stop(P.ROLLED_BACK, "cancelled")
        if now > self.deadline:
            raise Stop(P.FAILED, str(OperationTimeout(
                f"not done within {rules.completion_timeout_s(self.vm):.0f} s "
                f"({rules.TIMEOUT_S_PER_GIB:.0f} s per GiB)")))
        if now - self.last_progress > rules.NO_PROGRESS_TIMEOUT_S:
            raise Stop(P.FAILED, f"no progress for {rules.NO_PROGRESS_TIMEOUT_S:.0f} s")

    def poll(self) -> None:
        """Save the progress and check for a cancel or a timeout, moving nothing."""
        self.report(self.progress.percent)

    def read_vm(self) -> VM:
        """The VM's record as the controller holds it now."""
        return VM.model_validate(self._call("migration_context", self.id)["vm"])

    def forced(self) -> bool:
        """Whether a user asked to force the migration to complete."""
        self.save()
        return self.m.force_complete

    def node_of(self, host: Host) -> str:
        """The Ray node a host's files live on (a logical host lives on this actor's node)."""
        resource = names.host_resource(host.name)
        for node in ray.nodes():  # type: ignore[no-untyped-call]
            if node.get("Alive") and resource in node.get("Resources", {}):
                return str(node["NodeID"])
        node_id: str = ray.get_runtime_context().get_node_id()
        return node_id

    # -- what a path implements -------------------------------------------------------------
    def prepare_target(self) -> None:
        """Make the target ready to receive (by default: define the guest there)."""
        self.dst.define(guest_config(self.vm.model_dump(mode="json")))

    def transfer(self) -> None:
        """Move everything up to the switchover; on return the source is stopped or paused
        (or, for a path whose hypervisor switches over itself, already gone)."""
        raise NotImplementedError

    def start_on_target(self, epoch: int, desired: str) -> GuestInfo:
        """Run the guest on the target with ``epoch`` (or leave it stopped if ``desired``
        says so) and say what it is now."""
        raise NotImplementedError

    def restore_source(self, desired: str) -> None:
        """After a rollback: leave the source guest as it was before the migration."""
        raise NotImplementedError

    def settle(self) -> bool:
        """Before a rollback: end what the hypervisor may still be doing for this migration,
        and say whether the guest ended up running on the target anyway (a hypervisor that
        switches over by itself may have finished first): then the run rolls forward instead.
        By default there is nothing to end and the guest is on the source."""
        return False

    def destroy_target(self) -> None:
        """After a rollback: remove the guest from the target (by default with ``dst``)."""
        self.destroy(self.dst)

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> None:
        """Run to the end: completed, or rolled back / failed with the VM on its source."""
        if self.m.phase in MIGRATION_DONE:
            return
        try:
            if self.m.phase == P.CANCELLING or (
                    self.m.cancel_requested and self.m.phase != P.SWITCHOVER):
                raise Stop(P.ROLLED_BACK, "cancelled")
            if self.m.phase != P.SWITCHOVER:
                self._admit()
                self.prepare_target()
                self.report(2.0)
                self.transfer()
            self._switchover()
        except Stop as stop:
            self._rollback(stop.phase, stop.reason)
        except NovaCronError as exc:
            self._rollback(P.FAILED, exc.message)
        except Exception as exc:
            log.exception("migration %s failed", self.id)
            self._rollback(P.FAILED, f"{type(exc).__name__}: {exc}")

    def _admit(self) -> None:
        while not self._call("migration_admit", self.id):
            time.sleep(POLL_S)  # queued behind the cluster's or the source's limit
            self.deadline += POLL_S  # the clocks start once it runs
            self.last_progress = time.monotonic()
            self.save()
            self.poll()
        self.save()
        self.enter(P.PREPARING)

    def _switchover(self) -> None:
        # Entered only once everything was copied, with the source stopped or paused: a
        # restarted run in this phase rolls forward (starting on the target is idempotent).
        # Within the downtime: one write (the phase, with the progress and outcome so far) and
        # the start; the VM's record was read before the pause (a resumed run reads it now).
        self.enter(P.SWITCHOVER, progress=self.progress, outcome=self.outcome)
        record = self.vm_at_pause or self.read_vm()
        epoch = record.epoch + (0 if record.host == self.m.target else 1)
        running = time.monotonic()
        if record.host != self.m.target:
            info = self.start_on_target(epoch, record.desired.value)
            running = time.monotonic()  # the downtime ends as the guest runs on the target
            self._call("migration_switch", self.id, info.state.value, info.guest_id,
                       image=self.target_image)
        downtime_ms = (None if self.downtime_from is None
                       else (running - self.downtime_from) * 1000)
        self.destroy(self.src)
        outcome = {"total_s": round(time.monotonic() - self.started, 3),
                   "bytes": self.progress.bytes_sent, "epoch": epoch,
                   "memory_bytes": self.vm.spec.memory_mib * MIB, **self.outcome}
        if downtime_ms is not None:
            outcome["downtime_ms"] = round(downtime_ms, 1)
        self.progress = self.progress.model_copy(update={"percent": 100.0, "eta_s": 0.0,
                                                         "bytes_remaining": 0})
        self.save(progress=self.progress)
        self._call("migration_end", self.id, P.COMPLETED.value, None, outcome)
        log.info("migration %s completed: %s", self.id, outcome)

    def destroy(self, driver: Driver) -> None:
        """Stop and undefine the guest on one side (its storage too); errors are logged."""
        try:
            driver.stop(self.vm.id, force=True)
            driver.undefine(self.vm.id, delete_storage=True)
        except NovaCronError as exc:
            if exc.code != "not_found":
                log.warning("migration %s: could not clean %s: %s", self.id, driver.host,
                            exc.message)

    def _landed(self) -> bool:
        """:meth:`settle`, if the record still has the VM on its source and the phase allows
        going on to the switchover; False when that cannot be told."""
        record = VM.model_validate(self._call("migration_context", self.id)["vm"])
        self.save()
        if record.host == self.m.target or self.m.phase not in _ORDER[1:-1]:
            return False
        try:
            return self.settle()
        except NovaCronError as exc:
            log.warning("migration %s: cannot tell where the guest is: %s", self.id,
                        exc.message)
            return False

    def _rollback(self, phase: MigrationPhase, reason: str) -> None:
        """Give the VM back to its source: clean the target, restore the source guest."""
        log.warning("migration %s: rolling back (%s)", self.id, reason)
        if self._landed():
            log.warning("migration %s: too late to roll back (%s): the guest runs on the "
                        "target; completing", self.id, reason)
            self.outcome["stopped_late"] = reason
            self.save()
            if self.m.phase == P.PREPARING:
                self.enter(P.SYNCING_DISK)
            if self.m.phase == P.PRECOPY:
                self.enter(P.STOP_AND_COPY)
            self._switchover()
            return
        current = Migration.model_validate(self._call("migration_context", self.id)["migration"])
        if phase == P.ROLLED_BACK and current.phase != P.CANCELLING:
            self._call("migration_update", self.id, phase=P.CANCELLING)
        record = VM.model_validate(self._call("migration_context", self.id)["vm"])
        if record.host == self.m.target:  # switched over already: there is nothing to undo
            self.destroy(self.src)
            self._call("migration_end", self.id, P.COMPLETED.value, None, {})
            return
        self.destroy_target()
        try:
            self.restore_source(record.desired.value)
        except NovaCronError as exc:
            log.warning("migration %s: source guest: %s", self.id, exc.message)
        self._call("migration_end", self.id, phase.value, reason, {})

