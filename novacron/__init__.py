"""NovaCron: one control plane for virtual machines on KVM/QEMU, AWS, Azure and GCP, on Ray.

``novacron.connect()`` attaches a driver script to a running cluster (see :mod:`novacron.client`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from novacron.client import NovaCron


def connect(address: str = "auto", *, namespace: str = "novacron", **kwargs: Any) -> NovaCron:
    """Attach to the running NovaCron cluster at ``address`` (Ray's address); ``token=`` or
    ``$NOVACRON_TOKEN`` or ``~/.novacron/admin.token`` authenticates."""
    from novacron.client import connect as _connect

    return _connect(address, namespace=namespace, **kwargs)


__all__ = ["__version__", "connect"]
