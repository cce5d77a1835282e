"""Embedded SQLite metadata backend (R-OPS-1).

WAL journal with ``synchronous=FULL``: a commit is durable when it returns,
so an instance acknowledged after ``add_instances`` survives power loss.
All methods are synchronous; the gateway calls them from worker threads.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime

from gateway.sqlitedb import SqliteDatabase
from gateway.store.index import InstanceIndex
from gateway.store.model import (
    AddResult,
    Consent,
    Partner,
    StoredInstance,
    StudyFilter,
    Visibility,
)
from pki.errors import ConflictError, InvalidInputError, NotFoundError, StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    pk INTEGER PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL DEFAULT '',
    name_alpha TEXT NOT NULL DEFAULT '',
    name_ideo TEXT NOT NULL DEFAULT '',
    name_phon TEXT NOT NULL DEFAULT '',
    birth_date TEXT NOT NULL DEFAULT '',
    sex TEXT NOT NULL DEFAULT '',
    UNIQUE (patient_id, issuer)
);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_pk INTEGER NOT NULL REFERENCES patients(pk),
    study_date TEXT NOT NULL DEFAULT '',
    study_time TEXT NOT NULL DEFAULT '',
    accession TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    referring TEXT NOT NULL DEFAULT '',
    charset TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient_pk);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    modality TEXT NOT NULL DEFAULT '',
    series_number INTEGER,
    description TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    instance_number INTEGER,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS partners (
    name TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS partner_bindings (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    partner TEXT NOT NULL REFERENCES partners(name) ON DELETE CASCADE,
    PRIMARY KEY (kind, value)
);
CREATE TABLE IF NOT EXISTS consents (
    id INTEGER PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer TEXT NOT NULL DEFAULT '',
    scope_kind TEXT NOT NULL CHECK (scope_kind IN ('partner', 'network')),
    scope_name TEXT NOT NULL,
    granted_by TEXT NOT NULL,
    granted_at TEXT NOT NULL,
    revoked_by TEXT,
    revoked_at TEXT,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS consents_patient ON consents(patient_id, issuer);
"""


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _like(pattern: str) -> str:
    """DICOM wildcard matching (PS3.4 C.2.2.2.4) to an SQL LIKE pattern."""
    out = []
    for ch in pattern:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _date_range(value: str) -> tuple[str, str]:
    """PS3.4 C.2.2.2.5 range matching: ``A-B``, ``A-``, ``-B`` or a single date."""
    if "-" in value:
        lo, _, hi = value.partition("-")
    else:
        lo = hi = value
    for part in (lo, hi):
        if part and (len(part) != 8 or not part.isdigit()):
            raise InvalidInputError(f"invalid date or date range {value!r} (expected YYYYMMDD)")
    return lo or "00000000", hi or "99999999"


class SqliteMetadataStore(SqliteDatabase):
    """Patients, studies, series, instances, partners and consent (SQLite)."""

    SCHEMA = SCHEMA
    LABEL = "metadata database"

    # -- instances ---------------------------------------------------------
    def add_instances(
        self, items: Sequence[tuple[InstanceIndex, str, int]], source: str
    ) -> list[str]:
        """Index staged instances in one durable transaction.

        Returns per item ``stored``, ``already-present`` (same UID, same bytes)
        or ``conflict`` (same UID, different bytes: the stored one is kept).
        """
        results: list[str] = []
        now = utcnow()
        with self._write() as conn:
            for idx, sha, size in items:
                row = conn.execute(
                    "SELECT sha256 FROM instances WHERE sop_uid = ?", (idx.sop_instance_uid,)
                ).fetchone()
                if row is not None:
                    results.append(
                        AddResult.ALREADY_PRESENT if row["sha256"] == sha else AddResult.CONFLICT
                    )
                    continue
                study = conn.execute(
                    "SELECT s.patient_pk, p.patient_id, p.issuer FROM studies s "
                    "JOIN patients p ON p.pk = s.patient_pk WHERE s.study_uid = ?",
                    (idx.study_uid,),
                ).fetchone()
                if study is not None and (study["patient_id"], study["issuer"]) != (
                    idx.patient_id,
                    idx.issuer,
                ):
                    results.append(AddResult.CONFLICT)
                    continue
                # A series belongs to one study: check before writing any row.
                series = conn.execute(
                    "SELECT study_uid FROM series WHERE series_uid = ?", (idx.series_uid,)
                ).fetchone()
                if series is not None and series["study_uid"] != idx.study_uid:
                    results.append(AddResult.CONFLICT)
                    continue
                # A known study already has its patient row, a known series its row:
                # only the first instance of each writes them.
                if study is None:
                    patient_pk = self._upsert_patient(conn, idx)
                    conn.execute(
                        "INSERT OR IGNORE INTO studies (study_uid, patient_pk, study_date,"
                        " study_time, accession, description, referring, charset)"
                        " VALUES (?,?,?,?,?,?,?,?)",
                        (
                            idx.study_uid,
                            patient_pk,
                            idx.study_date,
                            idx.study_time,
                            idx.accession,
                            idx.study_description,
                            idx.referring,
                            idx.specific_character_set,
                        ),
                    )
                if series is None:
                    conn.execute(
                        "INSERT OR IGNORE INTO series (series_uid, study_uid, modality,"
                        " series_number, description) VALUES (?,?,?,?,?)",
                        (
                            idx.series_uid,
                            idx.study_uid,
                            idx.modality,
                            idx.series_number,
                            idx.series_description,
                        ),
                    )
                conn.execute(
                    "INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid,"
                    " transfer_syntax, instance_number, sha256, size, received_at, source)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        idx.sop_instance_uid,
                        idx.series_uid,
                        idx.study_uid,
                        idx.sop_class_uid,
                        idx.transfer_syntax,
                        idx.instance_number,
                        sha,
                        size,
                        now,
                        source,
                    ),
                )
                results.append(AddResult.STORED)
        return results

    @staticmethod
    def _upsert_patient(conn: sqlite3.Connection, idx: InstanceIndex) -> int:
        groups = (idx.patient_name.split("=") + ["", "", ""])[:3]
        row = conn.execute(
            "SELECT pk FROM patients WHERE patient_id = ? AND issuer = ?",
            (idx.patient_id, idx.issuer),
        ).fetchone()
        if row is not None:
            return int(row["pk"])
        cur = conn.execute(
            "INSERT INTO patients (patient_id, issuer, name, name_alpha, name_ideo, name_phon,"
            " birth_date, sex) VALUES (?,?,?,?,?,?,?,?)",
            (idx.patient_id, idx.issuer, idx.patient_name, *groups, idx.birth_date, idx.sex),
        )
        return int(cur.lastrowid or 0)

    def find_instance(self, sop_uid: str) -> StoredInstance | None:
        with self._conn() as conn:
            row = conn.execute(_INSTANCE_SELECT + " WHERE i.sop_uid = ?", (sop_uid,)).fetchone()
        return _instance(row) if row else None

    def patient(self, patient_id: str, issuer: str) -> dict[str, str] | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT patient_id, issuer, name, birth_date, sex FROM patients"
                " WHERE patient_id = ? AND issuer = ?",
                (patient_id, issuer),
            ).fetchone()
        return dict(row) if row else None

    # -- visibility --------------------------------------------------------
    @staticmethod
    def _visible(vis: Visibility | None, alias: str = "p") -> tuple[str, list[object]]:
        """SQL condition: the patient consented to share with this partner (R-XCH-2)."""
        if vis is None:
            return "1", []
        marks = ",".join("?" for _ in vis.networks) or "NULL"
        clause = (
            f"EXISTS (SELECT 1 FROM consents c WHERE c.patient_id = {alias}.patient_id"
            f" AND c.issuer = {alias}.issuer AND c.revoked_at IS NULL AND ("
            "(c.scope_kind = 'partner' AND c.scope_name = ?)"
            f" OR (c.scope_kind = 'network' AND c.scope_name IN ({marks}))))"
        )
        return clause, [vis.partner, *vis.networks]

    @staticmethod
    def _study_conditions(f: StudyFilter) -> tuple[list[str], list[object]]:
        cond: list[str] = []
        args: list[object] = []
        if f.patient_id:
            cond.append("p.patient_id LIKE ? ESCAPE '\\'")
            args.append(_like(f.patient_id))
        if f.patient_name:
            pat = _like(f.patient_name)
            cond.append(
                "(p.name_alpha LIKE ? ESCAPE '\\' OR p.name_ideo LIKE ? ESCAPE '\\'"
                " OR p.name_phon LIKE ? ESCAPE '\\' OR p.name LIKE ? ESCAPE '\\')"
            )
            args.extend([pat] * 4)
        if f.study_date:
            lo, hi = _date_range(f.study_date)
            cond.append("s.study_date BETWEEN ? AND ?")
            args.extend([lo, hi])
        if f.accession:
            cond.append("s.accession LIKE ? ESCAPE '\\'")
            args.append(_like(f.accession))
        if f.study_uids:
            cond.append(f"s.study_uid IN ({','.join('?' for _ in f.study_uids)})")
            args.extend(f.study_uids)
        if f.modality:
            cond.append(
                "EXISTS (SELECT 1 FROM series x WHERE x.study_uid = s.study_uid AND x.modality = ?)"
            )
            args.append(f.modality)
        return cond, args

    def query_studies(self, f: StudyFilter, vis: Visibility | None) -> list[dict[str, object]]:
        cond, args = self._study_conditions(f)
        vclause, vargs = self._visible(vis)
        sql = (
            "SELECT s.*, p.patient_id, p.issuer, p.name AS patient_name, p.birth_date, p.sex,"
            " (SELECT group_concat(DISTINCT modality) FROM series x"
            "   WHERE x.study_uid = s.study_uid) AS modalities,"
            " (SELECT count(*) FROM series x WHERE x.study_uid = s.study_uid) AS n_series,"
            " (SELECT count(*) FROM instances i WHERE i.study_uid = s.study_uid) AS n_instances"
            " FROM studies s JOIN patients p ON p.pk = s.patient_pk"
            f" WHERE {vclause} AND {' AND '.join(cond) or '1'}"
            " ORDER BY s.study_date, s.study_uid LIMIT ? OFFSET ?"
        )
        with self._conn() as conn:
            rows = conn.execute(sql, [*vargs, *args, f.limit, f.offset]).fetchall()
        return [dict(r) for r in rows]

    def query_series(
        self, study_uid: str | None, f: StudyFilter, vis: Visibility | None
    ) -> list[dict[str, object]]:
        cond, args = self._study_conditions(f)
        if study_uid:
            cond.append("s.study_uid = ?")
            args.append(study_uid)
        if f.series_uids:
            cond.append(f"se.series_uid IN ({','.join('?' for _ in f.series_uids)})")
            args.extend(f.series_uids)
        if f.modality:  # below the study level, Modality is the series' own (PS3.4 C.6.1.1.3)
            cond.append("se.modality = ?")
            args.append(f.modality)
        vclause, vargs = self._visible(vis)
        sql = (
            "SELECT se.*, s.study_date, s.accession, p.patient_id, p.issuer,"
            " p.name AS patient_name,"
            " (SELECT count(*) FROM instances i WHERE i.series_uid = se.series_uid) AS n_instances"
            " FROM series se JOIN studies s ON s.study_uid = se.study_uid"
            " JOIN patients p ON p.pk = s.patient_pk"
            f" WHERE {vclause} AND {' AND '.join(cond) or '1'}"
            " ORDER BY se.series_number, se.series_uid LIMIT ? OFFSET ?"
        )
        with self._conn() as conn:
            rows = conn.execute(sql, [*vargs, *args, f.limit, f.offset]).fetchall()
        return [dict(r) for r in rows]

    def query_instances(
        self, study_uid: str | None, series_uid: str | None, f: StudyFilter, vis: Visibility | None
    ) -> list[dict[str, object]]:
        cond, args = self._study_conditions(f)
        for col, val in (("s.study_uid", study_uid), ("i.series_uid", series_uid)):
            if val:
                cond.append(f"{col} = ?")
                args.append(val)
        if f.sop_uids:
            cond.append(f"i.sop_uid IN ({','.join('?' for _ in f.sop_uids)})")
            args.extend(f.sop_uids)
        if f.modality:
            cond.append("se.modality = ?")
            args.append(f.modality)
        vclause, vargs = self._visible(vis)
        sql = (
            "SELECT i.*, se.modality, p.patient_id, p.issuer, p.name AS patient_name"
            " FROM instances i JOIN series se ON se.series_uid = i.series_uid"
            " JOIN studies s ON s.study_uid = i.study_uid JOIN patients p ON p.pk = s.patient_pk"
            f" WHERE {vclause} AND {' AND '.join(cond) or '1'}"
            " ORDER BY i.instance_number, i.sop_uid LIMIT ? OFFSET ?"
        )
        with self._conn() as conn:
            rows = conn.execute(sql, [*vargs, *args, f.limit, f.offset]).fetchall()
        return [dict(r) for r in rows]

    def instances_of(
        self,
        study_uid: str,
        series_uid: str | None,
        sop_uid: str | None,
        vis: Visibility | None,
    ) -> list[StoredInstance]:
        vclause, vargs = self._visible(vis)
        cond = ["i.study_uid = ?"]
        args: list[object] = [study_uid]
        if series_uid:
            cond.append("i.series_uid = ?")
            args.append(series_uid)
        if sop_uid:
            cond.append("i.sop_uid = ?")
            args.append(sop_uid)
        sql = (
            _INSTANCE_SELECT + f" WHERE {vclause} AND {' AND '.join(cond)}"
            " ORDER BY i.series_uid, i.instance_number, i.sop_uid"
        )
        with self._conn() as conn:
            rows = conn.execute(sql, [*vargs, *args]).fetchall()
        return [_instance(r) for r in rows]

    # -- partners ----------------------------------------------------------
    def add_partner(self, partner: Partner) -> None:
        data = {
            "fingerprints": list(partner.fingerprints),
            "issuer_subjects": [list(x) for x in partner.issuer_subjects],
            "ae_titles": list(partner.ae_titles),
            "permissions": sorted(partner.permissions),
            "networks": list(partner.networks),
            "allowed_addresses": list(partner.allowed_addresses),
            "role": partner.role,
            "move_destinations": [list(x) for x in partner.move_destinations],
            "certificate_not_after": partner.certificate_not_after,
            "created_at": partner.created_at or utcnow(),
            "created_by": partner.created_by,
        }
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO partners (name, data) VALUES (?, ?)",
                    (partner.name, json.dumps(data)),
                )
                for fp in partner.fingerprints:
                    conn.execute(
                        "INSERT INTO partner_bindings VALUES ('sha256', ?, ?)",
                        (fp.lower(), partner.name),
                    )
                for issuer, subject in partner.issuer_subjects:
                    conn.execute(
                        "INSERT INTO partner_bindings VALUES ('issuer-subject', ?, ?)",
                        (json.dumps([issuer, subject]), partner.name),
                    )
        except StoreError as exc:
            if "UNIQUE" in str(exc):
                raise ConflictError(
                    f"partner {partner.name!r} or one of its certificates is already registered"
                ) from exc
            raise

    def remove_partner(self, name: str) -> bool:
        with self._write() as conn:
            conn.execute("DELETE FROM partner_bindings WHERE partner = ?", (name,))
            cur = conn.execute("DELETE FROM partners WHERE name = ?", (name,))
            return cur.rowcount > 0

    def list_partners(self) -> list[Partner]:
        with self._conn() as conn:
            rows = conn.execute("SELECT name, data FROM partners ORDER BY name").fetchall()
        return [_partner(r["name"], r["data"]) for r in rows]

    def get_partner(self, name: str) -> Partner:
        with self._conn() as conn:
            row = conn.execute("SELECT name, data FROM partners WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no partner named {name!r}")
        return _partner(row["name"], row["data"])

    def partner_for_certificate(self, sha256: str, issuer: str, subject: str) -> Partner | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT p.name, p.data FROM partner_bindings b JOIN partners p"
                " ON p.name = b.partner WHERE (b.kind = 'sha256' AND b.value = ?)"
                " OR (b.kind = 'issuer-subject' AND b.value = ?)",
                (sha256.lower(), json.dumps([issuer, subject])),
            ).fetchone()
        return _partner(row["name"], row["data"]) if row else None

    # -- consent -----------------------------------------------------------
    def grant_consent(
        self, patient_id: str, issuer: str, kind: str, scope: str, by: str, note: str = ""
    ) -> Consent:
        if kind not in ("partner", "network"):
            raise InvalidInputError("consent scope must be 'partner' or 'network'")
        now = utcnow()
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO consents (patient_id, issuer, scope_kind, scope_name, granted_by,"
                " granted_at, note) VALUES (?,?,?,?,?,?,?)",
                (patient_id, issuer, kind, scope, by, now, note),
            )
            cid = int(cur.lastrowid or 0)
        return Consent(cid, patient_id, issuer, kind, scope, by, now, note=note)  # type: ignore[arg-type]

    def revoke_consent(self, patient_id: str, issuer: str, kind: str, scope: str, by: str) -> int:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE consents SET revoked_by = ?, revoked_at = ? WHERE patient_id = ?"
                " AND issuer = ? AND scope_kind = ? AND scope_name = ? AND revoked_at IS NULL",
                (by, utcnow(), patient_id, issuer, kind, scope),
            )
            return cur.rowcount

    def list_consents(self, patient_id: str | None = None) -> list[Consent]:
        sql = "SELECT * FROM consents"
        args: list[object] = []
        if patient_id is not None:
            sql += " WHERE patient_id = ?"
            args.append(patient_id)
        with self._conn() as conn:
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
        return [Consent(**dict(r)) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._conn() as conn:
            return {
                t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                for t in ("patients", "studies", "series", "instances", "partners")
            }


_INSTANCE_SELECT = (
    "SELECT i.*, p.patient_id, p.issuer FROM instances i"
    " JOIN studies s ON s.study_uid = i.study_uid JOIN patients p ON p.pk = s.patient_pk"
)


def _instance(row: sqlite3.Row) -> StoredInstance:
    return StoredInstance(
        sop_instance_uid=row["sop_uid"],
        sop_class_uid=row["sop_class_uid"],
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        transfer_syntax=row["transfer_syntax"],
        sha256=row["sha256"],
        size=row["size"],
        patient_id=row["patient_id"],
        issuer=row["issuer"],
        instance_number=row["instance_number"],
        received_at=row["received_at"],
        source=row["source"],
    )


def _partner(name: str, raw: str) -> Partner:
    d = json.loads(raw)
    return Partner(
        name=name,
        fingerprints=tuple(d.get("fingerprints", ())),
        issuer_subjects=tuple((a, b) for a, b in d.get("issuer_subjects", ())),
        ae_titles=tuple(d.get("ae_titles", ())),
        permissions=frozenset(d.get("permissions", ())),
        networks=tuple(d.get("networks", ())),
        allowed_addresses=tuple(d.get("allowed_addresses", ())),
        role=d.get("role", "partner"),
        move_destinations=tuple((a, b) for a, b in d.get("move_destinations", ())),
        certificate_not_after=d.get("certificate_not_after", ""),
        created_at=d.get("created_at", ""),
        created_by=d.get("created_by", ""),
    )
