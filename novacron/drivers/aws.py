"""The AWS driver: an EC2 region under one account is a host; its guests are EC2 instances.

The shared lifecycle (define, then create on first start; epoch fencing; tags) is in
:mod:`novacron.drivers.cloud`; this module makes the boto3 calls. Instances are created with a
ClientToken derived from the guest's definition, so a RunInstances retried after a timeout (by
botocore or by an actor) returns the instance the first call made. Calls retry throttling and
transient failures through botocore's ``standard`` (or ``adaptive``) retry mode; creates, starts,
stops and deletes wait through boto3 waiters. Errors are mapped by EC2 error code in
:meth:`AwsDriver._call`, the one place, keeping AWS's request id.

Host ``config`` keys, besides the shared ones of :mod:`novacron.drivers.cloud`:

``region`` (required)
    e.g. ``eu-west-1``; checked against the account's region list (DescribeRegions).
``home_region``
    where that list is asked (``us-east-1``; another partition needs its own).
``subnet_id`` / ``security_group_ids`` / ``key_name`` / ``volume_type``
    passed to RunInstances (volume type ``gp3``).
``architecture``
    the processor architecture of the types a guest may get (``x86_64``).
``retry_mode``
    ``standard`` or ``adaptive`` (client-side rate limiting after throttling).
``connect_timeout_s`` / ``read_timeout_s``
    per attempt (10, 60).

Credentials (``config["credentials"]``): ``default`` (boto3's chain: environment, shared files,
SSO, instance role), ``env`` (the ``AWS_*`` variables), ``profile`` (a named profile of the shared
files, re-read when they change) or ``file``: a JSON object with ``aws_access_key_id``,
``aws_secret_access_key`` and optionally ``aws_session_token`` and ``expiration``, re-read when it
changes and checked eagerly near its expiration.

Metrics come from CloudWatch (``AWS/EC2``: CPUUtilization, NetworkIn/Out, Disk* and EBS*
bytes) over the time since the instance last started.

Cold migration into AWS (IMAGE_IMPORT, :mod:`actors.migration.cloud_import`):
:meth:`AwsDriver.import_disk` writes a raw disk image (a stopped sim guest's ``disk.img``) into an
EBS snapshot with the EBS direct APIs, sending only the 512 KiB blocks that hold data (holes are
found with SEEK_DATA, never read) and, on a later import of the same guest, only those that
changed (the new snapshot's parent is the previous one); it registers the snapshot as an AMI
tagged with the guest and host, and returns the AMI id, which the guest is then defined with.
``import_workers`` (8) blocks are in flight at once; a progress callback after each block may
abort the import, which then deletes its snapshot. :meth:`AwsDriver.discard_imports` (and
``undefine`` with its storage) deregisters every AMI and deletes every snapshot tagged for the
guest, an interrupted import's too.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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
    ImportProgress,
    Instance,
    InstanceType,
    VcpuQuota,
    check_vm_id,
    expiry_of,
    parse_epoch,
    read_json_file,
    require_str,
    tag_key,
    write_atomic,
)
from novacron.errors import (
    Conflict,
    DriverError,
    Forbidden,
    GuestError,
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
    import boto3
    import botocore.config
    import botocore.exceptions as boto_errors
    from botocore.parsers import ResponseParserError
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise NotSupported('the aws driver needs boto3: pip install "novacron[aws]"',
                       details={"driver": "aws"}) from _exc

log = logging.getLogger("novacron.drivers.aws")

# EC2 instance state name -> VM state; anything else is UNKNOWN.
STATES: Mapping[str, VMState] = {
    "pending": VMState.STARTING,
    "running": VMState.RUNNING,
    "stopping": VMState.STOPPING,
    "stopped": VMState.STOPPED,
    "shutting-down": VMState.DELETING,
    "terminated": VMState.DELETED,
}
_LIVE = ["pending", "running", "stopping", "stopped", "shutting-down"]

THROTTLE_CODES = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottledException", "TooManyRequestsException", "EC2ThrottledException",
    "RequestThrottled", "SlowDown", "PriorRequestNotComplete"})

# EC2 (and CloudWatch, Service Quotas, STS) error code -> NovaCron error.
ERRORS: Mapping[str, type[NovaCronError]] = {
    "InvalidInstanceID.NotFound": NotFound,
    "InvalidAMIID.NotFound": NotFound,
    "InvalidAMIID.Unavailable": NotFound,
    "InvalidSubnetID.NotFound": NotFound,
    "InvalidGroup.NotFound": NotFound,
    "InvalidKeyPair.NotFound": NotFound,
    "NoSuchResourceException": NotFound,
    "InvalidParameterValue": InvalidRequest,
    "InvalidParameter": InvalidRequest,
    "InvalidParameterCombination": InvalidRequest,
    "MissingParameter": InvalidRequest,
    "UnknownParameter": InvalidRequest,
    "InvalidInstanceType": InvalidRequest,
    "InvalidInstanceType.NotFound": InvalidRequest,
    "InvalidAMIID.Malformed": InvalidRequest,
    "InvalidInstanceID.Malformed": InvalidRequest,
    "InvalidBlockDeviceMapping": InvalidRequest,
    "ValidationError": InvalidRequest,
    "ValidationException": InvalidRequest,
    "IncorrectInstanceState": InvalidTransition,
    "IncorrectState": InvalidTransition,
    "IdempotentParameterMismatch": Conflict,
    "InstanceLimitExceeded": QuotaExceeded,
    "VcpuLimitExceeded": QuotaExceeded,
    "VolumeLimitExceeded": QuotaExceeded,
    "MaxIOPSLimitExceeded": QuotaExceeded,
    "ResourceLimitExceeded": QuotaExceeded,
    "ServiceQuotaExceededException": QuotaExceeded,
    "InsufficientInstanceCapacity": NoCapacity,
    "InsufficientHostCapacity": NoCapacity,
    "InsufficientReservedInstanceCapacity": NoCapacity,
    "InsufficientCapacity": NoCapacity,
    "InsufficientFreeAddressesInSubnet": NoCapacity,
    "AuthFailure": Unauthenticated,
    "InvalidClientTokenId": Unauthenticated,
    "SignatureDoesNotMatch": Unauthenticated,
    "IncompleteSignature": Unauthenticated,
    "MissingAuthenticationToken": Unauthenticated,
    "ExpiredToken": Unauthenticated,
    "RequestExpired": Unauthenticated,
    "UnrecognizedClientException": Unauthenticated,
    "UnauthorizedOperation": Forbidden,
    "AccessDenied": Forbidden,
    "AccessDeniedException": Forbidden,
    "OptInRequired": Forbidden,
    "Blocked": Forbidden,
    "Unsupported": NotSupported,
    "UnsupportedOperation": NotSupported,
    "InternalError": HostUnreachable,
    "InternalFailure": HostUnreachable,
    "ServiceUnavailable": HostUnreachable,
    "Unavailable": HostUnreachable,
    **dict.fromkeys(THROTTLE_CODES, Throttled),
}

_VCPU_QUOTA = ("ec2", "L-1216C47A")  # Running On-Demand Standard (A, C, D, H, I, M, R, T, Z)
# The instance types that quota counts (families A, C, D, H, I, M, R, T, Z; not DL, HPC, Inf,
# Trn, Mac, which have their own).
_STANDARD_FAMILY = re.compile(r"^(a|c|d|h|i|im|is|m|r|t|z)\d")
_TYPES_PER_CALL = 100  # instance type names one DescribeInstanceTypes takes
_OWN_KEYS = frozenset({"region", "home_region", "subnet_id", "security_group_ids", "key_name",
                       "volume_type", "architecture", "retry_mode", "connect_timeout_s",
                       "read_timeout_s", "import_workers"})
EBS_BLOCK = 512 * 1024  # the block size of the EBS direct APIs
_GIB = 1024**3
_ROOT_DEVICE = "/dev/xvda"
_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# CloudWatch metric -> (statistic, GuestStats field); CPU is turned into seconds.
_METRICS: Mapping[str, tuple[str, str]] = {
    "CPUUtilization": ("Average", "cpu_time_s"),
    "NetworkIn": ("Sum", "net_rx_bytes"),
    "NetworkOut": ("Sum", "net_tx_bytes"),
    "DiskReadBytes": ("Sum", "disk_read_bytes"),
    "DiskWriteBytes": ("Sum", "disk_written_bytes"),
    "EBSReadBytes": ("Sum", "disk_read_bytes"),
    "EBSWriteBytes": ("Sum", "disk_written_bytes"),
}
_MAX_POINTS = 1440  # CloudWatch datapoints per metric asked for at most


def map_error(err: Exception, context: str, **details: Any) -> NovaCronError:
    """The NovaCron error for a botocore exception; ``context`` says what was being done."""
    if isinstance(err, boto_errors.ClientError):
        error = err.response.get("Error", {})
        meta = err.response.get("ResponseMetadata", {})
        code = str(error.get("Code", "Unknown"))
        request_id = meta.get("RequestId") or err.response.get("RequestID")
        cls = ERRORS.get(code, DriverError)
        message = error.get("Message") or str(err)
        if cls is Throttled:
            message = (f"AWS kept throttling the request after {meta.get('RetryAttempts', 0)} "
                       f"retries: {message}")
        return cls(f"{context}: {message} (AWS {code}, request {request_id})", details={
            **details, "provider": "aws", "provider_code": code, "request_id": request_id,
            "http_status": meta.get("HTTPStatusCode")})
    if isinstance(err, boto_errors.NoCredentialsError | boto_errors.PartialCredentialsError):
        return Unauthenticated(f"{context}: {err}", details={**details, "provider": "aws"})
    if isinstance(err, boto_errors.ProfileNotFound):
        return InvalidRequest(f"{context}: {err}", details={**details, "provider": "aws"})
    if isinstance(err, boto_errors.ParamValidationError):
        return InvalidRequest(f"{context}: {err}", details={**details, "provider": "aws"})
    if isinstance(err, boto_errors.ReadTimeoutError):
        return OperationTimeout(f"{context}: {err}", details={**details, "provider": "aws"})
    if isinstance(err, boto_errors.EndpointConnectionError | boto_errors.ConnectionError):
        return HostUnreachable(f"{context}: {err}", details={**details, "provider": "aws"})
    return DriverError(f"{context}: {err}", details={**details, "provider": "aws"})


@register
class AwsDriver(CloudDriver):
    """EC2 instances of one region (see the module docstring)."""

    name: ClassVar[str] = "aws"
    provider_label: ClassVar[str] = "AWS"
    instance_type_label: ClassVar[str] = "aws.instance_type"

    def __init__(self, host: str, uri: str | None, config: Mapping[str, Any],
                 state_dir: Path) -> None:
        super().__init__(host, uri, config, state_dir, _OWN_KEYS)
        c = self.config
        self.region = require_str(self.name, c, "region")
        self.home_region = str(c.get("home_region", "us-east-1"))
        self.architecture = str(c.get("architecture", "x86_64"))
        self.volume_type = str(c.get("volume_type", "gp3"))
        self.retry_mode = str(c.get("retry_mode", "standard"))
        if self.retry_mode not in ("standard", "adaptive"):
            raise InvalidRequest(f"aws retry_mode must be standard or adaptive, not "
                                 f"{self.retry_mode!r}", details={"driver": self.name})
        self._launch = {k: v for k, v in (("SubnetId", c.get("subnet_id")),
                                           ("SecurityGroupIds", c.get("security_group_ids")),
                                           ("KeyName", c.get("key_name"))) if v}
        if self.settings.credentials.source == "anonymous":
            raise InvalidRequest("aws credentials come from 'default', 'env', 'profile' or "
                                 "'file'", details={"driver": self.name})
        try:
            self._timeouts = (float(c.get("connect_timeout_s", 10.0)),
                              float(c.get("read_timeout_s", 60.0)))
            self._import_workers = max(1, int(c.get("import_workers", 8)))
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad aws host config: {exc}",
                                 details={"driver": self.name}) from None
        self._imports = self.state_dir / "cloud" / self.name / "imports" / host
        self._clients: dict[str, Any] = {}

    @property
    def capabilities(self) -> frozenset[Capability]:
        """Reboot, and image import (:meth:`import_disk`)."""
        return frozenset({Capability.REBOOT, Capability.IMAGE_IMPORT})

    def missing_capabilities(self) -> dict[Capability, str]:
        """The shared reasons; cold migration is one-way."""
        reasons = super().missing_capabilities()
        reasons[Capability.COLD_MIGRATION] = (
            "a disk can be moved into AWS (IMAGE_IMPORT: import_disk, then define and start "
            "the guest with the returned AMI) but not out of it: the aws driver does not "
            "export EBS snapshots")
        return reasons

    # -- clients ----------------------------------------------------------------------------
    def _credential_watcher(self) -> CredentialWatcher:
        ref = self.settings.credentials
        files: list[Path] = []
        if ref.source == "file" and ref.path is not None:
            files = [ref.path]
        elif ref.source in ("profile", "default"):
            files = [Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")),
                     Path(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))]
            files = [f.expanduser() for f in files]
        env = _ENV if ref.source in ("env", "default") else ()
        return CredentialWatcher(env, files,
                                 check_interval_s=self.settings.credential_check_interval_s)

    def _session(self) -> Any:
        ref = self.settings.credentials
        if ref.source == "file":
            assert ref.path is not None
            data = read_json_file(ref.path, self.name)
            try:
                keys = {"aws_access_key_id": data["aws_access_key_id"],
                        "aws_secret_access_key": data["aws_secret_access_key"],
                        "aws_session_token": data.get("aws_session_token")}
            except KeyError as exc:
                raise Unauthenticated(f"the aws credentials file {ref.path} lacks {exc}",
                                      details={"driver": self.name,
                                               "provider": self.name}) from None
            if self._watcher is not None:
                self._watcher.expires_at = expiry_of(data, "expiration", "Expiration")
            return boto3.Session(region_name=self.region, **keys)
        if ref.source == "env":
            missing = [n for n in _ENV[:2] if not os.environ.get(n)]
            if missing:
                raise Unauthenticated(f"aws credentials from the environment need {missing}",
                                      details={"driver": self.name, "provider": self.name})
            return boto3.Session(region_name=self.region,
                                 aws_access_key_id=os.environ[_ENV[0]],
                                 aws_secret_access_key=os.environ[_ENV[1]],
                                 aws_session_token=os.environ.get(_ENV[2]))
        with self._call("open the aws profile"):
            return boto3.Session(region_name=self.region, profile_name=ref.profile)

    def _build_clients(self) -> None:
        session = self._session()
        config = botocore.config.Config(
            retries={"mode": self.retry_mode, "total_max_attempts": self.settings.max_attempts},
            connect_timeout=self._timeouts[0], read_timeout=self._timeouts[1],
            user_agent_extra="novacron")
        url = self.settings.endpoint_url
        clients = {
            "ec2": session.client("ec2", config=config, endpoint_url=url),
            "home": session.client("ec2", config=config, endpoint_url=url,
                                   region_name=self.home_region),
            "cloudwatch": session.client("cloudwatch", config=config, endpoint_url=url),
            "quotas": session.client("service-quotas", config=config, endpoint_url=url),
            "ebs": session.client("ebs", config=config, endpoint_url=url),
        }
        for client in clients.values():
            client.meta.events.register("needs-retry", self._count_throttle)
        self._clients = clients

    def _close_clients(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients = {}

    def _client(self, name: str) -> Any:
        self.ensure_clients()
        return self._clients[name]

    def _count_throttle(self, response: Any = None, **_: Any) -> None:
        """botocore ``needs-retry`` hook: count attempts AWS answered with throttling."""
        if response is not None and response[1].get("Error", {}).get("Code") in THROTTLE_CODES:
            self.health.throttled()

    @contextlib.contextmanager
    def _call(self, context: str, **details: Any) -> Iterator[None]:
        """Run AWS calls, mapping any botocore error into NovaCron's tree (the one place)."""
        try:
            yield
        except boto_errors.WaiterError as err:
            raise self.note_error(self._waiter_error(err, context, details)) from err
        except (boto_errors.BotoCoreError, boto_errors.ClientError, ResponseParserError) as err:
            raise self.note_error(map_error(err, context, host=self.host, **details)) from err
        self.health.succeeded()

    def _waiter_error(self, err: Any, context: str, details: Mapping[str, Any]) -> NovaCronError:
        last = err.last_response or {}
        if "Error" in last:
            return map_error(boto_errors.ClientError(last, "Waiter"), context, host=self.host,
                             **details)
        if "Max attempts exceeded" in str(err.kwargs.get("reason", "")):
            return OperationTimeout(f"{context}: timed out waiting on AWS ({err})",
                                    details={**details, "host": self.host, "provider": "aws"})
        reasons = [i.get("StateReason", {}).get("Message", "")
                   for r in last.get("Reservations", []) for i in r.get("Instances", [])]
        return GuestError(f"{context}: {err}; {'; '.join(r for r in reasons if r)}".rstrip("; "),
                          details={**details, "host": self.host, "provider": "aws"})

    def _waiter_config(self, timeout_s: float | None = None) -> dict[str, float]:
        return {"Delay": self.settings.poll_interval_s, "MaxAttempts": self.polls(timeout_s)}

    def _wait(self, waiter: str, instance_id: str, context: str,
              timeout_s: float | None = None) -> None:
        with self._call(context, instance_id=instance_id):
            self._client("ec2").get_waiter(waiter).wait(
                InstanceIds=[instance_id], WaiterConfig=self._waiter_config(timeout_s))

    # -- region, catalogue, quota -----------------------------------------------------------
    def _location(self) -> str:
        return self.region

    def _catalogue_scope(self) -> str:
        return f"{self.region}|{self.architecture}|{','.join(self.settings.instance_types)}"

    def _check_location(self) -> None:
        with self._call("list the AWS regions", region=self.region):
            answer = self._clients["home"].describe_regions(AllRegions=True)
        status = {r["RegionName"]: r.get("OptInStatus", "") for r in answer["Regions"]}
        details = {"region": self.region, "provider": "aws",
                   "request_id": answer.get("ResponseMetadata", {}).get("RequestId")}
        if self.region not in status:
            raise self.note_error(InvalidRequest(
                f"unknown AWS region {self.region!r}; this account knows: "
                f"{', '.join(sorted(status))}", details=details))
        if status[self.region] == "not-opted-in":
            raise self.note_error(Forbidden(
                f"AWS region {self.region} is not enabled for this account (opt in first)",
                details=details))

    def _load_types(self) -> list[InstanceType]:
        filters = [{"Name": "supported-usage-class", "Values": ["on-demand"]},
                   {"Name": "processor-info.supported-architecture",
                    "Values": [self.architecture]}]
        if self.settings.instance_types:  # EC2 matches the same globs: list only those
            filters.append({"Name": "instance-type",
                            "Values": list(self.settings.instance_types)})
        return self._types("list the EC2 instance types", Filters=filters)

    def _types(self, context: str, **query: Any) -> list[InstanceType]:
        """The instance types DescribeInstanceTypes answers ``query`` with (every page)."""
        types: list[InstanceType] = []
        with self._call(context, region=self.region):
            pages = self._client("ec2").get_paginator("describe_instance_types").paginate(
                **query)
            for page in pages:
                types.extend(InstanceType(t["InstanceType"], int(t["VCpuInfo"]["DefaultVCpus"]),
                                          int(t["MemoryInfo"]["SizeInMiB"]))
                             for t in page["InstanceTypes"])
        return types

    def _describe_type(self, name: str) -> InstanceType:
        """DescribeInstanceTypes of ``name``: EC2 answers a type it does not offer in the
        region with InvalidInstanceType."""
        return self._types(f"look up the EC2 instance type {name}", InstanceTypes=[name])[0]

    def _service_quota(self) -> tuple[float, str, str | None] | None:
        """The account's Standard vCPU quota as (value, name, request id): the applied
        value, else AWS's default; None when Service Quotas knows neither."""
        service, code = _VCPU_QUOTA
        quotas = self._client("quotas")
        for read in (quotas.get_service_quota, quotas.get_aws_default_service_quota):
            try:
                with self._call("read the EC2 vCPU quota", quota=code):
                    answer = read(ServiceCode=service, QuotaCode=code)
            except NotFound:
                continue
            quota = answer["Quota"]
            name = f"{code} ({quota['QuotaName']})" if quota.get("QuotaName") else code
            return (float(quota["Value"]), name,
                    answer.get("ResponseMetadata", {}).get("RequestId"))
        return None

    def _quota_vcpus(self) -> float | None:
        quota = self._service_quota()
        return None if quota is None else quota[0]

    def _vcpu_quota(self, instance_type: InstanceType) -> VcpuQuota | None:
        """The Standard quota with the vCPUs of the region's running On-Demand Standard
        instances (every page; AWS counts the whole account's). Other families (G, P, X,
        Inf...) count against quotas of their own, which are not read: None."""
        if not _STANDARD_FAMILY.match(instance_type.name):
            return None
        quota = self._service_quota()
        if quota is None:
            return None
        limit, name, request_id = quota
        return VcpuQuota(name, limit, self._standard_vcpus_running(), request_id)

    def _standard_vcpus_running(self) -> float:
        """vCPUs of the region's pending and running On-Demand Standard instances."""
        running: Counter[str] = Counter()
        with self._call("count the running EC2 vCPUs", region=self.region):
            pages = self._client("ec2").get_paginator("describe_instances").paginate(
                Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
            for page in pages:
                running.update(i["InstanceType"] for r in page["Reservations"]
                               for i in r["Instances"]
                               if not i.get("InstanceLifecycle")  # spot: a quota of its own
                               and _STANDARD_FAMILY.match(i["InstanceType"]))
        types = dict(self.catalogue.types())
        unknown = sorted(set(running) - set(types))
        for first in range(0, len(unknown), _TYPES_PER_CALL):
            types.update((t.name, t) for t in self._types(
                "look up running EC2 instance types",
                InstanceTypes=unknown[first:first + _TYPES_PER_CALL]))
        return float(sum(types[name].vcpus * count for name, count in running.items()))

    # -- instances --------------------------------------------------------------------------
    def _parse(self, raw: Mapping[str, Any]) -> Instance:
        tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
        state = raw["State"]["Name"]
        launched = raw.get("LaunchTime")
        return Instance(vm_id=tags.get(tag_key(TAG_VM_ID), ""), instance_id=raw["InstanceId"],
                        state=STATES.get(state, VMState.UNKNOWN), raw_state=state,
                        epoch=parse_epoch(tags.get(tag_key(TAG_EPOCH))),
                        instance_type=raw.get("InstanceType", ""),
                        started_at=launched.timestamp() if launched else None)

    def _describe(self, context: str, filters: list[dict[str, Any]],
                  **details: Any) -> list[Instance]:
        found: list[Instance] = []
        paging = {"PageSize": self.settings.page_size} if self.settings.page_size else {}
        with self._call(context, **details):
            pages = self._client("ec2").get_paginator("describe_instances").paginate(
                Filters=[*filters, {"Name": f"tag:{tag_key(TAG_HOST)}", "Values": [self.host]},
                         {"Name": "instance-state-name", "Values": _LIVE}],
                PaginationConfig=paging)
            for page in pages:
                found.extend(self._parse(i) for r in page["Reservations"]
                             for i in r["Instances"])
        return found

    def _find(self, vm_id: str) -> Instance | None:
        found = self._describe("find the instance of guest " + vm_id,
                               [{"Name": f"tag:{tag_key(TAG_VM_ID)}", "Values": [vm_id]}],
                               vm_id=vm_id)
        if len(found) > 1:
            log.error("guest %s has %d instances on %s: %s", vm_id, len(found), self.host,
                      [i.instance_id for i in found])
        return min(found, key=lambda i: i.started_at or 0.0, default=None)

    def _by_id(self, instance_id: str, context: str) -> Instance:
        with self._call(context, instance_id=instance_id):
            reservations = self._client("ec2").describe_instances(
                InstanceIds=[instance_id])["Reservations"]
        return self._parse(reservations[0]["Instances"][0])

    def _list_instances(self) -> list[Instance]:
        return self._describe(f"list the instances of host {self.host}", [])

    def _create(self, definition: Definition, epoch: int) -> Instance:
        vm_id = definition.vm_id
        context = f"create the instance of guest {vm_id}"
        with self._call(context, vm_id=vm_id, image=definition.image):
            images = self._client("ec2").describe_images(ImageIds=[definition.image])["Images"]
        if not images:
            raise self.note_error(NotFound(
                f"{context}: image {definition.image} does not exist in {self.region}",
                details={"vm_id": vm_id, "image": definition.image, "provider": "aws"}))
        raw = self._run(definition, epoch, images[0], context)
        if raw["State"]["Name"] in ("shutting-down", "terminated"):
            # The token's instance was deleted since: a new definition nonce, a new instance.
            log.warning("the instance %s of guest %s was deleted outside NovaCron; creating "
                        "another", raw["InstanceId"], vm_id)
            raw = self._run(self.definitions.renew(definition), epoch, images[0], context)
        self._wait("instance_running", raw["InstanceId"], context)
        return self._by_id(raw["InstanceId"], context)

    def _run(self, definition: Definition, epoch: int, image: Mapping[str, Any],
             context: str) -> Any:
        tags = self.tags(definition.vm_id, epoch, definition.name)
        root: Mapping[str, Any] = next((m for m in image.get("BlockDeviceMappings", [])
                     if m.get("DeviceName") == image.get("RootDeviceName")), {})
        size = max(definition.disk_gib, int(root.get("Ebs", {}).get("VolumeSize", 0)))
        with self._call(context, vm_id=definition.vm_id,
                        instance_type=definition.instance_type):
            reservation = self._client("ec2").run_instances(
                ImageId=definition.image, InstanceType=definition.instance_type,
                MinCount=1, MaxCount=1, ClientToken=definition.token(self.host),
                BlockDeviceMappings=[{"DeviceName": image.get("RootDeviceName", "/dev/xvda"),
                                      "Ebs": {"VolumeSize": size,
                                              "VolumeType": self.volume_type,
                                              "DeleteOnTermination": True}}],
                TagSpecifications=[
                    {"ResourceType": "instance",
                     "Tags": [{"Key": k, "Value": v} for k, v in
                              {**tags, "Name": definition.name}.items()]},
                    {"ResourceType": "volume",
                     "Tags": [{"Key": tag_key(k), "Value": tags[tag_key(k)]}
                              for k in (TAG_VM_ID, TAG_HOST)]}],
                **self._launch)
        return reservation["Instances"][0]

    def _set_epoch(self, instance: Instance, epoch: int) -> None:
        with self._call(f"record epoch {epoch} on guest {instance.vm_id}",
                        instance_id=instance.instance_id):
            self._client("ec2").create_tags(
                Resources=[instance.instance_id],
                Tags=[{"Key": tag_key(TAG_EPOCH), "Value": str(epoch)}])

    def _power_on(self, instance: Instance) -> Instance:
        context = f"start guest {instance.vm_id}"
        if instance.state == VMState.STOPPING:
            self._wait("instance_stopped", instance.instance_id, context)
        with self._call(context, instance_id=instance.instance_id):
            self._client("ec2").start_instances(InstanceIds=[instance.instance_id])
        self._wait("instance_running", instance.instance_id, context)
        return self._by_id(instance.instance_id, context)

    def _power_off(self, instance: Instance, *, force: bool, timeout_s: float) -> Instance:
        context = f"stop guest {instance.vm_id}"
        ec2 = self._client("ec2")
        with self._call(context, instance_id=instance.instance_id):
            ec2.stop_instances(InstanceIds=[instance.instance_id], Force=force)
        try:
            self._wait("instance_stopped", instance.instance_id, context,
                       None if force else timeout_s)
        except OperationTimeout:
            if force:
                raise
            log.warning("guest %s did not shut down in %.0f s; forcing it off", instance.vm_id,
                        timeout_s)
            with self._call(context, instance_id=instance.instance_id):
                ec2.stop_instances(InstanceIds=[instance.instance_id], Force=True)
            self._wait("instance_stopped", instance.instance_id, context)
        return self._by_id(instance.instance_id, context)

    def _restart(self, instance: Instance) -> Instance:
        with self._call(f"reboot guest {instance.vm_id}", instance_id=instance.instance_id):
            self._client("ec2").reboot_instances(InstanceIds=[instance.instance_id])
        return instance

    def _destroy(self, instance: Instance, *, delete_storage: bool) -> None:
        context = f"delete the instance of guest {instance.vm_id}"
        ec2 = self._client("ec2")
        with self._call(context, instance_id=instance.instance_id):
            if not delete_storage:
                raw = ec2.describe_instances(InstanceIds=[instance.instance_id])
                mappings = raw["Reservations"][0]["Instances"][0].get("BlockDeviceMappings", [])
                if mappings:
                    ec2.modify_instance_attribute(
                        InstanceId=instance.instance_id,
                        BlockDeviceMappings=[{"DeviceName": m["DeviceName"],
                                              "Ebs": {"DeleteOnTermination": False}}
                                             for m in mappings])
            ec2.terminate_instances(InstanceIds=[instance.instance_id])
        self._wait("instance_terminated", instance.instance_id, context)

    # -- metrics ----------------------------------------------------------------------------
    def _metrics(self, instance: Instance) -> GuestStats:
        if instance.started_at is None:
            return GuestStats()
        first = math.floor(instance.started_at / 60) * 60  # whole minutes, as CloudWatch keeps
        last = max(first + 60, math.ceil(time.time() / 60) * 60)
        start, end = (datetime.fromtimestamp(t, UTC) for t in (first, last))
        period = 60 * max(1, math.ceil((last - first) / 60 / _MAX_POINTS))
        queries = [{"Id": f"m{i}", "ReturnData": True,
                    "MetricStat": {"Metric": {"Namespace": "AWS/EC2", "MetricName": metric,
                                              "Dimensions": [{"Name": "InstanceId",
                                                              "Value": instance.instance_id}]},
                                   "Period": period, "Stat": stat}}
                   for i, (metric, (stat, _)) in enumerate(_METRICS.items())]
        totals = dict.fromkeys(_METRICS, 0.0)
        with self._call(f"read the metrics of guest {instance.vm_id}",
                        instance_id=instance.instance_id):
            paginator = self._client("cloudwatch").get_paginator("get_metric_data")
            for page in paginator.paginate(MetricDataQueries=queries, StartTime=start,
                                           EndTime=end):
                for result in page["MetricDataResults"]:
                    metric = list(_METRICS)[int(result["Id"][1:])]
                    totals[metric] += sum(result["Values"])
        vcpus = self.catalogue.types().get(instance.instance_type)
        fields: dict[str, float] = {}
        for metric, (_, name) in _METRICS.items():
            value = totals[metric]
            if metric == "CPUUtilization":
                value = value / 100.0 * period * (vcpus.vcpus if vcpus else 1)
            fields[name] = fields.get(name, 0.0) + value
        return GuestStats(cpu_time_s=fields["cpu_time_s"],
                          disk_read_bytes=int(fields["disk_read_bytes"]),
                          disk_written_bytes=int(fields["disk_written_bytes"]),
                          net_rx_bytes=int(fields["net_rx_bytes"]),
                          net_tx_bytes=int(fields["net_tx_bytes"]))

    # -- image import -----------------------------------------------------------------------
    def import_disk(self, vm_id: str, source: Path, *, name: str | None = None,
                    progress: ImportProgress | None = None) -> str:
        """Import the raw disk image ``source`` as guest ``vm_id``'s AMI; returns its id.

        Only blocks that differ from the last import of this guest's disk are sent (the first
        time, every block holding data: holes and all-zero blocks are skipped). ``progress``
        is called after each block (see :meth:`CloudDriver.import_disk`). The previous AMI and
        snapshot, and what an interrupted import left, are removed once the new AMI is
        available; a failed or aborted import deletes the snapshot it started.
        """
        check_vm_id(vm_id)
        context = f"import the disk of guest {vm_id}"
        try:
            size_gib = max(1, math.ceil(source.stat().st_size / _GIB))
            digests = _block_digests(source)
        except OSError as exc:
            raise InvalidRequest(f"{context}: cannot read {source}: {exc.strerror}",
                                 details={"vm_id": vm_id, "source": str(source)}) from None
        previous = self._last_import(vm_id, size_gib)
        before: list[str | None] = previous["digests"] if previous else []
        changed = [i for i, d in enumerate(digests)
                   if d != (before[i] if i < len(before) else None)]
        changed += [i for i in range(len(digests), len(before)) if before[i] is not None]
        tags = [{"Key": tag_key(TAG_VM_ID), "Value": vm_id},
                {"Key": tag_key(TAG_HOST), "Value": self.host}]
        parent = {"ParentSnapshotId": previous["snapshot_id"]} if previous else {}
        with self._call(context, source=str(source)):
            snapshot = self._client("ebs").start_snapshot(
                VolumeSize=size_gib, Tags=tags, Description=name or f"NovaCron guest {vm_id}",
                ClientToken=str(uuid.uuid4()), Timeout=60, **parent)["SnapshotId"]
        try:
            self._send_blocks(source, snapshot, changed, context, progress)
            with self._call(context, snapshot_id=snapshot):
                self._client("ebs").complete_snapshot(SnapshotId=snapshot,
                                                      ChangedBlocksCount=len(changed))
                self._client("ec2").get_waiter("snapshot_completed").wait(
                    SnapshotIds=[snapshot], WaiterConfig=self._waiter_config())
            image = self._register(vm_id, snapshot, context, tags)
        except BaseException:  # a provider error, or the caller aborting through progress
            with contextlib.suppress(NovaCronError), self._call(context, snapshot_id=snapshot):
                self._client("ec2").delete_snapshot(SnapshotId=snapshot)
            raise
        write_atomic(self._imports / f"{vm_id}.json", json.dumps({
            "snapshot_id": snapshot, "image_id": image, "size_gib": size_gib,
            "digests": digests}))
        try:
            self._discard(vm_id, keep={snapshot, image})
        except NovaCronError as exc:  # the import stands; the next one (or undefine) retries
            log.warning("guest %s: could not remove older imports: %s", vm_id, exc.message)
        log.info("imported %s as %s (%d of %d blocks sent) for guest %s", source, image,
                 len(changed), len(digests), vm_id)
        return image

    def discard_imports(self, vm_id: str) -> None:
        """Deregister every AMI and delete every snapshot imported for guest ``vm_id`` on this
        host (found by their tags, so an interrupted import's too) and forget the last one."""
        self._discard(vm_id, keep=set())
        (self._imports / f"{vm_id}.json").unlink(missing_ok=True)

    def undefine(self, vm_id: str, *, delete_storage: bool = True) -> None:
        """Delete the instance and the record; with ``delete_storage`` the guest's imported
        AMIs and snapshots too."""
        super().undefine(vm_id, delete_storage=delete_storage)
        if delete_storage:
            self.discard_imports(vm_id)

    def _discard(self, vm_id: str, keep: set[str]) -> None:
        """Remove the guest's imported AMIs and snapshots on this host but those in ``keep``."""
        ec2 = self._client("ec2")
        mine = [{"Name": f"tag:{tag_key(TAG_VM_ID)}", "Values": [vm_id]},
                {"Name": f"tag:{tag_key(TAG_HOST)}", "Values": [self.host]}]
        context = f"remove the imported images of guest {vm_id}"
        with self._call(context, vm_id=vm_id):
            images = [i["ImageId"] for i in ec2.describe_images(Owners=["self"],
                                                                Filters=mine)["Images"]]
            snapshots = [s["SnapshotId"]
                         for page in ec2.get_paginator("describe_snapshots").paginate(
                             OwnerIds=["self"], Filters=mine)
                         for s in page["Snapshots"]]
        for image in images:  # an AMI first: its snapshot cannot go while it is registered
            if image not in keep:
                with contextlib.suppress(NotFound), self._call(context, image_id=image):
                    ec2.deregister_image(ImageId=image)
                log.info("deregistered %s (imported for guest %s)", image, vm_id)
        for snapshot in snapshots:
            if snapshot not in keep:
                with contextlib.suppress(NotFound), self._call(context, snapshot_id=snapshot):
                    ec2.delete_snapshot(SnapshotId=snapshot)

    def _last_import(self, vm_id: str, size_gib: int) -> dict[str, Any] | None:
        """The record of this guest's last import, if its disk had the same size."""
        try:
            record: dict[str, Any] = json.loads((self._imports / f"{vm_id}.json").read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("size_gib") == size_gib else None

    def _send_blocks(self, source: Path, snapshot: str, blocks: list[int], context: str,
                     progress: ImportProgress | None) -> None:
        """Send ``blocks`` with ``import_workers`` in flight; ``progress`` after each."""
        ebs = self._client("ebs")
        total = len(blocks) * EBS_BLOCK

        def send(fd: int, index: int) -> None:
            data = os.pread(fd, EBS_BLOCK, index * EBS_BLOCK).ljust(EBS_BLOCK, b"\0")
            ebs.put_snapshot_block(
                SnapshotId=snapshot, BlockIndex=index, BlockData=data, DataLength=EBS_BLOCK,
                Checksum=base64.b64encode(hashlib.sha256(data).digest()).decode(),
                ChecksumAlgorithm="SHA256")

        sent = 0
        pool = ThreadPoolExecutor(self._import_workers, thread_name_prefix="ebs-put")
        with self._call(context, snapshot_id=snapshot), open(source, "rb") as f:
            try:
                pending: set[Future[None]] = set()
                for n, index in enumerate(blocks, 1):
                    pending.add(pool.submit(send, f.fileno(), index))
                    while pending and (len(pending) >= 2 * self._import_workers
                                       or n == len(blocks)):
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            future.result()
                            sent += EBS_BLOCK
                            if progress is not None:
                                progress(sent, total)
            finally:  # on an error or an abort, send no more than what is in flight
                pool.shutdown(wait=True, cancel_futures=True)

    def _register(self, vm_id: str, snapshot: str, context: str,
                  tags: list[dict[str, str]]) -> str:
        with self._call(context, snapshot_id=snapshot):
            ec2 = self._client("ec2")
            image = ec2.register_image(
                Name=f"novacron-{vm_id}-{snapshot}", RootDeviceName=_ROOT_DEVICE,
                VirtualizationType="hvm", Architecture=self.architecture, EnaSupport=True,
                BlockDeviceMappings=[{"DeviceName": _ROOT_DEVICE, "Ebs": {
                    "SnapshotId": snapshot, "DeleteOnTermination": True,
                    "VolumeType": self.volume_type}}],
                TagSpecifications=[{"ResourceType": "image", "Tags": tags}])["ImageId"]
            ec2.get_waiter("image_available").wait(ImageIds=[image],
                                                  WaiterConfig=self._waiter_config())
        return str(image)


def _block_digests(source: Path) -> list[str | None]:
    """The SHA-256 of each 512 KiB block of ``source`` (zero-padded), None for all-zero ones;
    the holes of a sparse file are not read."""
    zero = bytes(EBS_BLOCK)
    size = source.stat().st_size
    digests: list[str | None] = [None] * math.ceil(size / EBS_BLOCK)
    with open(source, "rb") as f:
        for index in _data_blocks(f.fileno(), size):
            block = os.pread(f.fileno(), EBS_BLOCK, index * EBS_BLOCK).ljust(EBS_BLOCK, b"\0")
            if block != zero:
                digests[index] = hashlib.sha256(block).hexdigest()
    return digests


def _data_blocks(fd: int, size: int) -> Iterator[int]:
    """The indexes of the blocks of a file that hold data, as SEEK_DATA/SEEK_HOLE tell (a file
    system that cannot tell holes reports all data)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from offset to the end
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        last = (end - 1) // EBS_BLOCK
        yield from range(start // EBS_BLOCK, last + 1)
        offset = (last + 1) * EBS_BLOCK
