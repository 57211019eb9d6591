"""The Azure driver: a location of one subscription and resource group is a host; its guests are
virtual machines.

The shared lifecycle (define, then create on first start; epoch fencing; tags) is in
:mod:`novacron.drivers.cloud`; this module makes the azure-mgmt-compute calls. VMs get the
deterministic name ``novacron-<vm_id>`` and are created with ``If-None-Match: *``, so a create
retried after a timeout finds the VM the first try made (a PUT of the same definition is then
repeated, which ARM treats as a no-op) and a foreign VM of that name is never overwritten. A VM
whose provisioning failed is deleted before the error is raised. Calls retry throttling (429
with Retry-After) and transient failures through azure-core's RetryPolicy; long operations are
waited on with the SDK's LRO pollers (``Azure-AsyncOperation``) at ``poll_interval_s``. The epoch
tag is written with ``If-Match`` on the VM's etag. Errors are mapped by ARM error code in
:func:`map_error`, keeping ``x-ms-request-id``. Azure has no pause.

Host ``config`` keys, besides the shared ones of :mod:`novacron.drivers.cloud`:

``subscription_id`` / ``resource_group`` / ``location`` (required)
    where the VMs go; the location and group are checked to exist.
``subnet_id`` / ``ssh_public_key`` (required to create VMs)
    the subnet of their NIC (created and deleted with the VM) and the key of ``admin_username``
    (``novacron``). A public key is not a secret.
``os_disk_type``
    managed disk type of the OS disk (``StandardSSD_LRS``); its size is at least 30 GiB.
``deallocate``
    stop deallocates (``true``: no compute charges) or only powers off.
``retry_backoff_factor`` / ``retry_backoff_max_s``
    azure-core backoff between retries (0.8, 60); retries are ``max_attempts - 1``.
``ca_bundle``
    a CA file to verify the endpoint with (private endpoints; the local fake in tests).
``connection_timeout_s`` / ``read_timeout_s``
    per attempt (10, 60).

Images are marketplace URNs (``publisher:offer:sku:version``) or resource ids
(``/subscriptions/.../images/...``). Credentials (``config["credentials"]``): ``default``
(DefaultAzureCredential), ``env`` (EnvironmentCredential) or ``file``: a JSON object with
``tenant_id``, ``client_id`` and ``client_secret`` (a service principal) or ``access_token`` and
``expires_on`` (a token another process renews).

Metrics come from Azure Monitor (``Microsoft.Insights/metrics`` of the VM: Percentage CPU,
Network In/Out Total, Disk Read/Write Bytes) over the time since the VM last started, asked
through the compute client's own pipeline (``send_request``: same credentials, retries and
endpoint), so azure-mgmt-monitor is not needed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlencode

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
    RevisionMismatch,
    Throttled,
    Unauthenticated,
)
from novacron.states import VMState

try:
    import azure.identity
    from azure.core import MatchConditions
    from azure.core.credentials import AccessToken
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.core.pipeline import PipelineRequest, PipelineResponse
    from azure.core.pipeline.policies import SansIOHTTPPolicy
    from azure.core.rest import HttpRequest
    from azure.mgmt.compute import ComputeManagementClient
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise NotSupported('the azure driver needs azure-mgmt-compute and azure-identity: '
                       'pip install "novacron[azure]"', details={"driver": "azure"}) from _exc

log = logging.getLogger("novacron.drivers.azure")

# Azure power state (instance view status code) -> VM state; anything else is UNKNOWN.
POWER_STATES: Mapping[str, VMState] = {
    "PowerState/starting": VMState.STARTING,
    "PowerState/running": VMState.RUNNING,
    "PowerState/stopping": VMState.STOPPING,
    "PowerState/stopped": VMState.STOPPED,
    "PowerState/deallocating": VMState.STOPPING,
    "PowerState/deallocated": VMState.STOPPED,
}
# Provisioning states that decide the VM state (compared in lower case: ARM varies it); a
# creating VM's own power state wins once it has one.
PROVISIONING_STATES: Mapping[str, VMState] = {
    "provisioningstate/failed": VMState.ERROR,
    "provisioningstate/deleting": VMState.DELETING,
    "provisioningstate/creating": VMState.STARTING,
}

THROTTLE_CODES = frozenset({"TooManyRequests", "SubscriptionRequestsThrottled",
                            "ResourceRequestsThrottled", "429"})
# ARM error code -> NovaCron error.
ERRORS: Mapping[str, type[NovaCronError]] = {
    "ResourceNotFound": NotFound,
    "NotFound": NotFound,
    "PlatformImageNotFound": NotFound,
    "ImageNotFound": NotFound,
    "ResourceGroupNotFound": InvalidRequest,
    "SubscriptionNotFound": InvalidRequest,
    "InvalidParameter": InvalidRequest,
    "BadRequest": InvalidRequest,
    "InvalidRequestContent": InvalidRequest,
    "InvalidRequestFormat": InvalidRequest,
    "InvalidResourceName": InvalidRequest,
    "InvalidResourceReference": InvalidRequest,
    "PropertyChangeNotAllowed": InvalidRequest,
    "MissingApiVersionParameter": InvalidRequest,
    "NoRegisteredProviderFound": InvalidRequest,
    "LocationNotAvailableForResourceType": InvalidRequest,
    "InvalidLocation": InvalidRequest,
    "SkuNotAvailable": NoCapacity,
    "AllocationFailed": NoCapacity,
    "ZonalAllocationFailed": NoCapacity,
    "OverconstrainedAllocationRequest": NoCapacity,
    "OverconstrainedZonalAllocationRequest": NoCapacity,
    "QuotaExceeded": QuotaExceeded,
    "ResourceQuotaExceeded": QuotaExceeded,
    "OperationNotAllowed": QuotaExceeded,  # how ARM refuses a VM over the vCPU quota
    "Conflict": Conflict,
    "OperationPreempted": Conflict,
    "PreconditionFailed": RevisionMismatch,
    "InvalidAuthenticationToken": Unauthenticated,
    "InvalidAuthenticationTokenTenant": Unauthenticated,
    "InvalidAuthenticationTokenAudience": Unauthenticated,
    "ExpiredAuthenticationToken": Unauthenticated,
    "AuthenticationFailed": Unauthenticated,
    "AuthorizationFailed": Forbidden,
    "LinkedAuthorizationFailed": Forbidden,
    "RequestDisallowedByPolicy": Forbidden,
    "InternalServerError": HostUnreachable,
    "InternalExecutionError": HostUnreachable,
    "ServiceUnavailable": HostUnreachable,
    "GatewayTimeout": HostUnreachable,
    **dict.fromkeys(THROTTLE_CODES, Throttled),
}
STATUSES: Mapping[int, type[NovaCronError]] = {
    400: InvalidRequest, 401: Unauthenticated, 403: Forbidden, 404: NotFound, 409: Conflict,
    412: RevisionMismatch, 429: Throttled, 500: HostUnreachable, 502: HostUnreachable,
    503: HostUnreachable, 504: HostUnreachable}

MONITOR_API_VERSION = "2023-10-01"
# Azure Monitor metric -> (aggregation, GuestStats field); CPU is turned into seconds.
MONITOR_METRICS: Mapping[str, tuple[str, str]] = {
    "Percentage CPU": ("average", "cpu_time_s"),
    "Network In Total": ("total", "net_rx_bytes"),
    "Network Out Total": ("total", "net_tx_bytes"),
    "Disk Read Bytes": ("total", "disk_read_bytes"),
    "Disk Write Bytes": ("total", "disk_written_bytes"),
}
# The coarsest-first grains Azure Monitor offers: (longest window, ISO 8601, seconds).
_GRAINS = ((86400.0, "PT1M", 60), (5 * 86400.0, "PT5M", 300), (15 * 86400.0, "PT15M", 900),
           (30 * 86400.0, "PT30M", 1800), (60 * 86400.0, "PT1H", 3600),
           (math.inf, "PT6H", 21600))
_OWN_KEYS = frozenset({"subscription_id", "resource_group", "location", "subnet_id",
                       "ssh_public_key", "admin_username", "os_disk_type", "deallocate",
                       "retry_backoff_factor", "retry_backoff_max_s", "ca_bundle",
                       "connection_timeout_s", "read_timeout_s"})
_MIN_OS_DISK_GIB = 30


def map_error(err: Exception, context: str, **details: Any) -> NovaCronError:
    """The NovaCron error for an azure-core / azure-identity exception."""
    base = {**details, "provider": "azure"}
    if isinstance(err, HttpResponseError) and err.status_code is not None:
        code = str(err.error.code if err.error and err.error.code else err.status_code)
        message = str(err.error.message if err.error and err.error.message else err.message)
        headers = getattr(err.response, "headers", None) or {}
        request_id = headers.get("x-ms-request-id")
        cls = ERRORS.get(code, STATUSES.get(int(err.status_code), DriverError))
        if code in THROTTLE_CODES or err.status_code == 429:
            cls = Throttled
            message = f"Azure kept throttling the request: {message}"
        return cls(f"{context}: {message} (Azure {code}, request {request_id})", details={
            **base, "provider_code": code, "request_id": request_id,
            "http_status": err.status_code})
    if isinstance(err, ClientAuthenticationError | azure.identity.CredentialUnavailableError):
        return Unauthenticated(f"{context}: {err}", details=base)
    if isinstance(err, ServiceResponseError):
        return OperationTimeout(f"{context}: {err}", details=base)
    if isinstance(err, ServiceRequestError):
        return HostUnreachable(f"{context}: {err}", details=base)
    return DriverError(f"{context}: {err}", details=base)


def _collect_request_id(into: list[str]) -> Callable[[PipelineResponse[Any, Any]], None]:
    """An azure-core ``raw_response_hook`` appending each answer's ``x-ms-request-id``."""

    def hook(response: PipelineResponse[Any, Any]) -> None:
        request_id = response.http_response.headers.get("x-ms-request-id")
        if request_id:
            into.append(str(request_id))

    return hook


def image_reference(image: str) -> dict[str, str]:
    """The ARM imageReference of a URN or an image resource id; InvalidRequest otherwise."""
    if image.startswith("/subscriptions/"):
        return {"id": image}
    parts = image.split(":")
    if len(parts) != 4 or not all(parts):
        raise InvalidRequest(f"Azure image {image!r} is neither publisher:offer:sku:version "
                             "nor an image resource id", details={"image": image})
    return dict(zip(("publisher", "offer", "sku", "version"), parts, strict=True))


def vm_state(statuses: Sequence[Any]) -> tuple[VMState, str]:
    """The VM state of an instance view's statuses, and the status code that decided it."""
    codes = [str(s.code) for s in statuses if s.code]
    provisioning = next((c for c in codes if c.lower().startswith("provisioningstate/")), "")
    power = next((c for c in codes if c.startswith("PowerState/")), "")
    decided = PROVISIONING_STATES.get(provisioning.lower())
    if decided is not None and not (power and decided == VMState.STARTING):
        return decided, provisioning
    if power:
        return POWER_STATES.get(power, VMState.UNKNOWN), power
    return VMState.UNKNOWN, provisioning or "no status"


class _TokenFile:
    """An azure-core TokenCredential reading ``{"access_token", "expires_on"}`` at each call."""

    def __init__(self, path: Path, on_expiry: Callable[[float | None], None]) -> None:
        self._path = path
        self._on_expiry = on_expiry

    def get_token(self, *scopes: str, claims: str | None = None, tenant_id: str | None = None,
                  enable_cae: bool = False, **kwargs: Any) -> AccessToken:
        """The token in the file (azure-core asks again when it nears expiry)."""
        data = read_json_file(self._path, "azure")
        expires = expiry_of(data, "expires_on", "expiresOn")
        self._on_expiry(expires)
        if "access_token" not in data:
            raise Unauthenticated(f"the azure token file {self._path} lacks access_token",
                                  details={"driver": "azure", "provider": "azure"})
        return AccessToken(str(data["access_token"]), int(expires or 0))


class _ThrottleCounter(SansIOHTTPPolicy[Any, Any]):
    """Per-retry pipeline policy: counts attempts ARM answered with 429."""

    def __init__(self, on_throttle: Callable[[], None]) -> None:
        self._on_throttle = on_throttle

    def on_response(self, request: PipelineRequest[Any], response: PipelineResponse[Any, Any],
                    ) -> None:
        if response.http_response.status_code == 429:
            self._on_throttle()


@register
class AzureDriver(CloudDriver):
    """Virtual machines of one location and resource group (see the module docstring)."""

    name: ClassVar[str] = "azure"
    provider_label: ClassVar[str] = "Azure"
    instance_type_label: ClassVar[str] = "azure.vm_size"

    def __init__(self, host: str, uri: str | None, config: Mapping[str, Any],
                 state_dir: Path) -> None:
        super().__init__(host, uri, config, state_dir, _OWN_KEYS)
        c = self.config
        self.subscription_id = require_str(self.name, c, "subscription_id")
        self.resource_group = require_str(self.name, c, "resource_group")
        self.location = require_str(self.name, c, "location")
        self.subnet_id = c.get("subnet_id")
        self.ssh_public_key = c.get("ssh_public_key")
        self.admin_username = str(c.get("admin_username", "novacron"))
        self.os_disk_type = str(c.get("os_disk_type", "StandardSSD_LRS"))
        self.deallocate = bool(c.get("deallocate", True))
        if self.settings.credentials.source in ("profile", "anonymous"):
            raise InvalidRequest("azure credentials come from 'default', 'env' or 'file'",
                                 details={"driver": self.name})
        try:
            self._client_options: dict[str, Any] = {
                "polling_interval": self.settings.poll_interval_s,
                "retry_total": self.settings.max_attempts - 1,
                "retry_backoff_factor": float(c.get("retry_backoff_factor", 0.8)),
                "retry_backoff_max": float(c.get("retry_backoff_max_s", 60.0)),
                "connection_timeout": float(c.get("connection_timeout_s", 10.0)),
                "read_timeout": float(c.get("read_timeout_s", 60.0)),
                "connection_verify": str(c["ca_bundle"]) if c.get("ca_bundle") else True,
            }
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad azure host config: {exc}",
                                 details={"driver": self.name}) from None
        self._client: Any = None

    def missing_capabilities(self) -> dict[Capability, str]:
        """The shared reasons; what importing a disk into Azure would take."""
        reasons = super().missing_capabilities()
        reasons[Capability.IMAGE_IMPORT] = (
            "importing a disk into Azure means an upload-ready managed disk, a write SAS from "
            "its grantAccess and the image sent as page-blob writes to Blob Storage, which the "
            "azure driver (azure-mgmt-compute only) does not implement")
        reasons[Capability.COLD_MIGRATION] = (
            "VMs cannot be migrated into Azure (no image import: "
            f"{reasons[Capability.IMAGE_IMPORT]}) nor out of it (no disk export)")
        return reasons

    # -- clients ----------------------------------------------------------------------------
    def _credential_watcher(self) -> CredentialWatcher:
        ref = self.settings.credentials
        files = [ref.path] if ref.source == "file" and ref.path else []
        env = (("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET",
                "AZURE_CLIENT_CERTIFICATE_PATH") if ref.source in ("env", "default") else ())
        return CredentialWatcher(env, files,
                                 check_interval_s=self.settings.credential_check_interval_s)

    def _credential(self) -> Any:
        ref = self.settings.credentials
        if ref.source == "env":
            return azure.identity.EnvironmentCredential()
        if ref.source == "default":
            return azure.identity.DefaultAzureCredential()
        assert ref.path is not None
        data = read_json_file(ref.path, self.name)
        if "client_secret" in data:
            try:
                return azure.identity.ClientSecretCredential(
                    str(data["tenant_id"]), str(data["client_id"]), str(data["client_secret"]))
            except KeyError as exc:
                raise Unauthenticated(f"the azure credentials file {ref.path} lacks {exc}",
                                      details={"driver": self.name,
                                               "provider": self.name}) from None
        return _TokenFile(ref.path, self._note_expiry)

    def _note_expiry(self, expires_at: float | None) -> None:
        if self._watcher is not None:
            self._watcher.expires_at = expires_at

    def _build_clients(self) -> None:
        self._client = ComputeManagementClient(
            self._credential(), self.subscription_id,
            base_url=self.settings.endpoint_url or "https://management.azure.com",
            per_retry_policies=[_ThrottleCounter(self.health.throttled)],
            **self._client_options)

    def _close_clients(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def _compute(self) -> Any:
        self.ensure_clients()
        return self._client

    @contextlib.contextmanager
    def _call(self, context: str, **details: Any) -> Iterator[None]:
        """Run Azure calls, mapping any SDK error into NovaCron's tree (the one place)."""
        try:
            yield
        except AzureError as err:
            raise self.note_error(map_error(err, context, host=self.host, **details)) from err
        self.health.succeeded()

    def _lro(self, context: str, begin: Callable[[], Any], timeout_s: float | None = None,
             **details: Any) -> Any:
        """Start a long-running operation and wait on its poller; OperationTimeout if late."""
        timeout = self.settings.operation_timeout_s if timeout_s is None else timeout_s
        with self._call(context, **details):
            poller = begin()
            result = poller.result(timeout=timeout)
        if not poller.done():
            raise self.note_error(OperationTimeout(
                f"{context}: not done after {timeout:.0f} s", details={
                    **details, "host": self.host, "provider": "azure"}))
        return result

    def _vms(self) -> Any:
        return self._compute().virtual_machines

    # -- location, catalogue, quota ---------------------------------------------------------
    def _location(self) -> str:
        return self.location

    def _catalogue_scope(self) -> str:
        return f"{self.subscription_id}|{self.location}"

    def _check_location(self) -> None:
        try:
            with self._call("look up the Azure location", location=self.location):
                next(iter(self._client.usage.list(self.location)), None)
        except InvalidRequest as exc:
            raise InvalidRequest(f"unknown Azure location {self.location!r}: {exc.message}",
                                 details=exc.details) from exc
        with self._call("look up the resource group", resource_group=self.resource_group):
            next(iter(self._client.virtual_machines.list(self.resource_group)), None)

    def _resolve_image(self, image: str) -> str:
        image_reference(image)
        return image

    def _load_types(self) -> list[InstanceType]:
        return self._sizes("list the Azure VM sizes", [])

    def _sizes(self, context: str, request_ids: list[str]) -> list[InstanceType]:
        """The location's VM sizes (every page); each answer's request id goes to
        ``request_ids``."""
        with self._call(context, location=self.location):
            return [InstanceType(str(s.name), int(s.number_of_cores or 0),
                                 int(s.memory_in_mb or 0))
                    for s in self._compute().virtual_machine_sizes.list(
                        self.location, raw_response_hook=_collect_request_id(request_ids))]

    def _describe_type(self, name: str) -> InstanceType:
        """ARM gets no single VM size: the location's list is asked again (the cached one
        may be older than a size), and a size it lacks is an InvalidRequest with its request
        id."""
        context = f"look up the Azure VM size {name}"
        request_ids: list[str] = []
        found = next((s for s in self._sizes(context, request_ids) if s.name == name), None)
        if found is None:
            request_id = request_ids[0] if request_ids else None
            raise InvalidRequest(
                f"{context}: the VM sizes of location {self.location} do not include it "
                f"(Azure request {request_id})",
                details={"provider": self.name, "host": self.host, "location": self.location,
                         "request_id": request_id})
        return found

    def _cores(self) -> VcpuQuota | None:
        """The location's Total Regional vCPUs usage (``cores``), as ARM reports it."""
        request_ids: list[str] = []
        with self._call("read the Azure vCPU quota", location=self.location):
            usages = list(self._compute().usage.list(
                self.location, raw_response_hook=_collect_request_id(request_ids)))
        cores = next((u for u in usages if u.name and u.name.value == "cores"), None)
        if cores is None:
            return None
        label = cores.name.localized_value
        return VcpuQuota(f"cores ({label})" if label else "cores", float(cores.limit),
                         float(cores.current_value or 0),
                         request_ids[0] if request_ids else None)

    def _quota_vcpus(self) -> float | None:
        cores = self._cores()
        return None if cores is None else cores.limit

    def _vcpu_quota(self, instance_type: InstanceType) -> VcpuQuota | None:
        """The Total Regional vCPUs every size counts against (the per-family quotas ARM
        also lists are not read)."""
        return self._cores()

    # -- instances --------------------------------------------------------------------------
    def _parse(self, vm: Any, statuses: Sequence[Any] | None = None) -> Instance:
        tags = dict(vm.tags or {})
        if statuses is None:
            view = vm.properties.instance_view if vm.properties else None
            statuses = list(view.statuses or []) if view else []
        state, raw = vm_state(statuses)
        started = next((s.time for s in statuses if s.code == "PowerState/running" and s.time),
                       None)
        size = vm.properties.hardware_profile.vm_size if vm.properties else ""
        return Instance(vm_id=tags.get(tag_key(TAG_VM_ID), ""), instance_id=str(vm.id),
                        state=state, raw_state=raw,
                        epoch=parse_epoch(tags.get(tag_key(TAG_EPOCH))),
                        instance_type=str(size or ""),
                        started_at=started.timestamp() if isinstance(started, datetime)
                        else None)

    def _ours(self, vm: Any, vm_id: str) -> bool:
        tags = dict(vm.tags or {})
        return tags.get(tag_key(TAG_VM_ID)) == vm_id and tags.get(tag_key(TAG_HOST)) == self.host

    def _get_vm(self, name: str, context: str) -> Any:
        try:
            with self._call(context, vm=name):
                return self._vms().get(self.resource_group, name, expand="instanceView")
        except NotFound:
            return None

    def _find(self, vm_id: str) -> Instance | None:
        vm = self._get_vm(instance_name(vm_id), f"find the VM of guest {vm_id}")
        return self._parse(vm) if vm is not None and self._ours(vm, vm_id) else None

    def _list_instances(self) -> list[Instance]:
        with self._call(f"list the VMs of host {self.host}", resource_group=self.resource_group):
            ours = [vm for vm in self._vms().list(self.resource_group)
                    if dict(vm.tags or {}).get(tag_key(TAG_HOST)) == self.host]
            statuses = {str(vm.id).lower(): list(vm.properties.instance_view.statuses or [])
                        for vm in self._vms().list_all(status_only="true")
                        if vm.properties and vm.properties.instance_view} if ours else {}
        return [self._parse(vm, statuses.get(str(vm.id).lower(), [])) for vm in ours]

    def _body(self, definition: Definition, epoch: int) -> dict[str, Any]:
        if not self.subnet_id or not self.ssh_public_key:
            raise InvalidRequest(f"Azure host {self.host} needs subnet_id and ssh_public_key in "
                                 "its config to create VMs", details={"host": self.host})
        name = instance_name(definition.vm_id)
        admin = self.admin_username
        return {
            "location": self.location,
            "tags": self.tags(definition.vm_id, epoch, definition.name),
            "properties": {
                "hardwareProfile": {"vmSize": definition.instance_type},
                "storageProfile": {
                    "imageReference": image_reference(definition.image),
                    "osDisk": {"createOption": "FromImage", "deleteOption": "Delete",
                               "diskSizeGB": max(definition.disk_gib, _MIN_OS_DISK_GIB),
                               "managedDisk": {"storageAccountType": self.os_disk_type}}},
                "osProfile": {"computerName": name[:64], "adminUsername": admin,
                              "linuxConfiguration": {
                                  "disablePasswordAuthentication": True,
                                  "ssh": {"publicKeys": [{
                                      "path": f"/home/{admin}/.ssh/authorized_keys",
                                      "keyData": str(self.ssh_public_key)}]}}},
                "networkProfile": {
                    "networkApiVersion": "2020-11-01",
                    "networkInterfaceConfigurations": [{
                        "name": f"{name}-nic",
                        "properties": {"primary": True, "deleteOption": "Delete",
                                       "ipConfigurations": [{
                                           "name": "ipconfig1",
                                           "properties": {"subnet": {"id": self.subnet_id}}}]}}]},
            }}

    def _create(self, definition: Definition, epoch: int) -> Instance:
        vm_id, name = definition.vm_id, instance_name(definition.vm_id)
        context = f"create the VM of guest {vm_id}"
        body = self._body(definition, epoch)
        try:
            try:
                self._lro(context, lambda: self._vms().begin_create_or_update(
                    self.resource_group, name, body, match_condition=MatchConditions.IfMissing),
                    vm=name)
            except RevisionMismatch:  # it exists: ours from an earlier try, or someone else's
                existing = self._get_vm(name, context)
                if existing is None or not self._ours(existing, vm_id):
                    raise AlreadyExists(f"{context}: a VM named {name} exists in "
                                        f"{self.resource_group} but is not NovaCron's guest of "
                                        "this host", details={"vm": name}) from None
                self._lro(context, lambda: self._vms().begin_create_or_update(
                    self.resource_group, name, body), vm=name)
        except (AlreadyExists, InvalidRequest):
            raise
        except NovaCronError:
            self._remove_failed(vm_id, name, context)
            raise
        found = self._find(vm_id)
        if found is None:
            raise DriverError(f"{context}: ARM reported success but VM {name} is not there",
                              details={"vm": name, "provider": "azure"})
        return found

    def _remove_failed(self, vm_id: str, name: str, context: str) -> None:
        """Delete a VM of ours whose provisioning failed: nothing half-created stays."""
        leftover = self._find(vm_id)
        if leftover is not None and leftover.state == VMState.ERROR:
            log.warning("deleting VM %s: its provisioning failed", name)
            self._lro(context, lambda: self._vms().begin_delete(self.resource_group, name),
                      vm=name)

    def _set_epoch(self, instance: Instance, epoch: int) -> None:
        context = f"record epoch {epoch} on guest {instance.vm_id}"
        name = instance_name(instance.vm_id)
        vm = self._get_vm(name, context)
        if vm is None:
            raise NotFound(f"{context}: VM {name} is gone", details={"vm": name})
        tags = {**dict(vm.tags or {}), tag_key(TAG_EPOCH): str(epoch)}
        self._lro(context, lambda: self._vms().begin_update(
            self.resource_group, name, {"tags": tags}, etag=vm.etag,
            match_condition=MatchConditions.IfNotModified), vm=name)

    def _action(self, instance: Instance, context: str, begin: Callable[[Any, str], Any],
                timeout_s: float | None = None) -> None:
        name = instance_name(instance.vm_id)
        self._lro(context, lambda: begin(self.resource_group, name), timeout_s, vm=name)

    def _refetch(self, instance: Instance, context: str) -> Instance:
        vm = self._get_vm(instance_name(instance.vm_id), context)
        if vm is None:
            raise NotFound(f"{context}: the VM of guest {instance.vm_id} is gone",
                           details={"vm_id": instance.vm_id})
        return self._parse(vm)

    def _power_on(self, instance: Instance) -> Instance:
        context = f"start guest {instance.vm_id}"
        if instance.state == VMState.STOPPING:
            raise InvalidTransition(f"{context}: it is still {instance.raw_state}; try again",
                                    details={"vm_id": instance.vm_id})
        self._action(instance, context, self._vms().begin_start)
        return self._refetch(instance, context)

    def _power_off(self, instance: Instance, *, force: bool, timeout_s: float) -> Instance:
        context = f"stop guest {instance.vm_id}"
        vms = self._vms()
        if instance.raw_state != "PowerState/stopped":
            try:
                self._action(instance, context, lambda g, n: vms.begin_power_off(
                    g, n, skip_shutdown=force), None if force else timeout_s)
            except OperationTimeout:
                if force:
                    raise
                log.warning("guest %s did not shut down in %.0f s; forcing it off",
                            instance.vm_id, timeout_s)
                self._action(instance, context, lambda g, n: vms.begin_power_off(
                    g, n, skip_shutdown=True))
        if self.deallocate:
            self._action(instance, context, vms.begin_deallocate)
        return self._refetch(instance, context)

    def _restart(self, instance: Instance) -> Instance:
        context = f"restart guest {instance.vm_id}"
        self._action(instance, context, self._vms().begin_restart)
        return self._refetch(instance, context)

    def _destroy(self, instance: Instance, *, delete_storage: bool) -> None:
        context = f"delete the VM of guest {instance.vm_id}"
        name = instance_name(instance.vm_id)
        if not delete_storage:
            self._lro(context, lambda: self._vms().begin_update(
                self.resource_group, name,
                {"properties": {"storageProfile": {"osDisk": {"deleteOption": "Detach"}}}}),
                vm=name)
        self._action(instance, context, self._vms().begin_delete)

    # -- metrics ----------------------------------------------------------------------------
    def _metrics(self, instance: Instance) -> GuestStats:
        if instance.started_at is None:
            return GuestStats()
        first = math.floor(instance.started_at / 60) * 60
        last = max(first + 60, math.ceil(time.time() / 60) * 60)
        _, grain, grain_s = next(g for g in _GRAINS if last - first <= g[0])
        span = "/".join(datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                        for t in (first, last))
        query = urlencode({"api-version": MONITOR_API_VERSION, "timespan": span,
                           "interval": grain, "metricnames": ",".join(MONITOR_METRICS),
                           "aggregation": "average,total"})
        with self._call(f"read the metrics of guest {instance.vm_id}", vm=instance.instance_id):
            response = self._compute().send_request(HttpRequest(
                "GET", f"{instance.instance_id}/providers/Microsoft.Insights/metrics?{query}"))
            response.raise_for_status()
            body = response.json()
        size = self.catalogue.types().get(instance.instance_type)
        fields = dict.fromkeys(("cpu_time_s", "net_rx_bytes", "net_tx_bytes", "disk_read_bytes",
                                "disk_written_bytes"), 0.0)
        for metric in body.get("value", []):
            aggregation, name = MONITOR_METRICS.get(metric.get("name", {}).get("value"),
                                                    ("", ""))
            if not name:
                continue
            total = sum(float(point.get(aggregation) or 0.0)
                        for series in metric.get("timeseries", [])
                        for point in series.get("data", []))
            if name == "cpu_time_s":
                total = total / 100.0 * grain_s * (size.vcpus if size else 1)
            fields[name] += total
        return GuestStats(cpu_time_s=fields["cpu_time_s"],
                          net_rx_bytes=int(fields["net_rx_bytes"]),
                          net_tx_bytes=int(fields["net_tx_bytes"]),
                          disk_read_bytes=int(fields["disk_read_bytes"]),
                          disk_written_bytes=int(fields["disk_written_bytes"]))
