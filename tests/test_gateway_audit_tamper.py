"""Tampering with the audit table directly in SQLite is found (R-AUD-2, R-AUD-3).

A gateway runs once to fill a real trail (start, a refused connection, a STOW,
a query, a retrieve), then stops.  Each case works on its own copy of the
instance directory, edits the ``audit_log`` table with the ``sqlite3`` module
as an intruder with write access to the file would (dropping the append-only
triggers first), and runs ``sekisho audit verify``: it must exit non-zero and
name the record.
"""

from __future__ import annotations

import shutil
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.audit import events as ev
from gateway.audit.chain import ROW_COLUMNS, StoredRow, build_row
from tests.gateway_helpers import (
    SECURITY_ALERT,
    Instance,
    build_study,
    create_instance,
    curl,
    running_gateway,
    stow,
)


@dataclass
class Trail:
    instance: Instance
    head: int
    alert_seq: int


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Trail:
    inst = create_instance(tmp_path_factory.mktemp("audit") / "gw")
    inst.cli_ok("consent", "grant", "P-AUD", "--partner", "partner-a", "--by", "reception01")
    study = build_study(patient_id="P-AUD", series=(("CT", 2),), rows=32, columns=32)
    with running_gateway(inst):
        assert curl(inst, "/dicomweb/studies", role=None).status == 0  # refused: no certificate
        assert stow(inst, [i.data for i in study.instances]).status == 200
        assert curl(inst, "/dicomweb/studies?PatientID=P-AUD").status == 200
        assert curl(inst, f"/dicomweb/studies/{study.study_uid}").status == 200
    records = inst.audit_records()
    alerts = [r.seq for r in records if r.event.event_id.value == SECURITY_ALERT]
    assert alerts, "the refused connection was not audited"
    assert len(records) >= 6
    return Trail(inst, records[-1].seq, alerts[0])


@pytest.fixture
def copy(trail: Trail, tmp_path: Path) -> Iterator[Instance]:
    """A private copy of the stopped instance to tamper with."""
    target = tmp_path / "copy"
    shutil.copytree(trail.instance.root, target)
    yield Instance(target, trail.instance.https_port, trail.instance.monitoring_port)


def connect(instance: Instance) -> sqlite3.Connection:
    return sqlite3.connect(instance.database, isolation_level=None)


def verify(instance: Instance) -> tuple[int, str]:
    proc = instance.cli("audit", "verify")
    return proc.returncode, proc.stdout + proc.stderr


def test_untouched_trail_verifies(trail: Trail, copy: Instance) -> None:
    code, out = verify(copy)
    assert code == 0, out
    assert f"{trail.head} record(s)" in out


def test_append_only_triggers_refuse_plain_edits(copy: Instance) -> None:
    conn = connect(copy)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit_log SET actor = 'x' WHERE seq = 1")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM audit_log WHERE seq = 1")
    finally:
        conn.close()
    assert verify(copy)[0] == 0


def test_updated_row_is_named(trail: Trail, copy: Instance) -> None:
    seq = trail.alert_seq
    conn = connect(copy)
    try:
        conn.execute("DROP TRIGGER audit_log_no_update")
        cur = conn.execute(
            "UPDATE audit_log SET actor = 'partner-a', outcome = 0 WHERE seq = ?", (seq,)
        )
        assert cur.rowcount == 1
    finally:
        conn.close()
    code, out = verify(copy)
    assert code != 0
    assert f"record {seq} was altered" in out
    assert f"first affected record: {seq}" in out
    # The export refuses to present the altered record as genuine.
    export = copy.cli("audit", "export", "--format", "dicom-xml", "-o", str(copy.root / "x.xml"))
    assert export.returncode != 0
    assert f"record {seq}" in export.stderr


def test_updated_details_are_named(trail: Trail, copy: Instance) -> None:
    """Editing only the JSON details (e.g. the reason of an alert) is found too."""
    seq = trail.alert_seq
    conn = connect(copy)
    try:
        conn.execute("DROP TRIGGER audit_log_no_update")
        details = conn.execute("SELECT details FROM audit_log WHERE seq = ?", (seq,)).fetchone()[0]
        assert "no-certificate" in details
        conn.execute(
            "UPDATE audit_log SET details = ? WHERE seq = ?",
            (details.replace("no-certificate", "connection-closed"), seq),
        )
    finally:
        conn.close()
    code, out = verify(copy)
    assert code != 0
    assert f"record {seq} was altered" in out


def test_deleted_row_is_named(trail: Trail, copy: Instance) -> None:
    seq = trail.alert_seq + 1
    assert seq < trail.head
    conn = connect(copy)
    try:
        conn.execute("DROP TRIGGER audit_log_no_delete")
        assert conn.execute("DELETE FROM audit_log WHERE seq = ?", (seq,)).rowcount == 1
    finally:
        conn.close()
    code, out = verify(copy)
    assert code != 0
    assert f"record {seq} is missing" in out


def test_deleted_last_rows_are_found_by_the_checkpoint(trail: Trail, copy: Instance) -> None:
    conn = connect(copy)
    try:
        conn.execute("DROP TRIGGER audit_log_no_delete")
        conn.execute("DELETE FROM audit_log WHERE seq >= ?", (trail.head - 1,))
    finally:
        conn.close()
    code, out = verify(copy)
    assert code != 0
    assert "removed" in out
    assert f"checkpoint says head is {trail.head}" in out


def _row(conn: sqlite3.Connection, seq: int) -> StoredRow:
    raw = conn.execute(
        f"SELECT {', '.join(ROW_COLUMNS)} FROM audit_log WHERE seq = ?", (seq,)
    ).fetchone()
    return StoredRow(*raw)


def _insert(conn: sqlite3.Connection, row: StoredRow) -> None:
    conn.execute(
        f"INSERT INTO audit_log ({', '.join(ROW_COLUMNS)}) VALUES "
        f"({', '.join('?' * len(ROW_COLUMNS))})",
        tuple(row),
    )


FORGED = ev.application_activity("start", actor="intruder")


def test_forged_row_with_a_made_up_hash_is_named(trail: Trail, copy: Instance) -> None:
    conn = connect(copy)
    try:
        last = _row(conn, trail.head)
        forged = build_row(trail.head + 1, last.occurred_at, FORGED, last.record_hash)
        _insert(conn, forged._replace(record_hash="0" * 64))
    finally:
        conn.close()
    code, out = verify(copy)
    assert code != 0
    assert f"record {trail.head + 1} was altered" in out


def test_well_formed_forged_row_inserted_in_the_middle_is_named(
    trail: Trail, copy: Instance
) -> None:
    """The intruder knows the format: renumbers the rows after ``at`` and inserts
    a record with a correct hash and previous-hash link."""
    at = trail.alert_seq
    conn = connect(copy)
    try:
        conn.execute("DROP TRIGGER audit_log_no_update")
        for seq in range(trail.head, at, -1):
            conn.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (seq + 1, seq))
        before = _row(conn, at)
        _insert(conn, build_row(at + 1, before.occurred_at, FORGED, before.record_hash))
    finally:
        conn.close()
    code, out = verify(copy)
    assert code != 0
    assert f"record {at + 1} was inserted or reordered" in out
    assert f"first affected record: {at + 1}" in out


# --------------------------------------------------------------------- export
def test_export_dicom_xml_contains_the_security_alert(trail: Trail, copy: Instance) -> None:
    proc = copy.cli("audit", "export", "--format", "dicom-xml")
    assert proc.returncode == 0, proc.stderr
    root = ET.fromstring(proc.stdout.encode())
    assert root.tag == "AuditMessages"
    messages = root.findall("AuditMessage")
    assert len(messages) == trail.head
    event_ids = [m.find("EventIdentification/EventID").get("csd-code") for m in messages]
    assert SECURITY_ALERT in event_ids
    alert = messages[event_ids.index(SECURITY_ALERT)].find("EventIdentification")
    assert alert is not None
    assert alert.get("EventOutcomeIndicator") == "4"
    assert [c.get("csd-code") for c in alert.findall("EventTypeCode")] == ["110126"]
    assert {"110100", "110104", "110112"} <= set(event_ids)


def test_export_to_file_filtered_by_patient(copy: Instance) -> None:
    out = copy.root / "patient.xml"
    proc = copy.cli(
        "audit", "export", "--format", "dicom-xml", "--patient-id", "P-AUD", "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    messages = ET.parse(out).getroot().findall("AuditMessage")
    assert messages
    for m in messages:
        ids = [p.get("ParticipantObjectID") for p in m.findall("ParticipantObjectIdentification")]
        assert any(i and i.startswith("P-AUD") for i in ids), ids
