"""確定: finalization of import records, and changes as new linked records (R-PDI-6, R-PDI-5).

* ``due_at`` is the pure rule for scheduled finalization (000 付録1: e.g. 24:00
  of the day);
* with ``mode = "scheduled"`` an import stays *saved* until
  ``sekisho media finalize-due`` (frozen with ``--now``) finalizes it in the
  designated person's name, audited; before its time nothing happens;
* a finalized record cannot be changed or deleted, even with SQL; a later
  change is a new import whose ``supersedes`` names it.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from gateway_helpers import Instance, run_sekisho
from media_factory import build_media
from test_import_helpers import INSTANCES_ACCESSED, media_cli, media_instance, media_ok

from gateway.imports.finalization import due_at
from gateway.imports.records import ImportRecords, RecordHeader

TOKYO = ZoneInfo("Asia/Tokyo")


@pytest.mark.parametrize(
    ("saved", "at", "due"),
    [
        ("2025-04-01T10:15", "24:00", "2025-04-02T00:00"),
        ("2025-04-01T23:59", "24:00", "2025-04-02T00:00"),
        ("2025-04-01T00:00", "24:00", "2025-04-02T00:00"),
        ("2025-04-01T10:15", "17:30", "2025-04-01T17:30"),
        ("2025-04-01T17:30", "17:30", "2025-04-02T17:30"),
        ("2025-04-01T18:00", "17:30", "2025-04-02T17:30"),
        ("2025-12-31T20:00", "24:00", "2026-01-01T00:00"),
    ],
)
def test_due_time_is_the_next_configured_local_time(saved: str, at: str, due: str) -> None:
    moment = datetime.fromisoformat(saved).replace(tzinfo=TOKYO)
    expected = datetime.fromisoformat(due).replace(tzinfo=TOKYO)
    assert due_at(moment, at, TOKYO) == expected
    assert due_at(moment.astimezone(UTC), at, TOKYO) == expected  # the zone decides, not UTC


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("medium") / "CD"
    build_media(root)
    return root


SCHEDULED = {
    "mode": "scheduled",
    "at": "24:00",
    "timezone": "Asia/Tokyo",
    "responsible_id": "rad001",
    "responsible_name": "Houshasen^Kachou=放射線^課長",
}


def do_import(inst: Instance, medium: Path, *extra: str) -> dict:
    out = media_ok(
        inst,
        "import",
        str(medium),
        "--operator",
        "reception01",
        "--patient-id",
        "H0001",
        "--no-progress",
        "--json",
        *extra,
    )
    return json.loads(out)["record"]


def test_scheduled_finalization_by_the_designated_person(medium: Path, tmp_path: Path) -> None:
    inst = media_instance(tmp_path / "sekisho", finalization=SCHEDULED)
    record = do_import(inst, medium, "--select", "1")
    assert record["status"] == "saved" and record["finalized_at"] is None
    due = datetime.fromisoformat(record["finalize_due_at"])
    created = datetime.fromisoformat(record["created_at"]).astimezone(TOKYO)
    assert due.astimezone(TOKYO) == datetime.combine(
        created.date() + timedelta(days=1), datetime.min.time(), tzinfo=TOKYO
    )
    early = (due - timedelta(minutes=1)).isoformat()
    assert "0 import(s) finalized" in media_ok(inst, "finalize-due", "--now", early)
    assert ImportRecords(inst.database).get(record["id"]).status == "saved"

    out = media_ok(inst, "finalize-due", "--now", due.isoformat())
    assert f"import #{record['id']} finalized by rad001" in out
    final = ImportRecords(inst.database).get(record["id"])
    assert final.status == "finalized" and final.finalization == "scheduled"
    assert (final.finalized_by_id, final.finalized_by_name) == (
        "rad001",
        SCHEDULED["responsible_name"],
    )
    assert datetime.fromisoformat(final.finalized_at or "") == due
    assert final.importer_id == "reception01"  # the importer stays the importer
    [event] = [r.event for r in inst.audit_records(event_id=INSTANCES_ACCESSED)]
    assert (event.actor, event.action, event.patient_id) == ("rad001", "U", "H0001")
    assert event.extra["import_id"] == str(record["id"])
    assert event.instance_count == record["instance_count"]
    again = media_ok(inst, "finalize-due", "--now", (due + timedelta(days=2)).isoformat())
    assert "0 import(s) finalized" in again
    assert run_sekisho("audit", "verify", config=inst.config).returncode == 0


def test_on_save_is_finalization_by_the_importer(medium: Path, tmp_path: Path) -> None:
    inst = media_instance(tmp_path / "sekisho")
    record = do_import(inst, medium, "--select", "2")
    assert record["status"] == "finalized" and record["finalization"] == "importer"
    assert record["finalized_by_id"] == "reception01" and record["finalize_due_at"] is None
    assert "nothing to do" in media_ok(inst, "finalize-due")


def test_finalized_record_is_never_changed_and_changes_are_linked(
    medium: Path, tmp_path: Path
) -> None:
    inst = media_instance(tmp_path / "sekisho")
    first = do_import(inst, medium, "--select", "study:1.1")
    conn = sqlite3.connect(inst.database)
    try:
        for sql in (
            "UPDATE media_imports SET importer_id = 'someone' WHERE id = ?",
            "UPDATE media_imports SET details = '{}' WHERE id = ?",
            "DELETE FROM media_imports WHERE id = ?",
            "DELETE FROM media_import_instances WHERE import_id = ?",
        ):
            with pytest.raises(sqlite3.DatabaseError, match="never|not allowed"):
                conn.execute(sql, (first["id"],))
    finally:
        conn.close()

    no_reason = media_cli(
        inst,
        "import",
        str(medium),
        "--operator",
        "operator01",
        "--patient-id",
        "H0001",
        "--select",
        "study:1.2",
        "--supersedes",
        str(first["id"]),
        "--no-progress",
    )
    assert no_reason.returncode == 2 and "reason" in no_reason.stderr
    second = do_import(
        inst,
        medium,
        "--select",
        "study:1.2",
        "--supersedes",
        str(first["id"]),
        "--reason",
        "the CT study was left out by mistake",
    )
    assert second["supersedes"] == first["id"]
    assert second["change_reason"] == "the CT study was left out by mistake"
    assert second["importer_id"] == "reception01"
    records = ImportRecords(inst.database)
    assert records.get(first["id"]).superseded_by == second["id"]
    assert records.get(first["id"]).status == "finalized"
    twice = media_cli(
        inst,
        "import",
        str(medium),
        "--operator",
        "reception01",
        "--patient-id",
        "H0001",
        "--select",
        "study:1.1",
        "--supersedes",
        str(first["id"]),
        "--reason",
        "again",
        "--no-progress",
    )
    assert twice.returncode == 2 and "already superseded" in twice.stderr
    listing = media_ok(inst, "imports")
    assert f"superseded by #{second['id']}" in listing
    assert f"supersedes #{first['id']}" in listing
    one = json.loads(media_ok(inst, "imports", "--id", str(first["id"]), "--json"))
    assert len(one["instances"]) == first["instance_count"] and one["superseded_by"] == second["id"]


def test_record_states_only_move_forward(tmp_path: Path) -> None:
    records = ImportRecords(tmp_path / "db.sqlite")
    header = RecordHeader("u1", "Name^One", "ST", "CD", "LABEL", "", "P1", "")
    rid = records.begin(header)
    saved = datetime(2025, 4, 1, 10, tzinfo=UTC)
    records.save(
        rid,
        {"x": 1},
        instance_count=0,
        saved_at=saved,
        finalize_due_at=saved + timedelta(hours=5),
        finalized_by=None,
    )
    from pki.errors import ConflictError

    with pytest.raises(ConflictError):
        records.save(
            rid,
            {"x": 2},
            instance_count=0,
            saved_at=saved,
            finalize_due_at=None,
            finalized_by=("u1", "Name^One"),
        )
    with pytest.raises(ConflictError):
        records.stop(rid, "late", {})
    assert records.due(saved + timedelta(hours=4)) == []
    assert [r.id for r in records.due(saved + timedelta(hours=5))] == [rid]
    assert records.finalize_scheduled(rid, "rad", "Rad^Person", at=saved + timedelta(hours=5))
    assert not records.finalize_scheduled(rid, "rad", "Rad^Person", at=saved + timedelta(hours=6))
    assert records.get(rid).details == {"x": 1}


def test_the_serving_process_finalizes_due_imports(tmp_path: Path) -> None:
    """``sekisho serve`` runs the scheduled finalization task (R-PDI-6)."""
    import time

    from gateway_helpers import running_gateway

    inst = media_instance(
        tmp_path / "sekisho", finalization={**SCHEDULED, "check_interval_seconds": 0.2}
    )
    records = ImportRecords(inst.database)
    header = RecordHeader("reception01", "Uketsuke^Hanako", "ST", "CD", "L", "", "H0001", "")
    saved = datetime.now(UTC) - timedelta(days=1)
    rid = records.begin(header, now=saved)
    records.save(rid, {"stored": []}, instance_count=0, saved_at=saved,
                 finalize_due_at=saved + timedelta(hours=1), finalized_by=None)  # fmt: skip
    with running_gateway(inst):
        deadline = time.monotonic() + 20
        while records.get(rid).status != "finalized" and time.monotonic() < deadline:
            time.sleep(0.1)
    final = records.get(rid)
    assert final.status == "finalized" and final.finalized_by_id == "rad001"
    assert [r.event.actor for r in inst.audit_records(event_id=INSTANCES_ACCESSED)] == ["rad001"]
