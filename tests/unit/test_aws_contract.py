"""The AWS driver through boto3's real code paths against moto in server mode (127.0.0.1).

A fault proxy in front of moto (tests/fakes/moto_server.py) throttles, delays, fails and revokes
keys the way EC2 would, and honours ClientToken as EC2 does.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest

from novacron.drivers.aws import STATES, AwsDriver
from novacron.drivers.base import Capability, Driver, GuestConfig, driver_class
from novacron.drivers.cloud import tag_key
from novacron.errors import (
    Forbidden,
    InvalidRequest,
    InvalidTransition,
    NoCapacity,
    NotFound,
    NotSupported,
    NovaCronError,
    OperationTimeout,
    QuotaExceeded,
    StaleEpoch,
    Throttled,
    Unauthenticated,
)
from novacron.states import VMState
from serve.errors import status_of
from tests.contract.driver_contract import DriverContract
from tests.fakes.env import DriverEnv
from tests.fakes.moto_server import FaultProxy

pytest_plugins = ["tests.fakes.plugin"]

REGION = "eu-west-1"
PAGING_REGION = "ap-southeast-2"  # moto scans every instance of a region: keep the 250 apart
QUOTA_REGION = "eu-north-1"  # the quota test counts every running instance of its region


@pytest.fixture(scope="session")
def aws_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One state dir for the session: the instance-type catalogue is read from moto once."""
    return tmp_path_factory.mktemp("aws-state")


@pytest.fixture(scope="session")
def ami(moto_url: str) -> str:
    ec2 = raw_client(moto_url)
    return str(ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"])


def raw_client(url: str, region: str = REGION, service: str = "ec2") -> Any:
    return boto3.client(service, region_name=region, endpoint_url=url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def write_keys(path: Path, key_id: str, **extra: Any) -> Path:
    path.write_text(json.dumps({"aws_access_key_id": key_id, "aws_secret_access_key": "s3cret",
                                **extra}))
    return path


class Env(DriverEnv[AwsDriver]):
    """Builds drivers on unique hosts against the proxy; closes them and their instances."""

    driver_class = AwsDriver
    prefix = "aws"

    def __init__(self, proxy: FaultProxy, state: Path, tmp: Path, ami: str) -> None:
        super().__init__(proxy, state)
        self.proxy, self.state, self.tmp, self.ami = proxy, state, tmp, ami
        self.keys = write_keys(tmp / "aws.json", "AKIDNOVACRON0001")

    def config(self, **over: Any) -> dict[str, Any]:
        return {"region": REGION, "endpoint_url": self.proxy.url,
                "credentials": {"source": "file", "path": str(self.keys)},
                "capacity": {"cpus": 64}, "default_image": self.ami, "poll_interval_s": 0.01,
                "instance_types": ["t3.*", "m5.*", "c5.*"],
                "max_attempts": 4, "credential_check_interval_s": 0, "page_size": 100, **over}



@pytest.fixture(scope="session")
def warm_catalogue(aws_proxy_session: FaultProxy, aws_state: Path, ami: str,
                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """Read the default instance types once (moto is slow to list them)."""
    e = Env(aws_proxy_session, aws_state, tmp_path_factory.mktemp("warm"), ami)
    e.driver().catalogue.types()
    e.cleanup()


@pytest.fixture
def env(aws_proxy: FaultProxy, aws_state: Path, tmp_path: Path, ami: str,
        warm_catalogue: None) -> Iterator[Env]:
    e = Env(aws_proxy, aws_state, tmp_path, ami)
    yield e
    e.cleanup()


class TestAwsContract(DriverContract):
    @pytest.fixture
    def driver(self, env: Env) -> Driver:
        return env.driver()


def guest(vm_id: str, **kwargs: Any) -> GuestConfig:
    return GuestConfig(**{"vm_id": vm_id, "name": "unit", "cpus": 1, "memory_mib": 512,
                          "disk_gib": 8, "epoch": 1, **kwargs})


def vm() -> str:
    return f"vm-aws-{uuid.uuid4().hex[:10]}"


def instances_of(url: str, vm_id: str) -> list[dict[str, Any]]:
    pages = raw_client(url).get_paginator("describe_instances").paginate(Filters=[
        {"Name": f"tag:{tag_key('vm-id')}", "Values": [vm_id]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopped"]}])
    return [i for p in pages for r in p["Reservations"] for i in r["Instances"]]


# -- registry, config, catalogue -------------------------------------------------------------


def test_registered_and_typed_capabilities(env: Env) -> None:
    assert driver_class("aws") is AwsDriver
    drv = env.driver(connect=False)
    assert drv.capabilities == {Capability.REBOOT, Capability.IMAGE_IMPORT}
    assert "stop it instead" in drv.missing_capabilities()[Capability.PAUSE]


@pytest.mark.parametrize(("config", "message"), [
    ({"region": None}, "region"),
    ({"aws_secret_access_key": "x"}, "secrets are never stored"),
    ({"credentials": {"source": "file"}}, "path"),
    ({"credentials": {"source": "vault"}}, "source"),
    ({"credentials": {"source": "anonymous"}, "endpoint_url": None}, "local"),
    ({"credentials": {"source": "anonymous"}}, "aws credentials come from"),
    ({"read_timeout_s": "long"}, "bad aws host config"),
    ({"retry_mode": "legacy"}, "retry_mode"),
    ({"regoin": "eu-west-1"}, "unknown"),
    ({"capacity": {"cpus": 0}}, "positive"),
    ({"endpoint_url": "ftp://x"}, "endpoint_url"),
])
def test_bad_config_is_refused(env: Env, config: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        AwsDriver("h", None, env.config(**config), env.state)


def test_unknown_region_is_a_clear_error(env: Env) -> None:
    drv = env.driver(connect=False, region="xx-nowhere-9")
    with pytest.raises(InvalidRequest,
                       match=r"unknown AWS region 'xx-nowhere-9'.*eu-west-1") as info:
        drv.connect()
    assert info.value.details["request_id"]  # of the DescribeRegions answer


def test_cheapest_fit_from_the_catalogue(env: Env) -> None:
    drv = env.driver(instance_types=["m5.*", "c5.*"])
    assert drv.catalogue.cheapest_fit(1, 512).name in ("c5.large", "m5.large")
    assert drv.catalogue.cheapest_fit(3, 10_000).name == "m5.xlarge"
    priced = env.driver(instance_types=["m5.*", "c5.*"], prices={"c5.large": 0.085,
                                                                 "m5.large": 0.096})
    assert priced.catalogue.cheapest_fit(2, 4096).name == "c5.large"
    with pytest.raises(NoCapacity, match=r"4096 vCPUs.*largest allowed is"):
        drv.catalogue.cheapest_fit(4096, 1)
    smallest = env.driver().define(guest(vm(), cpus=1, memory_mib=64))
    assert smallest.state == VMState.STOPPED


def test_define_records_type_and_image_and_creates_nothing(env: Env) -> None:
    drv, vm_id = env.driver(instance_types=["t3.*"]), vm()
    info = drv.define(guest(vm_id, cpus=2, memory_mib=3000))
    assert (info.state, info.guest_id) == (VMState.STOPPED, None)
    definition = drv.definitions.load(vm_id)
    assert definition is not None
    assert (definition.instance_type, definition.image) == ("t3.medium", env.ami)
    assert instances_of(env.proxy.url, vm_id) == []
    assert drv.stop(vm_id).state == VMState.STOPPED
    with pytest.raises(InvalidTransition, match="never started"):
        drv.reboot(vm_id)


def test_define_without_any_image_is_refused(env: Env) -> None:
    drv = env.driver(default_image=None)
    with pytest.raises(InvalidRequest, match="no image"):
        drv.define(guest(vm()))


# -- lifecycle -------------------------------------------------------------------------------


def test_create_tags_reattach_and_fence(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id, epoch=3, name="web"))
    started = drv.start(vm_id, epoch=3)
    assert started.state == VMState.RUNNING
    [raw] = instances_of(env.proxy.url, vm_id)
    tags = {t["Key"]: t["Value"] for t in raw["Tags"]}
    assert tags[tag_key("host")] == drv.host
    assert (tags[tag_key("epoch")], tags["Name"]) == ("3", "web")
    assert raw["InstanceType"] == drv.definitions.load(vm_id).instance_type  # type: ignore[union-attr]
    assert started.guest_id == raw["InstanceId"]
    # an actor restarted elsewhere (empty state dir) re-attaches through the tags
    other = AwsDriver(drv.host, None, env.config(), env.tmp / "elsewhere")
    env.drivers.append(other)
    assert other.get(vm_id).guest_id == raw["InstanceId"]
    assert other.define(guest(vm_id)).guest_id == raw["InstanceId"]
    assert other.start(vm_id, epoch=5).epoch == 5
    with pytest.raises(StaleEpoch):
        drv.start(vm_id, epoch=4)
    assert {g.vm_id for g in other.list()} == {vm_id}


def test_undefine_refuses_a_running_guest_and_can_keep_the_disk(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id))
    drv.start(vm_id, epoch=1)
    with pytest.raises(InvalidTransition, match="stop it first"):
        drv.undefine(vm_id)
    [raw] = instances_of(env.proxy.url, vm_id)
    volume = raw["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    drv.stop(vm_id, force=True)
    drv.undefine(vm_id, delete_storage=False)
    volumes = raw_client(env.proxy.url).describe_volumes(VolumeIds=[volume])["Volumes"]
    assert volumes[0]["State"] == "available"
    with pytest.raises(NotFound):
        drv.get(vm_id)


def test_pause_is_not_supported_with_a_reason(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id))
    with pytest.raises(NotSupported, match="AWS cannot freeze"):
        drv.pause(vm_id)


def test_state_table_maps_unknown_names_to_unknown(env: Env) -> None:
    assert STATES["stopping"] == VMState.STOPPING
    parsed = env.driver(connect=False)._parse({"InstanceId": "i-1", "State": {"Name": "rebooting"},
                                               "Tags": []})
    assert parsed.state == VMState.UNKNOWN
    assert parsed.raw_state == "rebooting"


# -- reliability -----------------------------------------------------------------------------


def test_throttling_storm_is_absorbed_by_botocore_retries(env: Env) -> None:
    drv = env.driver()
    env.proxy.throttle(3, "DescribeInstances")
    started = time.monotonic()
    assert drv.list() == []
    assert env.proxy.calls["DescribeInstances"] == 4
    assert time.monotonic() - started > 0  # botocore backed off between the attempts
    assert drv.health.snapshot()["provider_throttled_per_min"] > 0


def test_throttling_beyond_the_retries_is_a_typed_error(env: Env) -> None:
    drv = env.driver(max_attempts=2)
    env.proxy.throttle(5, "DescribeInstances")
    with pytest.raises(Throttled, match="throttling") as info:
        drv.list()
    assert status_of(info.value) == 503
    assert info.value.details["provider_code"] == "RequestLimitExceeded"
    assert info.value.details["request_id"]


def test_create_that_times_out_is_retried_into_one_instance(env: Env) -> None:
    drv, vm_id = env.driver(read_timeout_s=0.5), vm()
    drv.define(guest(vm_id))
    env.proxy.delay("RunInstances", 1.5)  # moto launches it, the answer comes too late
    assert drv.start(vm_id, epoch=1).state == VMState.RUNNING
    assert env.proxy.calls["RunInstances"] >= 2  # botocore retried with the same ClientToken
    assert len(instances_of(env.proxy.url, vm_id)) == 1


def test_start_that_gives_up_is_reattached_by_the_next_start(env: Env) -> None:
    drv, vm_id = env.driver(read_timeout_s=0.3, max_attempts=2), vm()
    drv.define(guest(vm_id))
    env.proxy.delay("RunInstances", 0.8, count=2)
    with pytest.raises(OperationTimeout):
        drv.start(vm_id, epoch=1)
    restarted = env.driver(drv.host)  # the actor, restarted, tries again
    assert restarted.start(vm_id, epoch=1).state == VMState.RUNNING
    assert len(instances_of(env.proxy.url, vm_id)) == 1


def test_listing_250_instances_pages_through_all(env: Env, moto_url: str) -> None:
    drv = AwsDriver(f"aws-{uuid.uuid4().hex[:8]}", None, env.config(region=PAGING_REGION),
                    env.state)
    ec2 = raw_client(moto_url, PAGING_REGION)
    tags = [{"Key": tag_key("host"), "Value": drv.host}]

    def launch(i: int) -> str:  # one per call: moto's pages count reservations
        reservation = ec2.run_instances(
            ImageId=env.ami, InstanceType="t3.nano", MinCount=1, MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [
                *tags, {"Key": tag_key("vm-id"), "Value": f"vm-page-{i:03d}"}]}])
        return str(reservation["Instances"][0]["InstanceId"])

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(launch, range(250)))
    try:
        guests = drv.list()
        assert len(guests) == 250
        assert {g.vm_id for g in guests} == {f"vm-page-{i:03d}" for i in range(250)}
        assert env.proxy.calls["DescribeInstances"] == 3  # pages of 100
    finally:
        ec2.terminate_instances(InstanceIds=ids)
        drv.close()


# -- bad input: typed errors with AWS's message and request id, nothing left behind ----------


def test_unknown_instance_type(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id, labels={"aws.instance_type": "x9.huge"}))
    with pytest.raises(InvalidRequest, match=r"x9\.huge") as info:
        drv.start(vm_id, epoch=1)
    assert info.value.details["provider_code"].startswith("InvalidInstanceType")
    assert info.value.details["request_id"]
    assert instances_of(env.proxy.url, vm_id) == []
    assert drv.get(vm_id).state == VMState.STOPPED


@pytest.mark.parametrize(("code", "expected"), [
    ("VcpuLimitExceeded", QuotaExceeded),
    ("InsufficientInstanceCapacity", NoCapacity),
    ("UnauthorizedOperation", Forbidden),
])
def test_provider_refusals_are_typed(env: Env, code: str,
                                     expected: type[NovaCronError]) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id))
    env.proxy.fail("RunInstances", code, f"refused by test ({code})")
    with pytest.raises(expected, match=f"refused by test.*AWS {code}, request") as info:
        drv.start(vm_id, epoch=1)
    assert info.value.details["request_id"]
    assert instances_of(env.proxy.url, vm_id) == []


def test_preflight_refuses_a_type_ec2_does_not_offer_with_its_answer(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.catalogue.types()  # cached: only the unknown name is asked
    env.proxy.reset()
    with pytest.raises(InvalidRequest, match=r"no instance type 'x9\.huge' in eu-west-1 .*"
                       r"do not exist: \[x9\.huge\] \(AWS InvalidInstanceType, request ") as info:
        drv.preflight(guest(vm_id, labels={"aws.instance_type": "x9.huge"}))
    details = info.value.details
    assert (details["provider"], details["provider_code"]) == ("aws", "InvalidInstanceType")
    assert details["request_id"]
    assert len(details["nearest"]) == 3
    assert set(details["nearest"]) <= set(drv.catalogue.types())
    assert status_of(info.value) == 422
    assert env.proxy.calls == {"DescribeInstanceTypes": 1}  # nothing defined, nothing created
    assert drv.definitions.load(vm_id) is None
    # A type outside the host's patterns that EC2 offers passes: a pin overrides the patterns.
    drv.preflight(guest(vm_id, labels={"aws.instance_type": "r5.large"}))


def test_preflight_counts_the_regions_running_vcpus_against_the_quota(env: Env,
                                                                     moto_url: str) -> None:
    drv = env.driver(region=QUOTA_REGION)
    drv.preflight(guest(vm(), labels={"aws.instance_type": "t3.2xlarge"}))  # no quota known
    env.proxy.set_quota("L-1216C47A", 7)
    ec2 = raw_client(moto_url, QUOTA_REGION)

    def run(instance_type: str) -> str:
        return str(ec2.run_instances(ImageId=env.ami, InstanceType=instance_type, MinCount=1,
                                     MaxCount=1)["Instances"][0]["InstanceId"])

    running = [run("t3.medium"), run("r5.large")]  # 2 + 2 Standard vCPUs (r5 not in patterns)
    others = [run("g4dn.xlarge"), run("t3.xlarge")]  # a quota of its own; stopped
    ec2.stop_instances(InstanceIds=others[1:])
    try:
        drv.preflight(guest(vm(), labels={"aws.instance_type": "t3.small"}))  # 4 + 2 of 7
        drv.preflight(guest(vm(), labels={"aws.instance_type": "g4dn.2xlarge"}))  # not Standard
        vm_id = vm()
        with pytest.raises(QuotaExceeded, match=r"quota L-1216C47A .* in eu-north-1 would be "
                           r"exceeded: m5\.xlarge needs 4 vCPUs and 4 of 7 are in use .*request") \
                as info:
            drv.preflight(guest(vm_id, cpus=4, memory_mib=16384))  # the cheapest fit
    finally:
        ec2.terminate_instances(InstanceIds=running + others)
    details = info.value.details
    assert (details["limit"], details["in_use"], details["requested"]) == (7, 4, 4)
    assert (details["provider"], details["instance_type"]) == ("aws", "m5.xlarge")
    assert details["request_id"]  # of the Service Quotas answer
    assert status_of(info.value) == 409  # the account's use clashes; not the caller's 403
    assert env.proxy.calls["RunInstances"] == 0
    assert drv.definitions.load(vm_id) is None


def test_missing_image_is_not_found(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id, image="ami-00000000deadbeef0"))
    with pytest.raises(NotFound, match="ami-00000000deadbeef0"):
        drv.start(vm_id, epoch=1)
    assert instances_of(env.proxy.url, vm_id) == []


def test_bad_credentials_and_rotation(env: Env) -> None:
    drv = env.driver()
    env.proxy.revoke("AKIDNOVACRON0001")
    with pytest.raises(Unauthenticated, match="AuthFailure") as info:
        drv.list()
    assert info.value.details["request_id"]
    assert status_of(info.value) == 422  # NovaCron's AWS keys, not the API caller's token
    assert drv.health.snapshot()["provider_credentials_valid"] == 0.0
    write_keys(env.keys, "AKIDNOVACRON0002")  # rotated: picked up without a restart
    assert drv.list() == []
    assert drv.health.snapshot()["provider_credentials_valid"] == 1.0


def test_missing_credentials_file(env: Env) -> None:
    drv = env.driver(connect=False,
                     credentials={"source": "file", "path": str(env.tmp / "nope.json")})
    with pytest.raises(Unauthenticated, match=r"nope\.json") as info:
        drv.connect()
    assert status_of(info.value) == 422


def test_expiring_credentials_are_checked_at_every_call(env: Env) -> None:
    write_keys(env.keys, "AKIDNOVACRON0003", expiration=time.time() + 60)
    drv = env.driver(credential_check_interval_s=3600)
    assert drv.list() == []
    env.proxy.revoke("AKIDNOVACRON0003")
    write_keys(env.keys, "AKIDNOVACRON0004", expiration=time.time() + 7200)
    assert drv.list() == []  # re-read despite the long interval: the old keys were expiring


# -- host figures and metrics ----------------------------------------------------------------


def test_capacity_from_config_or_the_vcpu_quota(env: Env) -> None:
    info = env.driver(capacity={"cpus": 32, "disk_gib": 500}).host_info()
    assert (info.cpus, info.memory_mib, info.disk_gib) == (32, 32 * 4096, 500)
    assert (info.hypervisor, info.version) == ("aws", REGION)
    with pytest.raises(InvalidRequest, match="quota could not be read"):
        env.driver(capacity={}).host_info()  # the account's quota is not known
    env.proxy.set_quota("L-1216C47A", 96)
    info = env.driver(capacity={"memory_mib": 1024}).host_info()
    assert (info.cpus, info.memory_mib) == (96, 1024)


def test_host_stats_and_cloudwatch_metrics(env: Env) -> None:
    drv, vm_id = env.driver(instance_types=["m5.large"]), vm()
    drv.define(guest(vm_id, cpus=2))
    info = drv.start(vm_id, epoch=1)
    stats = drv.host_stats()
    assert stats.guests == 1
    assert stats.cpu_load == pytest.approx(2 / 64)
    assert stats.memory_used_mib == 8192
    assert stats.extra["provider_api_reachable"] == 1.0
    assert drv.stats(vm_id).cpu_time_s == 0  # nothing in CloudWatch yet
    now = datetime.now(UTC)
    cw = raw_client(env.proxy.url, service="cloudwatch")
    cw.put_metric_data(Namespace="AWS/EC2", MetricData=[
        {"MetricName": name, "Dimensions": [{"Name": "InstanceId", "Value": info.guest_id}],
         "Timestamp": now, "Value": value, "Unit": unit}
        for name, value, unit in (("CPUUtilization", 50.0, "Percent"),
                                  ("NetworkIn", 1000.0, "Bytes"),
                                  ("EBSWriteBytes", 4096.0, "Bytes"))])
    metrics = drv.stats(vm_id)
    assert metrics.cpu_time_s > 0
    assert metrics.net_rx_bytes == 1000
    assert metrics.disk_written_bytes == 4096


# -- cold migration into AWS: image import ----------------------------------------------------


def snapshot_blocks(url: str, snapshot_id: str) -> list[int]:
    blocks = raw_client(url, service="ebs").list_snapshot_blocks(SnapshotId=snapshot_id)
    return sorted(b["BlockIndex"] for b in blocks["Blocks"])


def imported_snapshot(url: str, image_id: str) -> str:
    """The snapshot an imported AMI was made of (named in it: moto keeps no mappings)."""
    [image] = raw_client(url).describe_images(ImageIds=[image_id])["Images"]
    return "snap-" + str(image["Name"]).rsplit("snap-", 1)[1]


def tagged_snapshots(url: str, vm_id: str) -> list[str]:
    snaps = raw_client(url).describe_snapshots(Filters=[
        {"Name": f"tag:{tag_key('vm-id')}", "Values": [vm_id]}])["Snapshots"]
    return [str(s["SnapshotId"]) for s in snaps]


def test_import_disk_sends_only_changed_blocks_and_boots(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    assert Capability.IMAGE_IMPORT in drv.capabilities
    assert "not out of it" in drv.missing_capabilities()[Capability.COLD_MIGRATION]
    disk = env.tmp / "disk.img"
    with open(disk, "wb") as f:  # 3 MiB, sparse: six 512 KiB blocks, two with data
        f.truncate(3 * 1024**2)
        f.write(b"boot" * 1024)
        f.seek(2 * 1024**2 + 5)
        f.write(b"data")
    first = drv.import_disk(vm_id, disk)
    snapshot = imported_snapshot(env.proxy.url, first)
    assert snapshot_blocks(env.proxy.url, snapshot) == [0, 4]
    assert tagged_snapshots(env.proxy.url, vm_id) == [snapshot]
    with open(disk, "r+b") as f:
        f.seek(2 * 1024**2)
        f.write(b"changed")
    second = drv.import_disk(vm_id, disk)
    snapshot2 = imported_snapshot(env.proxy.url, second)
    assert snapshot_blocks(env.proxy.url, snapshot2) == [4]  # only the changed block
    assert env.proxy.calls["PUT snapshots"] == 3
    assert tagged_snapshots(env.proxy.url, vm_id) == [snapshot2]  # the older one removed
    assert raw_client(env.proxy.url).describe_images(ImageIds=[first])["Images"] == []
    drv.define(guest(vm_id, image=second))
    assert drv.start(vm_id, epoch=1).state == VMState.RUNNING


def test_failed_import_leaves_no_snapshot(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    disk = env.tmp / "disk.img"
    disk.write_bytes(b"x" * 1024)
    env.proxy.fail("RegisterImage", "InvalidParameterValue", "refused by test")
    with pytest.raises(InvalidRequest, match="refused by test"):
        drv.import_disk(vm_id, disk)
    assert tagged_snapshots(env.proxy.url, vm_id) == []


def tagged_images(url: str, vm_id: str) -> list[str]:
    images = raw_client(url).describe_images(Owners=["self"], Filters=[
        {"Name": f"tag:{tag_key('vm-id')}", "Values": [vm_id]}])["Images"]
    return [str(i["ImageId"]) for i in images]


def sparse_disk(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path


def test_only_blocks_with_data_are_read_and_sent(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    block = 512 * 1024
    disk = sparse_disk(env.tmp / "disk.img", 1024**3, {  # 1 GiB, three blocks written
        0: b"boot", 700 * block + 3: b"data", 2047 * block: b"end", 5 * block: bytes(100)})
    seen: list[tuple[int, int]] = []
    image = drv.import_disk(vm_id, disk, progress=lambda sent, total: seen.append((sent, total)))
    assert snapshot_blocks(env.proxy.url, imported_snapshot(env.proxy.url, image)) == [
        0, 700, 2047]  # block 5 holds only zeros: not sent either
    assert seen == [(block, 3 * block), (2 * block, 3 * block), (3 * block, 3 * block)]
    assert tagged_images(env.proxy.url, vm_id) == [image]


def test_an_aborted_import_leaves_nothing(env: Env) -> None:
    drv, vm_id = env.driver(import_workers=1), vm()
    disk = sparse_disk(env.tmp / "disk.img", 8 * 1024**2,
                       {i * 512 * 1024: b"x" for i in range(16)})

    class Cancelled(Exception):
        pass

    def abort(sent: int, total: int) -> None:
        if sent >= 2 * 512 * 1024:
            raise Cancelled

    with pytest.raises(Cancelled):
        drv.import_disk(vm_id, disk, progress=abort)
    assert env.proxy.calls["PUT snapshots"] <= 4  # at most what was in flight was sent on
    assert tagged_snapshots(env.proxy.url, vm_id) == []
    assert tagged_images(env.proxy.url, vm_id) == []


def test_leftovers_of_an_interrupted_import_and_undefine_remove_every_import(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    tags = [{"Key": tag_key("vm-id"), "Value": vm_id}, {"Key": tag_key("host"), "Value": drv.host}]
    left = raw_client(env.proxy.url, service="ebs").start_snapshot(VolumeSize=1, Tags=tags)
    disk = sparse_disk(env.tmp / "disk.img", 1024**2, {0: b"boot"})
    image = drv.import_disk(vm_id, disk)  # a killed import left a pending snapshot
    snapshot = imported_snapshot(env.proxy.url, image)
    assert tagged_snapshots(env.proxy.url, vm_id) == [snapshot] != [left["SnapshotId"]]
    drv.define(guest(vm_id, image=image))
    assert drv.start(vm_id, epoch=1).state == VMState.RUNNING
    assert instances_of(env.proxy.url, vm_id)[0]["ImageId"] == image
    drv.stop(vm_id, force=True)
    drv.undefine(vm_id)  # the guest's storage: its instance, and the image it was imported as
    assert instances_of(env.proxy.url, vm_id) == []
    assert tagged_images(env.proxy.url, vm_id) == []
    assert tagged_snapshots(env.proxy.url, vm_id) == []
    drv.discard_imports(vm_id)  # idempotent
