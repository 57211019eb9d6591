"""Local users: passwords, lockout, TOTP enrollment, MFA per tenant, replay protection."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyotp
import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from novacron.auth import totp
from novacron.auth.passwords import DEFAULT_PARAMETERS, Passwords
from novacron.auth.records import MemoryRecord, MemoryRecords
from novacron.auth.services import AuthServices
from novacron.auth.users import USER_KIND, LockoutPolicy
from novacron.errors import AlreadyExists, Conflict, InvalidRequest, NotFound, Unauthenticated

PASSWORD = "correct horse battery staple"
T0 = 1_700_000_010.0  # 10 s into a 30 s TOTP step


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def auth(clock: FakeClock) -> AuthServices:
    services = AuthServices.create(MemoryRecords(), clock=clock, password_parameters=CHEAPEST,
                                   lockout=LockoutPolicy(max_failures=3, window=60,
                                                         duration=300))
    services.tenants.create("acme")
    services.users.create("acme", "alice", PASSWORD)
    return services


def code(secret: str, when: float) -> str:
    return pyotp.TOTP(secret).at(when)


def enroll(auth: AuthServices, clock: FakeClock) -> str:
    secret, uri = auth.users.begin_totp("acme", "alice", PASSWORD)
    assert uri.startswith("otpauth://totp/")
    assert "issuer=NovaCron" in uri
    auth.users.confirm_totp("acme", "alice", PASSWORD, code(secret, clock.now))
    return secret


# --- passwords ----------------------------------------------------------------------------------

def test_password_hashes_are_argon2id_and_verify() -> None:
    pw = Passwords(CHEAPEST)
    stored = pw.hash(PASSWORD)
    assert stored.startswith("$argon2id$")
    assert pw.verify(stored, PASSWORD)
    assert not pw.verify(stored, PASSWORD + "!")
    assert not pw.verify(None, PASSWORD)
    assert not pw.verify("not-a-hash", PASSWORD)
    assert not pw.verify(stored, "x" * 5000)
    assert not pw.needs_rehash(stored)
    assert pw.needs_rehash(PasswordHasher(time_cost=1, memory_cost=16, parallelism=1).hash("x"))


def test_default_parameters_are_rfc9106_low_memory() -> None:
    assert (DEFAULT_PARAMETERS.time_cost, DEFAULT_PARAMETERS.memory_cost,
            DEFAULT_PARAMETERS.parallelism) == (3, 64 * 1024, 4)


@pytest.mark.parametrize("bad", ["short", "x" * 11, "x" * 1025])
def test_password_length_policy(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        Passwords(CHEAPEST).hash(bad)


def test_login_upgrades_an_outdated_hash(auth: AuthServices) -> None:
    old = PasswordHasher(time_cost=1, memory_cost=16, parallelism=1).hash(PASSWORD)
    rec = auth.records.get(USER_KIND, "acme/alice")
    assert rec is not None
    auth.records.put(USER_KIND, "acme/alice", {**rec.data, "password_hash": old}, None)
    auth.users.login("acme", "alice", PASSWORD)
    rec = auth.records.get(USER_KIND, "acme/alice")
    assert rec is not None
    assert rec.data["password_hash"] != old
    auth.users.login("acme", "alice", PASSWORD)


# --- users ----------------------------------------------------------------------------------------

def test_user_administration(auth: AuthServices) -> None:
    info = auth.users.get("acme", "alice")
    assert info.principal_id == "user:acme/alice"
    assert not info.totp_enabled
    assert "password_hash" not in info.model_dump()
    with pytest.raises(AlreadyExists):
        auth.users.create("acme", "alice", PASSWORD)
    with pytest.raises(InvalidRequest):
        auth.users.create("acme", "Alice Smith", PASSWORD)
    with pytest.raises(NotFound):
        auth.users.create("nowhere", "bob", PASSWORD)
    auth.tenants.create("globex")
    auth.users.create("globex", "alice", PASSWORD)  # names are per tenant
    assert [u.tenant for u in auth.users.list()] == ["acme", "globex"]
    assert [u.name for u in auth.users.list("globex")] == ["alice"]
    with pytest.raises(NotFound):
        auth.users.get("acme", "nobody")


def test_every_refusal_looks_the_same(auth: AuthServices) -> None:
    messages = set()
    for tenant, name, password in [("acme", "alice", "wrong password here"),
                                   ("acme", "nobody", PASSWORD), ("nowhere", "alice", PASSWORD),
                                   ("BAD TENANT", "alice", PASSWORD), ("acme", "../x", PASSWORD)]:
        with pytest.raises(Unauthenticated) as err:
            auth.users.login(tenant, name, password)
        messages.add((err.value.message, tuple(err.value.details)))
    assert messages == {("invalid credentials", ())}


# --- lockout ----------------------------------------------------------------------------------

def test_lockout_after_repeated_failures(auth: AuthServices, clock: FakeClock) -> None:
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            auth.users.login("acme", "alice", "wrong password here")
    locked_until = auth.users.get("acme", "alice").locked_until
    assert locked_until == clock.now + 300
    with pytest.raises(Unauthenticated, match="invalid credentials"):
        auth.users.login("acme", "alice", PASSWORD)  # even the right password
    clock.now += 299
    with pytest.raises(Unauthenticated):
        auth.users.login("acme", "alice", PASSWORD)
    clock.now += 1
    auth.users.login("acme", "alice", PASSWORD)
    assert auth.users.get("acme", "alice").locked_until is None


def test_failures_outside_the_window_do_not_add_up(auth: AuthServices,
                                                   clock: FakeClock) -> None:
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            auth.users.login("acme", "alice", "wrong password here")
        with pytest.raises(Unauthenticated):
            auth.users.login("acme", "alice", "wrong password here")
        clock.now += 61
    auth.users.login("acme", "alice", PASSWORD)


def test_success_resets_the_failure_count(auth: AuthServices) -> None:
    for _ in range(3):
        for _ in range(2):
            with pytest.raises(Unauthenticated):
                auth.users.login("acme", "alice", "wrong password here")
        auth.users.login("acme", "alice", PASSWORD)
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            auth.users.login("acme", "alice", "wrong password here")
    assert auth.users.get("acme", "alice").locked_until is not None


def test_admin_unlock(auth: AuthServices) -> None:
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            auth.users.login("acme", "alice", "wrong password here")
    auth.users.unlock("acme", "alice")
    auth.users.login("acme", "alice", PASSWORD)


# --- TOTP -----------------------------------------------------------------------------------

def test_totp_verify_window_and_replay() -> None:
    secret = totp.new_secret()
    step = int(T0 // 30)
    assert totp.verify(secret, code(secret, T0), now=T0, last_step=None) == step
    assert totp.verify(secret, code(secret, T0 - 30), now=T0, last_step=None) == step - 1
    assert totp.verify(secret, code(secret, T0 + 30), now=T0, last_step=None) == step + 1
    assert totp.verify(secret, code(secret, T0 - 60), now=T0, last_step=None) is None
    assert totp.verify(secret, code(secret, T0 + 60), now=T0, last_step=None) is None
    # A step already used (or older) never matches again.
    assert totp.verify(secret, code(secret, T0), now=T0, last_step=step) is None
    assert totp.verify(secret, code(secret, T0 - 30), now=T0, last_step=step) is None
    assert totp.verify(secret, code(secret, T0 + 30), now=T0, last_step=step) == step + 1
    for bad in ("", "12345", "1234567", "abcdef", " 12345", "١٢٣٤٥٦"):
        assert totp.verify(secret, bad, now=T0, last_step=None) is None


def test_totp_login(auth: AuthServices, clock: FakeClock) -> None:
    secret = enroll(auth, clock)
    assert auth.users.get("acme", "alice").totp_enabled
    with pytest.raises(Unauthenticated, match="TOTP code required") as err:
        auth.users.login("acme", "alice", PASSWORD)
    assert err.value.details == {"mfa_required": True}
    # The enrollment code was consumed: the next step's code is needed.
    with pytest.raises(Unauthenticated, match="invalid TOTP code"):
        auth.users.login("acme", "alice", PASSWORD, code(secret, clock.now))
    clock.now += 30
    session = auth.users.login("acme", "alice", PASSWORD, code(secret, clock.now))
    assert session.session.mfa
    with pytest.raises(Unauthenticated, match="invalid TOTP code"):  # replay
        auth.users.login("acme", "alice", PASSWORD, code(secret, clock.now))
    clock.now += 30
    # One step of drift is tolerated: next step's code, then nothing older.
    auth.users.login("acme", "alice", PASSWORD, code(secret, clock.now + 30))
    with pytest.raises(Unauthenticated):
        auth.users.login("acme", "alice", PASSWORD, code(secret, clock.now))


def test_wrong_totp_codes_count_towards_lockout(auth: AuthServices, clock: FakeClock) -> None:
    secret = enroll(auth, clock)
    clock.now += 30
    good = code(secret, clock.now)
    wrong = f"{(int(good) + 1) % 1_000_000:06d}"
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            auth.users.login("acme", "alice", PASSWORD, wrong)
    with pytest.raises(Unauthenticated, match="invalid credentials"):
        auth.users.login("acme", "alice", PASSWORD, good)


def test_wrong_password_with_totp_says_nothing_about_totp(auth: AuthServices,
                                                          clock: FakeClock) -> None:
    secret = enroll(auth, clock)
    with pytest.raises(Unauthenticated) as err:
        auth.users.login("acme", "alice", "wrong password here", code(secret, clock.now + 30))
    assert (err.value.message, err.value.details) == ("invalid credentials", {})


def test_tenant_requiring_mfa(auth: AuthServices, clock: FakeClock) -> None:
    auth.tenants.update("acme", require_mfa=True)
    with pytest.raises(Unauthenticated, match="enroll") as err:
        auth.users.login("acme", "alice", PASSWORD)
    assert err.value.details == {"mfa_enrollment_required": True}
    secret = enroll(auth, clock)
    clock.now += 30
    assert auth.users.login("acme", "alice", PASSWORD, code(secret, clock.now)).session.mfa


def test_enrollment_rules(auth: AuthServices, clock: FakeClock) -> None:
    with pytest.raises(Conflict):
        auth.users.confirm_totp("acme", "alice", PASSWORD, "123456")
    with pytest.raises(Unauthenticated):
        auth.users.begin_totp("acme", "alice", "wrong password here")
    secret, _ = auth.users.begin_totp("acme", "alice", PASSWORD)
    with pytest.raises(Unauthenticated):
        auth.users.confirm_totp("acme", "alice", PASSWORD, code(secret, clock.now - 90))
    assert not auth.users.get("acme", "alice").totp_enabled
    auth.users.confirm_totp("acme", "alice", PASSWORD, code(secret, clock.now))
    with pytest.raises(Conflict):
        auth.users.begin_totp("acme", "alice", PASSWORD)
    auth.users.reset_totp("acme", "alice")
    assert not auth.users.get("acme", "alice").totp_enabled
    auth.users.login("acme", "alice", PASSWORD)


class RacingRecords(MemoryRecords):
    """When armed, another writer updates the user record just before a conditional write."""

    armed = False

    def put(self, kind: str, key: str, data: Mapping[str, Any],
            expected_revision: int | None = None) -> MemoryRecord:
        if self.armed and kind == USER_KIND and expected_revision is not None:
            self.armed = False
            super().put(kind, key, data, None)  # the other login, with the same code
        return super().put(kind, key, data, expected_revision)


def test_concurrent_use_of_one_code_lets_only_one_through(clock: FakeClock) -> None:
    records = RacingRecords()
    auth = AuthServices.create(records, clock=clock, password_parameters=CHEAPEST)
    auth.tenants.create("acme")
    auth.users.create("acme", "alice", PASSWORD)
    secret = enroll(auth, clock)
    clock.now += 30
    records.armed = True
    with pytest.raises(Unauthenticated):
        auth.users.login("acme", "alice", PASSWORD, code(secret, clock.now))
