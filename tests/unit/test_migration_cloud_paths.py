"""Which migrations reach a cloud host (novacron/migrations.py), and why the others cannot."""

from __future__ import annotations

import pytest

from novacron.errors import NotSupported
from novacron.migrations import check_supported, path_for
from novacron.model import MigrationPolicy


def test_a_sim_guest_goes_into_aws_cold_only() -> None:
    assert path_for("sim", "aws", "cold") == "cloud_import"
    for mode in ("warm", "live"):
        with pytest.raises(NotSupported, match=r"use cold \(the stopped guest's disk is "
                                               r"imported as an AMI.*EC2 instance\)") as info:
            path_for("sim", "aws", mode)
        assert info.value.details["mode"] == mode
    with pytest.raises(NotSupported, match="policy option"):
        check_supported("cold", MigrationPolicy(compress=True), "sim", "aws")


@pytest.mark.parametrize(("source", "target", "why"), [
    ("sim", "azure", "imports no disk images into Azure"),
    ("sim", "gcp", "imports no disk images into Compute Engine"),
    ("aws", "sim", "the aws driver exports no disks"),
    ("gcp", "aws", "the gcp driver exports no disks"),
])
def test_no_path_into_or_out_of_a_cloud_says_why(source: str, target: str, why: str) -> None:
    with pytest.raises(NotSupported, match=why) as info:
        path_for(source, target, "cold")
    assert "sim -> aws" in info.value.message  # and what is possible
