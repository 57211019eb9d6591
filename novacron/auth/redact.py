"""Keeping secrets out of logs and audit entries.

:func:`redact` blanks values under secret-looking keys (password, token, secret, authorization,
cookie, otp...; but not ``*_id`` keys such as ``token_id``) and scrubs secret-looking text anywhere
else: NovaCron tokens and sessions, JWTs, ``Bearer``/``Basic`` credentials, argon2 hashes and
``otpauth://`` URIs. :class:`RedactingFilter` applies the text scrubbing to log records.
"""

from __future__ import annotations

import logging
import re
from typing import Any

REDACTED = "[redacted]"

_SENSITIVE_KEY = re.compile(
    r"pass(word|wd|phrase)?|secret|token|authori[sz]ation|cookie|api[-_]?key|private|"
    r"credential|otp|session|signature|digest|hash", re.IGNORECASE)
_SECRET_TEXT = re.compile(
    r"\bncs?_[0-9a-f]{16}_[A-Za-z0-9]+"
    r"|\beyJ[\w-]*\.[\w-]*\.[\w-]*"
    r"|\b(?:bearer|basic)\s+[\w.~+/=-]+"
    r"|\$argon2[\w$=,+/.-]*"
    r"|otpauth://\S+", re.IGNORECASE)


def _sensitive(key: str) -> bool:
    low = key.lower()
    return bool(_SENSITIVE_KEY.search(low)) and not low.endswith(("_id", "_ids", "id"))


def redact_text(text: str) -> str:
    """``text`` with every secret-looking substring replaced by ``[redacted]``."""
    return _SECRET_TEXT.sub(REDACTED, text)


def redact(value: Any) -> Any:
    """A copy of a JSON-like value safe to log or audit."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and _sensitive(k) and v is not None
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs secrets from the formatted message of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = redact_text(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True
