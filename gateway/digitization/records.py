"""Film receipts, bulk plans, digitizations and signed records (R-DIG-3..5, R-SIG-6).

Own tables in the metadata database file, through the module's own
connections (WAL, ``synchronous=FULL``: a record is on disk when the call
returns), like the forwarding queue.  Times are stored as UTC ISO 8601.

* ``film_receipts``: who received which films for which patient, from where,
  when, and the deadline computed at receipt (R-DIG-3);
* ``digitization_plans``: bulk digitization of past films needs a recorded
  plan (seed 000 §5.2(2): plan reviewed by a committee with outside experts,
  external audit; R-DIG-5);
* ``digitizations``: one row per submitted digitization, with operator,
  information-creation manager, late and bulk flags, signer and timestamp;
* ``signed_records``: every signed artifact the archive keeps, its current
  content hash, its evidence record and when its protection ends (R-SIG-6).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from gateway.sqlitedb import SqliteDatabase
from pki.errors import InvalidInputError, NotFoundError

SCHEMA = """
CREATE TABLE IF NOT EXISTS film_receipts (
    id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer TEXT NOT NULL DEFAULT '',
    patient_name TEXT NOT NULL DEFAULT '',
    birth_date TEXT NOT NULL DEFAULT '',
    sex TEXT NOT NULL DEFAULT '',
    source_facility TEXT NOT NULL,
    films INTEGER NOT NULL CHECK (films > 0),
    received_at TEXT NOT NULL,
    received_by TEXT NOT NULL,
    deadline TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    accession TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS film_receipts_patient ON film_receipts(patient_id, issuer);
CREATE TABLE IF NOT EXISTS digitization_plans (
    id TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    committee_approval TEXT NOT NULL,
    external_auditor TEXT NOT NULL,
    recorded_by TEXT NOT NULL,
    recorded_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS digitizations (
    id TEXT PRIMARY KEY,
    receipt_id TEXT NOT NULL REFERENCES film_receipts(id),
    kind TEXT NOT NULL CHECK (kind IN ('film', 'paper')),
    record_type TEXT NOT NULL,
    operator_id TEXT NOT NULL,
    operator_name TEXT NOT NULL DEFAULT '',
    information_manager TEXT NOT NULL,
    digitized_at TEXT NOT NULL,
    deadline TEXT NOT NULL,
    late INTEGER NOT NULL DEFAULT 0,
    bulk_plan TEXT REFERENCES digitization_plans(id),
    patient_consent TEXT NOT NULL DEFAULT '',
    images INTEGER NOT NULL DEFAULT 0,
    series_uid TEXT NOT NULL DEFAULT '',
    signer TEXT NOT NULL DEFAULT '',
    hc_role TEXT NOT NULL DEFAULT '',
    timestamp_time TEXT NOT NULL DEFAULT '',
    tsa TEXT NOT NULL DEFAULT '',
    details TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS digitizations_receipt ON digitizations(receipt_id);
CREATE TABLE IF NOT EXISTS signed_records (
    id INTEGER PRIMARY KEY,
    digitization_id TEXT REFERENCES digitizations(id),
    kind TEXT NOT NULL CHECK (kind IN ('dicom', 'pdf')),
    record_type TEXT NOT NULL,
    sop_uid TEXT NOT NULL DEFAULT '',
    sha256 TEXT NOT NULL,
    evidence_sha256 TEXT NOT NULL DEFAULT '',
    patient_id TEXT NOT NULL DEFAULT '',
    issuer TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    protected_until TEXT NOT NULL DEFAULT '',
    protection_reason TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    renewed_at TEXT NOT NULL DEFAULT '',
    renewals INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS signed_records_due ON signed_records(protected_until);
"""


def utc_iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("naive datetime")
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def new_id(prefix: str, moment: datetime) -> str:
    return f"{prefix}-{moment.astimezone(UTC):%Y%m%d}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class FilmReceipt:
    id: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    source_facility: str
    films: int
    received_at: str
    received_by: str
    deadline: str
    study_uid: str
    accession: str
    modality: str
    note: str
    created_at: str
    #: Filled by queries: images digitized so far.
    digitized_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Plan:
    id: str
    description: str
    committee_approval: str
    external_auditor: str
    recorded_by: str
    recorded_at: str


@dataclass(frozen=True)
class Digitization:
    id: str
    receipt_id: str
    kind: str
    record_type: str
    operator_id: str
    operator_name: str
    information_manager: str
    digitized_at: str
    deadline: str
    late: bool
    bulk_plan: str | None
    patient_consent: str
    images: int
    series_uid: str
    signer: str
    hc_role: str
    timestamp_time: str
    tsa: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SignedRecord:
    id: int
    digitization_id: str | None
    kind: str
    record_type: str
    sop_uid: str
    sha256: str
    evidence_sha256: str
    patient_id: str
    issuer: str
    study_uid: str
    protected_until: str
    protection_reason: str
    created_at: str
    renewed_at: str
    renewals: int
    last_error: str

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class DigitizationRecords(SqliteDatabase):
    """Access to the digitization tables (synchronous; call from worker threads)."""

    SCHEMA = SCHEMA
    LABEL = "digitization record database"
    INTEGRITY_IS_CONFLICT = True
    FOREIGN_KEYS = True


    # -- receipts -------------------------------------------------------------
    def add_receipt(self, receipt: FilmReceipt) -> FilmReceipt:
        values = receipt.to_dict()
        values.pop("digitized_images")
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO film_receipts ({cols}) VALUES ({marks})", list(values.values())
            )
        return receipt

    _RECEIPT_SELECT = (
        "SELECT r.*, COALESCE((SELECT SUM(d.images) FROM digitizations d"
        " WHERE d.receipt_id = r.id), 0) AS digitized_images FROM film_receipts r"
    )

    def receipt(self, receipt_id: str) -> FilmReceipt:
        with self._conn() as conn:
            row = conn.execute(self._RECEIPT_SELECT + " WHERE r.id = ?", (receipt_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no film receipt {receipt_id!r}")
        return FilmReceipt(**dict(row))

    def receipts(self, patient_id: str | None = None, limit: int = 500) -> list[FilmReceipt]:
        sql, args = self._RECEIPT_SELECT, []
        if patient_id:
            sql += " WHERE r.patient_id = ?"
            args.append(patient_id)
        with self._conn() as conn:
            rows = conn.execute(sql + " ORDER BY r.received_at LIMIT ?", [*args, limit]).fetchall()
        return [FilmReceipt(**dict(r)) for r in rows]

    def open_receipts_past_deadline(self, now: datetime) -> list[FilmReceipt]:
        """Receipts with films not yet digitized whose deadline has passed (R-DIG-3)."""
        with self._conn() as conn:
            rows = conn.execute(
                self._RECEIPT_SELECT + " WHERE r.deadline <= ? ORDER BY r.deadline",
                (utc_iso(now),),
            ).fetchall()
        receipts = [FilmReceipt(**dict(r)) for r in rows]
        return [r for r in receipts if r.digitized_images < r.films]

    # -- plans ----------------------------------------------------------------
    def add_plan(self, plan: Plan) -> Plan:
        if not plan.committee_approval or not plan.external_auditor:
            raise InvalidInputError(
                "a bulk digitization plan needs the committee approval and the external auditor"
                " (seed 000 §5.2(2))"
            )
        with self._write() as conn:
            conn.execute(
                "INSERT INTO digitization_plans VALUES (?,?,?,?,?,?)",
                (
                    plan.id,
                    plan.description,
                    plan.committee_approval,
                    plan.external_auditor,
                    plan.recorded_by,
                    plan.recorded_at,
                ),
            )
        return plan

    def plan(self, plan_id: str) -> Plan:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT * FROM digitization_plans WHERE id = ?", (plan_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no bulk digitization plan {plan_id!r} is recorded (R-DIG-5)")
        return Plan(**dict(row))

    # -- digitizations ---------------------------------------------------------
    def add_digitization(self, d: Digitization, signed: Sequence[dict[str, Any]]) -> None:
        """The digitization and its signed artifacts, in one transaction."""
        values = d.to_dict()
        values["late"] = int(d.late)
        values["details"] = json.dumps(d.details, ensure_ascii=False, sort_keys=True)
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO digitizations ({cols}) VALUES ({marks})", list(values.values())
            )
            for item in signed:
                item = {**item, "digitization_id": d.id}
                keys = ", ".join(item)
                conn.execute(
                    f"INSERT INTO signed_records ({keys}) VALUES ({', '.join('?' for _ in item)})",
                    list(item.values()),
                )

    def digitization(self, digitization_id: str) -> Digitization:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT * FROM digitizations WHERE id = ?", (digitization_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no digitization {digitization_id!r}")
        return _digitization(row)

    def digitizations(self, *, late_only: bool = False, limit: int = 500) -> list[Digitization]:
        sql = "SELECT * FROM digitizations"
        if late_only:
            sql += " WHERE late = 1"
        with self._conn() as conn:
            rows = conn.execute(sql + " ORDER BY digitized_at LIMIT ?", (limit,)).fetchall()
        return [_digitization(r) for r in rows]

    # -- signed records ----------------------------------------------------------
    def signed_records(self, *, due_before: datetime | None = None) -> list[SignedRecord]:
        sql, args = "SELECT * FROM signed_records", []
        if due_before is not None:
            sql += " WHERE protected_until != '' AND protected_until <= ?"
            args.append(utc_iso(due_before))
        with self._conn() as conn:
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
        return [SignedRecord(**dict(r)) for r in rows]

    def signed_record(self, record_id: int) -> SignedRecord:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM signed_records WHERE id = ?", (record_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no signed record {record_id}")
        return SignedRecord(**dict(row))

    def record_renewal(
        self,
        record_id: int,
        *,
        sha256: str,
        evidence_sha256: str,
        protected_until: str,
        reason: str,
        renewed_at: str,
    ) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE signed_records SET sha256 = ?, evidence_sha256 = ?, protected_until = ?,"
                " protection_reason = ?, renewed_at = ?, renewals = renewals + 1, last_error = ''"
                " WHERE id = ?",
                (sha256, evidence_sha256, protected_until, reason, renewed_at, record_id),
            )

    def record_renewal_error(self, record_id: int, message: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE signed_records SET last_error = ? WHERE id = ?", (message[:500], record_id)
            )


def _digitization(row: sqlite3.Row) -> Digitization:
    data = dict(row)
    data["late"] = bool(data["late"])
    data["details"] = json.loads(data["details"] or "{}")
    return Digitization(**data)
