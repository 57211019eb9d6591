"""What the HTTP routes talk to: the store for reads, the controller for everything else.

Reads (lists and gets) are served from the store directly and never fan out to actors; mutations go
to the controller. :class:`LocalBackend` runs a :class:`~novacron.controlplane.ControlPlane` in this
process (the unit tier); ``serve.deployment.RayBackend`` calls the Ray controller. Reads are
authorized here with the same :class:`~novacron.access.Gate` the controller uses.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from novacron.access import Caller, Gate
from novacron.secured import SecuredPlane
from novacron.store import Store


class Backend(Protocol):
    """The store to read, the gate to check reads, and the controller to call."""

    store: Store
    gate: Gate

    async def call(self, method: str, caller: Caller, *args: Any, **kwargs: Any) -> Any:
        """Call a user-facing controller operation (see SecuredPlane) for ``caller``."""
        ...

    async def ready(self) -> bool:
        """Whether the controller answers."""
        ...


class LocalBackend:
    """A secured control plane in this process."""

    def __init__(self, secured: SecuredPlane) -> None:
        self.secured = secured
        self.store = secured.plane.store
        self.gate = secured.gate

    async def call(self, method: str, caller: Caller, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(getattr(self.secured, method), caller, *args, **kwargs)

    async def ready(self) -> bool:
        return True
