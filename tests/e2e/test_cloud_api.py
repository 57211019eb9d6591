"""Cloud hosts through the HTTP API against the local fakes: register an AWS region, an Azure
location and a GCP zone, run a VM's life there and see it (then not) through the provider's own
API; bad input (unknown region, refused credentials, an unknown instance type, a quota refusal)
refused at once with the provider's answer (its message and request id), leaving nothing behind.

The host agents run in Ray workers: they reach the fakes on 127.0.0.1 and read NovaCron's
credentials from files named in each host's config (a reference; no secret is stored)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from novacron.drivers.cloud import instance_name, tag_key
from novacron.drivers.gcp import label
from tests.fakes.azure_arm import ArmFake
from tests.fakes.gce import GceFake
from tests.fakes.moto_server import FaultProxy

pytest_plugins = ["tests.fakes.plugin"]

A = "/api/v1"
AWS_REGION = "ca-central-1"
AZURE_GROUP = "novacron-rg"
GCP_ZONE = "us-central1-a"
CLOUDS = ["aws", "azure", "gcp"]


@dataclass
class Cloud:
    """One provider's fake, a host config for it, and how to see an instance through the
    provider's own API (None when there is none)."""

    driver: str
    config: Callable[..., dict[str, Any]]
    instance: Callable[[str], dict[str, Any] | None]  # -> {"state", "tags", "type"}
    on_host: Callable[[str], list[str]]  # the live instances tagged with a host, by name/id
    stopped: str  # the provider's state of a stopped instance
    bad_location: tuple[str, str]  # a config key naming a region/location/zone, one not there
    unknown_type: tuple[str, str]  # (label pinning an instance type, a type that does not exist)
    refuse_credentials: Callable[[], None]
    refuse_quota: Callable[[], None]
    lift_faults: Callable[[], None]


def aws_cloud(proxy: FaultProxy, keys: Path) -> Cloud:
    ec2 = boto3.client("ec2", region_name=AWS_REGION, endpoint_url=proxy.url,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    keys.write_text(json.dumps({"aws_access_key_id": "AKIDE2ECLOUD0001",
                                "aws_secret_access_key": "s3cret"}))

    def instance(vm_id: str) -> dict[str, Any] | None:
        found = [i for r in ec2.describe_instances(Filters=[
            {"Name": f"tag:{tag_key('vm-id')}", "Values": [vm_id]}])["Reservations"]
                 for i in r["Instances"] if i["State"]["Name"] != "terminated"]
        assert len(found) <= 1
        return {"state": found[0]["State"]["Name"], "type": found[0]["InstanceType"],
                "tags": {t["Key"]: t["Value"] for t in found[0]["Tags"]}} if found else None

    def on_host(host: str) -> list[str]:
        return [i["InstanceId"] for r in ec2.describe_instances(Filters=[
            {"Name": f"tag:{tag_key('host')}", "Values": [host]}])["Reservations"]
                for i in r["Instances"] if i["State"]["Name"] != "terminated"]

    return Cloud(
        "aws", lambda **over: {
            "region": AWS_REGION, "endpoint_url": proxy.url,
            "credentials": {"source": "file", "path": str(keys)}, "capacity": {"cpus": 16},
            "default_image": ami, "instance_types": ["t3.*"], "poll_interval_s": 0.01,
            "max_attempts": 3, **over},
        instance, on_host, "stopped", ("region", "mars-north-1"),
        ("aws.instance_type", "t3.gigantic"), lambda: proxy.revoke("AKIDE2ECLOUD0001"),
        lambda: proxy.set_quota("L-1216C47A", 0), proxy.reset)


def azure_cloud(arm: ArmFake, token: Path) -> Cloud:
    token.write_text(json.dumps({"access_token": "arm-token", "expires_on": time.time() + 3600}))

    def instance(vm_id: str) -> dict[str, Any] | None:
        vm = arm.vms.get((AZURE_GROUP, instance_name(vm_id)))
        return None if vm is None else {"state": vm["properties"]["power"], "tags": vm["tags"],
                                        "type": vm["properties"]["hardwareProfile"]["vmSize"]}

    def on_host(host: str) -> list[str]:
        return [name for (_, name), vm in arm.vms.items()
                if vm["tags"].get(tag_key("host")) == host]

    def refuse_credentials() -> None:
        arm.tokens = {"another-token"}

    def refuse_quota() -> None:
        arm.core_quota = 0

    return Cloud(
        "azure", lambda **over: {
            "subscription_id": arm.subscription, "resource_group": AZURE_GROUP,
            "location": "westeurope", "endpoint_url": arm.url, "ca_bundle": str(arm.cert),
            "subnet_id": "/subscriptions/x/resourceGroups/net/providers/Microsoft.Network/"
                         "virtualNetworks/v/subnets/s",
            "ssh_public_key": "ssh-ed25519 AAAAC3Nza novacron@e2e",
            "credentials": {"source": "file", "path": str(token)}, "capacity": {"cpus": 16},
            "default_image": "Canonical:ubuntu-24_04-lts:server:latest", "poll_interval_s": 0.01,
            "max_attempts": 3, "retry_backoff_factor": 0.01, **over},
        instance, on_host, "deallocated", ("location", "atlantis"),
        ("azure.vm_size", "Standard_X9"), refuse_credentials, refuse_quota, arm.reset)


def gcp_cloud(gce: GceFake, token: Path) -> Cloud:
    token.write_text(json.dumps({"access_token": "gce-token", "expires_on": time.time() + 3600}))
    gce.tokens = {"gce-token"}

    def instance(vm_id: str) -> dict[str, Any] | None:
        found = gce.instances.get((GCP_ZONE, instance_name(vm_id)))
        return None if found is None else {"state": found["status"], "tags": found["labels"],
                                           "type": found["machineType"].rsplit("/", 1)[1]}

    def on_host(host: str) -> list[str]:
        return [name for (_, name), found in gce.instances.items()
                if found["labels"].get(tag_key("host", "-")) == label(host)]

    def refuse_credentials() -> None:
        gce.tokens = {"another-token"}

    def refuse_quota() -> None:
        gce.cpu_quotas["CPUS"] = 0

    def lift_faults() -> None:
        gce.reset()
        gce.tokens = {"gce-token"}

    return Cloud(
        "gcp", lambda **over: {
            "project": gce.project, "zone": GCP_ZONE, "endpoint_url": gce.url,
            "credentials": {"source": "file", "path": str(token)}, "capacity": {"cpus": 16},
            "default_image": "projects/debian-cloud/global/images/family/debian-12",
            "poll_interval_s": 0.01, "retry_initial_s": 0.01, "retry_timeout_s": 5, **over},
        instance, on_host, "TERMINATED", ("zone", "mars-north1-a"),
        ("gcp.machine_type", "x9-huge"), refuse_credentials, refuse_quota, lift_faults)


@pytest.fixture(params=CLOUDS)
def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cloud]:
    name = request.param
    if name == "aws":
        made = aws_cloud(request.getfixturevalue("aws_proxy"), tmp_path / "aws-keys.json")
    elif name == "azure":
        made = azure_cloud(request.getfixturevalue("arm"), tmp_path / "arm-token.json")
    else:
        made = gcp_cloud(request.getfixturevalue("gce"), tmp_path / "gce-token.json")
    yield made
    made.lift_faults()


@pytest.fixture
def hosts(http: httpx.Client) -> Iterator[list[str]]:
    """Names of the hosts a test registers; deleted (with any VM left on them) afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        vms = http.get(f"{A}/vms", params={"host": name, "limit": 1000}).json()["items"]
        for vm in vms:
            http.delete(f"{A}/vms/{vm['id']}")
        for vm in vms:
            wait_vm(http, vm["id"], lambda b: b is None)
        http.delete(f"{A}/hosts/{name}")


def wait_vm(http: httpx.Client, vm_id: str, done: Callable[[dict[str, Any] | None], bool],
            timeout: float = 90) -> dict[str, Any] | None:
    """The VM's record once ``done`` holds (None: it is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"{A}/vms/{vm_id}")
        body: dict[str, Any] | None = None if r.status_code == 404 else r.json()
        if done(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def settled(state: str) -> Callable[[dict[str, Any] | None], bool]:
    return lambda b: b is not None and b["state"] == state and b["pending"] is None


def register(http: httpx.Client, hosts: list[str], cloud: Cloud, **over: Any) -> httpx.Response:
    """Register a host; once registered, wait for its agent's first report (an agent slower to
    start than the heartbeat timeout has its host marked unreachable until then, and a VM
    created there meanwhile waits for the agent's preflight and then finds no host)."""
    name = f"{cloud.driver}-{uuid.uuid4().hex[:6]}"
    r = http.post(f"{A}/hosts", json={"name": name, "driver": cloud.driver,
                                      "config": cloud.config(**over)})
    if r.status_code == 201:
        hosts.append(name)
        reported = (f'novacron_host_cpu_load{{host="{name}"}}',
                    f'novacron_host_up{{host="{name}",state="up"}} 1.0')
        deadline = time.monotonic() + 60
        while not all(line in http.get("/metrics").text for line in reported):
            assert time.monotonic() < deadline, f"host {name} never reported"
            time.sleep(0.2)
    return r


def test_a_cloud_vm_lives_and_dies_over_http(http: httpx.Client, hosts: list[str],
                                              cloud: Cloud) -> None:
    r = register(http, hosts, cloud)
    assert r.status_code == 201, r.text
    host = r.json()
    assert host["capacity"]["cpus"] == 16
    assert host["config"]["credentials"]["source"] == "file"  # a reference, never the secret
    r = http.post(f"{A}/vms", json={"name": f"web-{cloud.driver}", "cpus": 1, "memory_mib": 512,
                                    "disk_gib": 8, "host": host["name"]})
    assert r.status_code == 202, r.text
    vm_id = r.json()["id"]

    running = wait_vm(http, vm_id, settled("running"))
    assert running is not None
    seen = cloud.instance(vm_id)  # through the provider's own API
    assert seen is not None
    assert seen["state"] in ("running", "RUNNING")
    assert seen["tags"][tag_key("vm-id", "-" if cloud.driver == "gcp" else ":")] == vm_id
    assert running["guest_id"]

    assert http.post(f"{A}/vms/{vm_id}/stop").status_code == 202
    wait_vm(http, vm_id, settled("stopped"))
    assert (cloud.instance(vm_id) or {}).get("state") == cloud.stopped
    assert http.post(f"{A}/vms/{vm_id}/start").status_code == 202
    wait_vm(http, vm_id, settled("running"))
    assert http.delete(f"{A}/vms/{vm_id}").status_code == 202
    wait_vm(http, vm_id, lambda b: b is None)
    assert cloud.instance(vm_id) is None  # gone from the provider too
    assert http.delete(f"{A}/hosts/{host['name']}").status_code == 204
    hosts.remove(host["name"])


def test_bad_cloud_input_is_a_clear_4xx_and_leaves_nothing(http: httpx.Client,
                                                           hosts: list[str],
                                                           cloud: Cloud) -> None:
    before = http.get(f"{A}/hosts").json()["items"]
    key, nowhere = cloud.bad_location
    r = register(http, hosts, cloud, **{key: nowhere})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert nowhere in error["message"]
    assert error["details"]["provider"] == cloud.driver
    assert error["details"]["request_id"]

    cloud.refuse_credentials()
    r = register(http, hosts, cloud)  # NovaCron's credentials, not the caller's: no 401
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "unauthenticated"
    assert error["details"]["provider"] == cloud.driver
    assert error["details"]["request_id"]
    assert http.get(f"{A}/hosts").json()["items"] == before  # neither was registered
    cloud.lift_faults()

    r = register(http, hosts, cloud)
    assert r.status_code == 201, r.text
    name = r.json()["name"]
    pin, unknown = cloud.unknown_type
    for why, labels, expected, status in (("type", {pin: unknown}, "invalid_request", 422),
                                          ("quota", {}, "quota_exceeded", 409)):
        if why == "quota":
            cloud.refuse_quota()
        r = http.post(f"{A}/vms", json={"name": f"bad-{why}-{cloud.driver}", "cpus": 1,
                                        "memory_mib": 512, "disk_gib": 8, "host": name,
                                        "labels": labels})
        assert r.status_code == status, r.text  # refused before anything is recorded
        error = r.json()["error"]
        details = error["details"]
        assert (error["code"], details["provider"]) == (expected, cloud.driver)
        if why == "type":
            assert unknown in error["message"]
            assert len(details["nearest"]) == 3  # what the provider does offer
        else:
            assert (details["limit"], details["requested"]) == (0, 1 if cloud.driver ==
                                                                 "azure" else 2)
            assert "vCPU quota" in error["message"]
        if why == "type" or cloud.driver != "gcp":  # GCE's quota read carries no request id
            assert details["request_id"]
            assert details["request_id"] in error["message"]
        assert http.get(f"{A}/vms", params={"host": name}).json()["items"] == []
        assert cloud.on_host(name) == []  # nothing created, seen through the provider's API
        cloud.lift_faults()
    assert http.delete(f"{A}/hosts/{name}").status_code == 204
    hosts.remove(name)
