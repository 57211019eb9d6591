"""What the AWS, Azure and GCP drivers share: one lifecycle over provider primitives, settings,
the instance-type catalogue, credential references and their rotation, provider health.

A cloud region (AWS), location (Azure) or zone (GCP) under one account is a host. Each NovaCron
guest is one provider instance, found by its tags/labels (``novacron:vm-id``, ``novacron:host``,
``novacron:epoch``), so a restarted actor re-attaches and nothing is orphaned.

**define, then create on first start.** :meth:`CloudDriver.define` records the guest under
``<state_dir>/cloud/<provider>/<host>/<vm>.json`` (size chosen, image resolved, a fresh nonce) and
reports it STOPPED; the instance is created by the first :meth:`CloudDriver.start`. A stopped
cloud instance still costs its disks (and on Azure, unless deallocated, its cores), and no
provider can create an instance stopped, so a defined-but-never-started guest costs nothing. The
record is a cache of the VM's spec: an agent that finds no guest defines it again from the store.
The nonce keys the provider's idempotency (the EC2 ClientToken, the GCE requestId), so a create
retried after a timeout finds the instance the first try made.

**Epoch fencing.** The instance carries the epoch it was last started with in a tag/label;
``start`` with an older epoch raises StaleEpoch, a newer one is recorded before the start.

**Preflight.** Before the control plane records a VM for a cloud host it calls
:meth:`CloudDriver.preflight` (through the host's agent), which asks the provider what the create
would meet: a pinned type it does not offer here, or a type whose vCPUs, beside those the account
already runs, exceed the vCPU quota. So these come back from ``POST /api/v1/vms`` with the
provider's answer instead of failing later on a recorded VM.

**Host config** (``POST /api/v1/hosts {"driver": "aws"|"azure"|"gcp", "config": {...}}``), keys
shared by the three drivers, all optional; each driver adds its own (region, zone, ...):

``endpoint_url``
    a private or compatible endpoint (and the local fakes in tests).
``credentials``
    a *reference*, never a secret: ``{"source": "default"}`` (the SDK's own chain),
    ``{"source": "env"}``, ``{"source": "profile", "profile": "name"}`` (AWS),
    ``{"source": "file", "path": "/etc/novacron/aws.json"}`` or ``{"source": "anonymous"}``
    (local endpoints only). What a reference points at is re-read when it changes or expires
    and the clients are rebuilt, without restarting anything. It is resolved where the host's
    agents run (Ray workers on the host's node, and the migration's on the source's): a file
    must be readable there, and an environment reference reads the variables the Ray node was
    started with.
``capacity``
    ``{"cpus", "memory_mib", "disk_gib"}``; what is not given comes from the vCPU quota, with
    ``memory_per_cpu_mib`` (4096) per vCPU and ``disk_gib`` 51200.
``default_image``
    the image of guests whose spec names none.
``instance_types`` / ``prices``
    glob patterns of the types/sizes guests may get (default: all), and hourly prices that rank
    them; without a price a type ranks by vCPUs, then memory. A guest label
    ``<driver>.instance_type`` (``aws``), ``azure.vm_size`` or ``gcp.machine_type`` pins a type,
    patterns or not; the provider then judges it.
``catalogue_ttl_s``
    how long the type catalogue is cached (in memory and under ``state_dir``; 86400).
``poll_interval_s`` / ``operation_timeout_s``
    how often waiters/pollers ask, and how long a create, start or delete may take (5, 900).
``max_attempts``
    attempts per call, retries included, through the SDK's own retry (8).
``credential_check_interval_s``
    how often the credential reference is checked for changes (30).
``page_size``
    items per list page (the provider's maximum when not given).
"""

from __future__ import annotations

import builtins
import contextlib
import difflib
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from novacron.drivers.base import (
    Capability,
    Driver,
    GuestConfig,
    GuestInfo,
    GuestStats,
    HostInfo,
    HostStats,
)
from novacron.errors import (
    AuthError,
    HostUnreachable,
    InvalidRequest,
    InvalidTransition,
    NoCapacity,
    NotFound,
    NovaCronError,
    QuotaExceeded,
    StaleEpoch,
    Unauthenticated,
)
from novacron.states import VMState

log = logging.getLogger("novacron.drivers.cloud")

TAG_PREFIX = "novacron"
TAG_VM_ID = "vm-id"
TAG_HOST = "host"
TAG_EPOCH = "epoch"
TAG_NAME = "name"
INSTANCE_PREFIX = "novacron-"
DEFAULT_MEMORY_PER_CPU_MIB = 4096
DEFAULT_DISK_GIB = 51200
QUOTA_TTL_S = 300.0  # how long a read vCPU quota is used
EXPIRY_MARGIN_S = 300.0  # credentials this close to expiring are checked at every call
_SECRET_KEY = re.compile(r"secret|password|passwd|token|private_key|access_key", re.IGNORECASE)
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,53}$")
_DEFINITION_FORMAT = 1
_NONCE_NAMESPACE = uuid.UUID("3c1f7f0e-4b4a-4f7e-8d0c-6e6f76616372")

CredentialSource = Literal["default", "env", "profile", "file", "anonymous"]
ImportProgress = Callable[[int, int], None]  # (bytes sent, bytes to send) of an image import
CREDENTIAL_SOURCES: tuple[CredentialSource, ...] = ("default", "env", "profile", "file",
                                                    "anonymous")


def tag_key(field_name: str, sep: str = ":") -> str:
    """The provider tag/label key of one NovaCron field, e.g. ``novacron:vm-id``."""
    return f"{TAG_PREFIX}{sep}{field_name}"


def instance_name(vm_id: str) -> str:
    """The deterministic provider name of a guest's instance (Azure VM, GCE instance)."""
    return f"{INSTANCE_PREFIX}{vm_id}"


def check_vm_id(vm_id: str) -> None:
    """InvalidRequest unless ``vm_id`` fits every provider's names and labels."""
    if not _ID_RE.match(vm_id):
        raise InvalidRequest(f"VM id {vm_id!r} cannot name a cloud instance: use 1-54 lower-case "
                             "letters, digits and dashes", details={"vm_id": vm_id})


def idempotency_token(host: str, vm_id: str, nonce: str) -> str:
    """A provider idempotency token (a UUID string) for creating one definition's instance."""
    return str(uuid.uuid5(_NONCE_NAMESPACE, f"{host}/{vm_id}/{nonce}"))


# -- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CredentialRef:
    """Where a driver's credentials are (never the secrets themselves)."""

    source: CredentialSource = "default"
    profile: str | None = None
    path: Path | None = None

    @classmethod
    def parse(cls, value: Any, provider: str) -> CredentialRef:
        """Read ``config["credentials"]``; InvalidRequest for anything else."""
        if value is None:
            return cls()
        if not isinstance(value, Mapping) or value.get("source") not in CREDENTIAL_SOURCES:
            raise InvalidRequest(
                f"{provider} credentials must be {{'source': one of "
                f"{', '.join(CREDENTIAL_SOURCES)}, ...}}, got {value!r}",
                details={"driver": provider})
        unknown = set(value) - {"source", "profile", "path"}
        if unknown:
            raise InvalidRequest(f"unknown {provider} credentials keys: {sorted(unknown)}",
                                 details={"driver": provider})
        source = value["source"]
        if source == "file" and not value.get("path"):
            raise InvalidRequest(f"{provider} credentials from a file need its 'path'",
                                 details={"driver": provider})
        if source == "profile" and not value.get("profile"):
            raise InvalidRequest(f"{provider} credentials from a profile need its 'profile' name",
                                 details={"driver": provider})
        path = Path(str(value["path"])).expanduser() if value.get("path") else None
        return cls(source=source, profile=value.get("profile"), path=path)


@dataclass(frozen=True)
class CloudSettings:
    """The host config keys every cloud driver understands (see the module docstring)."""

    endpoint_url: str | None = None
    credentials: CredentialRef = field(default_factory=CredentialRef)
    capacity: Mapping[str, float] = field(default_factory=dict)
    memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB
    default_image: str | None = None
    instance_types: tuple[str, ...] = ()
    prices: Mapping[str, float] = field(default_factory=dict)
    catalogue_ttl_s: float = 86400.0
    poll_interval_s: float = 5.0
    operation_timeout_s: float = 900.0
    max_attempts: int = 8
    credential_check_interval_s: float = 30.0
    page_size: int | None = None

    KEYS: ClassVar[frozenset[str]] = frozenset({
        "endpoint_url", "credentials", "capacity", "memory_per_cpu_mib", "default_image",
        "instance_types", "prices", "catalogue_ttl_s", "poll_interval_s", "operation_timeout_s",
        "max_attempts", "credential_check_interval_s", "page_size"})

    @classmethod
    def parse(cls, provider: str, config: Mapping[str, Any],
              own_keys: frozenset[str]) -> CloudSettings:
        """The shared settings of ``config``; InvalidRequest for unknown keys or bad values."""
        reject_secrets(provider, config)
        unknown = set(config) - cls.KEYS - own_keys
        if unknown:
            raise InvalidRequest(
                f"unknown {provider} host config keys: {sorted(unknown)}; known: "
                f"{sorted(cls.KEYS | own_keys)}", details={"driver": provider})
        try:
            capacity = {k: float(v) for k, v in dict(config.get("capacity") or {}).items()}
            settings = cls(
                endpoint_url=_endpoint(config.get("endpoint_url")),
                credentials=CredentialRef.parse(config.get("credentials"), provider),
                capacity=capacity,
                memory_per_cpu_mib=int(config.get("memory_per_cpu_mib",
                                                  DEFAULT_MEMORY_PER_CPU_MIB)),
                default_image=_opt_str(config.get("default_image")),
                instance_types=tuple(str(p) for p in config.get("instance_types") or ()),
                prices={str(k): float(v) for k, v in dict(config.get("prices") or {}).items()},
                catalogue_ttl_s=float(config.get("catalogue_ttl_s", 86400.0)),
                poll_interval_s=float(config.get("poll_interval_s", 5.0)),
                operation_timeout_s=float(config.get("operation_timeout_s", 900.0)),
                max_attempts=int(config.get("max_attempts", 8)),
                credential_check_interval_s=float(config.get("credential_check_interval_s",
                                                             30.0)),
                page_size=int(config["page_size"]) if config.get("page_size") else None,
            )
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad {provider} host config: {exc}",
                                 details={"driver": provider}) from None
        if set(capacity) - {"cpus", "memory_mib", "disk_gib"} or any(
                v <= 0 for v in capacity.values()):
            raise InvalidRequest(f"{provider} capacity takes positive cpus, memory_mib and "
                                 f"disk_gib, got {capacity}", details={"driver": provider})
        if min(settings.poll_interval_s, settings.operation_timeout_s,
               settings.memory_per_cpu_mib, settings.max_attempts) <= 0:
            raise InvalidRequest(f"{provider} intervals, timeouts and attempts must be positive",
                                 details={"driver": provider})
        if settings.credentials.source == "anonymous" and not settings.endpoint_url:
            raise InvalidRequest(f"anonymous {provider} credentials are only for a local "
                                 "endpoint_url", details={"driver": provider})
        return settings


def reject_secrets(provider: str, config: Mapping[str, Any], path: str = "config") -> None:
    """InvalidRequest if a host config holds what looks like a secret: it would be stored."""
    for key, value in config.items():
        where = f"{path}.{key}"
        if _SECRET_KEY.search(str(key)):
            raise InvalidRequest(
                f"{where}: secrets are never stored in a host's config; reference them with "
                "'credentials' (an environment, a profile or a file)",
                details={"driver": provider, "key": where})
        if isinstance(value, Mapping):
            reject_secrets(provider, value, where)


def _endpoint(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"endpoint_url must be an http(s) URL, got {value!r}")
    return text


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def require_str(provider: str, config: Mapping[str, Any], key: str) -> str:
    """A required non-empty string from a host config."""
    value = config.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"the {provider} host config needs {key!r}",
                             details={"driver": provider, "key": key})
    return value.strip()


# -- instance types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceType:
    """One instance type (AWS), VM size (Azure) or machine type (GCP)."""

    name: str
    vcpus: int
    memory_mib: int


class Catalogue:
    """A region's instance types from the provider, cached in memory and under ``state_dir``.

    :meth:`cheapest_fit` picks, among the allowed types that have the cpus and memory asked for,
    the one with the lowest configured price, then the fewest vCPUs, then the least memory.
    """

    def __init__(self, cache_file: Path, ttl_s: float, load: Callable[[], list[InstanceType]],
                 allow: Sequence[str] = (), prices: Mapping[str, float] | None = None) -> None:
        self._file = cache_file
        self._ttl_s = ttl_s
        self._load = load
        self._allow = tuple(allow)
        self._prices = dict(prices or {})
        self._types: dict[str, InstanceType] | None = None
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    def types(self) -> dict[str, InstanceType]:
        """Every type by name (from memory, the cache file, or the provider)."""
        with self._lock:
            now = time.time()
            if self._types is not None and now - self._loaded_at < self._ttl_s:
                return self._types
            cached = self._read_file(now)
            if cached is None:
                cached = {t.name: t for t in self._load()}
                self._write_file(cached, now)
                log.info("loaded %d instance types into %s", len(cached), self._file.name)
            self._types, self._loaded_at = cached, now
            return cached

    def lookup(self, name: str) -> InstanceType | None:
        """The type called ``name``, if the provider has it."""
        return self.types().get(name)

    def cheapest_fit(self, cpus: int, memory_mib: int) -> InstanceType:
        """The cheapest allowed type with at least ``cpus`` vCPUs and ``memory_mib``."""
        allowed = [t for t in self.types().values()
                   if not self._allow or any(fnmatch.fnmatchcase(t.name, p) for p in self._allow)]
        fits = [t for t in allowed if t.vcpus >= cpus and t.memory_mib >= memory_mib]
        if not fits:
            largest = max(allowed, key=lambda t: (t.vcpus, t.memory_mib), default=None)
            raise NoCapacity(
                f"no instance type has {cpus} vCPUs and {memory_mib} MiB"
                + (f" (the largest allowed is {largest.name}: {largest.vcpus} vCPUs, "
                   f"{largest.memory_mib} MiB)" if largest else " (none is allowed)"),
                details={"cpus": cpus, "memory_mib": memory_mib, "allowed": list(self._allow)})
        return min(fits, key=lambda t: (self._prices.get(t.name, math.inf), t.vcpus,
                                        t.memory_mib, t.name))

    def _read_file(self, now: float) -> dict[str, InstanceType] | None:
        try:
            data = json.loads(self._file.read_text())
            if now - float(data["saved_at"]) >= self._ttl_s:
                return None
            return {t["name"]: InstanceType(**t) for t in data["types"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_file(self, types: Mapping[str, InstanceType], now: float) -> None:
        data = {"saved_at": now, "types": [asdict(t) for t in types.values()]}
        with contextlib.suppress(OSError):
            write_atomic(self._file, json.dumps(data))


@dataclass(frozen=True)
class VcpuQuota:
    """A provider's vCPU quota of a region, and the vCPUs the account already uses under it."""

    name: str  # as the provider names it, e.g. "CPUS" or "cores (Total Regional vCPUs)"
    limit: float
    used: float
    request_id: str | None = None  # of the provider's answer, where it gives one


def capacity_of(settings: CloudSettings, quota_vcpus: float | None, provider: str) -> HostInfo:
    """A cloud host's size: the configured capacity, the rest from the vCPU quota."""
    cpus = settings.capacity.get("cpus", quota_vcpus)
    if cpus is None:
        raise InvalidRequest(
            f"the {provider} vCPU quota could not be read; set the host's config.capacity",
            details={"driver": provider})
    memory = settings.capacity.get("memory_mib", cpus * settings.memory_per_cpu_mib)
    disk = settings.capacity.get("disk_gib", DEFAULT_DISK_GIB)
    return HostInfo(cpus=float(cpus), memory_mib=int(memory), disk_gib=int(disk),
                    hypervisor=provider)


# -- credentials -------------------------------------------------------------------------------


def read_json_file(path: Path, provider: str) -> dict[str, Any]:
    """A JSON credentials file as a dict; Unauthenticated (naming the file) if unusable."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise Unauthenticated(f"cannot read the {provider} credentials file {path}: "
                              f"{exc.strerror}", details={"driver": provider, "provider": provider,
                                                          "path": str(path)}) from None
    except ValueError as exc:
        raise Unauthenticated(f"the {provider} credentials file {path} is not JSON: {exc}",
                              details={"driver": provider, "provider": provider,
                                       "path": str(path)}) from None
    if not isinstance(data, dict):
        raise Unauthenticated(f"the {provider} credentials file {path} must hold an object",
                              details={"driver": provider, "provider": provider,
                                       "path": str(path)})
    return data


def expiry_of(data: Mapping[str, Any], *keys: str) -> float | None:
    """The expiry (epoch seconds) under the first of ``keys``: a number or an ISO 8601 time."""
    from datetime import datetime

    for key in keys:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, int | float):
            return float(value)
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return None


class CredentialWatcher:
    """Tells when what a credential reference points at has changed (rotated) or was refused.

    It fingerprints the environment variables and files the reference reads, at most every
    ``check_interval_s`` (at every call once what was read is about to expire, so a renewed
    file is picked up at once); :meth:`invalidate` (after the provider refused the credentials)
    makes the next check report a change so the clients are rebuilt from a fresh read.
    """

    def __init__(self, env: Sequence[str] = (), files: Sequence[Path] = (), *,
                 check_interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.expires_at: float | None = None  # set by the driver from what it read (epoch s)
        self._env = tuple(env)
        self._files = tuple(files)
        self._interval = check_interval_s
        self._clock = clock
        self._baseline = self._fingerprint()
        self._checked = clock()
        self._forced = False
        self._lock = threading.Lock()

    def changed(self) -> bool:
        """Whether the credentials must be read again; resets the baseline when they must."""
        with self._lock:
            now = self._clock()
            expiring = (self.expires_at is not None
                        and time.time() >= self.expires_at - EXPIRY_MARGIN_S)
            if not self._forced and not expiring and now - self._checked < self._interval:
                return False
            self._checked = now
            current = self._fingerprint()
            if self._forced or current != self._baseline:
                self._forced, self._baseline = False, current
                return True
            return False

    def invalidate(self) -> None:
        """Make the next :meth:`changed` true (the provider refused or expired the credentials)."""
        with self._lock:
            self._forced = True

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name in self._env:
            digest.update(f"{name}={os.environ.get(name)}\0".encode())
        for path in self._files:
            try:
                digest.update(path.read_bytes())
            except OSError:
                digest.update(b"<missing>")
            digest.update(b"\0")
        return digest.hexdigest()


# -- provider health ---------------------------------------------------------------------------


class ProviderHealth:
    """What a host reports about its provider: credentials valid, API reachable, throttling."""

    def __init__(self, window_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._calls: deque[float] = deque()
        self._throttles: deque[float] = deque()
        self._errors: deque[float] = deque()
        self._reachable = True
        self._credentials_ok = True
        self._lock = threading.Lock()

    def succeeded(self) -> None:
        """A call went through."""
        with self._lock:
            self._calls.append(self._clock())
            self._reachable = self._credentials_ok = True

    def failed(self, error: NovaCronError) -> None:
        """A call failed with ``error`` (after the SDK's retries)."""
        with self._lock:
            now = self._clock()
            self._calls.append(now)
            self._errors.append(now)
            if isinstance(error, AuthError):
                self._credentials_ok = False
            elif isinstance(error, HostUnreachable):
                self._reachable = False
            else:
                self._reachable = True

    def throttled(self) -> None:
        """The provider answered one attempt with throttling (the SDK retries it)."""
        with self._lock:
            self._throttles.append(self._clock())

    def snapshot(self) -> dict[str, float]:
        """Figures for HostStats.extra: 1/0 flags and per-minute rates over the window."""
        with self._lock:
            cutoff = self._clock() - self._window_s
            for series in (self._calls, self._throttles, self._errors):
                while series and series[0] < cutoff:
                    series.popleft()
            minutes = self._window_s / 60.0
            return {"provider_api_reachable": float(self._reachable),
                    "provider_credentials_valid": float(self._credentials_ok),
                    "provider_calls_per_min": len(self._calls) / minutes,
                    "provider_throttled_per_min": len(self._throttles) / minutes,
                    "provider_errors_per_min": len(self._errors) / minutes}


# -- definitions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Definition:
    """A guest defined on a cloud host: its spec, the size and image it gets, and its nonce."""

    vm_id: str
    name: str
    cpus: int
    memory_mib: int
    disk_gib: int
    instance_type: str
    image: str
    epoch: int
    nonce: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def token(self, host: str) -> str:
        """The idempotency token of creating this definition's instance."""
        return idempotency_token(host, self.vm_id, self.nonce)


class Definitions:
    """Definitions of one host's guests, one JSON file each (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def load(self, vm_id: str) -> Definition | None:
        """The definition of ``vm_id``, if any."""
        try:
            data = json.loads((self._root / f"{vm_id}.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable definition of %s: %s", vm_id, exc)
            return None
        data.pop("format", None)
        return Definition(**data)

    def save(self, definition: Definition) -> None:
        """Write ``definition`` atomically."""
        data = {"format": _DEFINITION_FORMAT, **asdict(definition)}
        data["labels"] = dict(definition.labels)
        write_atomic(self._root / f"{definition.vm_id}.json", json.dumps(data))

    def renew(self, definition: Definition) -> Definition:
        """The definition with a fresh nonce, saved (its old token created a now-gone instance)."""
        renewed = replace(definition, nonce=uuid.uuid4().hex)
        self.save(renewed)
        return renewed

    def delete(self, vm_id: str) -> None:
        """Forget ``vm_id`` (idempotent)."""
        (self._root / f"{vm_id}.json").unlink(missing_ok=True)

    def all(self) -> list[Definition]:
        """Every definition of the host."""
        if not self._root.is_dir():
            return []
        found = (self.load(p.stem) for p in sorted(self._root.glob("*.json")))
        return [d for d in found if d is not None]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- the shared lifecycle ----------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """A provider instance of a NovaCron guest, as the provider reported it."""

    vm_id: str
    instance_id: str  # the provider's handle: an EC2 id, an ARM resource id, a GCE name
    state: VMState
    raw_state: str  # the provider's own state name
    epoch: int
    instance_type: str
    started_at: float | None = None  # when it last started (epoch seconds), if known

    def info(self) -> GuestInfo:
        """The guest as NovaCron sees it."""
        return GuestInfo(vm_id=self.vm_id, state=self.state, guest_id=self.instance_id,
                         epoch=self.epoch, reason=self.raw_state)


def parse_epoch(value: str | None) -> int:
    """The epoch recorded in a tag/label (0 when missing or unreadable)."""
    try:
        return int(value or 0)
    except ValueError:
        return 0


_SETTLED = frozenset({VMState.STOPPED, VMState.ERROR})


class CloudDriver(Driver):
    """The lifecycle every cloud driver shares, over a few provider primitives.

    Subclasses parse their config, build their SDK clients (:meth:`_build_clients`), and provide
    the primitives below, each mapping the SDK's errors into NovaCron's tree in their one place.
    """

    provider_label: ClassVar[str]  # "AWS", "Azure", "GCP": for messages
    instance_type_label: ClassVar[str]  # the guest label that pins a type: "aws.instance_type"
    preflights: ClassVar[bool] = True  # the provider is asked before a VM is recorded

    def __init__(self, host: str, uri: str | None, config: Mapping[str, Any],
                 state_dir: Path, own_keys: frozenset[str]) -> None:
        super().__init__(host, uri, config, state_dir)
        self.settings = CloudSettings.parse(self.name, self.config, own_keys)
        self.health = ProviderHealth()
        root = self.state_dir / "cloud" / self.name
        self.definitions = Definitions(root / "hosts" / host)
        self._catalogue_dir = root / "catalogue"
        self._catalogue: Catalogue | None = None
        self._watcher: CredentialWatcher | None = None
        self._clients_lock = threading.RLock()
        self._connected = False
        self._quota: tuple[float, float | None] | None = None  # (read at, vCPUs)

    # -- what it can do ---------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[Capability]:
        """Reboot; subclasses add what their provider can do."""
        return frozenset({Capability.REBOOT})

    def missing_capabilities(self) -> dict[Capability, str]:
        """Why a cloud driver lacks the rest; subclasses refine the reasons."""
        label = self.provider_label
        reasons = {
            Capability.PAUSE: f"{label} cannot freeze an instance with its memory kept "
                              "(stop it instead)",
            Capability.SNAPSHOT: f"the {self.name} driver takes no snapshots of {label} "
                                 "instances",
            Capability.LIVE_MIGRATION: f"{label} instances cannot be live-migrated by a "
                                       "customer: the provider moves them itself",
            Capability.MEMORY_ACCESS: f"the memory of a {label} instance cannot be read from "
                                      "outside it",
            Capability.DISK_ACCESS: f"the disks of a {label} instance are not files NovaCron "
                                    "can read or write in place",
            Capability.CONSOLE: f"the {self.name} driver does not attach to {label} serial "
                                "consoles",
            Capability.EVENTS: f"the {self.name} driver polls {label}; it subscribes to no "
                               "event stream",
            Capability.COLD_MIGRATION: f"cold migration into {label} needs an image import "
                                       f"(export, upload, import), which the {self.name} "
                                       "driver does not implement",
            Capability.IMAGE_IMPORT: f"the {self.name} driver does not import disk images into "
                                     f"{label}",
        }
        return {c: reasons.get(c, f"the {self.name} driver does not support {c.value}")
                for c in Capability if c not in self.capabilities}

    # -- clients and credentials ------------------------------------------------------------
    def connect(self) -> None:
        """Build the SDK clients and check the region/zone exists (idempotent)."""
        with self._clients_lock:
            if self._connected:
                return
            self._watcher = self._credential_watcher()
            self._build_clients()
            try:
                self._check_location()
            except BaseException:
                self._close_clients()
                raise
            self._connected = True

    def close(self) -> None:
        """Drop the SDK clients. Instances keep running."""
        with self._clients_lock:
            if self._connected:
                self._close_clients()
            self._connected = False

    def ensure_clients(self) -> None:
        """Connect if needed; rebuild the clients when the credentials changed or were refused."""
        if not self._connected:
            self.connect()
            return
        assert self._watcher is not None
        if self._watcher.changed():
            with self._clients_lock:
                log.info("%s credentials of host %s changed; rebuilding the clients",
                         self.provider_label, self.host)
                self._close_clients()
                self._build_clients()

    def note_error(self, error: NovaCronError) -> NovaCronError:
        """Record a mapped provider error in the host's health; returns it for raising."""
        self.health.failed(error)
        if isinstance(error, AuthError) and self._watcher is not None:
            self._watcher.invalidate()
        return error

    @property
    def catalogue(self) -> Catalogue:
        """This region's instance types (cached)."""
        if self._catalogue is None:
            key = hashlib.sha256(
                f"{self.settings.endpoint_url}|{self._catalogue_scope()}".encode()).hexdigest()
            self._catalogue = Catalogue(self._catalogue_dir / f"{key[:24]}.json",
                                        self.settings.catalogue_ttl_s, self._load_types,
                                        self.settings.instance_types, self.settings.prices)
        return self._catalogue

    # -- host -------------------------------------------------------------------------------
    def host_info(self) -> HostInfo:
        """The configured capacity; what is not configured comes from the vCPU quota."""
        quota = None
        if "cpus" not in self.settings.capacity:
            now = time.monotonic()
            if self._quota is None or now - self._quota[0] > QUOTA_TTL_S:
                self.ensure_clients()
                self._quota = (now, self._quota_vcpus())
            quota = self._quota[1]
        info = capacity_of(self.settings, quota, self.name)
        return replace(info, version=self._location())

    def host_stats(self) -> HostStats:
        """vCPUs and memory of the running guests against the capacity, and provider health."""
        instances = self._list_instances()
        types = self.catalogue.types()
        running = [i for i in instances if i.state in (VMState.RUNNING, VMState.STARTING)]
        vcpus = sum(types[i.instance_type].vcpus for i in running if i.instance_type in types)
        memory = sum(types[i.instance_type].memory_mib for i in running
                     if i.instance_type in types)
        info = self.host_info()
        guests = {i.vm_id for i in instances} | {d.vm_id for d in self.definitions.all()}
        return HostStats(cpu_load=min(1.0, vcpus / info.cpus), memory_used_mib=memory,
                         guests=len(guests),
                         extra={"running_guests": float(len(running)),
                                "vcpus_in_use": float(vcpus), **self.health.snapshot()})

    # -- guests -----------------------------------------------------------------------------
    def preflight(self, config: GuestConfig) -> None:
        """Refuse, before anything is recorded, a guest whose create would fail here: no image
        (InvalidRequest), a pinned type the provider does not have here (InvalidRequest naming
        the nearest it has, with the provider's answer), no allowed type big enough
        (NoCapacity), or a type whose vCPUs do not fit the account's vCPU quota beside what it
        already runs (QuotaExceeded). A check, not a reservation: a guest created meanwhile may
        take the quota first, and this guest's create then reports the provider's refusal."""
        check_vm_id(config.vm_id)
        self._image_of(config)
        chosen = self._chosen_type(config)
        quota = self._vcpu_quota(chosen)
        if quota is None or quota.used + chosen.vcpus <= quota.limit:
            return
        where = self._location()
        raise QuotaExceeded(
            f"the {self.provider_label} vCPU quota {quota.name} in {where} would be exceeded: "
            f"{chosen.name} needs {chosen.vcpus} vCPUs and {quota.used:g} of {quota.limit:g} "
            f"are in use" + (f" ({self.provider_label} request {quota.request_id})"
                             if quota.request_id else ""),
            details={"provider": self.name, "host": self.host, "vm_id": config.vm_id,
                     "location": where, "instance_type": chosen.name, "quota": quota.name,
                     "limit": quota.limit, "in_use": quota.used, "requested": chosen.vcpus,
                     "request_id": quota.request_id})

    def define(self, config: GuestConfig) -> GuestInfo:
        """Record the guest (size and image chosen now); an existing guest is returned as is."""
        check_vm_id(config.vm_id)
        instance = self._find(config.vm_id)
        if instance is not None:
            return instance.info()
        existing = self.definitions.load(config.vm_id)
        if existing is not None:
            return self._defined_info(existing)
        image = self._image_of(config)
        pinned = config.labels.get(self.instance_type_label)
        instance_type = pinned or self.catalogue.cheapest_fit(config.cpus, config.memory_mib).name
        definition = Definition(
            vm_id=config.vm_id, name=config.name, cpus=config.cpus,
            memory_mib=config.memory_mib, disk_gib=config.disk_gib,
            instance_type=instance_type, image=image, epoch=config.epoch,
            nonce=uuid.uuid4().hex, labels=dict(config.labels))
        self.definitions.save(definition)
        log.info("defined guest %s on %s as %s (%s)", config.vm_id, self.host, instance_type,
                 definition.image)
        return self._defined_info(definition)

    def start(self, vm_id: str, epoch: int) -> GuestInfo:
        """Create the instance on first start, else start it; refuses a stale epoch."""
        instance = self._find(vm_id)
        if instance is None:
            definition = self._definition(vm_id)
            self._fence(vm_id, epoch, definition.epoch)
            log.info("creating the %s instance of guest %s on %s (epoch %d)",
                     self.provider_label, vm_id, self.host, epoch)
            return self._create(definition, epoch).info()
        self._fence(vm_id, epoch, instance.epoch)
        if epoch > instance.epoch:
            self._set_epoch(instance, epoch)
            instance = replace(instance, epoch=epoch)
        if instance.state == VMState.RUNNING:
            return instance.info()
        return self._power_on(instance).info()

    def stop(self, vm_id: str, *, force: bool = False, timeout_s: float = 30.0) -> GuestInfo:
        """Stop the instance (gracefully, forced after ``timeout_s``); a defined one is stopped."""
        instance = self._find(vm_id)
        if instance is None:
            return self._defined_info(self._definition(vm_id))
        if instance.state == VMState.STOPPED:
            return instance.info()
        return self._power_off(instance, force=force, timeout_s=timeout_s).info()

    def reboot(self, vm_id: str) -> GuestInfo:
        """Restart the instance's OS."""
        return self._restart(self._running(vm_id, "reboot")).info()

    def pause(self, vm_id: str) -> GuestInfo:
        """Freeze the instance keeping its memory, where the provider can."""
        self.require(Capability.PAUSE)
        return self._suspend(self._running(vm_id, "pause")).info()

    def resume(self, vm_id: str) -> GuestInfo:
        """Unfreeze a paused instance."""
        self.require(Capability.PAUSE)
        instance = self._instance(vm_id)
        if instance.state == VMState.RUNNING:
            return instance.info()
        if instance.state != VMState.PAUSED:
            raise InvalidTransition(f"guest {vm_id} is {instance.raw_state}, not paused",
                                    details={"vm_id": vm_id, "state": instance.raw_state})
        return self._unsuspend(instance).info()

    def undefine(self, vm_id: str, *, delete_storage: bool = True) -> None:
        """Delete the stopped instance (and its disks with ``delete_storage``) and the record."""
        instance = self._find(vm_id)
        if instance is not None:
            if instance.state not in _SETTLED:
                raise InvalidTransition(
                    f"guest {vm_id} on {self.host} is {instance.raw_state}; stop it first",
                    details={"vm_id": vm_id, "host": self.host, "state": instance.raw_state})
            self._destroy(instance, delete_storage=delete_storage)
            log.info("deleted the %s instance %s of guest %s", self.provider_label,
                     instance.instance_id, vm_id)
        self.definitions.delete(vm_id)

    def get(self, vm_id: str) -> GuestInfo:
        """The instance's state, STOPPED for a guest defined but not created, else NotFound."""
        instance = self._find(vm_id)
        if instance is not None:
            return instance.info()
        return self._defined_info(self._definition(vm_id))

    def list(self) -> list[GuestInfo]:
        """Every guest of this host: its instances (every page) and the guests only defined."""
        found = {i.vm_id: i.info() for i in self._list_instances()}
        for definition in self.definitions.all():
            found.setdefault(definition.vm_id, self._defined_info(definition))
        return list(found.values())

    def stats(self, vm_id: str) -> GuestStats:
        """The instance's counters from the provider's metrics (zero before its first start)."""
        instance = self._find(vm_id)
        if instance is None:
            self._definition(vm_id)
            return GuestStats()
        return self._metrics(instance)

    # -- image import (drivers with Capability.IMAGE_IMPORT override these) -----------------
    def import_disk(self, vm_id: str, source: Path, *, name: str | None = None,
                    progress: ImportProgress | None = None) -> str:
        """Import the raw disk image ``source`` as an image of guest ``vm_id``; returns the
        provider's image id, for the guest's :attr:`GuestConfig.image`. ``progress(sent,
        total)`` is called with the bytes sent so far, on the calling thread; an exception it
        raises aborts the import, which leaves nothing behind."""
        self.require(Capability.IMAGE_IMPORT)
        raise NotImplementedError(f"{self.name} declares image import but does not import")

    def discard_imports(self, vm_id: str) -> None:
        """Remove every image (and its storage) imported for guest ``vm_id`` on this host,
        interrupted imports included; succeeds if there is none."""
        self.require(Capability.IMAGE_IMPORT)
        raise NotImplementedError(f"{self.name} declares image import but does not discard")

    # -- helpers ----------------------------------------------------------------------------
    def _image_of(self, config: GuestConfig) -> str:
        """The guest's image (or the host's default), resolved; InvalidRequest if neither."""
        image = config.image or self.settings.default_image
        if not image:
            raise InvalidRequest(
                f"VM {config.vm_id} names no image and {self.provider_label} host {self.host} "
                "has no default_image", details={"vm_id": config.vm_id, "host": self.host})
        return self._resolve_image(image)

    def _chosen_type(self, config: GuestConfig) -> InstanceType:
        """The type the guest gets: the pinned one as the provider has it (the catalogue, else
        the provider asked), or the cheapest allowed fit."""
        pinned = config.labels.get(self.instance_type_label)
        if not pinned:
            return self.catalogue.cheapest_fit(config.cpus, config.memory_mib)
        known = self.catalogue.lookup(pinned)
        if known is not None:
            return known
        try:
            return self._describe_type(pinned)
        except (InvalidRequest, NotFound) as exc:
            where = self._location()
            nearest = difflib.get_close_matches(pinned, sorted(self.catalogue.types()), n=3,
                                                cutoff=0.0)
            raise InvalidRequest(
                f"{self.provider_label} has no instance type {pinned!r} in {where} (label "
                f"{self.instance_type_label}; nearest: {', '.join(nearest)}): {exc.message}",
                details={**exc.details, "provider": self.name, "host": self.host,
                         "vm_id": config.vm_id, "location": where, "instance_type": pinned,
                         "nearest": nearest}) from exc

    def _definition(self, vm_id: str) -> Definition:
        definition = self.definitions.load(vm_id)
        if definition is None:
            raise NotFound(f"no guest {vm_id} on {self.provider_label} host {self.host}",
                           details={"vm_id": vm_id, "host": self.host})
        return definition

    def _instance(self, vm_id: str) -> Instance:
        instance = self._find(vm_id)
        if instance is None:
            self._definition(vm_id)
            raise InvalidTransition(f"guest {vm_id} was never started: it has no instance yet",
                                    details={"vm_id": vm_id, "host": self.host})
        return instance

    def _running(self, vm_id: str, action: str) -> Instance:
        instance = self._instance(vm_id)
        if instance.state != VMState.RUNNING:
            raise InvalidTransition(f"cannot {action} guest {vm_id}: it is {instance.raw_state}",
                                    details={"vm_id": vm_id, "state": instance.raw_state})
        return instance

    def _fence(self, vm_id: str, epoch: int, recorded: int) -> None:
        if epoch < recorded:
            raise StaleEpoch(f"guest {vm_id}: epoch {epoch} is older than {recorded}",
                             details={"vm_id": vm_id, "epoch": epoch, "current": recorded,
                                      "host": self.host})

    def _defined_info(self, definition: Definition) -> GuestInfo:
        return GuestInfo(vm_id=definition.vm_id, state=VMState.STOPPED, epoch=definition.epoch,
                         reason="defined: the instance is created on first start")

    def tags(self, vm_id: str, epoch: int, name: str, sep: str = ":") -> dict[str, str]:
        """The tags/labels that tie an instance to its guest and this host."""
        return {tag_key(TAG_VM_ID, sep): vm_id, tag_key(TAG_HOST, sep): self.host,
                tag_key(TAG_EPOCH, sep): str(epoch), tag_key(TAG_NAME, sep): name}

    def polls(self, timeout_s: float | None = None) -> int:
        """How many polls at ``poll_interval_s`` fit in ``timeout_s`` (the operation timeout)."""
        timeout = self.settings.operation_timeout_s if timeout_s is None else timeout_s
        return max(1, math.ceil(timeout / self.settings.poll_interval_s))

    # -- provider primitives ----------------------------------------------------------------
    @abstractmethod
    def _credential_watcher(self) -> CredentialWatcher:
        """What to watch of the credential reference."""

    @abstractmethod
    def _build_clients(self) -> None:
        """(Re)build the SDK clients from freshly read credentials."""

    @abstractmethod
    def _close_clients(self) -> None:
        """Release the SDK clients."""

    @abstractmethod
    def _check_location(self) -> None:
        """InvalidRequest unless the configured region/zone exists (clients built, not
        connected yet: use them directly)."""

    @abstractmethod
    def _location(self) -> str:
        """The region/location/zone, for messages and HostInfo.version."""

    @abstractmethod
    def _catalogue_scope(self) -> str:
        """What the type catalogue depends on (region and account), for its cache key."""

    @abstractmethod
    def _load_types(self) -> builtins.list[InstanceType]:
        """Every instance type of the region from the provider (every page)."""

    @abstractmethod
    def _describe_type(self, name: str) -> InstanceType:
        """The type ``name`` as the provider offers it here (asked when the cached catalogue
        lacks it); InvalidRequest or NotFound, with the provider's message and request id, when
        it offers none."""

    @abstractmethod
    def _quota_vcpus(self) -> float | None:
        """The vCPU quota of the region, or None when the provider does not say."""

    @abstractmethod
    def _vcpu_quota(self, instance_type: InstanceType) -> VcpuQuota | None:
        """The vCPU quota guests of ``instance_type`` count against here, with the vCPUs the
        account already uses under it; None when the provider does not say."""

    def _resolve_image(self, image: str) -> str:
        """The image reference to record for ``image`` (as given by default)."""
        return image

    @abstractmethod
    def _find(self, vm_id: str) -> Instance | None:
        """The live (not deleted) instance of ``vm_id`` on this host, if any."""

    @abstractmethod
    def _list_instances(self) -> builtins.list[Instance]:
        """Every live instance of this host (every page)."""

    @abstractmethod
    def _create(self, definition: Definition, epoch: int) -> Instance:
        """Create and boot the instance, idempotently; nothing half-created is left on error."""

    @abstractmethod
    def _set_epoch(self, instance: Instance, epoch: int) -> None:
        """Record ``epoch`` on the instance."""

    @abstractmethod
    def _power_on(self, instance: Instance) -> Instance:
        """Start a stopped instance and wait until it runs."""

    @abstractmethod
    def _power_off(self, instance: Instance, *, force: bool, timeout_s: float) -> Instance:
        """Stop the instance and wait until it is stopped."""

    @abstractmethod
    def _restart(self, instance: Instance) -> Instance:
        """Reboot a running instance."""

    def _suspend(self, instance: Instance) -> Instance:
        """Suspend a running instance (providers with PAUSE)."""
        raise NotImplementedError

    def _unsuspend(self, instance: Instance) -> Instance:
        """Resume a suspended instance (providers with PAUSE)."""
        raise NotImplementedError

    @abstractmethod
    def _destroy(self, instance: Instance, *, delete_storage: bool) -> None:
        """Delete the instance and wait until it is gone."""

    @abstractmethod
    def _metrics(self, instance: Instance) -> GuestStats:
        """The instance's counters since it last started."""
