"""The Azure driver through azure-mgmt-compute and azure-core against a local HTTPS ARM fake.

The fake's self-signed certificate is passed as ``ca_bundle`` (azure-core's
``connection_verify``), so the real bearer-token policy runs; polling and retry are shortened.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novacron.drivers.azure import AzureDriver, image_reference, vm_state
from novacron.drivers.base import Capability, Driver, GuestConfig, driver_class
from novacron.drivers.cloud import instance_name, tag_key
from novacron.errors import (
    AlreadyExists,
    InvalidRequest,
    InvalidTransition,
    NoCapacity,
    NotFound,
    NotSupported,
    QuotaExceeded,
    StaleEpoch,
    Throttled,
    Unauthenticated,
)
from novacron.states import VMState
from serve.errors import status_of
from tests.contract.driver_contract import DriverContract
from tests.fakes.azure_arm import ArmFake
from tests.fakes.env import DriverEnv

pytest_plugins = ["tests.fakes.plugin"]

GROUP = "novacron-rg"
SUBNET = ("/subscriptions/x/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/v"
          "/subnets/s")


@pytest.fixture(scope="session")
def azure_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("azure-state")


def write_token(path: Path, token: str, expires_on: float | None = None) -> Path:
    path.write_text(json.dumps({"access_token": token,
                                "expires_on": expires_on or time.time() + 3600}))
    return path


class Env(DriverEnv[AzureDriver]):
    """Builds drivers on unique hosts against the fake; deletes what they made."""

    driver_class = AzureDriver
    prefix = "az"

    def __init__(self, fake: ArmFake, state: Path, tmp: Path) -> None:
        super().__init__(fake, state)
        self.fake, self.state, self.tmp = fake, state, tmp
        self.token = write_token(tmp / "token.json", "arm-token")

    def config(self, **over: Any) -> dict[str, Any]:
        return {"subscription_id": self.fake.subscription, "resource_group": GROUP,
                "location": "westeurope", "endpoint_url": self.fake.url,
                "ca_bundle": str(self.fake.cert), "subnet_id": SUBNET,
                "ssh_public_key": "ssh-ed25519 AAAAC3Nza novacron@test",
                "credentials": {"source": "file", "path": str(self.token)},
                "capacity": {"cpus": 64},
                "default_image": "Canonical:ubuntu-24_04-lts:server:latest",
                "poll_interval_s": 0.01, "max_attempts": 4, "retry_backoff_factor": 0.01,
                "credential_check_interval_s": 0, **over}



@pytest.fixture
def env(arm: ArmFake, azure_state: Path, tmp_path: Path) -> Iterator[Env]:
    e = Env(arm, azure_state, tmp_path)
    yield e
    e.cleanup()


class TestAzureContract(DriverContract):
    @pytest.fixture
    def driver(self, env: Env) -> Driver:
        return env.driver()


def guest(vm_id: str, **kwargs: Any) -> GuestConfig:
    return GuestConfig(**{"vm_id": vm_id, "name": "unit", "cpus": 1, "memory_mib": 512,
                          "disk_gib": 8, "epoch": 1, **kwargs})


def vm() -> str:
    return f"vm-az-{uuid.uuid4().hex[:10]}"


def raw(fake: ArmFake, vm_id: str) -> dict[str, Any] | None:
    return fake.vms.get((GROUP, instance_name(vm_id)))


# -- config, location, catalogue -------------------------------------------------------------


def test_registered_without_pause(env: Env) -> None:
    assert driver_class("azure") is AzureDriver
    drv = env.driver(connect=False)
    assert drv.capabilities == {Capability.REBOOT}
    assert "Azure cannot freeze" in drv.missing_capabilities()[Capability.PAUSE]


def test_no_image_import_says_why(env: Env, tmp_path: Path) -> None:
    drv = env.driver(connect=False)
    assert "page-blob" in drv.missing_capabilities()[Capability.IMAGE_IMPORT]
    assert "migrated into Azure" in drv.missing_capabilities()[Capability.COLD_MIGRATION]
    with pytest.raises(NotSupported, match="page-blob") as info:
        drv.import_disk(vm(), tmp_path / "disk.img")
    assert info.value.details["capability"] == "image_import"


@pytest.mark.parametrize(("config", "message"), [
    ({"subscription_id": None}, "subscription_id"),
    ({"resource_group": ""}, "resource_group"),
    ({"credentials": {"source": "anonymous"}}, "azure credentials come from"),
    ({"client_secret": "x"}, "secrets are never stored"),
    ({"retry_backoff_factor": "fast"}, "bad azure host config"),
])
def test_bad_config_is_refused(env: Env, config: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        AzureDriver("h", None, env.config(**config), env.state)


def test_unknown_location_and_group_are_clear_errors(env: Env) -> None:
    with pytest.raises(InvalidRequest, match=r"unknown Azure location 'atlantis'.*"
                                             r"NoRegisteredProviderFound") as info:
        env.driver(location="atlantis")
    assert info.value.details["request_id"]
    with pytest.raises(InvalidRequest, match=r"Resource group 'nope' could not be found"):
        env.driver(resource_group="nope")


def test_images_and_states_are_parsed() -> None:
    assert image_reference("Canonical:ubuntu:server:latest") == {
        "publisher": "Canonical", "offer": "ubuntu", "sku": "server", "version": "latest"}
    assert image_reference("/subscriptions/s/images/i") == {"id": "/subscriptions/s/images/i"}
    with pytest.raises(InvalidRequest, match="publisher:offer:sku:version"):
        image_reference("ubuntu")

    def status(code: str) -> Any:
        return type("S", (), {"code": code})()

    assert vm_state([status("ProvisioningState/succeeded"),
                     status("PowerState/deallocated")]) == (VMState.STOPPED,
                                                            "PowerState/deallocated")
    assert vm_state([status("ProvisioningState/failed"), status("PowerState/running")])[0] == (
        VMState.ERROR)
    assert vm_state([status("ProvisioningState/creating")])[0] == VMState.STARTING
    assert vm_state([status("PowerState/hibernated")])[0] == VMState.UNKNOWN


def test_cheapest_fit_and_quota_capacity(env: Env) -> None:
    drv = env.driver(capacity={})
    assert drv.catalogue.cheapest_fit(1, 64).name == "Standard_B1ls"
    assert drv.catalogue.cheapest_fit(2, 12000).name == "Standard_E2s_v5"
    with pytest.raises(NoCapacity):
        drv.catalogue.cheapest_fit(32, 1)
    info = drv.host_info()
    assert (info.cpus, info.version) == (20, "westeurope")
    with pytest.raises(InvalidRequest, match="publisher:offer:sku:version"):
        drv.define(guest(vm(), image="ubuntu-latest"))


# -- lifecycle -------------------------------------------------------------------------------


def test_create_tags_reattach_and_fence(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id, epoch=3, name="web"))
    started = drv.start(vm_id, epoch=3)
    resource = raw(env.fake, vm_id)
    assert resource is not None
    assert started.guest_id == resource["id"]
    assert resource["tags"] == {tag_key("vm-id"): vm_id, tag_key("host"): drv.host,
                                tag_key("epoch"): "3", tag_key("name"): "web"}
    properties = resource["properties"]
    assert properties["hardwareProfile"]["vmSize"] == "Standard_B1ls"
    assert properties["storageProfile"]["osDisk"]["diskSizeGB"] == 30
    nic = properties["networkProfile"]["networkInterfaceConfigurations"][0]
    assert nic["properties"]["deleteOption"] == "Delete"
    assert env.fake.calls["operations"] > 0  # polled through Azure-AsyncOperation
    other = AzureDriver(drv.host, None, env.config(), env.tmp / "elsewhere")
    env.drivers.append(other)
    assert other.start(vm_id, epoch=5).epoch == 5
    with pytest.raises(StaleEpoch):
        drv.start(vm_id, epoch=4)


def test_stop_deallocates_and_undefine_can_keep_the_disk(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id))
    drv.start(vm_id, epoch=1)
    stopped = drv.stop(vm_id, timeout_s=5)
    assert (stopped.state, stopped.reason) == (VMState.STOPPED, "PowerState/deallocated")
    kept = env.driver(deallocate=False)
    vm2 = vm()
    kept.define(guest(vm2))
    kept.start(vm2, epoch=1)
    assert kept.stop(vm2, force=True).reason == "PowerState/stopped"
    with pytest.raises(InvalidTransition):
        kept.reboot(vm2)
    drv.undefine(vm_id, delete_storage=False)
    gone = env.fake.deleted[(GROUP, instance_name(vm_id))]
    assert gone["properties"]["storageProfile"]["osDisk"]["deleteOption"] == "Detach"
    with pytest.raises(NotFound):
        drv.get(vm_id)


def test_a_foreign_vm_with_the_name_is_never_overwritten(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    env.fake.add_vm(GROUP, instance_name(vm_id), {"owner": "someone"})
    drv.define(guest(vm_id))
    with pytest.raises(AlreadyExists, match="not NovaCron's"):
        drv.start(vm_id, epoch=1)
    assert raw(env.fake, vm_id)["tags"] == {"owner": "someone"}  # type: ignore[index]
    del env.fake.vms[(GROUP, instance_name(vm_id))]


def test_pause_is_not_supported(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id))
    with pytest.raises(NotSupported, match="Azure"):
        drv.pause(vm_id)


# -- reliability -----------------------------------------------------------------------------


def test_throttling_storm_is_absorbed_by_the_retry_policy(env: Env) -> None:
    drv = env.driver()
    env.fake.throttle(3)
    assert drv.list() == []
    assert drv.health.snapshot()["provider_throttled_per_min"] == pytest.approx(3 / 5)


def test_retry_after_is_honoured(env: Env) -> None:
    drv = env.driver()
    env.fake.throttle(1, retry_after=1)
    started = time.monotonic()
    assert drv.list() == []
    assert time.monotonic() - started >= 1.0


def test_throttling_beyond_the_retries_is_a_typed_error(env: Env) -> None:
    drv = env.driver(max_attempts=2)
    env.fake.throttle(10)
    with pytest.raises(Throttled, match="throttling") as info:
        drv.list()
    assert status_of(info.value) == 503
    assert info.value.details["provider_code"] == "TooManyRequests"
    assert info.value.details["request_id"]


def test_create_that_times_out_is_retried_into_one_vm(env: Env) -> None:
    drv, vm_id = env.driver(read_timeout_s=0.5), vm()
    drv.define(guest(vm_id))
    env.fake.delay("put", 1.2)  # ARM accepts it, the answer comes too late
    assert drv.start(vm_id, epoch=1).state == VMState.RUNNING
    assert env.fake.calls["put"] >= 2  # retried: If-None-Match refused, then re-attached
    assert sum(1 for (_, n) in env.fake.vms if n == instance_name(vm_id)) == 1


def test_listing_250_vms_follows_next_links(env: Env) -> None:
    drv = env.driver()
    names = [f"novacron-vm-page-{i:03d}" for i in range(250)]
    for i, name in enumerate(names):
        env.fake.add_vm(GROUP, name, {tag_key("vm-id"): f"vm-page-{i:03d}",
                                      tag_key("host"): drv.host})
    env.fake.calls.clear()
    try:
        guests = drv.list()
        assert {g.vm_id for g in guests} == {f"vm-page-{i:03d}" for i in range(250)}
        assert {g.state for g in guests} == {VMState.RUNNING}
        assert env.fake.calls["list"] == 3  # pages of 100
    finally:
        for name in names:
            del env.fake.vms[(GROUP, name)]


# -- bad input -------------------------------------------------------------------------------


def test_unknown_vm_size(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id, labels={"azure.vm_size": "Standard_X9"}))
    with pytest.raises(InvalidRequest, match="Standard_X9 provided for the VM size") as info:
        drv.start(vm_id, epoch=1)
    assert info.value.details["provider_code"] == "InvalidParameter"
    assert info.value.details["request_id"]
    assert raw(env.fake, vm_id) is None
    assert drv.get(vm_id).state == VMState.STOPPED


def test_quota_refusal_is_typed(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id))
    env.fake.fail("put", 409, "OperationNotAllowed", "Operation could not be completed as it "
                  "results in exceeding approved Total Regional Cores quota.")
    with pytest.raises(QuotaExceeded, match=r"Total Regional Cores quota.*request") as info:
        drv.start(vm_id, epoch=1)
    assert info.value.details["request_id"]
    assert raw(env.fake, vm_id) is None


def test_preflight_refuses_a_size_the_location_lacks_with_arms_answer(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.catalogue.types()  # cached: the location's list is asked again once
    env.fake.calls.clear()
    with pytest.raises(InvalidRequest, match=r"no instance type 'Standard_X9' in westeurope .*"
                       r"do not include it \(Azure request ") as info:
        drv.preflight(guest(vm_id, labels={"azure.vm_size": "Standard_X9"}))
    details = info.value.details
    assert (details["provider"], details["location"]) == ("azure", "westeurope")
    assert details["request_id"]  # of the vmSizes answer
    assert len(details["nearest"]) == 3
    assert set(details["nearest"]) <= set(drv.catalogue.types())
    assert status_of(info.value) == 422
    assert env.fake.calls == {"vmSizes": 1}  # nothing put
    assert raw(env.fake, vm_id) is None
    assert drv.definitions.load(vm_id) is None


def test_preflight_counts_the_locations_cores_against_the_quota(env: Env) -> None:
    drv = env.driver(location="eastus")  # apart from the other tests' VMs
    others = ["other-1", "other-2", "other-3"]
    for name in others:  # 1 core each; the last one deallocated holds none
        env.fake.add_vm(GROUP, name, {}, location="eastus")
    env.fake.vms[(GROUP, others[2])]["properties"]["power"] = "deallocated"
    env.fake.core_quota = 4
    vm_id = vm()
    try:
        drv.preflight(guest(vm(), labels={"azure.vm_size": "Standard_B2s"}))  # 2 + 2 of 4
        with pytest.raises(QuotaExceeded, match=r"quota cores \(Total Regional vCPUs\) in "
                           r"eastus would be exceeded: Standard_D4s_v5 needs 4 vCPUs and 2 of 4 "
                           r"are in use \(Azure request ") as info:
            drv.preflight(guest(vm_id, cpus=4, memory_mib=16384))  # the cheapest fit
    finally:
        for name in others:
            del env.fake.vms[(GROUP, name)]
    details = info.value.details
    assert (details["limit"], details["in_use"], details["requested"]) == (4, 2, 4)
    assert (details["provider"], details["instance_type"]) == ("azure", "Standard_D4s_v5")
    assert details["request_id"]  # of the usages answer
    assert status_of(info.value) == 409
    assert env.fake.calls["put"] == 0
    assert drv.definitions.load(vm_id) is None


def test_failed_provisioning_is_typed_and_deleted(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id))
    env.fake.fail("put", 200, "AllocationFailed", "Allocation failed. We do not have "
                  "sufficient capacity for the requested VM size in this region.", late=True)
    with pytest.raises(NoCapacity, match=r"sufficient capacity.*Azure AllocationFailed"):
        drv.start(vm_id, epoch=1)
    assert raw(env.fake, vm_id) is None  # the Failed VM ARM left was deleted
    assert drv.get(vm_id).state == VMState.STOPPED


def test_bad_token_then_rotation(env: Env) -> None:
    drv = env.driver()
    env.fake.tokens = {"rotated-token"}
    with pytest.raises(Unauthenticated, match="InvalidAuthenticationToken") as info:
        drv.list()
    assert info.value.details["request_id"]
    assert status_of(info.value) == 422
    assert drv.health.snapshot()["provider_credentials_valid"] == 0.0
    write_token(env.token, "rotated-token")
    assert drv.list() == []
    assert drv.health.snapshot()["provider_credentials_valid"] == 1.0


def test_host_stats_and_azure_monitor_metrics(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id, labels={"azure.vm_size": "Standard_D2s_v5"}))
    drv.start(vm_id, epoch=1)
    stats = drv.host_stats()
    assert (stats.guests, stats.memory_used_mib) == (1, 8192)
    assert stats.cpu_load == pytest.approx(2 / 64)
    assert drv.stats(vm_id).cpu_time_s == 0  # Azure Monitor has nothing yet
    env.fake.metrics[(GROUP, instance_name(vm_id))] = {
        "Percentage CPU": 50.0, "Network In Total": 1000.0, "Disk Write Bytes": 4096.0}
    metrics = drv.stats(vm_id)
    assert metrics.cpu_time_s == pytest.approx(0.5 * 60 * 2)  # one minute at 50 % of 2 vCPUs
    assert (metrics.net_rx_bytes, metrics.disk_written_bytes) == (1000, 4096)
    assert env.fake.calls["metrics"] == 2
