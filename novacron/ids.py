"""Typed identifiers and their generation (time-ordered, so listing by id lists by age)."""

from __future__ import annotations

import os
import time
from typing import NewType

VMId = NewType("VMId", str)
HostName = NewType("HostName", str)
MigrationId = NewType("MigrationId", str)

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def new_id(prefix: str) -> str:
    """A ULID-style id ``<prefix>-<10 chars of ms time><10 random chars>``, sortable by time."""
    value = (int(time.time() * 1000) << 50) | int.from_bytes(os.urandom(7), "big") >> 6
    chars = []
    for _ in range(20):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}-{''.join(reversed(chars))}"
