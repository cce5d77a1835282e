"""Malware scanning with a real ClamAV daemon stops the import and is audited (R-PDI-2).

``clamd`` runs from a temporary folder with a local signature database for the
EICAR test string (see :class:`test_import_helpers.Clamd`).  A medium holding
EICAR -- as a program next to the studies, or inside a selected DICOM file --
is stopped before anything is stored; the import record says so and names the
importer; the audit trail has a Security Alert and the failed Import event,
and still verifies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gateway_helpers import Instance, run_sekisho
from media_factory import DOE_ASCII, SeriesSpec, StudySpec, build_media, make_instance
from pydicom import dcmwrite
from test_import_helpers import (  # noqa: F401 - the clamd fixture
    EICAR,
    IMPORT_EVENT,
    SECURITY_ALERT,
    Clamd,
    clamd,
    media_cli,
    media_instance,
    media_ok,
)

from gateway.imports.records import ImportRecords


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "CD"
    build_media(root, [StudySpec(DOE_ASCII, [SeriesSpec("CT", 2), SeriesSpec("CR", 1)])])
    return root


@pytest.fixture
def medium(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "medium" / "CD"
    shutil.copytree(pristine, root)
    return root


def scanning_instance(root: Path, clamd: Clamd, **scanner: object) -> Instance:  # noqa: F811
    return media_instance(
        root,
        scanner={"kind": "clamd", "socket": str(clamd.socket), "required": True, **scanner},
    )


def import_args(medium: Path) -> tuple[str, ...]:
    return (
        "import",
        str(medium),
        "--operator",
        "reception01",
        "--patient-id",
        "H0001",
        "--select",
        "1",
        "--no-progress",
    )


def assert_stopped_and_audited(inst: Instance, proc_stderr: str, signature: str) -> None:
    assert "malware" in proc_stderr
    assert inst.indexed_instances() == {} and inst.object_files() == {}
    assert list(inst.store_tmp.iterdir()) == []
    [record] = ImportRecords(inst.database).query()
    assert record.status == "stopped" and record.stop_reason == "malware detected"
    assert record.importer_id == "reception01" and record.instance_count == 0
    scanner = record.details["scanner"]
    assert scanner["verdict"] == "malware"
    assert any(d["signature"].startswith(signature) for d in scanner["detections"])
    assert scanner["engine"].startswith("clamd")
    [alert] = [r.event for r in inst.audit_records(event_id=SECURITY_ALERT)]
    assert alert.reason_code == "malware-detected"
    assert (alert.actor, alert.actor_kind) == ("reception01", "user")
    assert alert.event_type_codes[0].value == "MALWARE"
    assert alert.extra["import_id"] == str(record.id)
    assert signature in alert.extra["signatures"]
    [failed] = [r.event for r in inst.audit_records(event_id=IMPORT_EVENT)]
    assert failed.outcome == 12 and failed.actor == "reception01" and failed.instance_count == 0
    assert failed.patient_id == "H0001"
    verify = run_sekisho("audit", "verify", config=inst.config)
    assert verify.returncode == 0, verify.stderr


def test_clean_medium_is_scanned_then_imported(
    clamd: Clamd,  # noqa: F811
    medium: Path,
    tmp_path: Path,
) -> None:
    inst = scanning_instance(tmp_path / "sekisho", clamd)
    out = json.loads(media_ok(inst, *import_args(medium), "--json"))
    record = out["record"]
    assert record["status"] == "finalized" and record["instance_count"] == 3
    scanner = record["details"]["scanner"]
    assert scanner["verdict"] == "clean" and scanner["engine"].startswith("clamd")
    assert scanner["selected_files_scanned"] == 3 == scanner["selected_files_clean"]
    assert scanner["other_files"]["scanned"] == 1  # the DICOMDIR


def test_eicar_program_on_the_medium_stops_the_import(
    clamd: Clamd,  # noqa: F811
    medium: Path,
    tmp_path: Path,
) -> None:
    (medium / "EICAR.COM").write_bytes(EICAR)  # never imported, but on the medium
    inst = scanning_instance(tmp_path / "sekisho", clamd)
    proc = media_cli(inst, *import_args(medium))
    assert proc.returncode == 2, proc.stdout
    assert_stopped_and_audited(inst, proc.stderr, "Sekisho.Test.EICAR")


def test_eicar_inside_a_selected_dicom_file_stops_the_import(
    clamd: Clamd,  # noqa: F811
    medium: Path,
    tmp_path: Path,
) -> None:
    study = StudySpec(DOE_ASCII, [SeriesSpec("CT", 1)])
    ds = make_instance(study, study.series[0], 1, 1)
    ds.ImageComments = EICAR.decode("ascii")
    target = medium / "DICOM" / "ST000001" / "SE000001" / "IM000002"
    dcmwrite(target, ds, enforce_file_format=True)  # the DICOMDIR still references it
    inst = scanning_instance(tmp_path / "sekisho", clamd)
    proc = media_cli(inst, *import_args(medium))
    assert proc.returncode == 2, proc.stdout
    assert_stopped_and_audited(inst, proc.stderr, "Sekisho.Test.EICAR.Body")


def test_scope_selected_scans_only_what_is_imported(
    clamd: Clamd,  # noqa: F811
    medium: Path,
    tmp_path: Path,
) -> None:
    (medium / "EICAR.COM").write_bytes(EICAR)
    inst = scanning_instance(tmp_path / "sekisho", clamd, scope="selected")
    record = json.loads(media_ok(inst, *import_args(medium), "--json"))["record"]
    assert record["instance_count"] == 3
    assert record["details"]["scanner"]["other_files"]["scanned"] == 0
    assert "EICAR.COM" in record["details"]["plan"]["excluded"][-1]["what"]


def test_unreachable_required_scanner_stops_the_import(medium: Path, tmp_path: Path) -> None:
    inst = media_instance(
        tmp_path / "sekisho",
        scanner={"kind": "clamd", "socket": str(tmp_path / "no-clamd.sock"), "required": True},
    )
    proc = media_cli(inst, *import_args(medium))
    assert proc.returncode == 2 and "malware scanner" in proc.stderr
    assert inst.indexed_instances() == {}
    [record] = ImportRecords(inst.database).query()
    assert record.status == "stopped" and record.stop_reason == "scanner unavailable"
    [event] = [r.event for r in inst.audit_records(event_id=IMPORT_EVENT)]
    assert event.outcome == 8 and event.actor == "reception01"


def test_scanner_none_must_be_explicitly_optional(tmp_path: Path) -> None:
    inst = media_instance(tmp_path / "sekisho")
    inst.update_config({"media": {"scanner": {"kind": "none", "required": True}}})
    proc = run_sekisho("check-config", config=inst.config)
    assert proc.returncode != 0 and "media.scanner" in proc.stderr + proc.stdout
