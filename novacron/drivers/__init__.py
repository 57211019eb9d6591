"""Drivers: one module per place a VM can run, all behind :class:`novacron.drivers.base.Driver`."""

from novacron.drivers.base import (
    Capability,
    Driver,
    GuestConfig,
    GuestInfo,
    GuestStats,
    HostInfo,
    HostStats,
    driver_class,
)

__all__ = [
    "Capability",
    "Driver",
    "GuestConfig",
    "GuestInfo",
    "GuestStats",
    "HostInfo",
    "HostStats",
    "driver_class",
]
