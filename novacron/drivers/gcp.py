"""The GCP driver: a Compute Engine zone of one project is a host; its guests are instances.

The shared lifecycle (define, then create on first start; epoch fencing; labels) is in
:mod:`novacron.drivers.cloud`; this module makes the google-cloud-compute calls over its REST
transport. Instances get the deterministic name ``novacron-<vm_id>`` and their insert carries a
``requestId`` derived from the guest's definition, so a create retried after a timeout returns
the first operation (and a name clash is re-attached when the instance is ours). Calls retry
throttling (429, rateLimitExceeded) and transient failures through a google-api-core ``Retry``;
long operations are waited on as ``ExtendedOperation`` s whose refresh goes through a
ZoneOperationsClient built with the same endpoint and credentials (the one the SDK builds itself
would call the public endpoint). The epoch label is written with the instance's
``labelFingerprint``, so two writers cannot both win. Errors are mapped in :func:`map_error`
(by GCE reason and operation error code, keeping the request id). Pause is GCE suspend/resume.

Host ``config`` keys, besides the shared ones of :mod:`novacron.drivers.cloud`:

``project`` / ``zone`` (required)
    e.g. ``my-project`` / ``europe-west1-b``; the zone is checked to exist.
``network`` / ``subnetwork``
    of the instances' interface (``global/networks/default``).
``retry_initial_s`` / ``retry_maximum_s`` / ``retry_timeout_s``
    google-api-core backoff: first and largest delay, and the deadline of one call with its
    retries (1, 32, 120). (``max_attempts`` does not apply: GCP retries until the deadline.)
``read_timeout_s``
    per attempt (60).
``monitoring_endpoint_url``
    where Cloud Monitoring is asked (see Metrics below).

Credentials (``config["credentials"]``): ``default`` (Application Default Credentials), ``env``
(the file named by ``GOOGLE_APPLICATION_CREDENTIALS``), ``file`` (a service-account or other
google-auth JSON file, or ``{"access_token", "expires_on"}`` re-read when it expires) or
``anonymous`` (a local endpoint).

Metrics come from Cloud Monitoring (``compute.googleapis.com/instance/``: cpu/usage_time,
network/received_bytes_count and sent_bytes_count, disk/read_bytes_count and write_bytes_count)
summed since the instance last started, read from ``monitoring_endpoint_url`` (by default
``endpoint_url`` when one is set, as private.googleapis.com serves every API, else
``https://monitoring.googleapis.com``) over google-auth's AuthorizedSession with the same
credentials and the same api-core retry, so google-cloud-monitoring is not needed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from novacron.drivers.base import Capability, GuestStats, register
from novacron.drivers.cloud import (
    TAG_EPOCH,
    TAG_HOST,
    TAG_VM_ID,
    CloudDriver,
    CredentialWatcher,
    Definition,
    Instance,
    InstanceType,
    VcpuQuota,
    expiry_of,
    instance_name,
    parse_epoch,
    read_json_file,
    require_str,
    tag_key,
)
from novacron.errors import (
    AlreadyExists,
    Conflict,
    DriverError,
    Forbidden,
    HostUnreachable,
    InvalidRequest,
    InvalidTransition,
    NoCapacity,
    NotFound,
    NotSupported,
    NovaCronError,
    OperationTimeout,
    QuotaExceeded,
    Throttled,
    Unauthenticated,
)
from novacron.states import VMState

try:
    import google.auth
    import google.auth.credentials
    import google.auth.exceptions
    import google.auth.transport.requests
    import google.oauth2.credentials
    import requests.exceptions
    from google.api_core import client_options, extended_operation, retry
    from google.api_core import exceptions as gexc
    from google.api_core.future import polling
    from google.cloud import compute_v1
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise NotSupported('the gcp driver needs google-cloud-compute: pip install "novacron[gcp]"',
                       details={"driver": "gcp"}) from _exc

log = logging.getLogger("novacron.drivers.gcp")

# GCE instance status -> VM state; anything else (REPAIRING, PENDING_STOP...) is UNKNOWN.
STATES: Mapping[str, VMState] = {
    "PROVISIONING": VMState.STARTING,
    "STAGING": VMState.STARTING,
    "RUNNING": VMState.RUNNING,
    "STOPPING": VMState.STOPPING,
    "STOPPED": VMState.STOPPED,
    "TERMINATED": VMState.STOPPED,
    "SUSPENDING": VMState.PAUSED,
    "SUSPENDED": VMState.PAUSED,
}
_TRANSITIONAL = frozenset({"PROVISIONING", "STAGING", "STOPPING", "SUSPENDING"})

THROTTLE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
# GCE error reason (errors[].reason of an HTTP error) -> NovaCron error.
REASONS: Mapping[str, type[NovaCronError]] = {
    "notFound": NotFound,
    "alreadyExists": AlreadyExists,
    "invalid": InvalidRequest,
    "badRequest": InvalidRequest,
    "required": InvalidRequest,
    "invalidParameter": InvalidRequest,
    "resourceNotReady": InvalidTransition,
    "resourceInUseByAnotherResource": Conflict,
    "conditionNotMet": Conflict,
    "quotaExceeded": QuotaExceeded,
    "authError": Unauthenticated,
    "forbidden": Forbidden,
    "insufficientPermissions": Forbidden,
    "accessNotConfigured": Forbidden,
    "backendError": HostUnreachable,
    **dict.fromkeys(THROTTLE_REASONS, Throttled),
}
# Error code of a failed GCE operation -> NovaCron error.
OPERATION_CODES: Mapping[str, type[NovaCronError]] = {
    "QUOTA_EXCEEDED": QuotaExceeded,
    "ZONE_RESOURCE_POOL_EXHAUSTED": NoCapacity,
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS": NoCapacity,
    "RESOURCE_NOT_FOUND": NotFound,
    "RESOURCE_ALREADY_EXISTS": AlreadyExists,
    "INVALID_FIELD_VALUE": InvalidRequest,
    "UNSUPPORTED_OPERATION": NotSupported,
    "RESOURCE_NOT_READY": InvalidTransition,
    "PERMISSIONS_ERROR": Forbidden,
}
# HTTP status -> NovaCron error, when the reason is not in REASONS.
STATUSES: Mapping[int, type[NovaCronError]] = {
    400: InvalidRequest, 401: Unauthenticated, 403: Forbidden, 404: NotFound, 409: Conflict,
    412: Conflict, 429: Throttled, 500: HostUnreachable, 502: HostUnreachable,
    503: HostUnreachable, 504: HostUnreachable}

_OWN_KEYS = frozenset({"project", "zone", "network", "subnetwork", "retry_initial_s",
                       "retry_maximum_s", "retry_timeout_s", "read_timeout_s",
                       "monitoring_endpoint_url"})
# Cloud Monitoring metric (all DELTA, summed) -> GuestStats field.
MONITORING_METRICS: Mapping[str, str] = {
    "compute.googleapis.com/instance/cpu/usage_time": "cpu_time_s",
    "compute.googleapis.com/instance/network/received_bytes_count": "net_rx_bytes",
    "compute.googleapis.com/instance/network/sent_bytes_count": "net_tx_bytes",
    "compute.googleapis.com/instance/disk/read_bytes_count": "disk_read_bytes",
    "compute.googleapis.com/instance/disk/write_bytes_count": "disk_written_bytes",
}
_SCOPES = ["https://www.googleapis.com/auth/compute"]
_LABEL_INVALID = re.compile(r"[^a-z0-9_-]")


def label(value: str) -> str:
    """``value`` as a GCE label value: lower case, ``[a-z0-9_-]``, at most 63 characters."""
    return _LABEL_INVALID.sub("-", value.lower())[:63]


class _ZoneOperation(extended_operation.ExtendedOperation):
    """A zonal GCE operation with the error fields named as compute_v1 names them."""

    @property
    def error_code(self) -> int:
        return int(self._extended_operation.http_error_status_code)

    @property
    def error_message(self) -> str:
        return str(self._extended_operation.http_error_message)


class _Transitional(Exception):
    """The instance is between states; poll again."""


def _retryable(exc: Exception) -> bool:
    """Whether google-api-core should retry ``exc``: throttling and transient failures."""
    if isinstance(exc, gexc.TooManyRequests | gexc.ServiceUnavailable | gexc.InternalServerError
                  | gexc.BadGateway | gexc.GatewayTimeout):
        return True
    if isinstance(exc, gexc.Forbidden):
        return _reason(exc) in THROTTLE_REASONS
    return isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout)


def _reason(exc: gexc.GoogleAPICallError) -> str:
    errors = exc.errors or []
    first = errors[0] if errors else {}
    return str(first.get("reason", "")) if isinstance(first, Mapping) else ""


def _request_id(exc: gexc.GoogleAPICallError) -> str | None:
    for detail in exc.details or []:
        if isinstance(detail, Mapping) and str(detail.get("@type", "")).endswith("RequestInfo"):
            return str(detail.get("requestId"))
    return None


def map_error(err: Exception, context: str, **details: Any) -> NovaCronError:
    """The NovaCron error for a google-api-core / google-auth / requests exception."""
    base = {**details, "provider": "gcp"}
    if isinstance(err, gexc.RetryError) and isinstance(err.cause, Exception):
        mapped = map_error(err.cause, context, **details)
        mapped.details["retries_exhausted"] = True
        return mapped
    if isinstance(err, gexc.GoogleAPICallError):
        operation = err.response if isinstance(err.response, compute_v1.Operation) else None
        request_id: str | None
        if operation is not None:  # a failed long-running operation
            first = operation.error.errors[0] if operation.error.errors else None
            code = str(first.code if first else err.code)
            cls = OPERATION_CODES.get(code, STATUSES.get(int(err.code or 0), DriverError))
            message = str(first.message if first else err.message)
            request_id = str(operation.client_operation_id or operation.name)
            status = int(operation.http_error_status_code)
        else:
            code = _reason(err) or str(err.code)
            cls = REASONS.get(code, STATUSES.get(int(err.code or 0), DriverError))
            message, request_id, status = err.message, _request_id(err), int(err.code or 0)
        if code in THROTTLE_REASONS or status == 429:
            cls = Throttled
            message = f"GCP kept throttling the request: {message}"
        return cls(f"{context}: {message} (GCP {code}, request {request_id})", details={
            **base, "provider_code": code, "request_id": request_id, "http_status": status})
    if isinstance(err, google.auth.exceptions.DefaultCredentialsError
                  | google.auth.exceptions.RefreshError):
        return Unauthenticated(f"{context}: {err}", details=base)
    if isinstance(err, requests.exceptions.Timeout):
        return OperationTimeout(f"{context}: {err}", details=base)
    if isinstance(err, requests.exceptions.ConnectionError):
        return HostUnreachable(f"{context}: {err}", details=base)
    if isinstance(err, TimeoutError | _Transitional):
        return OperationTimeout(f"{context}: timed out waiting on GCP", details=base)
    return DriverError(f"{context}: {err}", details=base)


@register
class GcpDriver(CloudDriver):
    """Compute Engine instances of one zone (see the module docstring)."""

    name: ClassVar[str] = "gcp"
    provider_label: ClassVar[str] = "GCP"
    instance_type_label: ClassVar[str] = "gcp.machine_type"

    def __init__(self, host: str, uri: str | None, config: Mapping[str, Any],
                 state_dir: Path) -> None:
        super().__init__(host, uri, config, state_dir, _OWN_KEYS)
        c = self.config
        self.project = require_str(self.name, c, "project")
        self.zone = require_str(self.name, c, "zone")
        self.network = str(c.get("network", "global/networks/default"))
        self.subnetwork = c.get("subnetwork")
        if self.settings.credentials.source == "profile":
            raise InvalidRequest("gcp credentials come from 'default', 'env', 'file' or "
                                 "'anonymous'; profiles are AWS's", details={"driver": self.name})
        try:
            self._retry = retry.Retry(
                predicate=_retryable, initial=float(c.get("retry_initial_s", 1.0)),
                maximum=float(c.get("retry_maximum_s", 32.0)), multiplier=2.0,
                timeout=float(c.get("retry_timeout_s", 120.0)), on_error=self._on_retry)
            self._timeout = float(c.get("read_timeout_s", 60.0))
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad gcp host config: {exc}", details={"driver": self.name},
                                 ) from None
        self._clients: dict[str, Any] = {}
        self._monitoring: Any = None
        self._monitoring_url = str(c.get("monitoring_endpoint_url")
                                   or self.settings.endpoint_url
                                   or "https://monitoring.googleapis.com").rstrip("/")
        self.region = ""

    @property
    def capabilities(self) -> frozenset[Capability]:
        """Reboot (a hard reset) and pause (GCE suspend: memory kept on disk)."""
        return frozenset({Capability.REBOOT, Capability.PAUSE})

    def missing_capabilities(self) -> dict[Capability, str]:
        """The shared reasons; what importing a disk into Compute Engine would take."""
        reasons = super().missing_capabilities()
        reasons[Capability.IMAGE_IMPORT] = (
            "importing a disk into Compute Engine means uploading it as disk.raw in a .tar.gz "
            "to a Cloud Storage bucket and inserting an image from that object, which the gcp "
            "driver (google-cloud-compute only, no Cloud Storage) does not implement")
        reasons[Capability.COLD_MIGRATION] = (
            "VMs cannot be migrated into GCP (no image import: "
            f"{reasons[Capability.IMAGE_IMPORT]}) nor out of it (no disk export)")
        return reasons

    # -- clients ----------------------------------------------------------------------------
    def _credential_watcher(self) -> CredentialWatcher:
        path = self._credentials_path()
        return CredentialWatcher((), [path] if path else [],
                                 check_interval_s=self.settings.credential_check_interval_s)

    def _credentials_path(self) -> Path | None:
        ref = self.settings.credentials
        if ref.source == "file":
            return ref.path
        if ref.source == "env":
            value = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
            if not value:
                raise Unauthenticated("gcp credentials from the environment need "
                                      "GOOGLE_APPLICATION_CREDENTIALS",
                                      details={"driver": self.name, "provider": self.name})
            return Path(value)
        return None

    def _credentials(self) -> Any:
        source = self.settings.credentials.source
        if source == "anonymous":
            return google.auth.credentials.AnonymousCredentials()  # type: ignore[no-untyped-call]
        path = self._credentials_path()
        with self._call("load the gcp credentials"):
            if path is None:
                credentials, _ = google.auth.default(scopes=_SCOPES)
                return credentials
            data = read_json_file(path, self.name)
            if "access_token" not in data:
                credentials, _ = google.auth.load_credentials_from_file(  # type: ignore[no-untyped-call]
                    str(path), scopes=_SCOPES)
                return credentials
            token, expiry = self._token(path)
            return google.oauth2.credentials.Credentials(  # type: ignore[no-untyped-call]
                token, expiry=expiry, refresh_handler=lambda request, scopes: self._token(path))

    def _token(self, path: Path) -> tuple[str, datetime | None]:
        """The access token of a token file and its expiry (naive UTC, as google-auth wants)."""
        data = read_json_file(path, self.name)
        expires = expiry_of(data, "expires_on", "expiry")
        if self._watcher is not None:
            self._watcher.expires_at = expires
        when = datetime.fromtimestamp(expires, UTC).replace(tzinfo=None) if expires else None
        return str(data["access_token"]), when

    def _build_clients(self) -> None:
        options = (client_options.ClientOptions(api_endpoint=self.settings.endpoint_url)
                   if self.settings.endpoint_url else None)
        credentials = self._credentials()
        kwargs = {"credentials": credentials, "transport": "rest", "client_options": options}
        self._monitoring = google.auth.transport.requests.AuthorizedSession(  # type: ignore[no-untyped-call]
            credentials)
        self._clients = {
            "instances": compute_v1.InstancesClient(**kwargs),
            "operations": compute_v1.ZoneOperationsClient(**kwargs),
            "machine_types": compute_v1.MachineTypesClient(**kwargs),
            "zones": compute_v1.ZonesClient(**kwargs),
            "regions": compute_v1.RegionsClient(**kwargs),
        }

    def _close_clients(self) -> None:
        for client in self._clients.values():
            client.transport.close()
        if self._monitoring is not None:
            self._monitoring.close()
        self._clients, self._monitoring = {}, None

    def _client(self, name: str) -> Any:
        self.ensure_clients()
        return self._clients[name]

    def _on_retry(self, exc: Exception) -> None:
        """google-api-core ``on_error`` hook: count attempts GCP answered with throttling."""
        if isinstance(exc, gexc.TooManyRequests) or (
                isinstance(exc, gexc.Forbidden) and _reason(exc) in THROTTLE_REASONS):
            self.health.throttled()

    @contextlib.contextmanager
    def _call(self, context: str, **details: Any) -> Iterator[None]:
        """Run GCP calls, mapping any SDK error into NovaCron's tree (the one place)."""
        try:
            yield
        except NovaCronError:
            raise
        except Exception as err:
            if isinstance(err, gexc.GoogleAPICallError | gexc.RetryError
                          | google.auth.exceptions.GoogleAuthError
                          | requests.exceptions.RequestException | TimeoutError | _Transitional):
                raise self.note_error(map_error(err, context, host=self.host,
                                                **details)) from err
            raise
        self.health.succeeded()

    def _rpc(self, client: str, method: str, context: str, **request: Any) -> Any:
        """One call with the driver's retry and timeout."""
        with self._call(context, **{k: v for k, v in request.items() if isinstance(v, str)}):
            call: Callable[..., Any] = getattr(self._client(client), method)
            return call(request={"project": self.project, **request}, retry=self._retry,
                        timeout=self._timeout)

    def _operate(self, method: str, context: str, timeout_s: float | None = None,
                 **request: Any) -> None:
        """Start a zonal operation and wait until it is done (its error raised, mapped)."""
        request = {"zone": self.zone, "request_id": str(uuid.uuid4()), **request}
        operation = self._rpc("instances", method, context, **request)
        wait = functools.partial(self._client("operations").wait,
                                 request={"project": self.project, "zone": self.zone,
                                          "operation": operation.name},
                                 retry=self._retry, timeout=self._timeout)
        timeout = self.settings.operation_timeout_s if timeout_s is None else timeout_s
        interval = self.settings.poll_interval_s
        future = _ZoneOperation.make(  # type: ignore[no-untyped-call]
            wait, lambda: None, operation,
            polling=polling.DEFAULT_POLLING.with_delay(initial=interval, maximum=interval * 4)
            .with_timeout(timeout))
        with self._call(context, operation=operation.name):
            future.result(timeout=timeout)

    # -- zone, catalogue, quota -------------------------------------------------------------
    def _location(self) -> str:
        return self.zone

    def _catalogue_scope(self) -> str:
        return f"{self.project}|{self.zone}"

    def _check_location(self) -> None:
        try:
            with self._call("look up the GCP zone", zone=self.zone):
                zone = self._clients["zones"].get(
                    request={"project": self.project, "zone": self.zone}, retry=self._retry,
                    timeout=self._timeout)
        except NotFound as exc:
            raise InvalidRequest(f"unknown GCP zone {self.zone!r} in project {self.project}: "
                                 f"{exc.message}", details=exc.details) from exc
        self.region = str(zone.region).rsplit("/", 1)[-1]

    def _load_types(self) -> list[InstanceType]:
        with self._call("list the GCE machine types", zone=self.zone):
            pager = self._client("machine_types").list(
                request={"project": self.project, "zone": self.zone,
                         "max_results": self.settings.page_size or 500},
                retry=self._retry, timeout=self._timeout)
            return [InstanceType(t.name, int(t.guest_cpus), int(t.memory_mb)) for t in pager]

    def _describe_type(self, name: str) -> InstanceType:
        """machineTypes.get: GCE answers a type the zone does not have with 404 notFound."""
        found = self._rpc("machine_types", "get", f"look up the GCE machine type {name}",
                          zone=self.zone, machine_type=name)
        return InstanceType(found.name, int(found.guest_cpus), int(found.memory_mb))

    def _quota_vcpus(self) -> float | None:
        region = self._rpc("regions", "get", "read the GCE CPU quota", region=self.region)
        return next((float(q.limit) for q in region.quotas if q.metric == "CPUS"), None)

    def _vcpu_quota(self, instance_type: InstanceType) -> VcpuQuota | None:
        """The region's quota of the type's family (``N2_CPUS``...) where it has one of its
        own, else ``CPUS`` (E2, N1...), with its usage as GCE reports it. GCE's answer carries
        no request id."""
        region = self._rpc("regions", "get", "read the GCE CPU quota", region=self.region)
        quotas = {q.metric: q for q in region.quotas}
        family = instance_type.name.split("-", 1)[0].upper()
        quota = quotas.get(f"{family}_CPUS") or quotas.get("CPUS")
        if quota is None:
            return None
        return VcpuQuota(str(quota.metric), float(quota.limit), float(quota.usage))

    # -- instances --------------------------------------------------------------------------
    def _parse(self, raw: Any) -> Instance:
        labels = dict(raw.labels)
        started = raw.last_start_timestamp or raw.creation_timestamp
        return Instance(
            vm_id=labels.get(tag_key(TAG_VM_ID, "-"), ""), instance_id=raw.name,
            state=STATES.get(raw.status, VMState.UNKNOWN), raw_state=raw.status,
            epoch=parse_epoch(labels.get(tag_key(TAG_EPOCH, "-"))),
            instance_type=str(raw.machine_type).rsplit("/", 1)[-1],
            started_at=datetime.fromisoformat(started).timestamp() if started else None)

    def _ours(self, raw: Any, vm_id: str) -> bool:
        labels = dict(raw.labels)
        return (labels.get(tag_key(TAG_VM_ID, "-")) == vm_id
                and labels.get(tag_key(TAG_HOST, "-")) == label(self.host))

    def _get_raw(self, name: str, context: str) -> Any:
        return self._rpc("instances", "get", context, zone=self.zone, instance=name)

    def _find(self, vm_id: str) -> Instance | None:
        try:
            raw = self._get_raw(instance_name(vm_id), f"find the instance of guest {vm_id}")
        except NotFound:
            return None
        return self._parse(raw) if self._ours(raw, vm_id) else None

    def _list_instances(self) -> list[Instance]:
        query = f'labels.{tag_key(TAG_HOST, "-")} = "{label(self.host)}"'
        with self._call(f"list the instances of host {self.host}", zone=self.zone):
            pager = self._client("instances").list(
                request={"project": self.project, "zone": self.zone, "filter": query,
                         "max_results": self.settings.page_size or 500},
                retry=self._retry, timeout=self._timeout)
            return [self._parse(raw) for raw in pager]

    def _labels(self, vm_id: str, epoch: int, name: str) -> dict[str, str]:
        return {k: label(v) for k, v in self.tags(vm_id, epoch, name, sep="-").items()}

    def _create(self, definition: Definition, epoch: int) -> Instance:
        vm_id, name = definition.vm_id, instance_name(definition.vm_id)
        context = f"create the instance of guest {vm_id}"
        interface = {"network": self.network}
        if self.subnetwork:
            interface["subnetwork"] = str(self.subnetwork)
        resource = {
            "name": name, "labels": self._labels(vm_id, epoch, definition.name),
            "machine_type": f"zones/{self.zone}/machineTypes/{definition.instance_type}",
            "disks": [{"boot": True, "auto_delete": True, "initialize_params": {
                "source_image": definition.image, "disk_size_gb": definition.disk_gib}}],
            "network_interfaces": [interface]}
        try:
            self._insert(definition, resource, context)
        except AlreadyExists as exc:
            found = self._find(vm_id)
            if found is None:
                raise AlreadyExists(f"{context}: instance {name} exists in {self.zone} but is "
                                    "not NovaCron's guest of this host",
                                    details=exc.details) from exc
            return self._settle(found)
        found = self._find(vm_id)
        if found is None:  # the requestId answered an earlier insert, since deleted
            log.warning("the instance of guest %s was deleted outside NovaCron; creating "
                        "another", vm_id)
            self._insert(self.definitions.renew(definition), resource, context)
            found = self._find(vm_id)
        if found is None:
            raise DriverError(f"{context}: GCE reported success but no instance {name} exists",
                              details={"vm_id": vm_id, "provider": "gcp"})
        return self._settle(found)

    def _insert(self, definition: Definition, resource: Mapping[str, Any], context: str) -> None:
        """Insert the instance; a failed insert leaves no instance behind."""
        try:
            self._operate("insert_unary", context, instance_resource=resource,
                          request_id=definition.token(self.host))
        except AlreadyExists:
            raise
        except NovaCronError:
            leftover = self._find(definition.vm_id)
            if leftover is not None:
                log.warning("removing the half-created instance of guest %s", definition.vm_id)
                self._operate("delete_unary", context, instance=leftover.instance_id)
            raise

    def _settle(self, instance: Instance) -> Instance:
        """The instance once it is out of a transitional status (polled with api-core retry)."""
        if instance.raw_state not in _TRANSITIONAL:
            return instance

        def settled() -> Instance:
            current = self._parse(self._get_raw(instance.instance_id, "poll the instance"))
            if current.raw_state in _TRANSITIONAL:
                raise _Transitional(current.raw_state)
            return current

        poll = retry.Retry(predicate=retry.if_exception_type(_Transitional),
                           initial=self.settings.poll_interval_s,
                           maximum=self.settings.poll_interval_s * 4,
                           timeout=self.settings.operation_timeout_s)
        with self._call(f"wait for guest {instance.vm_id} to settle"):
            result: Instance = poll(settled)()
        return result

    def _refetch(self, instance: Instance, context: str) -> Instance:
        return self._parse(self._get_raw(instance.instance_id, context))

    def _set_epoch(self, instance: Instance, epoch: int) -> None:
        context = f"record epoch {epoch} on guest {instance.vm_id}"
        raw = self._get_raw(instance.instance_id, context)
        labels = {**dict(raw.labels), tag_key(TAG_EPOCH, "-"): str(epoch)}
        self._operate("set_labels_unary", context, instance=instance.instance_id,
                      instances_set_labels_request_resource={
                          "labels": labels, "label_fingerprint": raw.label_fingerprint})

    def _power_on(self, instance: Instance) -> Instance:
        context = f"start guest {instance.vm_id}"
        instance = self._settle(instance)
        method = "resume_unary" if instance.raw_state == "SUSPENDED" else "start_unary"
        self._operate(method, context, instance=instance.instance_id)
        return self._settle(self._refetch(instance, context))

    def _power_off(self, instance: Instance, *, force: bool, timeout_s: float) -> Instance:
        context = f"stop guest {instance.vm_id}"
        try:
            self._operate("stop_unary", context, None if force else timeout_s,
                          instance=instance.instance_id, no_graceful_shutdown=force)
        except OperationTimeout:
            if force:
                raise
            log.warning("guest %s did not stop in %.0f s; forcing it off", instance.vm_id,
                        timeout_s)
            self._operate("stop_unary", context, instance=instance.instance_id,
                          no_graceful_shutdown=True)
        return self._settle(self._refetch(instance, context))

    def _restart(self, instance: Instance) -> Instance:
        context = f"reset guest {instance.vm_id}"
        self._operate("reset_unary", context, instance=instance.instance_id)
        return self._refetch(instance, context)

    def _suspend(self, instance: Instance) -> Instance:
        context = f"suspend guest {instance.vm_id}"
        self._operate("suspend_unary", context, instance=instance.instance_id)
        return self._settle(self._refetch(instance, context))

    def _unsuspend(self, instance: Instance) -> Instance:
        context = f"resume guest {instance.vm_id}"
        self._operate("resume_unary", context, instance=instance.instance_id)
        return self._settle(self._refetch(instance, context))

    def _destroy(self, instance: Instance, *, delete_storage: bool) -> None:
        context = f"delete the instance of guest {instance.vm_id}"
        if not delete_storage:
            raw = self._get_raw(instance.instance_id, context)
            for disk in raw.disks:
                if disk.auto_delete:
                    self._operate("set_disk_auto_delete_unary", context,
                                  instance=instance.instance_id, auto_delete=False,
                                  device_name=disk.device_name)
        self._operate("delete_unary", context, instance=instance.instance_id)

    # -- metrics ----------------------------------------------------------------------------
    def _metrics(self, instance: Instance) -> GuestStats:
        if instance.started_at is None:
            return GuestStats()
        self.ensure_clients()
        types = ", ".join(f'"{m}"' for m in MONITORING_METRICS)
        query: dict[str, str] = {
            "filter": f"metric.type = one_of({types}) AND "
                      f'metric.labels.instance_name = "{instance.instance_id}"',
            "interval.startTime": _rfc3339(instance.started_at),
            "interval.endTime": _rfc3339(time.time()),
            "aggregation.alignmentPeriod": "60s", "aggregation.perSeriesAligner": "ALIGN_SUM"}
        url = f"{self._monitoring_url}/v3/projects/{self.project}/timeSeries"
        fields = dict.fromkeys(MONITORING_METRICS.values(), 0.0)

        def page(token: str) -> Any:
            response = self._monitoring.get(url, params={**query, "pageToken": token},
                                            timeout=self._timeout)
            if response.status_code >= 400:
                raise gexc.from_http_response(response)  # type: ignore[no-untyped-call]
            return response.json()

        token = ""
        with self._call(f"read the metrics of guest {instance.vm_id}",
                        instance=instance.instance_id):
            while True:
                body = self._retry(page)(token)
                for series in body.get("timeSeries", []):
                    name = MONITORING_METRICS.get(series.get("metric", {}).get("type"))
                    if name:
                        fields[name] += sum(_point(p.get("value", {}))
                                            for p in series.get("points", []))
                token = body.get("nextPageToken", "")
                if not token:
                    break
        return GuestStats(cpu_time_s=fields["cpu_time_s"],
                          net_rx_bytes=int(fields["net_rx_bytes"]),
                          net_tx_bytes=int(fields["net_tx_bytes"]),
                          disk_read_bytes=int(fields["disk_read_bytes"]),
                          disk_written_bytes=int(fields["disk_written_bytes"]))


def _point(value: Mapping[str, Any]) -> float:
    """A Cloud Monitoring point value (int64 values come as strings)."""
    return float(value.get("doubleValue", value.get("int64Value", 0)))


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
