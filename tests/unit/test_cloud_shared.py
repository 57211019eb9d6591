"""What the cloud drivers share (novacron/drivers/cloud.py), without any endpoint."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from novacron.drivers.base import GuestConfig
from novacron.drivers.cloud import (
    Catalogue,
    CloudSettings,
    CredentialRef,
    CredentialWatcher,
    Definition,
    Definitions,
    InstanceType,
    ProviderHealth,
    capacity_of,
    check_vm_id,
    expiry_of,
    idempotency_token,
    read_json_file,
)
from novacron.errors import (
    Forbidden,
    HostUnreachable,
    InvalidRequest,
    NoCapacity,
    NotSupported,
    NovaCronError,
    QuotaExceeded,
    Throttled,
    Unauthenticated,
)
from serve.errors import status_of

TYPES = [InstanceType("small", 1, 1024), InstanceType("medium", 2, 4096),
         InstanceType("wide", 4, 4096), InstanceType("big", 8, 32768),
         InstanceType("gpu.huge", 16, 65536)]


class Loader:
    def __init__(self) -> None:
        self.loads = 0

    def __call__(self) -> list[InstanceType]:
        self.loads += 1
        return list(TYPES)


def test_cheapest_fit_ranks_by_price_then_size(tmp_path: Path) -> None:
    cat = Catalogue(tmp_path / "c.json", 60, Loader())
    assert cat.cheapest_fit(1, 64).name == "small"
    assert cat.cheapest_fit(2, 2048).name == "medium"
    assert cat.cheapest_fit(3, 1024).name == "wide"
    priced = Catalogue(tmp_path / "p.json", 60, Loader(), prices={"big": 0.01})
    assert priced.cheapest_fit(2, 2048).name == "big"  # priced types rank first
    allowed = Catalogue(tmp_path / "a.json", 60, Loader(), allow=["m*", "w*"])
    assert allowed.cheapest_fit(1, 64).name == "medium"
    with pytest.raises(NoCapacity, match="largest allowed is wide: 4 vCPUs"):
        allowed.cheapest_fit(8, 1024)


def test_catalogue_is_cached_in_memory_and_on_disk(tmp_path: Path) -> None:
    loader = Loader()
    cache = tmp_path / "types" / "c.json"
    Catalogue(cache, 60, loader).types()
    Catalogue(cache, 60, loader).types()  # another process: read from the file
    assert loader.loads == 1
    assert Catalogue(cache, 60, loader).lookup("big") == InstanceType("big", 8, 32768)
    stale = Catalogue(cache, 0, loader)
    stale.types()
    assert loader.loads == 2
    cache.write_text("not json")
    Catalogue(cache, 60, loader).types()
    assert loader.loads == 3


def test_settings_parse_and_refuse_secrets() -> None:
    settings = CloudSettings.parse("aws", {"endpoint_url": "http://127.0.0.1:9/",
                                           "capacity": {"cpus": 8},
                                           "credentials": {"source": "profile",
                                                           "profile": "prod"}},
                                   frozenset())
    assert settings.endpoint_url == "http://127.0.0.1:9"
    assert settings.credentials == CredentialRef(source="profile", profile="prod")
    for bad in ({"secret_key": "x"}, {"credentials": {"source": "env", "token": "x"}},
                {"nested": {"password": "x"}}):
        with pytest.raises(InvalidRequest, match="secrets are never stored"):
            CloudSettings.parse("aws", bad, frozenset({"nested"}))
    with pytest.raises(InvalidRequest, match="profile"):
        CredentialRef.parse({"source": "profile"}, "aws")
    with pytest.raises(InvalidRequest, match="positive"):
        CloudSettings.parse("aws", {"poll_interval_s": 0}, frozenset())


def test_capacity_comes_from_config_then_quota() -> None:
    settings = CloudSettings(capacity={"memory_mib": 1000})
    info = capacity_of(settings, 16, "gcp")
    assert (info.cpus, info.memory_mib, info.disk_gib, info.hypervisor) == (16, 1000, 51200,
                                                                            "gcp")
    with pytest.raises(InvalidRequest, match=r"set the host's config\.capacity"):
        capacity_of(CloudSettings(), None, "aws")


def test_vm_ids_and_tokens() -> None:
    check_vm_id("vm-01hx4k2m3n4p5q6r7s8t")
    for bad in ("VM-UPPER", "", "vm_underscore", "x" * 60):
        with pytest.raises(InvalidRequest):
            check_vm_id(bad)
    token = idempotency_token("h", "vm-1", "n1")
    assert token == idempotency_token("h", "vm-1", "n1") != idempotency_token("h", "vm-1", "n2")


def test_definitions_round_trip_and_renew(tmp_path: Path) -> None:
    defs = Definitions(tmp_path / "defs")
    assert defs.all() == []
    definition = Definition(vm_id="vm-1", name="a", cpus=1, memory_mib=64, disk_gib=1,
                            instance_type="small", image="img", epoch=2, nonce="n",
                            labels={"k": "v"})
    defs.save(definition)
    assert defs.load("vm-1") == definition
    renewed = defs.renew(definition)
    assert renewed.nonce != definition.nonce
    assert renewed.token("h") != definition.token("h")
    assert defs.all() == [renewed]
    (tmp_path / "defs" / "vm-2.json").write_text("{broken")
    assert defs.load("vm-2") is None
    defs.delete("vm-1")
    defs.delete("vm-1")
    assert defs.load("vm-1") is None
    assert GuestConfig(vm_id="vm-1", name="a", cpus=1, memory_mib=64, disk_gib=1).epoch == 0


def test_watcher_sees_rotation_expiry_and_refusals(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    creds = tmp_path / "creds.json"
    creds.write_text("a")
    monkeypatch.setenv("NC_TEST_KEY", "1")
    watcher = CredentialWatcher(["NC_TEST_KEY"], [creds], check_interval_s=30,
                                clock=lambda: now[0])
    assert not watcher.changed()
    creds.write_text("b")
    assert not watcher.changed()  # not checked again before the interval
    now[0] = 31
    assert watcher.changed()
    assert not watcher.changed()
    monkeypatch.setenv("NC_TEST_KEY", "2")
    now[0] = 62
    assert watcher.changed()
    watcher.invalidate()
    assert watcher.changed()  # refused by the provider: read again at once
    watcher.expires_at = 0.0  # long expired: checked at every call
    creds.write_text("c")
    assert watcher.changed()


def test_credential_files(tmp_path: Path) -> None:
    with pytest.raises(Unauthenticated, match="cannot read"):
        read_json_file(tmp_path / "missing.json", "aws")
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    with pytest.raises(Unauthenticated, match="must hold an object"):
        read_json_file(bad, "aws")
    bad.write_text(json.dumps({"expiration": "2030-01-01T00:00:00Z"}))
    assert expiry_of(read_json_file(bad, "aws"), "expiration") == 1893456000.0
    assert expiry_of({"expires_on": 12}, "x", "expires_on") == 12.0
    assert expiry_of({}, "expires_on") is None


def test_provider_health() -> None:
    now = [0.0]
    health = ProviderHealth(window_s=60, clock=lambda: now[0])
    health.succeeded()
    health.throttled()
    health.failed(Unauthenticated("no"))
    snap = health.snapshot()
    assert (snap["provider_credentials_valid"], snap["provider_api_reachable"]) == (0.0, 1.0)
    assert (snap["provider_calls_per_min"], snap["provider_throttled_per_min"]) == (2.0, 1.0)
    health.failed(HostUnreachable("down"))
    assert health.snapshot()["provider_api_reachable"] == 0.0
    health.failed(Throttled("busy"))
    assert health.snapshot()["provider_api_reachable"] == 1.0
    health.succeeded()
    now[0] = 120
    snap = health.snapshot()
    assert snap["provider_credentials_valid"] == 1.0
    assert snap["provider_calls_per_min"] == 0.0


@pytest.mark.parametrize(("driver", "sdk"), [("aws", "boto3"),
                                             ("azure", "azure.mgmt.compute"),
                                             ("gcp", "google.auth")])
def test_a_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch, driver: str,
                                       sdk: str) -> None:
    monkeypatch.setitem(sys.modules, sdk, None)  # the import fails as if not installed
    monkeypatch.delitem(sys.modules, f"novacron.drivers.{driver}", raising=False)
    with pytest.raises(NotSupported, match=rf'pip install "novacron\[{driver}\]"'):
        importlib.import_module(f"novacron.drivers.{driver}")


@pytest.mark.parametrize(("error", "status"), [
    (Unauthenticated("bad token"), 401),  # the API caller's own
    (Forbidden("no role"), 403),
    (Unauthenticated("AWS AuthFailure", details={"provider": "aws"}), 422),  # NovaCron's keys
    (Forbidden("AuthorizationFailed", details={"provider": "azure"}), 422),
    (Throttled("rateLimitExceeded", details={"provider": "gcp"}), 503),
    (QuotaExceeded("tenant's vCPUs"), 403),  # the caller may not have more
    (QuotaExceeded("account's vCPU quota", details={"provider": "aws"}), 409),
])
def test_provider_refusals_do_not_look_like_the_callers_auth(error: NovaCronError,
                                                             status: int) -> None:
    assert status_of(error) == status
