"""The driver-script API: ``nc = novacron.connect(); vm = nc.vms.create(...)``.

Attaches to the running cluster with ``ray.init(address=...)`` and calls the controller actor;
returns typed records (:class:`~novacron.model.VM`, :class:`~novacron.model.Host`) wrapped in
handles that act on them. Errors are NovaCron's own exceptions, unwrapped from Ray's.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError

from novacron.access import Caller
from novacron.config import find_token
from novacron.errors import (
    NotFound,
    NovaCronError,
    OperationTimeout,
    Unauthenticated,
    Unavailable,
)
from novacron.model import (
    VM,
    Host,
    HostCreate,
    Migration,
    MigrationCreate,
    MigrationPolicy,
    MigrationProgress,
    Resources,
    VMCreate,
)
from novacron.states import MIGRATION_DONE, HostState, MigrationPhase, VMState

log = logging.getLogger("novacron.client")
CONTROLLER = "controller"  # actors.names.CONTROLLER; the client does not import actors/


class _Controller:
    """Calls to the controller actor with this connection's token, Ray's errors turned into
    NovaCron's."""

    def __init__(self, handle: Any, token: str | None, timeout_s: float) -> None:
        self.handle = handle
        self.token = token
        self.timeout_s = timeout_s

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.token is None:
            raise Unauthenticated("no API token: set NOVACRON_TOKEN, or pass token= (the admin "
                                  "token is in <state dir>/admin.token)")
        caller = Caller.with_token(self.token)
        try:
            return ray.get(self.handle.call.remote(method, caller, *args, **kwargs),
                           timeout=self.timeout_s)
        except RayTaskError as exc:
            if isinstance(exc.cause, NovaCronError):
                raise exc.cause from None
            raise
        except GetTimeoutError as exc:
            raise OperationTimeout(f"the controller did not answer {method} within "
                                   f"{self.timeout_s:g} s") from exc
        except (ActorDiedError, ActorUnavailableError) as exc:
            raise Unavailable("the NovaCron controller is not available") from exc


class VMHandle:
    """A VM record and the actions on it. ``record`` is the state last fetched."""

    def __init__(self, call: _Controller, record: VM) -> None:
        self._call = call
        self.record = record

    def __repr__(self) -> str:
        r = self.record
        return f"<VM {r.name} {r.id} {r.state.value} on {r.host}>"

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def state(self) -> VMState:
        return self.record.state

    @property
    def host(self) -> str | None:
        return self.record.host

    def refresh(self) -> VMHandle:
        """Fetch the current record."""
        self.record = self._call("get_vm", self.record.id)
        return self

    def _act(self, action: str, force: bool = False) -> VMHandle:
        self.record = self._call("vm_action", self.record.id, action, force=force)
        return self

    def start(self) -> VMHandle:
        return self._act("start")

    def stop(self, *, force: bool = False) -> VMHandle:
        return self._act("stop", force)

    def reboot(self) -> VMHandle:
        return self._act("reboot")

    def pause(self) -> VMHandle:
        return self._act("pause")

    def resume(self) -> VMHandle:
        return self._act("resume")

    def delete(self) -> VMHandle:
        self.record = self._call("delete_vm", self.record.id)
        return self

    def snapshot(self, name: str) -> dict[str, Any]:
        """Take a snapshot (drivers with the snapshot capability)."""
        result: dict[str, Any] = self._call("snapshot", self.record.id, "create", name)
        return result

    def snapshots(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("snapshot", self.record.id, "list")
        return result

    def revert(self, name: str) -> VMHandle:
        """Return the VM to snapshot ``name``."""
        self._call("snapshot", self.record.id, "revert", name)
        return self.refresh()

    def delete_snapshot(self, name: str) -> None:
        self._call("snapshot", self.record.id, "delete", name)

    def wait_for(self, state: VMState | str, timeout: float = 60.0,
                 poll_s: float = 0.2) -> VMHandle:
        """Wait until the VM is in ``state`` (``deleted`` waits for it to be gone)."""
        target = VMState(state)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.refresh()
            except NotFound:
                if target == VMState.DELETED:
                    self.record = self.record.model_copy(update={"state": VMState.DELETED})
                    return self
                raise
            if self.record.state == target:
                return self
            if time.monotonic() >= deadline:
                raise OperationTimeout(
                    f"VM {self.record.name} is {self.record.state.value}, not {target.value}, "
                    f"after {timeout:g} s" + (f" (last error: {self.record.last_error})"
                                              if self.record.last_error else ""),
                    details={"vm": self.record.id, "state": self.record.state.value})
            time.sleep(poll_s)


class VMs:
    """``nc.vms``: create, find and list VMs."""

    def __init__(self, call: _Controller) -> None:
        self._call = call

    def create(self, name: str, *, cpus: int, memory_mib: int, disk_gib: int = 1,
               image: str | None = None, labels: dict[str, str] | None = None,
               host: str | None = None, start: bool = True, **extra: Any) -> VMHandle:
        """Create (and by default start) a VM; returns at once, see ``wait_for``."""
        req = VMCreate(name=name, cpus=cpus, memory_mib=memory_mib, disk_gib=disk_gib,
                       image=image, labels=labels or {}, host=host, start=start, **extra)
        return VMHandle(self._call, self._call("create_vm", req))

    def get(self, ref: str) -> VMHandle:
        """A VM by id or name."""
        return VMHandle(self._call, self._call("get_vm", ref))

    def list(self, *, host: str | None = None) -> list[VMHandle]:
        return [VMHandle(self._call, vm) for vm in self._call("list_vms", host)]


class Hosts:
    """``nc.hosts``: register and inspect hosts."""

    def __init__(self, call: _Controller) -> None:
        self._call = call

    def register(self, name: str, *, driver: str = "sim", uri: str | None = None,
                 capacity: dict[str, Any] | None = None, labels: dict[str, str] | None = None,
                 config: dict[str, Any] | None = None) -> Host:
        req = HostCreate(name=name, driver=driver, uri=uri,
                         capacity=Resources(**capacity) if capacity else None,
                         labels=labels or {}, config=config or {})
        host: Host = self._call("register_host", req)
        return host

    def get(self, name: str) -> Host:
        host: Host = self._call("get_host", name)
        return host

    def list(self) -> list[Host]:
        hosts: list[Host] = self._call("list_hosts")
        return hosts

    def maintenance(self, name: str) -> Host:
        host: Host = self._call("set_host_state", name, HostState.MAINTENANCE)
        return host

    def activate(self, name: str) -> Host:
        host: Host = self._call("set_host_state", name, HostState.UP)
        return host

    def drain(self, name: str) -> Host:
        """Start moving every VM off host ``name`` (idempotent); see ``wait_drained``."""
        host: Host = self._call("drain_host", name)
        return host

    def cancel_drain(self, name: str) -> Host:
        """Stop the drain: its migrations roll back and the host is up again."""
        host: Host = self._call("cancel_drain", name)
        return host

    def wait_drained(self, name: str, timeout: float = 300.0, poll_s: float = 0.25) -> Host:
        """Wait until host ``name``'s drain has ended (completed or cancelled); the host."""
        deadline = time.monotonic() + timeout
        while True:
            host = self.get(name)
            drain = host.drain
            if drain is None or not drain.active:
                return host
            if time.monotonic() >= deadline:
                raise OperationTimeout(f"the drain of host {name} is still {drain.state.value} "
                                       f"after {timeout:g} s: {drain.message}",
                                       details={"host": name, "drain": drain.state.value})
            time.sleep(poll_s)

    def delete(self, name: str) -> None:
        self._call("delete_host", name)


class MigrationHandle:
    """A migration: its record, progress, and cancel / force-complete / wait."""

    def __init__(self, call: _Controller, record: Migration) -> None:
        self._call = call
        self.record = record

    def __repr__(self) -> str:
        r = self.record
        return f"<Migration {r.id} {r.mode} {r.source}->{r.target} {r.phase.value}>"

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def phase(self) -> MigrationPhase:
        return self.record.phase

    def refresh(self) -> MigrationHandle:
        self.record = self._call("get_migration", self.record.id)
        return self

    def progress(self) -> MigrationProgress:
        """The latest progress (percent, bytes sent and remaining, rate, ETA, iteration)."""
        return self.refresh().record.progress

    def cancel(self) -> MigrationHandle:
        """Roll back: the VM stays on its source and the target is cleaned."""
        self.record = self._call("migration_action", self.record.id, "cancel")
        return self

    def force_complete(self) -> MigrationHandle:
        """Switch a live migration over at its next pass, whatever the downtime."""
        self.record = self._call("migration_action", self.record.id, "force-complete")
        return self

    def wait(self, timeout: float = 300.0, poll_s: float = 0.2) -> MigrationHandle:
        """Wait until the migration has ended (completed, rolled back or failed)."""
        deadline = time.monotonic() + timeout
        while self.refresh().record.phase not in MIGRATION_DONE:
            if time.monotonic() >= deadline:
                raise OperationTimeout(f"migration {self.record.id} is still "
                                       f"{self.record.phase.value} after {timeout:g} s",
                                       details={"migration": self.record.id})
            time.sleep(poll_s)
        return self


class Migrations:
    """``nc.migrations``: start, find and list migrations."""

    def __init__(self, call: _Controller) -> None:
        self._call = call

    def start(self, vm: str, *, to: str, mode: str = "live",
              policy: MigrationPolicy | dict[str, Any] | None = None) -> MigrationHandle:
        """Start moving ``vm`` (id or name) to host ``to``; returns at once, see ``wait``."""
        req = MigrationCreate.model_validate({"vm": vm, "target_host": to, "mode": mode,
                                              "policy": policy or {}})
        return MigrationHandle(self._call, self._call("create_migration", req))

    def predict(self, vm: str, *, to: str, mode: str = "live",
                policy: MigrationPolicy | dict[str, Any] | None = None) -> dict[str, Any]:
        """The cost model's prediction (passes, bytes, duration, downtime); nothing moves."""
        req = MigrationCreate.model_validate({"vm": vm, "target_host": to, "mode": mode,
                                              "policy": policy or {}, "dry_run": True})
        record: Migration = self._call("create_migration", req)
        return record.prediction

    def get(self, migration_id: str) -> MigrationHandle:
        return MigrationHandle(self._call, self._call("get_migration", migration_id))

    def list(self) -> list[MigrationHandle]:
        return [MigrationHandle(self._call, m) for m in self._call("list_migrations")]


class NovaCron:
    """A connection to a running NovaCron cluster."""

    def __init__(self, controller: Any, *, token: str | None, timeout_s: float = 60.0) -> None:
        self._call = _Controller(controller, token, timeout_s)
        self.vms = VMs(self._call)
        self.hosts = Hosts(self._call)
        self.migrations = Migrations(self._call)

    def status(self) -> dict[str, Any]:
        """Counts of the hosts and VMs the caller may see, and the store's revision."""
        status: dict[str, Any] = self._call("status")
        return status

    def rebalance(self, *, apply: bool = False) -> dict[str, Any]:
        """The rebalancer's proposed moves with reasons; with ``apply`` they start."""
        result: dict[str, Any] = self._call("rebalance", not apply)
        return result

    def whoami(self) -> dict[str, Any]:
        """Who this connection's token is, and its roles."""
        me: dict[str, Any] = self._call("whoami")
        return me

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Any user-facing operation by name (tenants, tokens, users, roles, audit...)."""
        return self._call(operation, *args, **kwargs)


def _require_reachable(address: str) -> None:
    """Fail fast (Ray itself retries for minutes) when a ``host:port`` address is not listening."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise Unavailable(f"nothing answers at {address} ({exc.strerror or exc}): is NovaCron "
                          "up? (start it with: novacron up)", details={"address": address}) from exc


def connect(address: str = "auto", *, namespace: str = "novacron", token: str | None = None,
            state_dir: Path | None = None, timeout_s: float = 60.0) -> NovaCron:
    """Attach to the cluster at ``address``; Unavailable if NovaCron is not running there.

    ``token`` defaults to ``$NOVACRON_TOKEN``, else the admin token in ``state_dir`` (default
    ``~/.novacron``).
    """
    if not ray.is_initialized():
        _require_reachable(address)
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # as `novacron up` starts Ray
        try:
            ray.init(address=address, namespace=namespace, logging_level=logging.WARNING,
                     log_to_driver=False)
        except ConnectionError as exc:
            raise Unavailable(f"no Ray cluster at {address!r}: is NovaCron up? "
                              "(start it with: novacron up)") from exc
    try:
        handle = ray.get_actor(CONTROLLER, namespace=namespace)
    except ValueError as exc:
        raise Unavailable(f"Ray is running but NovaCron is not (no controller in namespace "
                          f"{namespace!r}); start it with: novacron up") from exc
    return NovaCron(handle, token=token or find_token(state_dir), timeout_s=timeout_s)
