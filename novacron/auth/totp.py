"""TOTP second factor (RFC 6238 via pyotp): 6 digits, 30 s steps, one step of clock drift either
way (``valid_window=1``), and replay protection: a code is accepted only for a time step later
than the last one used, so a used (or older) code never works twice."""

from __future__ import annotations

import hmac
import re

import pyotp

VALID_WINDOW = 1
_CODE = re.compile(r"[0-9]{6}")


def new_secret() -> str:
    """A random 160-bit base32 secret."""
    return pyotp.random_base32()


def provisioning_uri(secret: str, account: str, issuer: str = "NovaCron") -> str:
    """The ``otpauth://`` URI an authenticator app scans (as a QR code)."""
    return pyotp.TOTP(secret).provisioning_uri(name=account, issuer_name=issuer)


def verify(secret: str, code: str, *, now: float, last_step: int | None) -> int | None:
    """The time step ``code`` matches within the window and after ``last_step``, else None."""
    if not _CODE.fullmatch(code):
        return None
    totp = pyotp.TOTP(secret)
    current = totp.timecode(now)
    for step in range(current - VALID_WINDOW, current + VALID_WINDOW + 1):
        if (last_step is None or step > last_step) and hmac.compare_digest(
                code, totp.generate_otp(step)):
            return step
    return None
