"""Quotas (the pure admission check) and tenant records."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from novacron.auth.quotas import DIMENSIONS, Quota, Usage, check
from novacron.auth.records import MemoryRecords
from novacron.auth.tenants import TenantStore
from novacron.errors import AlreadyExists, InvalidRequest, NotFound, QuotaExceeded


def test_a_request_that_fits_passes() -> None:
    quota = Quota(vcpus=32, memory_mib=65536, disk_gib=500, vms=10, volume_bytes=10**12)
    used = Usage(vcpus=28, memory_mib=32768, disk_gib=100, vms=9)
    check(used, Usage.of_vm(cpus=4, memory_mib=32768, disk_gib=400), quota, tenant="acme")


def test_an_exceeding_request_is_refused_with_the_numbers() -> None:
    quota = Quota(vcpus=32, vms=10)
    used = Usage(vcpus=30, vms=10, memory_mib=10**6)
    with pytest.raises(QuotaExceeded) as err:
        check(used, Usage.of_vm(cpus=4, memory_mib=1024, disk_gib=10), quota, tenant="acme")
    assert err.value.message == ("quota of tenant acme exceeded: vcpus: 30 used + 4 requested > "
                                 "32 allowed; vms: 10 used + 1 requested > 10 allowed")
    assert err.value.details == {"tenant": "acme", "exceeded": {
        "vcpus": {"used": 30, "requested": 4, "limit": 32},
        "vms": {"used": 10, "requested": 1, "limit": 10}}}
    assert err.value.code == "quota_exceeded"


def test_volume_bytes() -> None:
    with pytest.raises(QuotaExceeded, match="volume_bytes: 900 used \\+ 200 requested > 1000"):
        check(Usage(volume_bytes=900), Usage(volume_bytes=200), Quota(volume_bytes=1000))


def test_zero_quota_refuses_and_none_is_unlimited() -> None:
    with pytest.raises(QuotaExceeded):
        check(Usage(), Usage(vms=1), Quota(vms=0))
    check(Usage(vcpus=10**6), Usage(vcpus=10**6), Quota())


def test_a_request_adding_nothing_to_an_over_quota_dimension_passes() -> None:
    # The quota was lowered below current use; growing memory only is still fine.
    check(Usage(vcpus=50, memory_mib=100), Usage(memory_mib=100), Quota(vcpus=10))


def test_negative_values_are_invalid() -> None:
    with pytest.raises(ValidationError):
        Quota(vcpus=-1)
    with pytest.raises(ValidationError):
        Usage(vms=-1)


def test_usage_adds_up() -> None:
    total = Usage.of_vm(2, 1024, 10) + Usage.of_vm(4, 2048, 20) + Usage(volume_bytes=5)
    assert total == Usage(vcpus=6, memory_mib=3072, disk_gib=30, vms=2, volume_bytes=5)


amounts = st.integers(min_value=0, max_value=1000)
usages = st.builds(Usage, **dict.fromkeys(DIMENSIONS, amounts))
quotas = st.builds(Quota, **{d: st.none() | amounts for d in DIMENSIONS})


@given(usages, usages, quotas)
def test_check_refuses_exactly_when_a_growing_dimension_passes_its_limit(
        used: Usage, request: Usage, quota: Quota) -> None:
    over = {d for d in DIMENSIONS
            if getattr(quota, d) is not None and getattr(request, d) > 0
            and getattr(used, d) + getattr(request, d) > getattr(quota, d)}
    if over:
        with pytest.raises(QuotaExceeded) as err:
            check(used, request, quota)
        assert set(err.value.details["exceeded"]) == over
    else:
        check(used, request, quota)


# --- tenants ----------------------------------------------------------------------------------

def test_tenant_store() -> None:
    tenants = TenantStore(MemoryRecords(), clock=lambda: 5.0)
    acme = tenants.create("acme", quota=Quota(vms=3), description="ACME Corp")
    assert acme.created_at == 5.0
    assert tenants.get("acme") == acme
    with pytest.raises(AlreadyExists):
        tenants.create("acme")
    for bad in ("ACME", "-x", "a b", "*", "", "x" * 64):
        with pytest.raises(InvalidRequest):
            tenants.create(bad)
    updated = tenants.update("acme", quota=Quota(vms=5, vcpus=20), require_mfa=True)
    assert updated.quota == Quota(vms=5, vcpus=20)
    assert tenants.get("acme").require_mfa
    assert tenants.update("acme").quota == Quota(vms=5, vcpus=20)
    assert tenants.ensure("default").name == "default"
    assert tenants.ensure("acme") == tenants.get("acme")
    assert [t.name for t in tenants.list()] == ["acme", "default"]
    tenants.delete("default")
    with pytest.raises(NotFound):
        tenants.get("default")
    with pytest.raises(NotFound):
        tenants.delete("default")
    with pytest.raises(NotFound):
        tenants.update("default", require_mfa=True)
