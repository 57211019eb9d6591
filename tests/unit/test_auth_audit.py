"""The hash-chained audit log, redaction, and the in-memory records."""

from __future__ import annotations

import itertools
import json
import logging
import threading

import pytest

from novacron.auth.audit import (
    AUDIT_KIND,
    GENESIS_HASH,
    HEAD_KIND,
    AuditLog,
    AuditResult,
    entry_hash,
    verify_chain,
)
from novacron.auth.records import AuthRecords, MemoryRecords
from novacron.auth.redact import REDACTED, RedactingFilter, redact, redact_text
from novacron.errors import AlreadyExists, NotFound, RevisionMismatch

TOKEN = "nc_0123456789abcdef_" + "a" * 52
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


def filled(n: int = 5) -> tuple[MemoryRecords, AuditLog]:
    records = MemoryRecords()
    log = AuditLog(records, clock=lambda: 1_700_000_000.5)
    for i in range(n):
        log.append(actor="token:abc", action="vms:create", result=AuditResult.SUCCESS,
                   tenant="acme", target=f"vm-{i}", request_id=f"req-{i}")
    return records, log


def test_entries_chain_up() -> None:
    _, log = filled()
    entries = log.entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    assert all(e.hash == entry_hash(e.model_dump(mode="json")) for e in entries)
    assert log.verify() is None
    assert log.head() == (5, entries[-1].hash)
    assert [e.target for e in log.entries(since_seq=3)] == ["vm-3", "vm-4"]


def test_entry_fields() -> None:
    records = MemoryRecords()
    log = AuditLog(records, clock=lambda: 42.0)
    entry = log.append(actor="anonymous", action="vms:delete", result=AuditResult.DENIED,
                       tenant="globex", target="vm-9", request_id="r-1",
                       detail={"status": 401})
    assert entry.model_dump(exclude={"hash", "prev_hash"}) == {
        "seq": 1, "time": 42.0, "request_id": "r-1", "actor": "anonymous", "tenant": "globex",
        "action": "vms:delete", "target": "vm-9", "result": AuditResult.DENIED,
        "detail": {"status": 401}}
    assert [e.seq for e in log.entries(tenant="globex")] == [1]
    assert log.entries(tenant="acme") == []


@pytest.mark.parametrize(("field", "value"), [
    ("actor", "token:someone-else"), ("result", "success"), ("target", "vm-x"),
    ("time", 0.0), ("detail", {"forged": True}), ("tenant", None),
])
def test_an_edited_entry_is_detected(field: str, value: object) -> None:
    records, log = filled()
    rec = records.get(AUDIT_KIND, f"{3:016d}")
    assert rec is not None
    if rec.data[field] == value:
        value = "different"
    records.put(AUDIT_KIND, rec.key, {**rec.data, field: value}, None)
    assert log.verify() == 2


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link() -> None:
    records, log = filled()
    rec = records.get(AUDIT_KIND, f"{3:016d}")
    assert rec is not None
    forged = {**rec.data, "result": "denied"}
    forged["hash"] = entry_hash(forged)
    records.put(AUDIT_KIND, rec.key, forged, None)
    assert log.verify() == 3


def test_removed_and_truncated_entries_are_detected() -> None:
    records, log = filled()
    records.delete(AUDIT_KIND, f"{2:016d}", None)
    assert log.verify() == 1
    records, log = filled()
    records.delete(AUDIT_KIND, f"{1:016d}", None)
    assert log.verify() == 0
    records, log = filled()
    records.delete(AUDIT_KIND, f"{5:016d}", None)
    assert log.verify() == 4  # the head hint knows of five


def test_verify_chain_on_a_slice_and_on_garbage() -> None:
    _, log = filled()
    entries = [e.model_dump(mode="json") for e in log.entries()]
    assert verify_chain(entries[2:], prev_hash=entries[1]["hash"]) is None
    assert verify_chain(entries[2:]) == 0
    assert verify_chain([]) is None
    assert verify_chain([*entries[:2], {"nonsense": 1}]) == 2
    swapped = [entries[0], entries[2], entries[1]]
    assert verify_chain(swapped) == 1


def test_appenders_catch_up_with_a_stale_head() -> None:
    records, log = filled(3)
    records.delete(HEAD_KIND, "head", None)  # lost hint (or a crash after the entry write)
    log.append(actor="x", action="vms:act", result=AuditResult.FAILED)
    assert [e.seq for e in log.entries()] == [1, 2, 3, 4]
    assert log.verify() is None


def test_concurrent_appends_keep_one_chain() -> None:
    records = MemoryRecords()
    logs = [AuditLog(records) for _ in range(8)]  # as if from several processes

    def work(log: AuditLog) -> None:
        for i in range(25):
            log.append(actor="t", action="vms:act", result=AuditResult.SUCCESS, target=str(i))

    threads = [threading.Thread(target=work, args=(lg,)) for lg in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.seq for e in logs[0].entries()] == list(range(1, 201))
    assert logs[0].verify() is None


def test_secrets_never_land_in_entries() -> None:
    records = MemoryRecords()
    log = AuditLog(records)
    log.append(actor="user:acme/alice", action="auth:login", result=AuditResult.DENIED,
               target=f"Authorization: Bearer {TOKEN}", request_id="r",
               detail={"password": "hunter2hunter2", "new_password": "s3cret-s3cret",
                       "token": TOKEN, "token_id": "0123456789abcdef",
                       "headers": {"Authorization": f"Bearer {JWT}", "Cookie": "a=b"},
                       "note": f"sent {JWT} and {TOKEN}", "totp_code": "987654",
                       "client_secret": None, "items": [TOKEN, 3]})
    stored = json.dumps([r.data for r in records.all(AUDIT_KIND)])
    for secret in (TOKEN, JWT, "hunter2hunter2", "s3cret-s3cret", "987654", "a=b"):
        assert secret not in stored
    (entry,) = log.entries()
    assert entry.detail["token_id"] == "0123456789abcdef"
    assert entry.detail["client_secret"] is None
    assert entry.detail["items"] == [REDACTED, 3]
    assert log.verify() is None


def test_redact_text() -> None:
    text = (f"token {TOKEN} jwt {JWT} hdr Bearer abc.def basic dXNlcjpwYXNz "
            "hash $argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA "
            "uri otpauth://totp/NovaCron:a?secret=JBSWY3DPEHPK3PXP")
    scrubbed = redact_text(text)
    for secret in (TOKEN, JWT, "abc.def", "dXNlcjpwYXNz", "aGFzaA", "JBSWY3DPEHPK3PXP"):
        assert secret not in scrubbed
    assert redact_text("vm-123 started on host-a") == "vm-123 started on host-a"
    assert redact({"a": (1, "x"), "session_id": "s-1"}) == {"a": [1, "x"], "session_id": "s-1"}


def test_redacting_log_filter(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("novacron.test_auth_redact")
    handler_filter = RedactingFilter()
    logger.addFilter(handler_filter)
    try:
        with caplog.at_level(logging.INFO, logger="novacron.test_auth_redact"):
            logger.info("client sent %s", f"Bearer {TOKEN}")
            logger.info("plain %s", "message")
    finally:
        logger.removeFilter(handler_filter)
    assert TOKEN not in caplog.text
    assert REDACTED in caplog.text
    assert "plain message" in caplog.text


# --- MemoryRecords (the AuthRecords contract) --------------------------------------------------

def test_memory_records_contract() -> None:
    records: AuthRecords = MemoryRecords()
    first = records.create("k", "a", {"v": [1]})
    with pytest.raises(AlreadyExists):
        records.create("k", "a", {})
    second = records.put("k", "a", {"v": [2]}, first.revision)
    assert second.revision > first.revision
    with pytest.raises(RevisionMismatch):
        records.put("k", "a", {"v": [3]}, first.revision)
    with pytest.raises(NotFound):
        records.put("k", "missing", {}, 1)
    with pytest.raises(AlreadyExists):
        records.put("k", "a", {}, 0)
    got = records.get("k", "a")
    assert got is not None
    got.data["v"].append(99)  # copies out: the stored data is untouched
    assert records.get("k", "a").data == {"v": [2]}  # type: ignore[union-attr]
    records.put("k", "b", {}, None)
    assert [r.key for r in records.all("k")] == ["a", "b"]
    assert [r.key for r in records.all("k", where={"v": [2]})] == ["a"]
    assert records.all("other") == []
    with pytest.raises(RevisionMismatch):
        records.delete("k", "a", first.revision)
    records.delete("k", "a", second.revision)
    with pytest.raises(NotFound):
        records.delete("k", "a", None)
    assert records.get("k", "a") is None
