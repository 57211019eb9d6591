"""API tokens, sessions, bootstrap and the authenticator (credentials -> principal)."""

from __future__ import annotations

import json
import logging

import pytest
from argon2.profiles import CHEAPEST
from hypothesis import given, settings
from hypothesis import strategies as st

from novacron.auth.principals import ALL_TENANTS, Action, PrincipalKind
from novacron.auth.records import MemoryRecords
from novacron.auth.roles import ADMIN, OPERATOR, VIEWER, Role
from novacron.auth.services import AuthServices
from novacron.auth.tokens import DAY, TOKEN_KIND, bootstrap_admin_token
from novacron.errors import InvalidRequest, NotFound, Unauthenticated

PASSWORD = "correct horse battery staple"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def auth(clock: FakeClock) -> AuthServices:
    services = AuthServices.create(MemoryRecords(), clock=clock, password_parameters=CHEAPEST)
    services.tenants.create("acme")
    return services


def test_token_is_shown_once_and_stored_only_as_a_hash(auth: AuthServices) -> None:
    issued = auth.tokens.issue(tenant="acme", role=OPERATOR, name="ci", created_by="user:x")
    raw = issued.token.get_secret_value()
    assert raw.startswith(f"nc_{issued.info.id}_")
    assert len(raw) == 3 + 16 + 1 + 52
    assert raw not in repr(issued)
    stored = json.dumps(auth.records.get(TOKEN_KIND, issued.info.id).data)  # type: ignore[union-attr]
    assert raw.rsplit("_", 1)[1] not in stored
    who = auth.tokens.authenticate(raw)
    assert who.id == f"token:{issued.info.id}"
    assert who.kind == PrincipalKind.TOKEN
    assert who.tenant == "acme"
    assert who.credential_id == issued.info.id
    assert [(g.tenant, g.role) for g in who.grants] == [("acme", OPERATOR)]


def test_token_expiry(auth: AuthServices, clock: FakeClock) -> None:
    issued = auth.tokens.issue(tenant="acme", role=VIEWER, name="short", created_by="x", ttl=60)
    raw = issued.token.get_secret_value()
    clock.now += 59
    auth.tokens.authenticate(raw)
    clock.now += 1
    with pytest.raises(Unauthenticated, match="expired"):
        auth.tokens.authenticate(raw)


def test_token_revocation(auth: AuthServices) -> None:
    issued = auth.tokens.issue(tenant="acme", role=VIEWER, name="t", created_by="x")
    raw = issued.token.get_secret_value()
    auth.tokens.authenticate(raw)
    revoked = auth.tokens.revoke(issued.info.id)
    assert revoked.revoked_at is not None
    assert auth.tokens.revoke(issued.info.id) == revoked  # idempotent
    with pytest.raises(Unauthenticated, match="revoked"):
        auth.tokens.authenticate(raw)
    with pytest.raises(NotFound):
        auth.tokens.revoke("0123456789abcdef")


def test_wrong_secret_for_a_real_id_is_refused(auth: AuthServices) -> None:
    issued = auth.tokens.issue(tenant="acme", role=VIEWER, name="t", created_by="x")
    forged = f"nc_{issued.info.id}_{'a' * 52}"
    with pytest.raises(Unauthenticated, match="invalid API token") as err:
        auth.tokens.authenticate(forged)
    assert forged not in str(err.value.to_dict())


def test_token_issue_validation(auth: AuthServices) -> None:
    with pytest.raises(InvalidRequest):
        auth.tokens.issue(tenant="acme", role=VIEWER, name="t", created_by="x", ttl=0)
    with pytest.raises(InvalidRequest):
        auth.tokens.issue(tenant="acme", role=VIEWER, name="t", created_by="x", ttl=400 * DAY)
    with pytest.raises(InvalidRequest):
        auth.tokens.issue(tenant="acme", role=ADMIN, name="t", created_by="x")
    with pytest.raises(NotFound):
        auth.tokens.issue(tenant="acme", role="ghost", name="t", created_by="x")
    with pytest.raises(InvalidRequest):
        auth.tokens.issue(tenant="acme", role=VIEWER, name="", created_by="x")


def test_token_listing_shows_no_secret(auth: AuthServices) -> None:
    a = auth.tokens.issue(tenant="acme", role=VIEWER, name="a", created_by="x")
    auth.tokens.issue(tenant=ALL_TENANTS, role=ADMIN, name="b", created_by="x")
    assert [t.id for t in auth.tokens.list("acme")] == [a.info.id]
    assert len(auth.tokens.list()) == 2
    assert auth.tokens.get(a.info.id) == a.info


def test_token_of_a_deleted_custom_role_grants_nothing(auth: AuthServices) -> None:
    auth.roles.put_role(Role("reader", frozenset({Action.parse("vms:read")})))
    issued = auth.tokens.issue(tenant="acme", role="reader", name="t", created_by="x")
    auth.roles.delete_role("reader")
    assert auth.tokens.authenticate(issued.token.get_secret_value()).grants == ()


def test_bootstrap_admin_token_once(auth: AuthServices) -> None:
    first = auth.first_start()
    assert first is not None
    who = auth.authenticator.authenticate(f"Bearer {first.get_secret_value()}")
    assert [(g.tenant, g.role) for g in who.grants] == [(ALL_TENANTS, ADMIN)]
    assert auth.tenants.get("default").name == "default"
    assert auth.first_start() is None
    assert bootstrap_admin_token(auth.records, auth.tokens) is None


def test_bootstrap_race_loser_revokes_its_token(auth: AuthServices) -> None:
    auth.records.create("auth.meta", "bootstrap", {"token_id": "other"})

    class Blind:  # sees no marker at first, like a second process racing the first
        def __getattr__(self, name: str) -> object:
            return getattr(auth.records, name)

        def get(self, kind: str, key: str) -> None:
            return None

    assert bootstrap_admin_token(Blind(), auth.tokens) is None  # type: ignore[arg-type]
    (token,) = auth.tokens.list()
    assert token.revoked_at is not None


# --- sessions ---------------------------------------------------------------------------------

def test_session_lifecycle(auth: AuthServices, clock: FakeClock) -> None:
    auth.users.create("acme", "alice", PASSWORD)
    auth.roles.bind("user:acme/alice", VIEWER, "acme", created_by="x")
    issued = auth.users.login("acme", "alice", PASSWORD)
    raw = issued.token.get_secret_value()
    assert raw.startswith(f"ncs_{issued.session.id}_")
    who = auth.authenticator.authenticate(None, session_cookie=raw)
    assert who.id == "user:acme/alice"
    assert who.kind == PrincipalKind.USER
    assert who.credential_id == issued.session.id
    assert who.mfa is False
    assert [(g.tenant, g.role) for g in who.grants] == [("acme", VIEWER)]
    assert auth.authenticator.authenticate(f"bearer {raw}").id == who.id
    auth.sessions.revoke(issued.session.id)
    with pytest.raises(Unauthenticated, match="ended"):
        auth.authenticator.authenticate(f"Bearer {raw}")

    second = auth.users.login("acme", "alice", PASSWORD).token.get_secret_value()
    clock.now += 12 * 3600
    with pytest.raises(Unauthenticated, match="expired"):
        auth.sessions.validate(second)


def test_sessions_end_on_password_change_disable_and_delete(auth: AuthServices) -> None:
    auth.users.create("acme", "alice", PASSWORD)
    s1 = auth.users.login("acme", "alice", PASSWORD).token.get_secret_value()
    auth.users.set_password("acme", "alice", "another long password")
    with pytest.raises(Unauthenticated):
        auth.authenticator.authenticate(f"Bearer {s1}")
    s2 = auth.users.login("acme", "alice", "another long password").token.get_secret_value()
    auth.users.set_disabled("acme", "alice", True)
    with pytest.raises(Unauthenticated):
        auth.authenticator.authenticate(f"Bearer {s2}")
    with pytest.raises(Unauthenticated, match="invalid credentials"):
        auth.users.login("acme", "alice", "another long password")
    auth.users.set_disabled("acme", "alice", False)
    s3 = auth.users.login("acme", "alice", "another long password").token.get_secret_value()
    auth.users.delete("acme", "alice")
    with pytest.raises(Unauthenticated):
        auth.authenticator.authenticate(f"Bearer {s3}")
    assert all(s.revoked_at is not None for s in auth.sessions.list())


def test_session_of_a_disabled_user_found_at_request_time(auth: AuthServices) -> None:
    auth.users.create("acme", "alice", PASSWORD)
    raw = auth.users.login("acme", "alice", PASSWORD).token.get_secret_value()
    # Disabled behind the session service's back (say, by another replica's older code).
    rec = auth.records.get("auth.user", "acme/alice")
    assert rec is not None
    auth.records.put("auth.user", "acme/alice", {**rec.data, "disabled": True}, rec.revision)
    with pytest.raises(Unauthenticated, match="session ended"):
        auth.authenticator.authenticate(f"Bearer {raw}")


def test_tenant_turning_on_mfa_ends_sessions_without_it(auth: AuthServices) -> None:
    auth.users.create("acme", "alice", PASSWORD)
    raw = auth.users.login("acme", "alice", PASSWORD).token.get_secret_value()
    auth.tenants.update("acme", require_mfa=True)
    with pytest.raises(Unauthenticated, match="TOTP") as err:
        auth.authenticator.authenticate(f"Bearer {raw}")
    assert err.value.details == {"mfa_required": True}


# --- authenticator dispatch and malformed credentials -----------------------------------------

@pytest.mark.parametrize("header", [
    None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Token nc_x", "nc_abc",
    "Bearer nc_", "Bearer nc_0123456789abcdef_short", "Bearer ncs_zz_zz", "Bearer a.b.c",
    "Bearer garbage", "Bearer " + "x" * 100_000, "Bearer nc_0123456789ABCDEF_" + "a" * 52,
])
def test_malformed_credentials_are_401_never_a_crash(auth: AuthServices,
                                                     header: str | None) -> None:
    with pytest.raises(Unauthenticated) as err:
        auth.authenticator.authenticate(header)
    if header and len(header) > 10:
        assert header.split()[-1] not in err.value.message


def test_no_credentials_at_all(auth: AuthServices) -> None:
    with pytest.raises(Unauthenticated, match="authentication required"):
        auth.authenticator.authenticate(None, None)


FUZZ_AUTH = AuthServices.create(MemoryRecords(), password_parameters=CHEAPEST)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.from_regex(r"ncs?_[0-9a-f]{0,20}_[a-z2-7]{0,60}"),
                 st.from_regex(r"[A-Za-z0-9_-]{0,40}\.[A-Za-z0-9_-]{0,40}\.[A-Za-z0-9_-]{0,40}")))
def test_fuzzed_bearer_values_raise_only_unauthenticated(value: str) -> None:
    with pytest.raises(Unauthenticated) as err:
        FUZZ_AUTH.authenticator.authenticate(f"Bearer {value}")
    if len(value.strip()) >= 8:
        assert value.strip() not in err.value.message


def test_secrets_never_reach_the_logs(auth: AuthServices,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="novacron")
    token = auth.tokens.issue(tenant="acme", role=VIEWER, name="t", created_by="x")
    raw_token = token.token.get_secret_value()
    auth.tokens.authenticate(raw_token)
    auth.users.create("acme", "alice", PASSWORD)
    session = auth.users.login("acme", "alice", PASSWORD).token.get_secret_value()
    with pytest.raises(Unauthenticated):
        auth.users.login("acme", "alice", "wrong password, long enough")
    with pytest.raises(Unauthenticated):
        auth.users.login("acme", "mallory", PASSWORD)
    auth.authenticator.authenticate(f"Bearer {session}")
    for secret in (raw_token, raw_token.rsplit("_", 1)[1], session, PASSWORD,
                   "wrong password, long enough"):
        assert secret not in caplog.text
    assert token.info.id in caplog.text

