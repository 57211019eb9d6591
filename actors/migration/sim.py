"""Migration between two sim hosts: their guests' memory, generation maps and disks are files.

Cold: stop the guest, delta-sync its disk image, start it on the target. Warm: delta-sync the
disk while the guest runs (up to three passes), then stop it, sync the rest and start it on the
target (memory is not moved: the guest boots again). Live: delta-sync the disk while the guest
runs, then pre-copy its memory pass after pass (first every page ever written, then the pages
dirtied meanwhile, from the guest's write generations), each pass also sending the disk blocks it
wrote meanwhile (:mod:`actors.migration.disk`), until the rest of both fits the downtime limit at
the measured rate (:func:`novacron.migration.precopy.decide`, with auto-converge throttling the
guest as an option); then pause it, copy the last dirty pages and disk blocks, the generations and
the control header, and hand it over to the guest waiting ``--incoming`` on the target.

Pages travel as batches of :mod:`novacron.migration.pages` (zero pages as bare indices; with
``policy.compress`` zstd, with ``policy.xbzrle`` deltas for pages sent again) to the target's end
(:mod:`actors.migration.stream`): in this process when both hosts share a Ray node, else in an
actor on the target's node, through the object store. Every target-side step (define, start,
destroy) runs there too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from actors.migration.disk import block_writer, disk_digests
from actors.migration.run import MIB, P, Run, Stop
from actors.migration.stream import LocalTarget, RemoteTarget, TargetEnd
from actors.options import placement
from actors.sync_tasks import sync_file
from novacron import migrations as rules
from novacron.drivers.base import GuestInfo
from novacron.drivers.sim import SimDriver, dirty_pages, read_generations
from novacron.errors import NotSupported, NovaCronError
from novacron.migration.codecs import choose_zstd_level
from novacron.migration.delta import SyncCheckpoint, SyncReport
from novacron.migration.diskblocks import DiskMirror
from novacron.migration.pages import PAGE_SIZE, PageReader, PassResult, memory_digest, send_pages
from novacron.migration.precopy import Action, PassReport, PrecopyState, decide
from novacron.states import VMState

log = logging.getLogger("novacron.actors.migration.sim")

_WARM_PASSES = 3  # disk passes of a warm migration while the guest runs
_WARM_REST = 4 * MIB  # a pass that sent less leaves a rest small enough to stop for
# Downtime that freezing the source and handing the guest over on the target take besides the
# checkpoint between them (2-8 ms measured by benchmarks/live_migration.py on two shared cores).
_PAUSE_AND_HANDOVER_S = 0.005


class SimRun(Run):
    """Cold, warm and live migration between two sim hosts."""

    modes = frozenset({"cold", "warm", "live"})
    src: SimDriver
    dst: SimDriver

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.disk_bytes = 0
        self._target: TargetEnd | None = None
        self.reader: PageReader | None = None  # the source memory, while pages are sent
        self.memory_wire = 0  # bytes the memory pages took on the wire, all passes
        self.zero_pages = 0  # pages sent as bare indices

    @property
    def target(self) -> TargetEnd:
        """The target's end: in this process on a shared node, else an actor on the target's."""
        if self._target is None:
            host = self.target_host.model_dump(mode="json")
            node = self.node_of(self.target_host)
            if node == self.node_of(self.source_host):
                self._target = LocalTarget(host, self.state_dir, self.vm.id)
            else:
                self._target = RemoteTarget(host, self.state_dir, self.vm.id, node)
        return self._target

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.reader is not None:
                self.reader.close()
            if self._target is not None:
                self._target.close()

    def prepare_target(self) -> None:
        self.target.define(self.vm.model_dump(mode="json"))

    def transfer(self) -> None:
        {"cold": self._cold, "warm": self._warm, "live": self._live}[self.m.mode]()
        self.outcome["disk_bytes_sent"] = self.disk_bytes

    def start_on_target(self, epoch: int, desired: str) -> GuestInfo:
        if self.m.mode == "live":
            started = time.monotonic()
            info = self.target.start(epoch, incoming=True)
            self.outcome["handover_ms"] = round((time.monotonic() - started) * 1000, 1)
            return info
        if desired in ("running", "paused"):
            return self.target.start(epoch, incoming=False)
        return self.target.get()

    def destroy_target(self) -> None:
        try:
            self.target.destroy()
        except NovaCronError as exc:
            log.warning("migration %s: could not clean %s: %s", self.id, self.target_host.name,
                        exc.message)

    def restore_source(self, desired: str) -> None:
        info = self.src.get(self.vm.id)
        if info.state in (VMState.RUNNING, VMState.PAUSED):
            self.src.set_workload(self.vm.id, throttle_pct=0.0)
        if info.state == VMState.PAUSED and desired == "running":
            self.src.resume(self.vm.id)

    def _sync_disk(self, low: float, high: float) -> SyncReport:
        """Delta-sync the disk image to the target, progress moving from ``low`` to ``high``."""
        src = self.src.memory_paths(self.vm.id).disk
        dst = self.dst.memory_paths(self.vm.id, must_exist=False).disk  # on the target's node
        nodes = {str(h.name): self.node_of(h) for h in (self.source_host, self.target_host)}

        def on_checkpoint(state: SyncCheckpoint) -> None:
            share = len(state.done) / max(1, state.geometry.n_ranges)
            self.report(low + (high - low) * share,
                         bytes_remaining=int(state.geometry.image_size * (1 - share)))

        report = sync_file(src, dst, parallelism=1, source_host=self.source_host.name,
                           target_host=self.target_host.name, host_nodes=nodes,
                           bandwidth_cap=self.bucket.rate if self.bucket else None,
                           on_checkpoint=on_checkpoint, durable=False)
        self.disk_bytes += report.bytes_sent
        self.report(high, bytes_sent=self.progress.bytes_sent + report.bytes_sent)
        return report

    def _cold(self) -> None:
        self.enter(P.SYNCING_DISK)
        self._stop_and_sync(5.0, 95.0)

    def _stop_and_sync(self, low: float, high: float) -> None:
        """Stop the guest on the source (its downtime starts) and sync its whole disk."""
        self.downtime_from = time.monotonic()
        if self.src.get(self.vm.id).state != VMState.STOPPED:
            self.src.stop(self.vm.id, timeout_s=30.0)
        report = self._sync_disk(low, high)
        if not report.verified:
            raise Stop(P.FAILED, "the disk image changed while the guest was stopped")
        self.save(checkpoint={"disk_digest": report.image_digest})

    def _warm(self) -> None:
        if self.enter(P.SYNCING_DISK):
            for n in range(_WARM_PASSES):  # while it runs: each pass sends what it wrote since
                report = self._sync_disk(5.0 + 20.0 * n, 25.0 + 20.0 * n)
                if report.bytes_sent < _WARM_REST:
                    break
        self.enter(P.STOP_AND_COPY)
        self._stop_and_sync(85.0, 97.0)

    def _mirror_disk(self) -> DiskMirror:
        """Copy the disk while the guest runs, following its writes from just before. A resumed
        run copies it again (what was written since the last run's snapshot is unknown); the
        delta sync then moves only what differs."""
        src = self.src.memory_paths(self.vm.id)
        if not src.disk_generations.exists():
            raise NotSupported(f"guest {self.vm.id} runs without disk write generations (it "
                               "was started by an older NovaCron); restart it to migrate it "
                               "live, or use cold or warm")
        node = self.node_of(self.target_host)
        write = block_writer(self.dst.memory_paths(self.vm.id, must_exist=False).disk,
                             placement(self.target_host.name, node),
                             local=node == self.node_of(self.source_host))
        mirror = DiskMirror(src.disk, src.disk_generations, write, self.bucket)
        self._sync_disk(3.0, 25.0)
        mirror.collect()  # written during the sync: sent with the first pass of memory
        return mirror

    def _live(self) -> None:
        self.enter(P.SYNCING_DISK)
        mirror = self._mirror_disk()
        self.enter(P.PRECOPY)
        src_paths = self.src.memory_paths(self.vm.id)
        self.target.prepare_incoming()
        policy = rules.precopy_policy(self.m.policy)
        state = PrecopyState()
        before = read_generations(src_paths.generations)
        pages = np.flatnonzero(before)
        total = max(1, len(pages))
        sent = self.progress.bytes_sent

        def counted(nbytes: int) -> None:
            nonlocal sent
            sent += nbytes
            self.report(self.progress.percent, bytes_sent=sent)

        while True:
            result = self._send(pages, resend=state.passes > 0, on_batch=counted)
            disk = mirror.send(on_batch=counted)
            after = read_generations(src_paths.generations)
            dirty = dirty_pages(before, after)
            before = after
            dirty_bytes = len(dirty) * PAGE_SIZE
            disk_dirty = mirror.collect()
            rate = result.rate or self.progress.rate or 1.0
            disk_rate = self.bucket.rate if self.bucket else rate  # blocks go uncompressed
            step = decide(policy, state, PassReport(result.bytes + disk.bytes,
                                                    result.seconds + disk.seconds, dirty_bytes,
                                                    disk_bytes_dirty=disk_dirty),
                          device_state_bytes=after.nbytes + PAGE_SIZE, bandwidth=rate,
                          disk_bandwidth=disk_rate,
                          switchover_s=self.checkpoint_s + _PAUSE_AND_HANDOVER_S)
            state = step.state
            converged = 1 - min(1.0, len(dirty) / total)
            self.report(25.0 + 60.0 * converged, iteration=state.passes, rate=rate,
                         dirty_rate=dirty_bytes / max(result.seconds, 1e-3),
                         bytes_remaining=dirty_bytes + disk_dirty,
                         eta_s=(dirty_bytes + disk_dirty) / rate,
                         throttle_pct=state.throttle_pct)
            self.check(time.monotonic())
            if step.action == Action.STOP_AND_COPY or self.forced():
                break
            if step.action == Action.ABORT:
                raise Stop(P.FAILED, f"pre-copy did not converge: {step.reason}")
            if step.action == Action.THROTTLE:
                self.src.set_workload(self.vm.id, throttle_pct=float(state.throttle_pct))
                log.info("migration %s: throttled the guest to %d %% (%s)", self.id,
                         state.throttle_pct, step.reason)
            pages = dirty
        self._stop_and_copy(before, dirty, mirror, expected_downtime=step.expected_downtime_s)

    def _stop_and_copy(self, before: Any, pending: Any, mirror: DiskMirror, *,
                       expected_downtime: float) -> None:
        """Pause the source; copy ``pending`` (dirty, not sent yet) and whatever was written
        since generation snapshot ``before``, then the generations, header and the disk blocks
        written since the last pass."""
        self.enter(P.STOP_AND_COPY)
        src_paths = self.src.memory_paths(self.vm.id)
        self.vm_at_pause = self.read_vm()
        self.downtime_from = time.monotonic()
        self.src.pause(self.vm.id)  # returns once the guest is frozen
        final = read_generations(src_paths.generations)
        dirty = dirty_pages(before, final, pending=pending)
        result = self._send(dirty, resend=True)
        self.target.finish(final.tobytes(), src_paths.control.read_bytes())
        disk = mirror.finish()
        self.disk_bytes += mirror.bytes_sent
        outcome: dict[str, Any] = {"final_pages": int(result.pages),
                                   "final_disk_blocks": disk.blocks,
                                   "expected_downtime_ms": round(expected_downtime * 1000, 1),
                                   "memory_bytes_sent": self.memory_wire,
                                   "zero_pages": self.zero_pages}
        if self.m.policy.verify:
            outcome["memory_digest"] = memory_digest(src_paths.memory)
            if self.target.memory_digest() != outcome["memory_digest"]:
                raise Stop(P.FAILED, "target memory differs from the paused source's")
            source_disk, target_disk = disk_digests(
                src_paths.disk, self.dst.memory_paths(self.vm.id, must_exist=False).disk,
                placement(self.target_host.name, self.node_of(self.target_host)))
            if target_disk != source_disk:
                raise Stop(P.FAILED, "target disk differs from the paused source's")
            outcome["disk_digest"] = source_disk
        outcome["stop_and_copy_ms"] = round((time.monotonic() - self.downtime_from) * 1000, 1)
        self.outcome.update(outcome)  # saved with the switchover, in the same write
        self.progress = self.progress.model_copy(update={
            "percent": 97.0, "bytes_remaining": 0, "eta_s": 0.0,
            "bytes_sent": self.progress.bytes_sent + result.wire_bytes + disk.wire_bytes})

    def _send(self, pages: Any, *, resend: bool,
              on_batch: Callable[[int], None] | None = None) -> PassResult:
        """One pass of pages to the target (``resend``: they were sent before), paced by the
        bandwidth cap on the bytes they take on the wire."""
        if self.reader is None:
            policy = self.m.policy
            self.reader = PageReader(
                self.src.memory_paths(self.vm.id).memory, compress=policy.compress,
                xbzrle=policy.xbzrle,
                level=choose_zstd_level(self.bucket.rate if self.bucket else None),
                elide_zero=isinstance(self.target, RemoteTarget))
        target = self.target
        result = send_pages(self.reader, pages, target.send, resend=resend, bucket=self.bucket,
                            on_batch=on_batch, flush=target.flush)
        self.memory_wire += result.wire_bytes
        self.zero_pages += result.zero_pages
        return result

