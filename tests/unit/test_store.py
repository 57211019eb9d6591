"""The durable store: revisions, atomic commits, the event log, paging and refusal to harm files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from novacron.errors import (
    AlreadyExists,
    InvalidRequest,
    NotFound,
    RevisionMismatch,
    SchemaTooNew,
    StoreCorrupt,
    StoreLocked,
)
from novacron.store import SCHEMA_VERSION, Delete, OwnerLock, Put, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.db")


def test_wal_and_full_sync(store: Store) -> None:
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_create_get_update_with_revisions(store: Store) -> None:
    first = store.create("vm", "a", {"name": "a"})
    assert store.require("vm", "a") == first
    second = store.put("vm", "a", {"name": "a", "x": 1}, expected_revision=first.revision)
    assert second.revision > first.revision
    with pytest.raises(RevisionMismatch, match="changed meanwhile"):
        store.put("vm", "a", {"name": "stale"}, expected_revision=first.revision)
    assert store.require("vm", "a").data == {"name": "a", "x": 1}


def test_create_twice_and_missing(store: Store) -> None:
    store.create("vm", "a", {})
    with pytest.raises(AlreadyExists):
        store.create("vm", "a", {"other": True})
    with pytest.raises(NotFound):
        store.require("vm", "nope")
    with pytest.raises(NotFound):
        store.delete("vm", "nope")
    with pytest.raises(NotFound):
        store.put("vm", "nope", {}, expected_revision=5)


def test_commit_is_atomic(store: Store) -> None:
    store.create("host", "h1", {"allocated": 0})
    with pytest.raises(AlreadyExists):
        store.commit([Put("host", "h1", {"allocated": 4}), Put("host", "h1", {}, 0)])
    assert store.require("host", "h1").data == {"allocated": 0}
    head = store.head_revision()
    store.commit([Put("vm", "v", {"host": "h1"}, 0), Delete("host", "h1")])
    assert store.get("host", "h1") is None
    assert store.head_revision() == head + 2


def test_events_follow_every_write(store: Store) -> None:
    a = store.create("vm", "a", {"n": 1})
    store.put("vm", "a", {"n": 2})
    store.delete("vm", "a")
    events = store.events(0)
    assert [(e.op, e.key) for e in events] == [("create", "a"), ("update", "a"), ("delete", "a")]
    assert events[0].revision == a.revision
    assert events[1].data == {"n": 2}
    assert events[2].data == {"n": 2}  # a delete carries the value it removed
    assert store.events(events[1].revision) == events[2:]


def test_paging_by_key_and_field(store: Store) -> None:
    for i in range(25):
        store.create("vm", f"vm-{i:03d}", {"name": f"n{24 - i:03d}", "state": "running"
                                          if i % 2 else "stopped"})
    seen: list[str] = []
    cursor = None
    while True:
        page = store.page("vm", limit=10, cursor=cursor)
        seen += [r.key for r in page.records]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [f"vm-{i:03d}" for i in range(25)]
    names: list[str] = []
    cursor = None
    while True:
        page = store.page("vm", sort="name", descending=True, limit=7, cursor=cursor,
                          where={"state": "running"})
        names += [r.data["name"] for r in page.records]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    expected = sorted((f"n{24 - i:03d}" for i in range(25) if i % 2), reverse=True)
    assert names == expected
    assert store.count("vm", where={"state": "running"}) == 12


def test_bad_listing_arguments(store: Store) -> None:
    with pytest.raises(InvalidRequest, match="not a field"):
        store.page("vm", sort="name; DROP TABLE records")
    with pytest.raises(InvalidRequest, match="cursor"):
        store.page("vm", limit=5, cursor="!!garbage!!")
    with pytest.raises(InvalidRequest, match="limit"):
        store.page("vm", limit=0)


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as s:
        s.create("vm", "a", {"name": "a"})
        rev = s.head_revision()
    with Store(path) as s:
        assert s.require("vm", "a").data == {"name": "a"}
        assert s.head_revision() == rev


def test_corrupt_file_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database at all" * 100)
    before = path.read_bytes()
    with pytest.raises(StoreCorrupt, match="not a NovaCron store"):
        Store(path)
    assert path.read_bytes() == before


def test_foreign_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE precious (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreCorrupt, match="not a NovaCron store"):
        Store(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("precious",)]
    db.close()


def test_newer_schema_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(SchemaTooNew, match="newer NovaCron"):
        Store(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION + 1
    db.close()


def test_locked_store_gives_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(path, timeout_s=0.2)
    store.create("vm", "a", {})
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreLocked, match="locked by another process"):
            store.put("vm", "a", {"changed": True})
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.require("vm", "a").data == {}


def test_readonly_reader_sees_writes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    writer = Store(path)
    reader = Store(path, readonly=True)
    writer.create("vm", "a", {"x": 1})
    assert reader.require("vm", "a").data == {"x": 1}
    with pytest.raises(Exception, match="read-only"):
        reader.create("vm", "b", {})


def test_owner_lock_is_exclusive(tmp_path: Path) -> None:
    first = OwnerLock(tmp_path)
    first.acquire()
    second = OwnerLock(tmp_path)
    with pytest.raises(StoreLocked, match="another NovaCron controller"):
        second.acquire(timeout_s=0.2)
    first.release()
    second.acquire(timeout_s=0.2)
    second.release()


def test_page_json_matches_page(store: Store) -> None:
    import json

    for i in range(5):
        store.create("vm", f"k{i}", {"name": f"n{i}", "nested": {"a": [1, 2]}})
    store.create("vm", "empty", {})
    records = store.page("vm", limit=4)
    texts, cursor = store.page_json("vm", limit=4)
    assert cursor == records.next_cursor
    assert [json.loads(t) for t in texts] == [{**r.data, "revision": r.revision}
                                              for r in records.records]
    texts, _ = store.page_json("vm")
    assert json.loads(texts[0]) == {"revision": store.require("vm", "empty").revision}


def test_private_kinds_keep_their_data_out_of_the_event_log(store: Store) -> None:
    store.create("auth.user", "acme/alice", {"password_hash": "$argon2id$..."})
    store.create("vm", "v", {"name": "v"})
    events = {e.kind: e for e in store.events(0)}
    assert events["auth.user"].data is None
    assert events["vm"].data == {"name": "v"}
    assert store.require("auth.user", "acme/alice").data == {"password_hash": "$argon2id$..."}


def test_in_filters(store: Store) -> None:
    for i, tenant in enumerate(["a", "b", "c", "a"]):
        store.create("vm", f"v{i}", {"tenant": tenant})
    assert [r.key for r in store.page("vm", where={"tenant": {"a", "c"}}).records] == [
        "v0", "v2", "v3"]
    assert store.page("vm", where={"tenant": set()}).records == []
    assert store.count("vm", where={"tenant": ["b"]}) == 1
