"""A create the provider would refuse, through the driver API on the session's Ray: the GCP
host's agent (a HostActor) is asked before anything is recorded, and ``nc.vms.create`` raises
the refusal with the provider's details."""

from __future__ import annotations

import pytest

from novacron.errors import InvalidRequest, QuotaExceeded
from novacron.model import HostCreate
from novacron.states import HostState
from tests.fakes.gce import GceFake
from tests.integration.conftest import Running
from tests.integration.test_runtime import eventually

pytest_plugins = ["tests.fakes.plugin"]


def test_nc_vms_create_raises_the_providers_refusal(running: Running, gce: GceFake) -> None:
    nc = running.nc
    nc.call("register_host", HostCreate(name="gcp1", driver="gcp", config={
        "project": gce.project, "zone": "us-central1-a", "endpoint_url": gce.url,
        "credentials": {"source": "anonymous"}, "capacity": {"cpus": 16},
        "default_image": "projects/debian-cloud/global/images/family/debian-12",
        "poll_interval_s": 0.01, "retry_initial_s": 0.01}))
    # its agent's new worker process may have starved the hosts' beats for a moment
    eventually(lambda: all(h.state == HostState.UP for h in nc.hosts.list()), 30,
               what="every host up")

    with pytest.raises(InvalidRequest, match=r"no instance type 'x9-huge' in us-central1-a") \
            as unknown:
        nc.vms.create("pinned", cpus=1, memory_mib=512, host="gcp1",
                      labels={"gcp.machine_type": "x9-huge"})
    assert unknown.value.details["provider"] == "gcp"
    assert unknown.value.details["request_id"]

    gce.cpu_quotas["CPUS"] = 0
    with pytest.raises(QuotaExceeded, match="vCPU quota CPUS") as quota:
        nc.vms.create("over", cpus=1, memory_mib=512, host="gcp1")
    assert (quota.value.details["provider"], quota.value.details["limit"]) == ("gcp", 0)

    assert nc.vms.list(host="gcp1") == []
    assert gce.calls["insert"] == 0
    nc.hosts.delete("gcp1")
