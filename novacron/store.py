"""The durable state store: versioned JSON records and an ordered event log in SQLite.

* SQLite in WAL mode with ``synchronous=FULL``: a committed write survives a crash.
* Every record has a revision. Revisions come from one cluster-wide counter (the event log's
  sequence, as in etcd), so a record's revision is the revision of the event that last wrote it.
* Writes may carry an expected revision (optimistic concurrency): ``0`` means "must not exist",
  ``None`` means unconditional; a mismatch raises :class:`~novacron.errors.RevisionMismatch`.
* Every write appends an event (revision, kind, key, operation, time, data) in the same
  transaction, so watchers and the audit trail never miss or invent a change.
* The schema is versioned, with forward migrations. A file that is locked, corrupt or written by a
  newer NovaCron raises a clear :class:`~novacron.errors.StoreError` and is never overwritten.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from novacron.errors import (
    AlreadyExists,
    InvalidRequest,
    NotFound,
    RevisionMismatch,
    SchemaTooNew,
    StoreCorrupt,
    StoreError,
    StoreLocked,
)

log = logging.getLogger("novacron.store")

SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
# Kinds whose data never enters the event log (credential digests, password hashes, secrets):
# their events say only that a record changed.
PRIVATE_KIND_PREFIX = "auth."
# Fields with an expression index: filtering or sorting on them does not scan the table.
INDEXED_FIELDS = ("name", "state", "host", "tenant")
_FIELD = re.compile(r"^[a-z_][a-z0-9_]{0,40}(\.[a-z_][a-z0-9_]{0,40}){0,3}$")

# Forward migrations: MIGRATIONS[v] takes a store from version v-1 to v.
MIGRATIONS: dict[int, Sequence[str]] = {
    1: (
        """CREATE TABLE records (
               kind TEXT NOT NULL, key TEXT NOT NULL, revision INTEGER NOT NULL,
               created_revision INTEGER NOT NULL, data TEXT NOT NULL,
               PRIMARY KEY (kind, key)) WITHOUT ROWID""",
        """CREATE TABLE events (
               revision INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
               key TEXT NOT NULL, op TEXT NOT NULL, time REAL NOT NULL, data TEXT)""",
        *(f"CREATE INDEX records_{f} ON records (kind, json_extract(data, '$.{f}'))"
          for f in INDEXED_FIELDS),
    ),
}


@dataclass(frozen=True)
class Record:
    """One stored object: its kind, key, revision and JSON data."""

    kind: str
    key: str
    revision: int
    data: dict[str, Any]


@dataclass(frozen=True)
class Event:
    """One change in the log: ``op`` is create, update or delete; ``data`` the new value (for a
    delete, the value it had), None for private kinds."""

    revision: int
    kind: str
    key: str
    op: Literal["create", "update", "delete"]
    time: float
    data: dict[str, Any] | None


@dataclass(frozen=True)
class Put:
    """Write ``data`` at (kind, key). ``expected_revision``: 0 = must not exist, None = any."""

    kind: str
    key: str
    data: Mapping[str, Any]
    expected_revision: int | None = None


@dataclass(frozen=True)
class Delete:
    """Remove (kind, key). ``expected_revision`` None deletes whatever revision is there."""

    kind: str
    key: str
    expected_revision: int | None = None
    missing_ok: bool = False


@dataclass(frozen=True)
class Page:
    """One page of a listing, and the cursor of the next (None at the end)."""

    records: list[Record]
    next_cursor: str | None


Op = Put | Delete


class Store:
    """A NovaCron store in one SQLite file. Thread-safe; several processes may open it."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.timeout_s = timeout_s
        self._lock = threading.RLock()
        self._check_file()
        self._db = self._connect()
        try:
            self._prepare()
        except BaseException:
            self._db.close()
            raise

    # -- opening --------------------------------------------------------------------------------
    def _check_file(self) -> None:
        if self.path.is_dir():
            raise StoreCorrupt(f"store path {self.path} is a directory, not a store file")
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as f:
                magic = f.read(len(_SQLITE_MAGIC))
            if magic != _SQLITE_MAGIC:
                raise StoreCorrupt(
                    f"{self.path} is not a NovaCron store (not an SQLite database); "
                    "it was left untouched", details={"path": str(self.path)})
        elif self.readonly:
            raise NotFound(f"no store at {self.path}", details={"path": str(self.path)})
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _connect(self) -> sqlite3.Connection:
        target = f"file:{self.path}?mode=ro" if self.readonly else str(self.path)
        try:
            db = sqlite3.connect(target, uri=self.readonly, timeout=self.timeout_s,
                                 isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        db.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
        return db

    def _prepare(self) -> None:
        try:
            if not self.readonly:
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise StoreError(f"cannot put {self.path} in WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous = FULL")
            version = self._schema_version()
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"{self.path} was written by a newer NovaCron (schema {version}; this one "
                    f"understands up to {SCHEMA_VERSION}); it was left untouched",
                    details={"path": str(self.path), "schema": version,
                             "supported": SCHEMA_VERSION})
            if version < SCHEMA_VERSION:
                if self.readonly:
                    raise StoreError(f"{self.path} needs a schema upgrade; open it read-write once")
                self._migrate(version)
            if not self.readonly:
                check = self._db.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise StoreCorrupt(f"{self.path} failed its integrity check: {check}",
                                       details={"path": str(self.path)})
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    def _schema_version(self) -> int:
        tables = {r[0] for r in self._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" not in tables:
            if tables - {"sqlite_sequence"}:
                raise StoreCorrupt(f"{self.path} is an SQLite database but not a NovaCron store",
                                   details={"path": str(self.path)})
            return 0
        row = self._db.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            raise StoreCorrupt(f"{self.path} has no schema version",
                               details={"path": str(self.path)})
        return int(row[0])

    def _migrate(self, version: int) -> None:
        with self._write():
            if version == 0:
                self._db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                self._db.execute("INSERT INTO schema_version VALUES (0)")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    self._db.execute(statement)
                self._db.execute("UPDATE schema_version SET version = ?", (target,))
                log.info("store %s migrated to schema %d", self.path, target)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- errors ---------------------------------------------------------------------------------
    def _translate(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        details = {"path": str(self.path), "sqlite": text}
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
            return StoreLocked(f"store {self.path} is locked by another process "
                               f"(waited {self.timeout_s:g} s)", details=details)
        if isinstance(exc, sqlite3.DatabaseError) and (
                "not a database" in text or "malformed" in text or "corrupt" in text):
            return StoreCorrupt(f"{self.path} is corrupt ({text}); it was left untouched",
                                details=details)
        if isinstance(exc, sqlite3.OperationalError) and "readonly" in text:
            return StoreError(f"store {self.path} is read-only here", details=details)
        return StoreError(f"store {self.path} failed: {text}", details=details)

    @contextmanager
    def _write(self) -> Iterator[None]:
        if self.readonly:
            raise StoreError(f"store {self.path} was opened read-only")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise self._translate(exc) from exc

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc

    # -- reads ----------------------------------------------------------------------------------
    def get(self, kind: str, key: str) -> Record | None:
        """The record at (kind, key), or None."""
        rows = self._read("SELECT revision, data FROM records WHERE kind = ? AND key = ?",
                          (kind, key))
        if not rows:
            return None
        return Record(kind, key, rows[0][0], json.loads(rows[0][1]))

    def require(self, kind: str, key: str) -> Record:
        """The record at (kind, key); NotFound if there is none."""
        record = self.get(kind, key)
        if record is None:
            raise NotFound(f"no {kind} {key!r}", details={"kind": kind, "key": key})
        return record

    def page(self, kind: str, *, where: Mapping[str, Any] | None = None, sort: str = "key",
             descending: bool = False, limit: int | None = None,
             cursor: str | None = None) -> Page:
        """A page of records of ``kind``, equal on every ``where`` field, ordered by ``sort``.

        ``sort`` is ``key`` or a field of the data (dotted for nested fields). ``cursor`` comes
        from the previous page; it is opaque and tied to the sort order.
        """
        rows, next_cursor = self._page_rows(kind, where, sort, descending, limit, cursor)
        return Page([Record(kind, r[0], r[1], json.loads(r[2])) for r in rows], next_cursor)

    def page_json(self, kind: str, *, where: Mapping[str, Any] | None = None,
                  sort: str = "key", descending: bool = False, limit: int | None = None,
                  cursor: str | None = None) -> tuple[list[str], str | None]:
        """Like :meth:`page`, but each record as its stored JSON text with ``"revision"`` added,
        never parsed: what an API list returns, at the cost of a string join."""
        rows, next_cursor = self._page_rows(kind, where, sort, descending, limit, cursor)
        return [f'{r[2][:-1]}{"," if len(r[2]) > 2 else ""}"revision":{r[1]}}}'
                for r in rows], next_cursor

    def _page_rows(self, kind: str, where: Mapping[str, Any] | None, sort: str,
                   descending: bool, limit: int | None,
                   cursor: str | None) -> tuple[list[Any], str | None]:
        sql = ["SELECT key, revision, data, "]
        params: list[Any] = []
        sort_expr = "key" if sort == "key" else _json_path(sort)
        sql.append(f"{sort_expr} FROM records WHERE kind = ?")
        params.append(kind)
        for field, value in (where or {}).items():
            clause, values = _condition(field, value)
            sql.append(f" AND {clause}")
            params.extend(values)
        order = "DESC" if descending else "ASC"
        cmp = "<" if descending else ">"
        if cursor:
            after_value, after_key = _decode_cursor(cursor)
            if sort == "key":
                sql.append(f" AND key {cmp} ?")
                params.append(after_key)
            else:
                sql.append(f" AND ({sort_expr} {cmp} ? OR ({sort_expr} IS ? AND key {cmp} ?))")
                params.extend([after_value, after_value, after_key])
        sql.append(f" ORDER BY {sort_expr} {order}" + ("" if sort == "key" else f", key {order}"))
        if limit is not None:
            if limit < 1:
                raise InvalidRequest("limit must be at least 1", details={"limit": limit})
            sql.append(" LIMIT ?")
            params.append(limit + 1)
        rows = self._read("".join(sql), params)
        more = limit is not None and len(rows) > limit
        rows = rows[:limit] if limit is not None else rows
        next_cursor = _encode_cursor(rows[-1][3], rows[-1][0]) if more and rows else None
        return rows, next_cursor

    def all(self, kind: str, *, where: Mapping[str, Any] | None = None) -> list[Record]:
        """Every record of ``kind`` (matching ``where``), in key order."""
        return self.page(kind, where=where).records

    def count(self, kind: str, *, where: Mapping[str, Any] | None = None) -> int:
        """How many records of ``kind`` match ``where``."""
        sql = "SELECT COUNT(*) FROM records WHERE kind = ?"
        params: list[Any] = [kind]
        for field, value in (where or {}).items():
            clause, values = _condition(field, value)
            sql += f" AND {clause}"
            params.extend(values)
        return int(self._read(sql, params)[0][0])

    def count_by(self, kind: str, field: str) -> dict[str, int]:
        """How many records of ``kind`` have each value of ``field``."""
        expr = _json_path(field)
        rows = self._read(f"SELECT {expr}, COUNT(*) FROM records WHERE kind = ? GROUP BY {expr}",
                          (kind,))
        return {str(value): int(n) for value, n in rows}

    def head_revision(self) -> int:
        """The revision of the newest event (0 for an empty store)."""
        row = self._read("SELECT MAX(revision) FROM events")[0]
        return int(row[0] or 0)

    def events(self, since: int = 0, *, limit: int = 1000,
               kinds: Sequence[str] | None = None) -> list[Event]:
        """Events with a revision greater than ``since``, oldest first."""
        sql = "SELECT revision, kind, key, op, time, data FROM events WHERE revision > ?"
        params: list[Any] = [since]
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            params.extend(kinds)
        sql += " ORDER BY revision LIMIT ?"
        params.append(limit)
        return [Event(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]) if r[5] else None)
                for r in self._read(sql, params)]

    # -- writes ---------------------------------------------------------------------------------
    def commit(self, ops: Sequence[Op]) -> list[Record | None]:
        """Apply every op atomically: all succeed or none does.

        Returns, per op, the record written (None for a delete).
        """
        results: list[Record | None] = []
        with self._write():
            for op in ops:
                results.append(self._apply(op))
        return results

    def put(self, kind: str, key: str, data: Mapping[str, Any],
            expected_revision: int | None = None) -> Record:
        """Write one record (see :class:`Put`)."""
        record = self.commit([Put(kind, key, data, expected_revision)])[0]
        assert record is not None
        return record

    def create(self, kind: str, key: str, data: Mapping[str, Any]) -> Record:
        """Write a record that must not exist yet; AlreadyExists otherwise."""
        return self.put(kind, key, data, expected_revision=0)

    def delete(self, kind: str, key: str, expected_revision: int | None = None) -> None:
        """Remove one record; NotFound if it is not there."""
        self.commit([Delete(kind, key, expected_revision)])

    def _apply(self, op: Op) -> Record | None:
        row = self._db.execute("SELECT revision FROM records WHERE kind = ? AND key = ?",
                               (op.kind, op.key)).fetchone()
        current = int(row[0]) if row else 0
        if isinstance(op, Delete):
            if row is None:
                if op.missing_ok:
                    return None
                raise NotFound(f"no {op.kind} {op.key!r}", details={"kind": op.kind,
                                                                     "key": op.key})
            self._check_revision(op.kind, op.key, op.expected_revision, current)
            last = self._db.execute("SELECT data FROM records WHERE kind = ? AND key = ?",
                                    (op.kind, op.key)).fetchone()[0]
            private = op.kind.startswith(PRIVATE_KIND_PREFIX)
            self._event(op.kind, op.key, "delete", None if private else last)
            self._db.execute("DELETE FROM records WHERE kind = ? AND key = ?", (op.kind, op.key))
            return None
        self._check_revision(op.kind, op.key, op.expected_revision, current)
        text = json.dumps(op.data, separators=(",", ":"), sort_keys=True)
        logged = None if op.kind.startswith(PRIVATE_KIND_PREFIX) else text
        revision = self._event(op.kind, op.key, "update" if row else "create", logged)
        if row:
            self._db.execute("UPDATE records SET revision = ?, data = ? WHERE kind = ? AND key = ?",
                             (revision, text, op.kind, op.key))
        else:
            self._db.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?)",
                             (op.kind, op.key, revision, revision, text))
        return Record(op.kind, op.key, revision, json.loads(text))

    def _check_revision(self, kind: str, key: str, expected: int | None, current: int) -> None:
        if expected is None or expected == current:
            return
        details = {"kind": kind, "key": key, "expected_revision": expected,
                   "current_revision": current}
        if expected == 0:
            raise AlreadyExists(f"{kind} {key!r} already exists", details=details)
        if current == 0:
            raise NotFound(f"no {kind} {key!r}", details=details)
        raise RevisionMismatch(
            f"{kind} {key!r} changed meanwhile (expected revision {expected}, now {current})",
            details=details)

    def _event(self, kind: str, key: str, op: str, data: str | None) -> int:
        cur = self._db.execute("INSERT INTO events (kind, key, op, time, data) VALUES (?,?,?,?,?)",
                               (kind, key, op, time.time(), data))
        assert cur.lastrowid is not None
        return int(cur.lastrowid)


def _json_path(field: str) -> str:
    if not _FIELD.match(field):
        raise InvalidRequest(f"not a field name: {field!r}", details={"field": field})
    return f"json_extract(data, '$.{field}')"


def _condition(field: str, value: Any) -> tuple[str, list[Any]]:
    """``field = value``, or ``field IN (...)`` for a list, tuple, set or frozenset of values."""
    if isinstance(value, list | tuple | set | frozenset):
        values = [_sql_value(v) for v in sorted(value, key=str)]
        if not values:
            return "0", []
        return f"{_json_path(field)} IN ({','.join('?' * len(values))})", values
    return f"{_json_path(field)} = ?", [_sql_value(value)]


def _sql_value(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if value is None or isinstance(value, int | float | str):
        return value
    raise InvalidRequest(f"cannot filter on a value of type {type(value).__name__}")


def _encode_cursor(value: Any, key: str) -> str:
    raw = json.dumps([value, key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[Any, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value, key = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest("the cursor is not one this API returned",
                             details={"cursor": cursor[:100]}) from exc
    if not isinstance(key, str):
        raise InvalidRequest("the cursor is not one this API returned",
                             details={"cursor": cursor[:100]})
    return value, key


class OwnerLock:
    """An exclusive lock on a state directory, held by the one controller that writes to it.

    The kernel releases it when the holder dies, so a restarted controller can take it again.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / "controller.lock"
        self._fd: int | None = None

    def acquire(self, timeout_s: float = 10.0) -> None:
        """Take the lock, waiting up to ``timeout_s`` for a previous holder to go away."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise StoreLocked(
                        f"another NovaCron controller (pid {holder}) owns {self.path.parent}",
                        details={"state_dir": str(self.path.parent), "holder": holder}) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
