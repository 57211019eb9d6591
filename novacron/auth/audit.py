"""The audit log: who did what to which target in which tenant, with what result.

Append-only and hash-chained: entry ``n`` stores the SHA-256 of entry ``n-1`` (``prev_hash``) and
its own ``hash`` over its canonical JSON, so editing, removing or reordering an entry breaks the
chain at that point (:func:`verify_chain`). Truncating the newest entries is only detectable
against a head kept elsewhere (export :meth:`AuditLog.head` regularly; the head hint kept in
the store catches a naive truncation). Every entry is passed
through :func:`~novacron.auth.redact.redact` before it is hashed, so secrets never land in it.

Entries are records ``(auth.audit, <seq as 16 digits>)``; an append is a ``create`` of the next
sequence number, which makes concurrent appenders from several processes safe: the loser of a race
gets AlreadyExists and chains onto the winner.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from novacron.auth.records import AuthRecords, Clock, wall_clock
from novacron.auth.redact import redact
from novacron.errors import AlreadyExists, RevisionMismatch, StoreError

log = logging.getLogger("novacron.auth")

AUDIT_KIND = "auth.audit"
HEAD_KIND = "auth.audit_head"
GENESIS_HASH = "0" * 64
_MAX_APPEND_ATTEMPTS = 1000


class AuditResult(StrEnum):
    SUCCESS = "success"
    DENIED = "denied"
    FAILED = "failed"


class AuditEntry(BaseModel):
    """One audit entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int
    time: float
    request_id: str | None
    actor: str
    tenant: str | None
    action: str
    target: str | None
    result: AuditResult
    detail: dict[str, Any]
    prev_hash: str
    hash: str


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 over the canonical JSON (sorted keys, no spaces) of every field but ``hash``."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                           allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def verify_chain(entries: Sequence[Mapping[str, Any]], *,
                 prev_hash: str = GENESIS_HASH) -> int | None:
    """The index of the first entry that breaks the chain (edited, missing before it, out of
    order), or None if all link up from ``prev_hash`` (the genesis hash for a whole log)."""
    first_seq = None
    for i, entry in enumerate(entries):
        try:
            seq = entry["seq"]
            if first_seq is None:
                first_seq = seq
            if (seq != first_seq + i or entry["prev_hash"] != prev_hash
                    or entry["hash"] != entry_hash(entry)):
                return i
        except (KeyError, TypeError, ValueError):
            return i
        prev_hash = entry["hash"]
    return None


class AuditLog:
    """Appends to, reads and verifies the audit log in :class:`AuthRecords`."""

    def __init__(self, records: AuthRecords, *, clock: Clock = wall_clock) -> None:
        self._records = records
        self._clock = clock

    def append(self, *, actor: str, action: str, result: AuditResult,
               tenant: str | None = None, target: str | None = None,
               request_id: str | None = None,
               detail: Mapping[str, Any] | None = None) -> AuditEntry:
        """Record one event (redacted) at the end of the chain."""
        fields = redact({"actor": actor, "action": action, "result": result.value,
                         "tenant": tenant, "target": target, "request_id": request_id,
                         "detail": dict(detail or {})})
        seq, prev_hash = self.head()
        for _ in range(_MAX_APPEND_ATTEMPTS):
            body = {**fields, "seq": seq + 1, "time": self._clock(), "prev_hash": prev_hash}
            body["hash"] = entry_hash(body)
            try:
                self._records.create(AUDIT_KIND, _key(seq + 1), body)
            except AlreadyExists:
                # Another appender took this number: chain onto its entry.
                winner = self._records.get(AUDIT_KIND, _key(seq + 1))
                if winner is None:
                    raise StoreError("audit entry vanished while appending") from None
                seq, prev_hash = seq + 1, winner.data["hash"]
                continue
            self._advance_head(seq + 1, body["hash"])
            return AuditEntry.model_validate(body)
        raise StoreError("could not append to the audit log (contention)")

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the newest entry known to the head hint, ``(0, GENESIS_HASH)``
        for an empty log; later entries, if any, are found by appenders."""
        rec = self._records.get(HEAD_KIND, "head")
        return (0, GENESIS_HASH) if rec is None else (rec.data["seq"], rec.data["hash"])

    def entries(self, *, since_seq: int = 0, tenant: str | None = None) -> list[AuditEntry]:
        """Entries after ``since_seq`` in order, optionally only those of ``tenant``."""
        where = None if tenant is None else {"tenant": tenant}
        return [AuditEntry.model_validate(r.data)
                for r in self._records.all(AUDIT_KIND, where=where) if r.data["seq"] > since_seq]

    def verify(self) -> int | None:
        """Index of the first broken entry of the whole log, or None if it is intact (an index
        equal to the length means entries the head hint knows of are missing at the end)."""
        raw = [r.data for r in self._records.all(AUDIT_KIND)]
        if raw and raw[0].get("seq") != 1:
            return 0
        broken = verify_chain(raw)
        if broken is None and self.head()[0] > len(raw):
            return len(raw)
        return broken

    def _advance_head(self, seq: int, hash_: str) -> None:
        # The head is only a hint to start from; a lost race leaves it behind, never wrong.
        rec = self._records.get(HEAD_KIND, "head")
        if rec is not None and rec.data["seq"] >= seq:
            return
        try:
            if rec is None:
                self._records.create(HEAD_KIND, "head", {"seq": seq, "hash": hash_})
            else:
                self._records.put(HEAD_KIND, "head", {"seq": seq, "hash": hash_},
                                  expected_revision=rec.revision)
        except (AlreadyExists, RevisionMismatch):
            log.debug("audit head moved concurrently; left at its newer value")


def _key(seq: int) -> str:
    return f"{seq:016d}"

