"""What the HTTP routes talk to: the store for reads, the controller for everything else.

Reads (lists and gets) are served from the store directly and never fan out to actors; mutations go
to the controller. :class:`LocalBackend` runs a :class:`~novacron.controlplane.ControlPlane` in this
process (the unit tier); ``serve.deployment.RayBackend`` calls the Ray controller.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from novacron.controlplane import ControlPlane
from novacron.store import Store


class Backend(Protocol):
    """The store to read and the controller to call."""

    store: Store

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a controller method by name."""
        ...

    async def ready(self) -> bool:
        """Whether the controller answers."""
        ...


class LocalBackend:
    """A control plane in this process."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.store = plane.store

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(getattr(self.plane, method), *args, **kwargs)

    async def ready(self) -> bool:
        return True
