"""Cold migration of a sim guest into an AWS region (moto behind the fault proxy) on the session's
Ray: its disk imported as an AMI and booted as an EC2 instance the AWS host's agent adopts; the
refusal of a live one; cancels during the upload and once the AMI exists, and a provider error
at the switchover, none of which leaves anything behind in AWS."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from novacron.client import VMHandle
from novacron.drivers.cloud import tag_key
from novacron.errors import NotSupported
from novacron.model import HostCreate
from novacron.states import HostState, MigrationPhase
from tests.fakes.moto_server import FaultProxy
from tests.integration.conftest import Running
from tests.integration.test_migration import guest_hosts
from tests.integration.test_runtime import eventually

pytest_plugins = ["tests.fakes.plugin"]

REGION = "eu-west-3"
BLOCK = 512 * 1024
DONE = (MigrationPhase.COMPLETED, MigrationPhase.FAILED, MigrationPhase.ROLLED_BACK)


def aws(url: str, service: str = "ec2") -> Any:
    return boto3.client(service, region_name=REGION, endpoint_url=url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def register_aws(running: Running, proxy: FaultProxy, tmp_path: Path) -> str:
    """An AWS host whose agents read NovaCron's keys from a file (a reference, no secret)."""
    keys = tmp_path / "aws-keys.json"
    keys.write_text(json.dumps({"aws_access_key_id": "AKIDMIGRATION01",
                                "aws_secret_access_key": "s3cret"}))
    running.nc.call("register_host", HostCreate(name="aws1", driver="aws", config={
        "region": REGION, "endpoint_url": proxy.url,
        "credentials": {"source": "file", "path": str(keys)}, "capacity": {"cpus": 64},
        "instance_types": ["t3.*"], "poll_interval_s": 0.01, "max_attempts": 3}))
    # its agent's new worker processes may have starved the sim hosts' beats for a moment
    eventually(lambda: all(h.state == HostState.UP for h in running.nc.hosts.list()), 30,
               what="every host up")
    return "aws1"


def sim_vm_with_data(running: Running, name: str, writes: dict[int, bytes]) -> VMHandle:
    """A running sim VM on h1 whose 1 GiB disk holds ``writes`` (offset -> bytes) and nothing
    else (it has no disk workload, so it writes nothing itself)."""
    vm = running.nc.vms.create(name, cpus=1, memory_mib=256, disk_gib=1, host="h1",
                               start=False).wait_for("stopped", timeout=60)
    with open(running.settings.state_dir / "sim" / "h1" / vm.id / "disk.img", "r+b") as f:
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return vm.start().wait_for("running", timeout=60)


def imports_of(url: str, vm_id: str) -> tuple[list[str], list[str]]:
    """The AMIs and snapshots tagged for ``vm_id``, as EC2 lists them."""
    mine = [{"Name": f"tag:{tag_key('vm-id')}", "Values": [vm_id]}]
    ec2 = aws(url)
    return ([i["ImageId"] for i in ec2.describe_images(Owners=["self"], Filters=mine)["Images"]],
            [s["SnapshotId"] for s in ec2.describe_snapshots(Filters=mine)["Snapshots"]])


def instances_of(url: str, vm_id: str) -> list[dict[str, Any]]:
    pages = aws(url).get_paginator("describe_instances").paginate(Filters=[
        {"Name": f"tag:{tag_key('vm-id')}", "Values": [vm_id]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
    return [i for p in pages for r in p["Reservations"] for i in r["Instances"]]


def test_a_sim_vm_moves_into_aws(running: Running, aws_proxy: FaultProxy,
                                 tmp_path: Path) -> None:
    nc, state = running.nc, running.settings.state_dir
    target = register_aws(running, aws_proxy, tmp_path)
    writes = {0: b"boot sector", 600 * BLOCK + 7: b"some data", 2047 * BLOCK: b"the end"}
    vm = sim_vm_with_data(running, "to-aws", writes)
    epoch = vm.record.epoch

    with pytest.raises(NotSupported, match=r"use cold.*memory cannot be moved into an EC2"):
        nc.migrations.start("to-aws", to=target, mode="live")
    assert vm.refresh().record.host == "h1"

    mig = nc.migrations.start("to-aws", to=target, mode="cold")
    percents = []
    while mig.refresh().phase not in DONE:
        percents.append(mig.record.progress.percent)
        time.sleep(0.05)
    assert mig.phase == MigrationPhase.COMPLETED, mig.record.reason
    assert percents == sorted(percents)
    assert mig.record.progress.percent == 100
    out = mig.record.outcome
    assert out["disk_bytes_sent"] == mig.record.progress.bytes_sent == 3 * BLOCK  # holes skipped
    assert out["downtime_ms"] > 0
    image = out["image"]

    record = vm.wait_for("running", timeout=60).record
    assert (record.host, record.epoch, record.spec.image) == (target, epoch + 1, image)
    [instance] = instances_of(aws_proxy.url, vm.id)  # through EC2's own API
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert (instance["State"]["Name"], instance["ImageId"]) == ("running", image)
    assert tags[tag_key("host")] == target
    assert tags[tag_key("epoch")] == str(record.epoch)
    assert record.guest_id == instance["InstanceId"]
    snapshot = "snap-" + str(aws(aws_proxy.url).describe_images(
        ImageIds=[image])["Images"][0]["Name"]).rsplit("snap-", 1)[1]
    ebs = aws(aws_proxy.url, "ebs")
    blocks = ebs.list_snapshot_blocks(SnapshotId=snapshot)["Blocks"]
    assert sorted(b["BlockIndex"] for b in blocks) == [0, 600, 2047]
    for b in blocks:  # the bytes in AWS are the guest's
        data = ebs.get_snapshot_block(SnapshotId=snapshot, BlockIndex=b["BlockIndex"],
                                      BlockToken=b["BlockToken"])["BlockData"].read()
        offset = b["BlockIndex"] * BLOCK
        expected = bytearray(BLOCK)
        for at, written in writes.items():
            if offset <= at < offset + BLOCK:
                expected[at - offset:at - offset + len(written)] = written
        assert data == bytes(expected)
    assert guest_hosts(state, vm.id) == set()  # the sim guest is gone, its files too
    assert not (state / "sim" / "h1" / vm.id).exists()
    assert nc.hosts.get("h1").allocated.memory_mib == 0

    vm.stop().wait_for("stopped", timeout=60)  # the AWS host's agent drives it now
    assert instances_of(aws_proxy.url, vm.id)[0]["State"]["Name"] == "stopped"
    vm.delete().wait_for("deleted", timeout=60)
    assert instances_of(aws_proxy.url, vm.id) == []
    assert imports_of(aws_proxy.url, vm.id) == ([], [])  # its image went with it


def test_a_cancelled_or_failed_import_leaves_nothing_in_aws(running: Running,
                                                            aws_proxy: FaultProxy,
                                                            tmp_path: Path) -> None:
    nc, state = running.nc, running.settings.state_dir
    target = register_aws(running, aws_proxy, tmp_path)
    vm = sim_vm_with_data(running, "stays", {i * 8 * BLOCK: b"x" * 100 for i in range(32)})

    mig = nc.migrations.start("stays", to=target, mode="cold", policy={"bandwidth_mib_s": 2})
    eventually(lambda: mig.refresh().record.progress.bytes_sent > 0, 60, what="upload started")
    assert mig.phase == MigrationPhase.SYNCING_DISK
    mig.cancel().wait(timeout=60)
    assert (mig.phase, mig.record.reason) == (MigrationPhase.ROLLED_BACK, "cancelled")
    assert mig.record.progress.bytes_sent < 32 * BLOCK  # stopped during the upload
    record = vm.wait_for("running", timeout=60).record
    assert record.host == "h1"
    assert guest_hosts(state, vm.id) == {"h1"}  # started again on its source
    assert imports_of(aws_proxy.url, vm.id) == ([], [])
    assert instances_of(aws_proxy.url, vm.id) == []

    aws_proxy.delay("RegisterImage", 3.0)  # cancelled once the AMI exists, before its guest
    mig = nc.migrations.start("stays", to=target, mode="cold")
    eventually(lambda: aws_proxy.calls["RegisterImage"] > 0, 60, what="AMI registered")
    assert mig.cancel().wait(timeout=60).phase == MigrationPhase.ROLLED_BACK
    assert vm.wait_for("running", timeout=60).record.host == "h1"
    assert imports_of(aws_proxy.url, vm.id) == ([], [])

    aws_proxy.fail("RunInstances", "VcpuLimitExceeded", "You have requested more vCPU "
                   "capacity than your current vCPU limit of 0 allows")
    failed = nc.migrations.start("stays", to=target, mode="cold").wait(timeout=120)
    assert failed.phase == MigrationPhase.FAILED
    assert "VcpuLimitExceeded" in str(failed.record.reason)
    assert aws_proxy.calls["RunInstances"] == 1  # at the switchover, after the import
    assert vm.wait_for("running", timeout=60).record.host == "h1"
    assert guest_hosts(state, vm.id) == {"h1"}
    assert imports_of(aws_proxy.url, vm.id) == ([], [])  # the AMI made for it is gone
    assert instances_of(aws_proxy.url, vm.id) == []
