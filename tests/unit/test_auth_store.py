"""The auth core on the real SQLite store: the AuthRecords protocol plugs straight in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest
from argon2.profiles import CHEAPEST

from novacron.auth.audit import AUDIT_KIND, AuditResult
from novacron.auth.policy import decide
from novacron.auth.principals import Action
from novacron.auth.records import AuthRecords
from novacron.auth.roles import OPERATOR
from novacron.auth.services import AuthServices
from novacron.errors import Unauthenticated
from novacron.store import Store

PASSWORD = "correct horse battery staple"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "novacron.db") as s:
        yield s


def test_full_flow_on_the_sqlite_store(store: Store) -> None:
    records: AuthRecords = store  # statically checked by mypy: the protocol matches
    auth = AuthServices.create(records, password_parameters=CHEAPEST)
    admin = auth.first_start()
    assert admin is not None
    assert auth.first_start() is None
    root = auth.authenticator.authenticate(f"Bearer {admin.get_secret_value()}")
    assert decide(root, Action.parse("tenants:create"), "*").allowed

    auth.tenants.create("acme")
    auth.users.create("acme", "alice", PASSWORD)
    auth.roles.bind("user:acme/alice", OPERATOR, "acme", created_by=root.id)
    secret, _ = auth.users.begin_totp("acme", "alice", PASSWORD)
    totp = pyotp.TOTP(secret)
    auth.users.confirm_totp("acme", "alice", PASSWORD, totp.now())
    with pytest.raises(Unauthenticated, match="TOTP code required"):
        auth.users.login("acme", "alice", PASSWORD)
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            auth.users.login("acme", "alice", "wrong password here")
    alice_sessions = auth.sessions.list("user:acme/alice")
    assert alice_sessions == []

    token = auth.tokens.issue(tenant="acme", role=OPERATOR, name="ci", created_by=root.id)
    who = auth.authenticator.authenticate(f"Bearer {token.token.get_secret_value()}")
    assert decide(who, Action.parse("vms:create"), "acme").allowed
    assert [t.id for t in auth.tokens.list("acme")] == [token.info.id]
    auth.tokens.revoke(token.info.id)
    with pytest.raises(Unauthenticated):
        auth.authenticator.authenticate(f"Bearer {token.token.get_secret_value()}")

    for i in range(5):
        auth.audit.append(actor=root.id, action="vms:create", result=AuditResult.SUCCESS,
                          tenant="acme", target=f"vm-{i}", request_id=f"r{i}")
    auth.audit.append(actor="anonymous", action="vms:read", result=AuditResult.DENIED)
    assert auth.audit.verify() is None
    assert len(auth.audit.entries(tenant="acme")) == 5
    rec = store.get(AUDIT_KIND, f"{2:016d}")
    assert rec is not None
    store.put(AUDIT_KIND, rec.key, {**rec.data, "actor": "someone-else"})
    assert auth.audit.verify() == 1
