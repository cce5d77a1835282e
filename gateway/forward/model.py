"""Rows of the forwarding tables: the schema and the values read from it."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, fields
from datetime import UTC, datetime

from pki.errors import NotFoundError

STATES = ("queued", "sending", "sent", "committed", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS forward_jobs (
    id INTEGER PRIMARY KEY,
    sop_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'sending', 'sent', 'committed', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    last_error TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL,
    sent_at TEXT,
    sent_syntax TEXT,
    confirmed TEXT NOT NULL DEFAULT '',
    dataset_sha256 TEXT,
    dataset_offset INTEGER,
    meta BLOB,
    commitment_uid TEXT,
    commitment_deadline REAL,
    committed_at TEXT,
    audited INTEGER NOT NULL DEFAULT 1,
    UNIQUE (sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS forward_jobs_due ON forward_jobs(destination, state, next_attempt_at);
CREATE INDEX IF NOT EXISTS forward_jobs_study ON forward_jobs(study_uid, destination);
CREATE INDEX IF NOT EXISTS forward_jobs_commitment ON forward_jobs(commitment_uid);
CREATE INDEX IF NOT EXISTS forward_jobs_unaudited ON forward_jobs(audited) WHERE audited = 0;
CREATE TABLE IF NOT EXISTS forward_transactions (
    transaction_uid TEXT PRIMARY KEY,
    destination TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    instances INTEGER NOT NULL,
    reported_at TEXT,
    report TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS forward_routing (
    destination TEXT PRIMARY KEY,
    last_rowid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS restores (
    id INTEGER PRIMARY KEY,
    restore_id TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    source TEXT NOT NULL,
    source_address TEXT NOT NULL,
    restored_by TEXT NOT NULL,
    restored_at TEXT NOT NULL,
    expected_sha256 TEXT NOT NULL,
    received_sha256 TEXT,
    outcome TEXT NOT NULL
        CHECK (outcome IN ('verified', 'mismatch', 'missing', 'unexpected')),
    stored_sha256 TEXT,
    quarantine_path TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS restores_study ON restores(study_uid, restored_at);
"""


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Job:
    id: int
    sop_uid: str
    destination: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    sha256: str
    size: int
    state: str
    attempts: int
    next_attempt_at: float
    lease_owner: str | None
    lease_until: float | None
    last_error: str
    created_at: str
    created_by: str
    reason: str
    updated_at: str
    sent_at: str | None
    sent_syntax: str | None
    confirmed: str
    dataset_sha256: str | None
    dataset_offset: int | None
    meta: bytes | None
    commitment_uid: str | None
    commitment_deadline: float | None
    committed_at: str | None
    audited: int

    def to_dict(self) -> dict[str, object]:
        """JSON-able view for ``queue list --json`` and the admin API (no file meta bytes)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "meta"}
        out["next_attempt_at"] = _iso(self.next_attempt_at)
        out["lease_until"] = _iso(self.lease_until) if self.lease_until else None
        out["commitment_deadline"] = (
            _iso(self.commitment_deadline) if self.commitment_deadline else None
        )
        return out


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


JOB_COLUMNS = ", ".join(f.name for f in fields(Job))


def job_from_row(row: sqlite3.Row) -> Job:
    return Job(**{k: row[k] for k in row.keys()})  # noqa: SIM118 - sqlite3.Row


@dataclass(frozen=True)
class JobSource:
    """What a job is made from: one stored instance."""

    sop_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    sha256: str
    size: int


@dataclass(frozen=True)
class EnqueueResult:
    new: int
    requeued: int
    present: int


@dataclass(frozen=True)
class CommitmentOutcome:
    destination: str
    committed: tuple[int, ...]
    failed: tuple[int, ...]
    unknown: tuple[str, ...]


class UnknownTransactionError(NotFoundError):
    """An N-EVENT-REPORT names a Transaction UID this gateway never issued."""

    code = "UNKNOWN_TRANSACTION"
