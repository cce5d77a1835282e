"""The hash-chained audit trail finds every tampering done directly in SQLite (R-AUD-2)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.audit import (
    GENESIS_HASH,
    AuditTrail,
    Outcome,
    instances_transferred,
    query,
    security_alert,
)
from gateway.audit import events as ev
from gateway.audit.chain import ROW_COLUMNS, StoredRow, build_row, compute_hash
from pki.errors import AuditIntegrityError, AuditWriteError

START = datetime(2025, 4, 1, 9, 0, tzinfo=UTC)


class StepClock:
    """A pinned clock that advances one second per call."""

    def __init__(self, start: datetime = START, step: timedelta = timedelta(seconds=1)) -> None:
        self.now = start
        self.step = step
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            self.now += self.step
            return self.now


def sample_event(i: int) -> ev.AuditEvent:
    if i % 7 == 0:
        return security_alert(
            "expired", "client certificate expired", source_address=f"192.0.2.{i % 250}"
        )
    if i % 3 == 0:
        return query(actor="partner-a", patient_id=f"P{i % 5}", query_text="PatientID=*")
    return instances_transferred(
        actor="partner-a",
        patient_id=f"P{i % 5}",
        patient_issuer="HOSP",
        study_uids=[f"1.2.392.200036.{i}"],
        instance_count=i,
        source_address="198.51.100.7",
    )


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[AuditTrail]:
    t = AuditTrail(tmp_path / "audit.db", clock=StepClock())
    for i in range(1, 51):
        t.record(sample_event(i))
    yield t
    t.close()


def tamper(db: Path, *statements: str | tuple[str, tuple[object, ...]]) -> None:
    """Act as an attacker with write access: drop the guard triggers, run SQL."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            conn.execute(f"DROP TRIGGER {name}")
        for statement in statements:
            if isinstance(statement, tuple):
                conn.execute(*statement)
            else:
                conn.execute(statement)
    finally:
        conn.close()


def read_row(db: Path, seq: int) -> StoredRow:
    conn = sqlite3.connect(db)
    try:
        raw = conn.execute(
            f"SELECT {', '.join(ROW_COLUMNS)} FROM audit_log WHERE seq = ?", (seq,)
        ).fetchone()
    finally:
        conn.close()
    return StoredRow(*raw)


def insert_row(row: StoredRow) -> tuple[str, tuple[object, ...]]:
    marks = ", ".join("?" * len(row))
    return (f"INSERT INTO audit_log ({', '.join(ROW_COLUMNS)}) VALUES ({marks})", tuple(row))


def test_fifty_events_verify_and_chain_from_genesis(trail: AuditTrail) -> None:
    report = trail.verify()
    assert report.ok, report.problems
    assert (report.records, report.head_seq, report.checkpoint_seq) == (50, 50, 50)
    records = list(trail.iter_records())
    assert [r.seq for r in records] == list(range(1, 51))
    assert records[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.record_hash for a, b in zip(records, records[1:], strict=False))
    assert records[6].event.event_id == ev.SECURITY_ALERT
    assert records[6].event.reason_code == "expired"
    assert records[0].occurred_at == START + timedelta(seconds=1)


def test_triggers_refuse_update_and_delete(trail: AuditTrail) -> None:
    conn = sqlite3.connect(trail.db_path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit_log SET actor = 'x' WHERE seq = 1")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM audit_log WHERE seq = 50")
    finally:
        conn.close()
    assert trail.verify().ok


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("patient_id", "P-OTHER"),
        ("actor", "innocent-partner"),
        ("outcome", 12),
        ("occurred_at", "2025-04-01T09:00:17.500000Z"),
        ("details", '{"description":"nothing happened"}'),
    ],
)
def test_update_of_record_17_is_named(trail: AuditTrail, column: str, value: object) -> None:
    tamper(trail.db_path, (f"UPDATE audit_log SET {column} = ? WHERE seq = 17", (value,)))
    report = trail.verify()
    assert not report.ok
    assert report.first_bad_seq == 17
    assert report.problem == "record 17 was altered (hash mismatch)"
    assert len(report.problems) == 1  # one tampering, one message
    with pytest.raises(AuditIntegrityError, match="record 17"):
        list(trail.iter_records(patient_id=None))


def test_deleted_record_17_is_named(trail: AuditTrail) -> None:
    tamper(trail.db_path, "DELETE FROM audit_log WHERE seq = 17")
    report = trail.verify()
    assert not report.ok
    assert report.first_bad_seq == 17
    assert report.problem == "record 17 is missing (sequence jumps from 16 to 18)"
    assert report.problems == (report.problem,)


def test_forged_record_inserted_at_17_by_renumbering_is_named(trail: AuditTrail) -> None:
    # A knowledgeable attacker shifts 17..50 up by one and writes a well-formed
    # record 17 with the project's own writer, correctly linked to record 16.
    prev = read_row(trail.db_path, 16)
    forged = build_row(17, prev.occurred_at, sample_event(2), prev.record_hash)
    tamper(
        trail.db_path,
        "UPDATE audit_log SET seq = -seq WHERE seq >= 17",
        "UPDATE audit_log SET seq = 1 - seq WHERE seq < 0",
        insert_row(forged),
    )
    report = trail.verify()
    assert not report.ok
    assert report.first_bad_seq == 17
    assert report.problem is not None
    assert report.problem.startswith("record 17 was inserted or reordered (previous-hash link")
    assert "written as record 17" in report.problem


def test_forged_record_with_duplicated_seq_is_named(trail: AuditTrail) -> None:
    # Without the primary key (the attacker rebuilds the table) a second row 17 fits.
    original = read_row(trail.db_path, 17)
    forged = original._replace(patient_id="P-FORGED")
    tamper(
        trail.db_path,
        "CREATE TABLE loose AS SELECT * FROM audit_log",
        "DROP TABLE audit_log",
        "ALTER TABLE loose RENAME TO audit_log",
        insert_row(forged),
    )
    report = trail.verify()
    assert not report.ok
    assert report.first_bad_seq == 17
    assert report.problem == (
        "record 17 appears more than once (a record was inserted with a duplicated sequence number)"
    )


def test_last_three_records_deleted_is_detected_by_checkpoint(trail: AuditTrail) -> None:
    tamper(trail.db_path, "DELETE FROM audit_log WHERE seq > 47")
    report = trail.verify()
    assert not report.ok
    assert report.head_seq == 47
    assert report.first_bad_seq == 48
    assert report.problem == "the last 3 records were removed (checkpoint says head is 50)"


def test_swapped_rows_are_named(trail: AuditTrail) -> None:
    a, b = read_row(trail.db_path, 17), read_row(trail.db_path, 18)
    tamper(
        trail.db_path,
        "DELETE FROM audit_log WHERE seq IN (17, 18)",
        insert_row(b._replace(seq=17)),
        insert_row(a._replace(seq=18)),
    )
    report = trail.verify()
    assert not report.ok
    assert report.first_bad_seq == 17
    assert report.problem == (
        "record 17 was inserted or reordered (previous-hash link broken; "
        "records 17 and 18 were swapped)"
    )
    assert len(report.problems) == 1


def test_missing_or_damaged_checkpoint_fails_verification(trail: AuditTrail) -> None:
    trail.head_path.write_text("{not json")
    assert trail.verify().problem == "the head checkpoint is unreadable (damaged or replaced)"
    trail.head_path.unlink()
    report = trail.verify()
    assert not report.ok
    assert report.problem is not None and "checkpoint is missing" in report.problem


def test_consistent_rewrite_is_caught_by_checkpoint_and_seal(trail: AuditTrail) -> None:
    seen: list[bytes] = []

    def fake_tsa(data: bytes) -> bytes:
        seen.append(data)
        return b"TOKEN:" + data

    seal = trail.seal(fake_tsa)
    assert (seal.seal_id, seal.head_seq) == (1, 50)
    assert seen == [bytes.fromhex(trail.head().record_hash)]
    checks: list[tuple[bytes, bytes]] = []
    assert trail.verify(token_check=lambda tok, h: checks.append((tok, h))).ok
    assert checks == [(b"TOKEN:" + seen[0], seen[0])]

    # Rewrite record 30 and recompute every later hash with the project's writer.
    rows = [read_row(trail.db_path, s) for s in range(30, 51)]
    prev_hash = read_row(trail.db_path, 29).record_hash
    statements: list[str | tuple[str, tuple[object, ...]]] = [
        "DELETE FROM audit_log WHERE seq >= 30"
    ]
    for row in rows:
        event = dict(json.loads(row.details))
        event.update({k: getattr(row, k) for k in ("event_id", "action", "outcome", "actor")})
        event.update({k: getattr(row, k) for k in ("actor_kind", "patient_id", "patient_issuer")})
        if row.seq == 30:
            event["patient_id"] = "P-HIDDEN"
        new = build_row(row.seq, row.occurred_at, ev.AuditEvent.from_dict(event), prev_hash)
        statements.append(insert_row(new))
        prev_hash = new.record_hash
    tamper(trail.db_path, *statements)
    report = trail.verify()
    assert not report.ok
    assert "record 50 does not match the head checkpoint" in report.problems[0]
    assert any("seal 1 no longer matches the chain" in p for p in report.problems)

    # Even with the checkpoint file forged too, the RFC 3161 seal still tells.
    trail.head_path.write_text(
        json.dumps({"format": "sekisho-audit-head/1", "seq": 50, "record_hash": prev_hash})
    )
    report = trail.verify()
    assert not report.ok
    assert report.problem == (
        "seal 1 no longer matches the chain (record 50 changed after it was sealed)"
    )


def test_seal_detects_truncation_even_with_forged_checkpoint(trail: AuditTrail) -> None:
    trail.seal(lambda data: b"token")
    tamper(trail.db_path, "DELETE FROM audit_log WHERE seq > 47")
    last = read_row(trail.db_path, 47)
    trail.head_path.write_text(
        json.dumps({"format": "sekisho-audit-head/1", "seq": 47, "record_hash": last.record_hash})
    )
    report = trail.verify()
    assert report.problem == "the last 3 records were removed (seal 1 covers record 50)"
    assert report.first_bad_seq == 48


def test_bad_seal_token_is_reported(trail: AuditTrail) -> None:
    trail.seal(lambda data: b"token")

    def reject(token: bytes, digest: bytes) -> None:
        raise ValueError("imprint mismatch")

    report = trail.verify(token_check=reject)
    assert report.problem == "seal 1 timestamp token does not verify (imprint mismatch)"


def test_seal_refuses_empty_trail_and_altered_head(tmp_path: Path) -> None:
    t = AuditTrail(tmp_path / "a.db")
    with pytest.raises(AuditWriteError, match="nothing to seal"):
        t.seal(lambda data: b"token")
    t.record(sample_event(1))
    tamper(t.db_path, "UPDATE audit_log SET actor = 'x'")
    with pytest.raises(AuditIntegrityError, match="record 1 was altered"):
        t.seal(lambda data: b"token")
    assert t.seals() == []


def test_iter_records_filters(trail: AuditTrail) -> None:
    p1 = list(trail.iter_records(patient_id="P1", patient_issuer="HOSP"))
    assert p1 and all(r.event.patient_id == "P1" for r in p1)
    assert all(r.event.event_id == ev.INSTANCES_TRANSFERRED for r in p1)
    alerts = list(trail.iter_records(event_id=ev.SECURITY_ALERT))
    assert [r.seq for r in alerts] == [7, 14, 21, 28, 35, 42, 49]
    window = list(
        trail.iter_records(since=START + timedelta(seconds=10), until=START + timedelta(seconds=13))
    )
    assert [r.seq for r in window] == [10, 11, 12]
    assert [r.seq for r in trail.iter_records(after_seq=48)] == [49, 50]
    assert len(list(trail.iter_records(actor="partner-a", limit=5))) == 5


def test_record_returns_consecutive_seq_and_notifies_subscribers(tmp_path: Path) -> None:
    t = AuditTrail(tmp_path / "a.db")
    got: list[int] = []
    t.subscribe(lambda record: got.append(record.seq))
    t.subscribe(lambda record: 1 / 0)  # a failing subscriber must not break auditing
    assert [t.record(sample_event(i)) for i in range(1, 4)] == [1, 2, 3]
    assert got == [1, 2, 3]
    assert compute_hash(read_row(t.db_path, 3)) == t.head().record_hash


def test_write_failure_raises_and_leaves_no_gap(tmp_path: Path) -> None:
    t = AuditTrail(tmp_path / "a.db", busy_timeout=0.2)
    t.record(sample_event(1))
    blocker = sqlite3.connect(t.db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(AuditWriteError, match="could not be written"):
            t.record(sample_event(2))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert t.record(sample_event(3)) == 2
    assert t.verify().ok
    t.close()
    with pytest.raises(AuditWriteError, match="closed"):
        t.record(sample_event(4))


def test_naive_clock_is_refused(tmp_path: Path) -> None:
    t = AuditTrail(tmp_path / "a.db", clock=lambda: datetime(2025, 1, 1))
    with pytest.raises(AuditWriteError):
        t.record(sample_event(1))
    assert t.head().seq == 0


def _write_once(db: str) -> str:
    try:
        AuditTrail(Path(db)).record(sample_event(1))
    except AuditWriteError as exc:
        return f"AuditWriteError: {exc}"
    return "written"


def _write_as_unprivileged(db: str, results: multiprocessing.Queue[str]) -> None:
    if os.geteuid() == 0:  # root ignores file modes: become nobody first
        os.setgid(65534)
        os.setuid(65534)
    results.put(_write_once(db))


def test_read_only_database_raises_audit_write_error() -> None:
    directory = Path(tempfile.mkdtemp(prefix="sekisho-ro-"))
    try:
        directory.chmod(0o755)
        db = directory / "audit.db"
        with AuditTrail(db) as t:
            for i in range(1, 4):
                t.record(sample_event(i))
        for path in directory.iterdir():
            path.chmod(0o444)
        directory.chmod(0o555)
        ctx = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue[str] = ctx.Queue()
        child = ctx.Process(target=_write_as_unprivileged, args=(str(db), results))
        child.start()
        outcome = results.get(timeout=60)
        child.join(60)
        assert outcome.startswith("AuditWriteError"), outcome
        directory.chmod(0o755)
        for path in directory.iterdir():
            path.chmod(0o644)
        with AuditTrail(db) as t:
            report = t.verify()
        assert report.ok and report.head_seq == 3
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory)


def test_outcome_of_alert_is_minor_failure(trail: AuditTrail) -> None:
    alert = next(trail.iter_records(event_id=ev.SECURITY_ALERT))
    assert alert.event.outcome == Outcome.MINOR_FAILURE
    assert alert.event.event_type_codes == (ev.NODE_AUTHENTICATION,)
