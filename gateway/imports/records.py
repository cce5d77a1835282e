"""The import record: who imported which medium, how, and with what result (R-PDI-5, R-PDI-6).

One row per import attempt in ``media_imports`` (metadata database), one row
per stored instance in ``media_import_instances``.  Lifecycle::

    importing ──▶ saved ──(scheduled time, designated person)──▶ finalized
        │    └──────────(on-save: the importer)──────────────────▶ finalized
        └──▶ stopped   (malware found, scanner failure: nothing imported)

The record's content (``details``: reconciliation, selection, per-file
SHA-256 of the medium, SHA-256 of each stored instance, findings, scanner
verdicts) is written once, when the import is saved; its SHA-256 goes into
the Import audit event, which ties the record to the hash-chained trail.
Triggers refuse deleting records, changing who/what/whom, rewriting saved
content, and any change to a finalized or stopped record: a later change is a
new record whose ``supersedes`` names the finalized one (R-PDI-6; 000 付録1).
A row left ``importing`` was interrupted (crash); the instances it stored are
listed against it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.sqlitedb import SqliteDatabase
from media.import_result import InstanceMeta
from pki.errors import ConflictError, InvalidInputError, NotFoundError

STATUSES = ("importing", "saved", "finalized", "stopped")

SCHEMA = """
CREATE TABLE IF NOT EXISTS media_imports (
    id INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    importer_id TEXT NOT NULL,
    importer_name TEXT NOT NULL,
    importer_cert_sha256 TEXT,
    source_address TEXT,
    station TEXT NOT NULL,
    media_type TEXT NOT NULL,
    media_label TEXT NOT NULL,
    source_facility TEXT NOT NULL,
    local_patient_id TEXT NOT NULL,
    local_issuer TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('importing', 'saved', 'finalized', 'stopped')),
    saved_at TEXT,
    finalize_due_at TEXT,
    finalized_at TEXT,
    finalized_by_id TEXT,
    finalized_by_name TEXT,
    finalization TEXT CHECK (finalization IN ('importer', 'scheduled')),
    supersedes INTEGER REFERENCES media_imports(id),
    change_reason TEXT NOT NULL DEFAULT '',
    instance_count INTEGER NOT NULL DEFAULT 0,
    stop_reason TEXT NOT NULL DEFAULT '',
    details TEXT NOT NULL DEFAULT '{}',
    details_sha256 TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS media_imports_patient
    ON media_imports(local_patient_id, local_issuer);
CREATE INDEX IF NOT EXISTS media_imports_due ON media_imports(status, finalize_due_at);
CREATE INDEX IF NOT EXISTS media_imports_supersedes ON media_imports(supersedes);
CREATE TABLE IF NOT EXISTS media_import_instances (
    import_id INTEGER NOT NULL REFERENCES media_imports(id),
    sop_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    source_path TEXT NOT NULL,
    source_sha256 TEXT NOT NULL,
    stored_sha256 TEXT NOT NULL,
    stored_at TEXT NOT NULL,
    PRIMARY KEY (import_id, sop_uid)
);
CREATE INDEX IF NOT EXISTS media_import_instances_sop ON media_import_instances(sop_uid);
CREATE TRIGGER IF NOT EXISTS media_imports_never_deleted BEFORE DELETE ON media_imports
BEGIN SELECT RAISE(ABORT, 'import records are never deleted (R-PDI-6)'); END;
CREATE TRIGGER IF NOT EXISTS media_imports_final BEFORE UPDATE ON media_imports
WHEN OLD.status IN ('finalized', 'stopped')
BEGIN SELECT RAISE(ABORT,
    'a finalized import record is never changed; record a new import that supersedes it');
END;
CREATE TRIGGER IF NOT EXISTS media_imports_transitions BEFORE UPDATE ON media_imports
WHEN NOT ((OLD.status = 'importing')
          OR (OLD.status = 'saved' AND NEW.status IN ('saved', 'finalized')
              AND NEW.details IS OLD.details))
  OR NEW.id IS NOT OLD.id OR NEW.created_at IS NOT OLD.created_at
  OR NEW.importer_id IS NOT OLD.importer_id OR NEW.importer_name IS NOT OLD.importer_name
  OR NEW.importer_cert_sha256 IS NOT OLD.importer_cert_sha256
  OR NEW.media_type IS NOT OLD.media_type OR NEW.media_label IS NOT OLD.media_label
  OR NEW.local_patient_id IS NOT OLD.local_patient_id
  OR NEW.local_issuer IS NOT OLD.local_issuer OR NEW.supersedes IS NOT OLD.supersedes
BEGIN SELECT RAISE(ABORT, 'this change to an import record is not allowed (R-PDI-6)'); END;
CREATE TRIGGER IF NOT EXISTS media_import_instances_fixed BEFORE UPDATE
    ON media_import_instances
BEGIN SELECT RAISE(ABORT, 'imported instance rows are never changed'); END;
CREATE TRIGGER IF NOT EXISTS media_import_instances_kept BEFORE DELETE
    ON media_import_instances
BEGIN SELECT RAISE(ABORT, 'imported instance rows are never deleted'); END;
"""


def utc_iso(moment: datetime | None = None) -> str:
    """An aware moment as UTC ISO 8601 with microseconds (sortable as text)."""
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is None:
        raise ValueError("an aware datetime is needed")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def canonical_sha256(data: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON form (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RecordHeader:
    """What is known when an import starts: who, where, which medium, for whom."""

    importer_id: str
    importer_name: str
    station: str
    media_type: str
    media_label: str
    source_facility: str
    local_patient_id: str
    local_issuer: str
    importer_cert_sha256: str | None = None
    source_address: str | None = None
    supersedes: int | None = None
    change_reason: str = ""


@dataclass(frozen=True)
class ImportRecord:
    """One row of ``media_imports`` with its details decoded."""

    id: int
    created_at: str
    importer_id: str
    importer_name: str
    importer_cert_sha256: str | None
    source_address: str | None
    station: str
    media_type: str
    media_label: str
    source_facility: str
    local_patient_id: str
    local_issuer: str
    status: str
    saved_at: str | None
    finalize_due_at: str | None
    finalized_at: str | None
    finalized_by_id: str | None
    finalized_by_name: str | None
    finalization: str | None
    supersedes: int | None
    change_reason: str
    instance_count: int
    stop_reason: str
    details_sha256: str
    details: dict[str, Any] = field(default_factory=dict)
    superseded_by: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def summary(self) -> str:
        """One line for ``sekisho media imports`` (it names the patient: staff only)."""
        fin = (
            f"finalized {self.finalized_at[:19]} by {self.finalized_by_id} ({self.finalization})"
            if self.finalized_at
            else (f"due {self.finalize_due_at[:19]}" if self.finalize_due_at else "")
        )
        link = f" supersedes #{self.supersedes}" if self.supersedes else ""
        later = f" superseded by #{self.superseded_by}" if self.superseded_by else ""
        stop = f" ({self.stop_reason})" if self.stop_reason else ""
        return (
            f"#{self.id} {self.created_at[:19]} {self.status}{stop} by {self.importer_id}"
            f" [{self.importer_name}] {self.media_type} {self.media_label!r}"
            f" from {self.source_facility or '-'} -> {self.local_patient_id}"
            f"^{self.local_issuer or '-'} instances={self.instance_count} {fin}{link}{later}"
        ).rstrip()


_COLUMNS = (
    "id, created_at, importer_id, importer_name, importer_cert_sha256, source_address, station,"
    " media_type, media_label, source_facility, local_patient_id, local_issuer, status, saved_at,"
    " finalize_due_at, finalized_at, finalized_by_id, finalized_by_name, finalization,"
    " supersedes, change_reason, instance_count, stop_reason, details_sha256, details"
)


class ImportRecords(SqliteDatabase):
    """Thread-safe access to the import record tables (own SQLite connection per thread)."""

    SCHEMA = SCHEMA
    LABEL = "import record database"
    INTEGRITY_IS_CONFLICT = True
    FOREIGN_KEYS = False


    # -- writing -------------------------------------------------------------
    def begin(self, header: RecordHeader, *, now: datetime | None = None) -> int:
        """Open a record in state ``importing``; checks the ``supersedes`` link."""
        with self._write() as conn:
            if header.supersedes is not None:
                row = conn.execute(
                    "SELECT status FROM media_imports WHERE id = ?", (header.supersedes,)
                ).fetchone()
                if row is None:
                    raise NotFoundError(f"there is no import record #{header.supersedes}")
                if row["status"] not in ("saved", "finalized"):
                    raise InvalidInputError(
                        f"import #{header.supersedes} is {row['status']}; only a saved or "
                        "finalized import can be superseded"
                    )
                later = conn.execute(
                    "SELECT id FROM media_imports WHERE supersedes = ? AND status != 'stopped'",
                    (header.supersedes,),
                ).fetchone()
                if later is not None:
                    raise ConflictError(
                        f"import #{header.supersedes} is already superseded by #{later['id']}; "
                        "supersede the latest record instead"
                    )
                if not header.change_reason.strip():
                    raise InvalidInputError("a superseding import needs a reason for the change")
            cur = conn.execute(
                "INSERT INTO media_imports (created_at, importer_id, importer_name,"
                " importer_cert_sha256, source_address, station, media_type, media_label,"
                " source_facility, local_patient_id, local_issuer, status, supersedes,"
                " change_reason) VALUES (?,?,?,?,?,?,?,?,?,?,?,'importing',?,?)",
                (
                    utc_iso(now), header.importer_id, header.importer_name,
                    header.importer_cert_sha256, header.source_address, header.station,
                    header.media_type, header.media_label, header.source_facility,
                    header.local_patient_id, header.local_issuer, header.supersedes,
                    header.change_reason,
                ),
            )  # fmt: skip
            return int(cur.lastrowid or 0)

    def add_instances(self, import_id: int, items: Sequence[tuple[InstanceMeta, str]]) -> None:
        """Attribute stored instances ``(meta, stored SHA-256)`` to the import, in one commit."""
        if not items:
            return
        stamp = utc_iso()
        with self._write() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO media_import_instances (import_id, sop_uid, study_uid,"
                " series_uid, source_path, source_sha256, stored_sha256, stored_at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        import_id, meta.sop_instance_uid, meta.study_instance_uid,
                        meta.series_instance_uid, meta.source_path, meta.source_sha256,
                        stored, stamp,
                    )
                    for meta, stored in items
                ],
            )  # fmt: skip

    def placement_of(self, study_uid: str, series_uid: str) -> tuple[str, str, str] | None:
        """Where the store files a series (else a study): ``(study UID, patient ID, issuer)``.

        Reads the store's own tables in the same database, so that the sink can
        refuse a misplaced instance before writing it (the store would refuse it
        at commit, R-XCH-5).
        """
        with self._conn() as conn:
            row = conn.execute(
                "SELECT s.study_uid, p.patient_id, p.issuer FROM series r"
                " JOIN studies s ON s.study_uid = r.study_uid"
                " JOIN patients p ON p.pk = s.patient_pk WHERE r.series_uid = ?",
                (series_uid,),
            ).fetchone()
            if row is None:
                row = conn.execute(
                    "SELECT s.study_uid, p.patient_id, p.issuer FROM studies s"
                    " JOIN patients p ON p.pk = s.patient_pk WHERE s.study_uid = ?",
                    (study_uid,),
                ).fetchone()
        return (row[0], row[1], row[2]) if row is not None else None

    def save(
        self,
        import_id: int,
        details: Mapping[str, Any],
        *,
        instance_count: int,
        saved_at: datetime,
        finalize_due_at: datetime | None,
        finalized_by: tuple[str, str] | None,
    ) -> str:
        """Write the content once and move to ``saved`` (or ``finalized`` on save).

        Returns the SHA-256 of the canonical details.
        """
        digest = canonical_sha256(details)
        text = json.dumps(details, sort_keys=True, ensure_ascii=False)
        with self._write() as conn:
            self._expect(conn, import_id, "importing")
            if finalized_by is not None:
                conn.execute(
                    "UPDATE media_imports SET status = 'finalized', saved_at = ?,"
                    " finalized_at = ?, finalized_by_id = ?, finalized_by_name = ?,"
                    " finalization = 'importer', instance_count = ?, details = ?,"
                    " details_sha256 = ? WHERE id = ?",
                    (utc_iso(saved_at), utc_iso(saved_at), finalized_by[0], finalized_by[1],
                     instance_count, text, digest, import_id),
                )  # fmt: skip
            else:
                conn.execute(
                    "UPDATE media_imports SET status = 'saved', saved_at = ?,"
                    " finalize_due_at = ?, instance_count = ?, details = ?, details_sha256 = ?"
                    " WHERE id = ?",
                    (utc_iso(saved_at), utc_iso(finalize_due_at) if finalize_due_at else None,
                     instance_count, text, digest, import_id),
                )  # fmt: skip
        return digest

    def stop(self, import_id: int, reason: str, details: Mapping[str, Any]) -> str:
        """The import was stopped before anything was stored (malware, scanner failure)."""
        digest = canonical_sha256(details)
        text = json.dumps(details, sort_keys=True, ensure_ascii=False)
        with self._write() as conn:
            self._expect(conn, import_id, "importing")
            conn.execute(
                "UPDATE media_imports SET status = 'stopped', stop_reason = ?, details = ?,"
                " details_sha256 = ? WHERE id = ?",
                (reason, text, digest, import_id),
            )
        return digest

    def finalize_scheduled(self, import_id: int, by_id: str, by_name: str, *, at: datetime) -> bool:
        """Finalize one saved import in the designated person's name; ``False`` if not saved."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE media_imports SET status = 'finalized', finalized_at = ?,"
                " finalized_by_id = ?, finalized_by_name = ?, finalization = 'scheduled'"
                " WHERE id = ? AND status = 'saved'",
                (utc_iso(at), by_id, by_name, import_id),
            )
            return cur.rowcount == 1

    @staticmethod
    def _expect(conn: sqlite3.Connection, import_id: int, status: str) -> None:
        row = conn.execute("SELECT status FROM media_imports WHERE id = ?", (import_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"there is no import record #{import_id}")
        if row["status"] != status:
            raise ConflictError(f"import #{import_id} is {row['status']}, not {status}")

    # -- reading -------------------------------------------------------------
    def source_sha256_of(self, sop_uid: str) -> str | None:
        """SHA-256 of the medium file last imported for this SOP Instance UID, if any."""
        with self._conn() as conn:
            row = conn.execute(
                "SELECT source_sha256 FROM media_import_instances WHERE sop_uid = ?"
                " ORDER BY import_id DESC LIMIT 1",
                (sop_uid,),
            ).fetchone()
        return str(row["source_sha256"]) if row else None

    def instances(self, import_id: int) -> list[dict[str, Any]]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT sop_uid, study_uid, series_uid, source_path, source_sha256,"
                " stored_sha256, stored_at FROM media_import_instances WHERE import_id = ?"
                " ORDER BY source_path",
                (import_id,),
            ).fetchall()
        return [dict(r) for r in rows]

    def get(self, import_id: int) -> ImportRecord:
        with self._conn() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS}, (SELECT MAX(n.id) FROM media_imports n WHERE n.supersedes"
                " = media_imports.id AND n.status != 'stopped') AS superseded_by"
                " FROM media_imports WHERE id = ?",
                (import_id,),
            ).fetchone()
        if row is None:
            raise NotFoundError(f"there is no import record #{import_id}")
        return _record(row)

    def query(
        self,
        *,
        status: str | None = None,
        patient_id: str | None = None,
        limit: int = 200,
    ) -> list[ImportRecord]:
        where, args = [], []
        if status is not None:
            if status not in STATUSES:
                raise InvalidInputError(f"status must be one of {', '.join(STATUSES)}")
            where.append("status = ?")
            args.append(status)
        if patient_id is not None:
            where.append("local_patient_id = ?")
            args.append(patient_id)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS}, (SELECT MAX(n.id) FROM media_imports n WHERE n.supersedes"
                " = media_imports.id AND n.status != 'stopped') AS superseded_by"
                f" FROM media_imports{clause} ORDER BY id DESC LIMIT ?",
                (*args, max(1, min(limit, 10000))),
            ).fetchall()
        return [_record(r) for r in rows]

    def due(self, now: datetime) -> list[ImportRecord]:
        """Saved imports whose scheduled finalization time has come."""
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS}, NULL AS superseded_by FROM media_imports"
                " WHERE status = 'saved' AND finalize_due_at IS NOT NULL"
                " AND finalize_due_at <= ? ORDER BY id",
                (utc_iso(now),),
            ).fetchall()
        return [_record(r) for r in rows]


def _record(row: sqlite3.Row) -> ImportRecord:
    data = dict(row)
    details = json.loads(data.pop("details") or "{}")
    return ImportRecord(details=details, **data)
