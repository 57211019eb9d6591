"""The persistence and time seams of the auth core.

Every auth module reads and writes JSON-able dicts through :class:`AuthRecords`, a protocol
shaped like ``novacron.store.Store`` (``get``/``put``/``create``/``delete``/``all`` of versioned
records by ``(kind, key)``), so the real store plugs straight in. :class:`MemoryRecords` is the
in-memory implementation used by the unit tests.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from novacron.errors import AlreadyExists, NotFound, RevisionMismatch

Clock = Callable[[], float]
"""Seconds since the epoch; injected everywhere so tests control time."""

wall_clock: Clock = time.time


class Record(Protocol):
    """One stored record: what ``novacron.store.Record`` provides."""

    @property
    def kind(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def revision(self) -> int: ...
    @property
    def data(self) -> dict[str, Any]: ...


class AuthRecords(Protocol):
    """Versioned records by ``(kind, key)`` with optimistic concurrency, as ``Store`` has them.

    ``expected_revision``: None writes unconditionally, 0 means "must not exist" (else
    AlreadyExists), n means "must be at revision n" (else RevisionMismatch, or NotFound if gone).
    ``create`` raises AlreadyExists; ``delete`` of a missing record raises NotFound. ``all``
    lists a kind in key order, keeping records whose top-level fields equal ``where``.
    """

    def get(self, kind: str, key: str) -> Record | None: ...
    def put(self, kind: str, key: str, data: Mapping[str, Any],
            expected_revision: int | None = None) -> Record: ...
    def create(self, kind: str, key: str, data: Mapping[str, Any]) -> Record: ...
    def delete(self, kind: str, key: str, expected_revision: int | None = None) -> None: ...
    def all(self, kind: str, *, where: Mapping[str, Any] | None = None) -> Sequence[Record]: ...


@dataclass(frozen=True)
class MemoryRecord:
    """A record of :class:`MemoryRecords`."""

    kind: str
    key: str
    revision: int
    data: dict[str, Any] = field(default_factory=dict)


class MemoryRecords:
    """Thread-safe in-memory :class:`AuthRecords` (data is deep-copied in and out)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], MemoryRecord] = {}
        self._revision = 0

    def get(self, kind: str, key: str) -> MemoryRecord | None:
        with self._lock:
            rec = self._records.get((kind, key))
            return None if rec is None else _copy(rec)

    def put(self, kind: str, key: str, data: Mapping[str, Any],
            expected_revision: int | None = None) -> MemoryRecord:
        with self._lock:
            current = self._records.get((kind, key))
            _check_revision(kind, key, expected_revision,
                            0 if current is None else current.revision)
            self._revision += 1
            rec = MemoryRecord(kind, key, self._revision, copy.deepcopy(dict(data)))
            self._records[(kind, key)] = rec
            return _copy(rec)

    def create(self, kind: str, key: str, data: Mapping[str, Any]) -> MemoryRecord:
        return self.put(kind, key, data, expected_revision=0)

    def delete(self, kind: str, key: str, expected_revision: int | None = None) -> None:
        with self._lock:
            current = self._records.get((kind, key))
            if current is None:
                raise NotFound(f"no {kind} {key!r}", details={"kind": kind, "key": key})
            _check_revision(kind, key, expected_revision, current.revision)
            del self._records[(kind, key)]

    def all(self, kind: str, *, where: Mapping[str, Any] | None = None) -> list[MemoryRecord]:
        conditions = (where or {}).items()
        with self._lock:
            return [_copy(r) for (k, _), r in sorted(self._records.items())
                    if k == kind and all(r.data.get(f) == v for f, v in conditions)]


def _check_revision(kind: str, key: str, expected: int | None, current: int) -> None:
    if expected is None or expected == current:
        return
    details = {"kind": kind, "key": key}
    if expected == 0:
        raise AlreadyExists(f"{kind} {key!r} already exists", details=details)
    if current == 0:
        raise NotFound(f"no {kind} {key!r}", details=details)
    raise RevisionMismatch(f"{kind} {key!r} changed meanwhile", details=details)


def _copy(rec: MemoryRecord) -> MemoryRecord:
    return MemoryRecord(rec.kind, rec.key, rec.revision, copy.deepcopy(rec.data))
