"""Cold migration from a sim host into a cloud that imports disk images (AWS).

``preparing``: the target must import images (IMAGE_IMPORT), have an instance type for the VM
and, for a VM that should be paused, be able to pause; nothing has stopped yet. ``syncing-disk``:
the guest stops on the source (its downtime starts) and its raw disk image is imported
(:meth:`~novacron.drivers.cloud.CloudDriver.import_disk`: only the blocks holding data are sent,
paced by the bandwidth cap, progress and a cancel check after each); the image id is
checkpointed, so a restarted run does not import again. ``switchover``: the guest is defined on
the target with that image and started if the VM should run, tagged with the new epoch; the VM
record moves there (epoch + 1, its spec naming the image) and only then is the source guest
removed. A rollback (cancel, failure, timeout) removes the target guest and every image imported
for it, and starts the source guest again if the VM should run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from actors.migration.run import P, Run
from novacron.agents import guest_config
from novacron.drivers.base import Capability, Driver, GuestInfo
from novacron.drivers.cloud import CloudDriver, check_vm_id
from novacron.drivers.sim import SimDriver
from novacron.errors import NotSupported, NovaCronError
from novacron.states import PowerState, VMState

log = logging.getLogger("novacron.actors.migration.cloud_import")

_UPLOAD = (5.0, 90.0)  # the share of the progress the upload takes (the rest: stop, register)


class ImportRun(Run):
    """Cold migration of a sim guest into a cloud region, through an image import."""

    modes = frozenset({"cold"})
    src: SimDriver
    dst: CloudDriver

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.target_image = self.m.checkpoint.get("image")
        self.disk_bytes = 0  # sent to the provider by this run
        self._upload_started = 0.0
        self._sent_before = 0  # bytes a run before a restart sent

    def prepare_target(self) -> None:
        """Refuse, before the guest stops, what the target cannot take; the guest is defined
        there only at the switchover, once its image exists."""
        self.dst.require(Capability.IMAGE_IMPORT)
        check_vm_id(self.vm.id)
        if self.vm.desired == PowerState.PAUSED and Capability.PAUSE not in self.dst.capabilities:
            raise NotSupported(
                f"VM {self.vm.name} should be paused, but "
                f"{self.dst.missing_capabilities()[Capability.PAUSE]}; resume or stop it first",
                details={"vm": self.vm.id, "host": self.target_host.name})
        spec = self.vm.spec
        if self.dst.instance_type_label not in spec.labels:
            self.dst.catalogue.cheapest_fit(spec.cpus, spec.memory_mib)  # else NoCapacity

    def transfer(self) -> None:
        self.enter(P.SYNCING_DISK)
        self.downtime_from = time.monotonic()
        if self.src.get(self.vm.id).state != VMState.STOPPED:
            self.src.stop(self.vm.id, timeout_s=30.0)
        self.report(_UPLOAD[0])
        if self.target_image is None:  # else a run before a restart imported it already
            self._upload_started = time.monotonic()
            self._sent_before = self.progress.bytes_sent
            self.target_image = self.dst.import_disk(
                self.vm.id, self.src.memory_paths(self.vm.id).disk,
                name=f"NovaCron VM {self.vm.name} ({self.vm.id})", progress=self._uploaded)
            self.save(checkpoint={"image": self.target_image})
        self.outcome.update(image=self.target_image, disk_bytes_sent=self.disk_bytes)
        self.report(95.0, bytes_remaining=0, eta_s=0.0)

    def _uploaded(self, sent: int, total: int) -> None:
        """Import progress: pace to the bandwidth cap, report, and stop for a cancel."""
        if self.bucket is not None:
            self.bucket.acquire(sent - self.disk_bytes)
        self.disk_bytes = sent
        rate = sent / max(time.monotonic() - self._upload_started, 1e-3)
        share = sent / total if total else 1.0
        self.report(_UPLOAD[0] + (_UPLOAD[1] - _UPLOAD[0]) * share,
                    bytes_sent=self._sent_before + sent,
                    bytes_remaining=total - sent, rate=rate, eta_s=(total - sent) / rate)

    def start_on_target(self, epoch: int, desired: str) -> GuestInfo:
        config = guest_config(self.vm.model_dump(mode="json"))
        self.dst.define(dataclasses.replace(config, image=self.target_image, epoch=epoch))
        if desired == PowerState.RUNNING.value:
            return self.dst.start(self.vm.id, epoch)
        return self.dst.get(self.vm.id)

    def restore_source(self, desired: str) -> None:
        if desired == PowerState.RUNNING.value and \
                self.src.get(self.vm.id).state == VMState.STOPPED:
            self.src.start(self.vm.id, self.vm.epoch)

    def destroy(self, driver: Driver) -> None:
        """On the target, the guest's storage includes every image imported for it."""
        super().destroy(driver)
        if driver is self.dst:
            try:
                self.dst.discard_imports(self.vm.id)
            except NovaCronError as exc:
                log.warning("migration %s: could not remove the images imported into %s: %s",
                            self.id, self.target_host.name, exc.message)
