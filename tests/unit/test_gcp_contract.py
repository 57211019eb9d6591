"""The GCP driver through google-cloud-compute's REST transport against a local GCE fake.

The client is built with AnonymousCredentials (or a token file) and
``api_endpoint="http://127.0.0.1:PORT"``; operations are waited on through a ZoneOperationsClient
with the same options, so nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novacron.drivers.base import Capability, Driver, GuestConfig, driver_class
from novacron.drivers.cloud import instance_name
from novacron.drivers.gcp import STATES, GcpDriver, label
from novacron.errors import (
    AlreadyExists,
    InvalidRequest,
    InvalidTransition,
    NoCapacity,
    NotFound,
    NotSupported,
    NovaCronError,
    QuotaExceeded,
    StaleEpoch,
    Throttled,
    Unauthenticated,
)
from novacron.states import VMState
from serve.errors import status_of
from tests.contract.driver_contract import DriverContract
from tests.fakes.env import DriverEnv
from tests.fakes.gce import GceFake

pytest_plugins = ["tests.fakes.plugin"]

ZONE = "us-central1-a"


@pytest.fixture(scope="session")
def gcp_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gcp-state")


class Env(DriverEnv[GcpDriver]):
    """Builds drivers on unique hosts against the fake; deletes what they made."""

    driver_class = GcpDriver
    prefix = "gcp"

    def __init__(self, fake: GceFake, state: Path, tmp: Path) -> None:
        super().__init__(fake, state)
        self.fake, self.state, self.tmp = fake, state, tmp

    def config(self, **over: Any) -> dict[str, Any]:
        return {"project": self.fake.project, "zone": ZONE, "endpoint_url": self.fake.url,
                "credentials": {"source": "anonymous"}, "capacity": {"cpus": 64},
                "default_image": "projects/debian-cloud/global/images/family/debian-12",
                "poll_interval_s": 0.01, "retry_initial_s": 0.01, "retry_timeout_s": 5,
                "credential_check_interval_s": 0, "page_size": 100, **over}



@pytest.fixture
def env(gce: GceFake, gcp_state: Path, tmp_path: Path) -> Iterator[Env]:
    e = Env(gce, gcp_state, tmp_path)
    yield e
    e.cleanup()


class TestGcpContract(DriverContract):
    @pytest.fixture
    def driver(self, env: Env) -> Driver:
        return env.driver()


def guest(vm_id: str, **kwargs: Any) -> GuestConfig:
    return GuestConfig(**{"vm_id": vm_id, "name": "Unit Test", "cpus": 1, "memory_mib": 512,
                          "disk_gib": 10, "epoch": 1, **kwargs})


def vm() -> str:
    return f"vm-gcp-{uuid.uuid4().hex[:10]}"


def raw(fake: GceFake, vm_id: str) -> dict[str, Any] | None:
    return fake.instances.get((ZONE, instance_name(vm_id)))


def write_token(path: Path, token: str, expires_on: float | None = None) -> Path:
    path.write_text(json.dumps({"access_token": token,
                                "expires_on": expires_on or time.time() + 3600}))
    return path


# -- config, zone, catalogue -----------------------------------------------------------------


def test_registered_with_pause_as_suspend(env: Env) -> None:
    assert driver_class("gcp") is GcpDriver
    drv = env.driver(connect=False)
    assert drv.capabilities == {Capability.REBOOT, Capability.PAUSE}
    assert "Cloud Storage" in drv.missing_capabilities()[Capability.IMAGE_IMPORT]
    assert "migrated into GCP" in drv.missing_capabilities()[Capability.COLD_MIGRATION]
    with pytest.raises(NotSupported, match="Cloud Storage"):
        drv.discard_imports("vm-x")
    assert STATES["SUSPENDED"] == VMState.PAUSED
    assert drv._parse(type("I", (), {"labels": {}, "last_start_timestamp": "",
                                     "creation_timestamp": "", "name": "x",
                                     "status": "REPAIRING", "machine_type": ""})()).state == (
        VMState.UNKNOWN)


@pytest.mark.parametrize(("config", "message"), [
    ({"project": ""}, "project"),
    ({"zone": None}, "zone"),
    ({"credentials": {"source": "profile", "profile": "x"}}, "profiles are AWS"),
    ({"client_secret": "x"}, "secrets are never stored"),
    ({"retry_initial_s": "soon"}, "bad gcp host config"),
])
def test_bad_config_is_refused(env: Env, config: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        GcpDriver("h", None, env.config(**config), env.state)


def test_unknown_zone_is_a_clear_error(env: Env) -> None:
    with pytest.raises(InvalidRequest, match=r"unknown GCP zone 'mars-north1-a'.*not found"):
        env.driver(zone="mars-north1-a")


def test_cheapest_fit_and_quota_capacity(env: Env) -> None:
    drv = env.driver(capacity={})
    assert drv.catalogue.cheapest_fit(1, 64).name == "e2-micro"
    assert env.driver(instance_types=["n2-*"]).catalogue.cheapest_fit(2, 4096).name == (
        "n2-standard-2")
    with pytest.raises(NoCapacity, match="no instance type has 64 vCPUs"):
        drv.catalogue.cheapest_fit(64, 1024)
    info = drv.host_info()
    assert (info.cpus, info.memory_mib, info.version) == (24, 24 * 4096, ZONE)


# -- lifecycle -------------------------------------------------------------------------------


def test_create_labels_reattach_and_fence(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id, epoch=3))
    started = drv.start(vm_id, epoch=3)
    instance = raw(env.fake, vm_id)
    assert instance is not None
    assert started.guest_id == instance["name"] == instance_name(vm_id)
    assert instance["labels"] == {"novacron-vm-id": vm_id, "novacron-host": label(drv.host),
                                  "novacron-epoch": "3", "novacron-name": "unit-test"}
    assert instance["machineType"].endswith("/e2-micro")
    assert env.fake.calls["operations.wait"] > 0  # polled through our operations client
    other = GcpDriver(drv.host, None, env.config(), env.tmp / "elsewhere")
    env.drivers.append(other)
    assert other.start(vm_id, epoch=5).epoch == 5
    with pytest.raises(StaleEpoch):
        drv.start(vm_id, epoch=4)
    assert drv.get(vm_id).epoch == 5


def test_a_foreign_instance_with_the_name_is_never_taken(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    env.fake.add_instance(ZONE, instance_name(vm_id), {"owner": "someone"})
    drv.define(guest(vm_id))
    with pytest.raises(AlreadyExists, match="not NovaCron's"):
        drv.start(vm_id, epoch=1)
    assert raw(env.fake, vm_id)["labels"] == {"owner": "someone"}  # type: ignore[index]
    del env.fake.instances[(ZONE, instance_name(vm_id))]


def test_suspend_stop_and_keep_the_disk(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id))
    drv.start(vm_id, epoch=1)
    assert drv.pause(vm_id).state == VMState.PAUSED
    assert raw(env.fake, vm_id)["status"] == "SUSPENDED"  # type: ignore[index]
    with pytest.raises(InvalidTransition):
        drv.reboot(vm_id)
    assert drv.start(vm_id, epoch=1).state == VMState.RUNNING  # resumes a suspended guest
    assert drv.reboot(vm_id).state == VMState.RUNNING
    drv.stop(vm_id)
    instance = raw(env.fake, vm_id)
    drv.undefine(vm_id, delete_storage=False)
    assert instance is not None
    assert instance["disks"][0]["autoDelete"] is False
    assert raw(env.fake, vm_id) is None
    with pytest.raises(NotFound):
        drv.get(vm_id)


# -- reliability -----------------------------------------------------------------------------


def test_throttling_storm_is_absorbed_by_api_core_retry(env: Env) -> None:
    drv = env.driver()
    env.fake.throttle(3)
    assert drv.list() == []
    assert env.fake.calls["instances.list"] == 1
    assert drv.health.snapshot()["provider_throttled_per_min"] == pytest.approx(3 / 5)


def test_throttling_past_the_deadline_is_a_typed_error(env: Env) -> None:
    drv = env.driver(retry_timeout_s=0.2, retry_initial_s=0.05)
    env.fake.throttle(10_000)
    with pytest.raises(Throttled, match="throttling") as info:
        drv.list()
    assert status_of(info.value) == 503
    assert info.value.details["provider_code"] == "rateLimitExceeded"
    assert info.value.details["request_id"]


def test_create_that_times_out_is_retried_into_one_instance(env: Env) -> None:
    drv, vm_id = env.driver(read_timeout_s=0.5), vm()
    drv.define(guest(vm_id))
    env.fake.delay("insert", 1.2)  # GCE inserts it, the answer comes too late
    assert drv.start(vm_id, epoch=1).state == VMState.RUNNING
    assert env.fake.calls["insert"] >= 2  # retried with the same requestId
    assert sum(1 for (_, n) in env.fake.instances if n == instance_name(vm_id)) == 1


def test_listing_250_instances_pages_through_all(env: Env) -> None:
    drv = env.driver()
    for i in range(250):
        env.fake.add_instance(ZONE, f"novacron-vm-page-{i:03d}",
                              {"novacron-vm-id": f"vm-page-{i:03d}",
                               "novacron-host": label(drv.host)})
    try:
        guests = drv.list()
        assert {g.vm_id for g in guests} == {f"vm-page-{i:03d}" for i in range(250)}
        assert env.fake.calls["instances.list"] == 3
    finally:
        for i in range(250):
            del env.fake.instances[(ZONE, f"novacron-vm-page-{i:03d}")]


# -- bad input -------------------------------------------------------------------------------


def test_unknown_machine_type(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id, labels={"gcp.machine_type": "x9-huge"}))
    with pytest.raises(InvalidRequest, match="Machine type with name 'x9-huge'") as info:
        drv.start(vm_id, epoch=1)
    assert info.value.details["provider_code"] == "invalid"
    assert info.value.details["request_id"]
    assert raw(env.fake, vm_id) is None
    assert drv.get(vm_id).state == VMState.STOPPED


@pytest.mark.parametrize(("code", "expected"), [
    ("QUOTA_EXCEEDED", QuotaExceeded),
    ("ZONE_RESOURCE_POOL_EXHAUSTED", NoCapacity),
])
def test_failed_inserts_are_typed_and_leave_nothing(env: Env, code: str,
                                                    expected: type[NovaCronError]) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id))
    env.fake.fail_operation("insert", code, f"refused by test ({code})")
    with pytest.raises(expected, match=f"refused by test.*GCP {code}, request") as info:
        drv.start(vm_id, epoch=1)
    assert info.value.details["request_id"]
    assert raw(env.fake, vm_id) is None


def test_preflight_refuses_a_machine_type_the_zone_lacks_with_gces_answer(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.catalogue.types()  # cached: only the unknown name is asked
    env.fake.calls.clear()
    with pytest.raises(InvalidRequest, match=r"no instance type 'x9-huge' in us-central1-a .*"
                       r"machineTypes/x9-huge' was not found \(GCP notFound, request ") as info:
        drv.preflight(guest(vm_id, labels={"gcp.machine_type": "x9-huge"}))
    details = info.value.details
    assert (details["provider"], details["provider_code"]) == ("gcp", "notFound")
    assert details["request_id"]
    assert len(details["nearest"]) == 3
    assert set(details["nearest"]) <= set(drv.catalogue.types())
    assert status_of(info.value) == 422  # the type is a field of the request: not a 404
    assert env.fake.calls["insert"] == 0
    assert raw(env.fake, vm_id) is None
    assert drv.definitions.load(vm_id) is None


def test_preflight_counts_the_regions_cpus_of_the_series_quota(env: Env) -> None:
    zone = "europe-west1-b"  # apart from the other tests' instances
    drv = env.driver(zone=zone)
    env.fake.add_instance(zone, "other-e2", {}, machine_type="e2-standard-4")
    env.fake.add_instance(zone, "other-n2", {}, machine_type="n2-standard-2")
    env.fake.add_instance(zone, "other-off", {}, status="TERMINATED",
                          machine_type="e2-standard-8")
    env.fake.cpu_quotas.update(CPUS=8, N2_CPUS=4)
    vm_id = vm()
    try:
        drv.preflight(guest(vm(), labels={"gcp.machine_type": "e2-standard-4"}))  # 4 + 4 of 8
        drv.preflight(guest(vm(), labels={"gcp.machine_type": "n2-standard-2"}))  # 2 + 2 of 4
        with pytest.raises(QuotaExceeded, match=r"quota N2_CPUS in europe-west1-b would be "
                           r"exceeded: n2-standard-4 needs 4 vCPUs and 2 of 4 are in use$") \
                as info:
            drv.preflight(guest(vm_id, labels={"gcp.machine_type": "n2-standard-4"}))
    finally:
        for name in ("other-e2", "other-n2", "other-off"):
            del env.fake.instances[(zone, name)]
    details = info.value.details
    assert (details["limit"], details["in_use"], details["requested"]) == (4, 2, 4)
    assert (details["provider"], details["quota"]) == ("gcp", "N2_CPUS")
    assert details["request_id"] is None  # GCE's answer to a read carries none
    assert status_of(info.value) == 409
    assert env.fake.calls["insert"] == 0
    assert drv.definitions.load(vm_id) is None


def test_bad_token_then_rotation(env: Env) -> None:
    token = write_token(env.tmp / "token.json", "expired-or-wrong")
    env.fake.tokens = {"good-token"}
    drv = env.driver(connect=False, credentials={"source": "file", "path": str(token)})
    with pytest.raises(Unauthenticated, match="authError") as info:
        drv.connect()
    assert info.value.details["request_id"]
    assert status_of(info.value) == 422
    write_token(token, "good-token")  # rotated
    drv.connect()
    assert drv.list() == []
    assert drv.health.snapshot()["provider_credentials_valid"] == 1.0


def test_rotated_and_expired_tokens_are_re_read(env: Env) -> None:
    token = write_token(env.tmp / "token.json", "first")
    env.fake.tokens = {"first"}
    drv = env.driver(credentials={"source": "file", "path": str(token)},
                     credential_check_interval_s=3600)
    env.fake.tokens = {"second"}
    write_token(token, "second")
    assert drv.list() == []  # the 401 made google-auth refresh: our handler re-read the file
    env.fake.tokens = {"third"}
    write_token(token, "third", expires_on=time.time() - 10)
    with pytest.raises(Unauthenticated, match="already expired"):
        drv.list()
    write_token(token, "third")
    assert drv.list() == []


def test_host_stats_and_cloud_monitoring_metrics(env: Env) -> None:
    drv, vm_id = env.driver(), vm()
    drv.define(guest(vm_id, labels={"gcp.machine_type": "n2-standard-4"}))
    drv.start(vm_id, epoch=1)
    stats = drv.host_stats()
    assert (stats.guests, stats.memory_used_mib, stats.extra["vcpus_in_use"]) == (1, 16384, 4)
    assert drv.stats(vm_id).cpu_time_s == 0
    env.fake.metrics[instance_name(vm_id)] = {
        "compute.googleapis.com/instance/cpu/usage_time": 12.5,
        "compute.googleapis.com/instance/network/sent_bytes_count": 2048}
    env.fake.throttle(1)  # absorbed by the same api-core retry
    metrics = drv.stats(vm_id)
    assert (metrics.cpu_time_s, metrics.net_tx_bytes) == (12.5, 2048)
