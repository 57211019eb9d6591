"""Password hashing with argon2id (memory-hard), via argon2-cffi.

Default parameters are RFC 9106's second recommended option: argon2id, time cost 3, 64 MiB of
memory, parallelism 4, 16-byte salt, 32-byte hash (about 50-100 ms per hash on a server core).
Tests pass cheaper :class:`argon2.Parameters`.
"""

from __future__ import annotations

import logging

from argon2 import Parameters, PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from argon2.profiles import RFC_9106_LOW_MEMORY

from novacron.errors import InvalidRequest

log = logging.getLogger("novacron.auth")

DEFAULT_PARAMETERS: Parameters = RFC_9106_LOW_MEMORY
MIN_LENGTH = 12
MAX_LENGTH = 1024  # bounds the work an attacker can make one login cost


class Passwords:
    """Hashes and verifies passwords; verification without a user still costs a full hash."""

    def __init__(self, parameters: Parameters = DEFAULT_PARAMETERS) -> None:
        self._hasher = PasswordHasher.from_parameters(parameters)
        self._dummy = self._hasher.hash("novacron-dummy-password")

    def hash(self, password: str) -> str:
        """Hash a new password after checking its length (12-1024 characters)."""
        if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
            raise InvalidRequest(f"a password must be {MIN_LENGTH}-{MAX_LENGTH} characters")
        return self._hasher.hash(password)

    def verify(self, stored: str | None, password: str) -> bool:
        """Whether ``password`` matches ``stored``; ``None`` (no such user) burns the same time."""
        if len(password) > MAX_LENGTH:
            return False
        try:
            return self._hasher.verify(stored or self._dummy, password) and stored is not None
        except InvalidHashError:
            log.error("a stored password hash is not an argon2 hash")
            return False
        except VerificationError:
            return False

    def needs_rehash(self, stored: str) -> bool:
        """Whether ``stored`` was made with other parameters (rehash at the next login)."""
        return self._hasher.check_needs_rehash(stored)
