"""Bearer credentials ``<prefix>_<id>_<secret>`` shared by API tokens and sessions.

The id (16 hex digits) names the stored record and is safe to log; the secret (256 random bits,
base32) is shown once and stored only as ``SHA-256(id:secret)``. A fast hash is right here and
wrong for passwords: guessing a 256-bit random secret is hopeless at any hash speed, so a
memory-hard KDF would add nothing but per-request cost (and a denial-of-service lever), while a
human password has little entropy and needs the slow KDF of :mod:`novacron.auth.passwords`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from pydantic import SecretStr

from novacron.errors import Unauthenticated

_MAX_LENGTH = 128


def mint(prefix: str) -> tuple[str, str, SecretStr]:
    """A new credential: its public id, the digest to store, and the full value to show once."""
    cred_id = secrets.token_hex(8)
    secret = base64.b32encode(secrets.token_bytes(32)).decode().rstrip("=").lower()
    return cred_id, digest(cred_id, secret), SecretStr(f"{prefix}_{cred_id}_{secret}")


def parse(prefix: str, raw: str, what: str) -> tuple[str, str]:
    """``(id, secret)`` of a credential; Unauthenticated (never echoing it) if malformed."""
    match = (re.fullmatch(rf"{prefix}_([0-9a-f]{{16}})_([a-z2-7]{{52}})", raw)
             if len(raw) <= _MAX_LENGTH else None)
    if match is None:
        raise Unauthenticated(f"malformed {what}")
    return match[1], match[2]


def digest(cred_id: str, secret: str) -> str:
    """The stored form of a credential's secret (bound to its id)."""
    return hashlib.sha256(f"{cred_id}:{secret}".encode()).hexdigest()


def matches(stored_digest: str, cred_id: str, secret: str) -> bool:
    """Constant-time comparison of a presented secret with the stored digest."""
    return hmac.compare_digest(stored_digest, digest(cred_id, secret))
