"""The target's end of a migration between two sim hosts, where the target's files are.

:class:`SimTarget` does everything that happens on the target host: defining the guest, preparing
its incoming memory, writing page batches into it (a :class:`~novacron.migration.pages.
PageWriter`), the generations and control header at stop-and-copy, starting the guest, and
destroying it on a rollback. When both hosts share a Ray node it runs in the MigrationActor's
process (:class:`LocalTarget`: pages go straight from one mapped file to the other). When the
target is another node it runs in a small actor pinned there (:class:`RemoteTarget`): the
MigrationActor encodes page batches on the source and hands them to it through Ray's object
store, a few in flight, in order (the actor runs one call at a time, in submission order).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Protocol, cast

import ray
from ray import ObjectRef
from ray.exceptions import (
    ActorUnschedulableError,
    GetTimeoutError,
    RayActorError,
    RayTaskError,
)

from actors import options
from novacron.agents import guest_config, make_driver
from novacron.drivers.base import GuestInfo
from novacron.drivers.sim import SimDriver
from novacron.errors import HostUnreachable, NovaCronError, OperationTimeout
from novacron.migration.pages import PageBatch, PageWriter, memory_digest

log = logging.getLogger("novacron.actors.migration.stream")

IN_FLIGHT = 4  # page batches on their way to a remote target at once (~32 MiB)
CALL_TIMEOUT_S = 120.0  # a call to a remote target (a guest boot takes at most 30 s)


class TargetEnd(Protocol):
    """What a migration run asks of its target host."""

    def define(self, vm: dict[str, Any]) -> None: ...
    def prepare_incoming(self) -> None: ...
    def send(self, batch: PageBatch) -> None: ...
    def flush(self) -> None: ...
    def finish(self, generations: bytes, control: bytes) -> None: ...
    def memory_digest(self) -> str: ...
    def start(self, epoch: int, *, incoming: bool) -> GuestInfo: ...
    def get(self) -> GuestInfo: ...
    def destroy(self) -> None: ...
    def close(self) -> None: ...


class SimTarget:
    """The target sim host's side of one VM's migration (on the target's node)."""

    def __init__(self, host: dict[str, Any], state_dir: str, vm_id: str) -> None:
        self.driver = cast(SimDriver, make_driver(host, state_dir))
        self.vm_id = vm_id
        self.writer: PageWriter | None = None

    def define(self, vm: dict[str, Any]) -> None:
        """Define the guest (idempotent)."""
        self.driver.define(guest_config(vm))

    def prepare_incoming(self) -> None:
        """Fresh, zeroed memory files for the incoming guest, mapped for writing."""
        self._close_writer()
        self.driver.prepare_incoming(self.vm_id)
        self.writer = PageWriter(self.driver.memory_paths(self.vm_id).memory)

    def apply(self, batch: PageBatch) -> int:
        """Write a batch of pages into the incoming memory; returns how many it held."""
        if self.writer is None:  # restarted since prepare_incoming: the files are still there
            self.writer = PageWriter(self.driver.memory_paths(self.vm_id).memory)
        return self.writer.apply(batch)

    def finish(self, generations: bytes, control: bytes) -> None:
        """Write the paused source's page generations and control header (stop-and-copy), in
        place: the guest waiting for the handover has both files mapped."""
        paths = self.driver.memory_paths(self.vm_id)
        for path, data in ((paths.generations, generations), (paths.control, control)):
            with open(path, "r+b") as f:
                f.write(data)

    def memory_digest(self) -> str:
        """The digest of the incoming memory."""
        return memory_digest(self.driver.memory_paths(self.vm_id).memory)

    def start(self, epoch: int, *, incoming: bool) -> GuestInfo:
        """Start the guest with ``epoch``: on the migrated memory when ``incoming``. The memory
        stays mapped until :meth:`close`: unmapping a GiB of written pages takes tens of
        milliseconds, which must not lengthen the downtime."""
        if incoming:
            return self.driver.start_incoming(self.vm_id, epoch)
        return self.driver.start(self.vm_id, epoch)

    def get(self) -> GuestInfo:
        return self.driver.get(self.vm_id)

    def destroy(self) -> None:
        """Stop and undefine the guest with its storage (after a rollback); gone is fine."""
        self._close_writer()
        try:
            self.driver.stop(self.vm_id, force=True)
            self.driver.undefine(self.vm_id, delete_storage=True)
        except NovaCronError as exc:
            if exc.code != "not_found":
                raise

    def close(self) -> None:
        self._close_writer()
        self.driver.close()

    def _close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class LocalTarget(SimTarget):
    """A target on this node: batches are written as they come."""

    def send(self, batch: PageBatch) -> None:
        self.apply(batch)

    def flush(self) -> None:
        """Nothing to wait for: every batch was written when sent."""


class RemoteTarget:
    """A :class:`SimTarget` in an actor on the target's Ray node.

    Its errors come back as NovaCron's; an actor that died or cannot be reached becomes
    :class:`~novacron.errors.HostUnreachable`, so the run rolls back.
    """

    def __init__(self, host: dict[str, Any], state_dir: str, vm_id: str, node_id: str) -> None:
        self.host = str(host["name"])
        self.node_id = node_id
        cls: Any = ray.remote(SimTarget)
        self.actor = cls.options(**options.migration_target_options(self.host, node_id)).remote(
            host, state_dir, vm_id)
        self.in_flight: deque[ObjectRef[Any]] = deque()

    def define(self, vm: dict[str, Any]) -> None:
        self._call("define", vm)

    def prepare_incoming(self) -> None:
        self._call("prepare_incoming")

    def send(self, batch: PageBatch) -> None:
        """Hand a batch on (through the object store) once fewer than IN_FLIGHT are on their
        way."""
        while len(self.in_flight) >= IN_FLIGHT:
            self._get(self.in_flight.popleft(), "apply")
        self.in_flight.append(self.actor.apply.remote(batch))

    def flush(self) -> None:
        """Wait until every batch sent is written."""
        while self.in_flight:
            self._get(self.in_flight.popleft(), "apply")

    def finish(self, generations: bytes, control: bytes) -> None:
        self._call("finish", generations, control)

    def memory_digest(self) -> str:
        return cast(str, self._call("memory_digest"))

    def start(self, epoch: int, *, incoming: bool) -> GuestInfo:
        return cast(GuestInfo, self._call("start", epoch, incoming=incoming))

    def get(self) -> GuestInfo:
        return cast(GuestInfo, self._call("get"))

    def destroy(self) -> None:
        self._call("destroy")

    def close(self) -> None:
        """Close the driver and end the actor (an unreachable one is left to Ray)."""
        self.in_flight.clear()
        try:
            self._call("close")
        except NovaCronError as exc:
            log.warning("the migration's end on %s did not close: %s", self.host, exc.message)
        ray.kill(self.actor, no_restart=True)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.flush()  # calls follow the batches sent before them
        return self._get(getattr(self.actor, method).remote(*args, **kwargs), method)

    def _get(self, ref: ObjectRef[Any], method: str) -> Any:
        try:
            return ray.get(ref, timeout=CALL_TIMEOUT_S)
        except RayTaskError as exc:
            if isinstance(exc.cause, NovaCronError):
                raise exc.cause from None
            raise
        except (RayActorError, ActorUnschedulableError) as exc:
            raise HostUnreachable(
                f"the migration's end on host {self.host} (Ray node {self.node_id}) is gone "
                f"during {method}: {exc}", details={"host": self.host}) from None
        except GetTimeoutError:
            raise OperationTimeout(
                f"the migration's end on host {self.host} did not finish {method} within "
                f"{CALL_TIMEOUT_S:g} s", details={"host": self.host}) from None
