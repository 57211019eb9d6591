"""What every cloud driver's tests share: drivers on unique hosts against a local endpoint."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from novacron.drivers.cloud import CloudDriver
from novacron.errors import NovaCronError

D = TypeVar("D", bound=CloudDriver)


class Resettable(Protocol):
    def reset(self) -> None: ...


class DriverEnv(Generic[D]):
    """Builds drivers (``driver_class``) on unique hosts against ``endpoint``; ``cleanup``
    resets the endpoint and removes every guest the drivers made. Subclasses give ``config``."""

    driver_class: Callable[..., D]  # the concrete driver class
    prefix: str

    def __init__(self, endpoint: Resettable, state: Path) -> None:
        self.endpoint, self.state = endpoint, state
        self.drivers: list[D] = []

    def config(self, **over: Any) -> dict[str, Any]:
        raise NotImplementedError

    def driver(self, host: str | None = None, connect: bool = True, **over: Any) -> D:
        drv = self.driver_class(host or f"{self.prefix}-{uuid.uuid4().hex[:8]}", None,
                                self.config(**over), self.state)
        self.drivers.append(drv)
        if connect:
            drv.connect()
        return drv

    def cleanup(self) -> None:
        self.endpoint.reset()
        for drv in self.drivers:
            with contextlib.suppress(NovaCronError):
                for guest in drv.list():
                    with contextlib.suppress(NovaCronError):
                        drv.stop(guest.vm_id, force=True)
                        drv.undefine(guest.vm_id)
            drv.close()
