"""pytest plugin of the cloud fakes: session fixtures that start them, and the live-cloud flags.

Test modules load it with ``pytest_plugins = ["tests.fakes.plugin"]``. The ``--aws``, ``--azure``
and ``--gcp`` flags (live smoke tests against real clouds) exist when the plugin is loaded at
start-up: ``pytest -p tests.fakes.plugin --aws tests/unit/test_cloud_live.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.azure_arm import ArmFake, arm_fake
from tests.fakes.gce import GceFake, gce_fake
from tests.fakes.moto_server import FaultProxy, moto_server


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("novacron-clouds", "live cloud smoke tests")
    for cloud in ("aws", "azure", "gcp"):
        group.addoption(f"--{cloud}", action="store_true", default=False,
                        help=f"run the live {cloud} smoke tests (real credentials, real costs)")


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """moto in server mode on 127.0.0.1, warmed once per session."""
    with moto_server() as url:
        yield url


@pytest.fixture(scope="session")
def aws_proxy_session(moto_url: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_url)
    yield proxy
    proxy.close()


@pytest.fixture
def aws_proxy(aws_proxy_session: FaultProxy) -> Iterator[FaultProxy]:
    """The fault proxy in front of moto, clean for each test."""
    aws_proxy_session.reset()
    yield aws_proxy_session
    aws_proxy_session.reset()


@pytest.fixture(scope="session")
def gce_session() -> Iterator[GceFake]:
    with gce_fake() as fake:
        yield fake


@pytest.fixture
def gce(gce_session: GceFake) -> Iterator[GceFake]:
    """The Compute Engine fake, clean of faults, tokens and counts for each test."""
    gce_session.reset()
    yield gce_session
    gce_session.reset()


@pytest.fixture(scope="session")
def arm_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArmFake]:
    with arm_fake(tmp_path_factory.mktemp("arm-tls")) as fake:
        yield fake


@pytest.fixture
def arm(arm_session: ArmFake) -> Iterator[ArmFake]:
    """The HTTPS ARM fake, clean of faults and counts for each test."""
    arm_session.reset()
    yield arm_session
    arm_session.reset()
