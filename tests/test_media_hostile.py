"""Hostile and broken media cannot escape, and the valid selected items still import (R-PDI-8).

Each medium is built by the real writers (pydicom, DCMTK dcmmkdir) and then
corrupted; every case checks the finding, that nothing outside the sink was
written, and that the valid instances of the selection were stored.
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from media_factory import (
    DOE_ASCII,
    FakeSink,
    SeriesSpec,
    StudySpec,
    build_media,
    file_id_bytes,
    make_instance,
    make_iso,
    patch_same_length,
    run_dcmmkdir,
    snapshot,
    write_studies,
)
from pydicom import dcmread, dcmwrite

from media.conformance import FindingCode
from media.importer import ImportResult, run_import
from media.inspect import inspect_media
from media.reconcile import LocalPatient, Operator
from media.report import InstanceStatus, MediaReport
from media.scanner import NullScanner
from media.selection import Selection, plan_import
from media.settings import MediaSettings
from media.source import open_source

TARGET = LocalPatient("H0001", "SEKISHO", "Doe^John", "19600315", "M")
OPERATOR = Operator("u001", "Uketsuke^Hanako")
NOW = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
FIRST = "DICOM/ST000001/SE000001/IM000001"
SECOND = "DICOM/ST000001/SE000001/IM000002"


def one_patient_studies() -> list[StudySpec]:
    return [StudySpec(DOE_ASCII, [SeriesSpec("CT", 3), SeriesSpec("CR", 1)], "CHEST", "A1")]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    build_media(root, one_patient_studies())
    return root


@pytest.fixture
def medium(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "medium"
    shutil.copytree(pristine, root, symlinks=True)
    return root


def inspect_and_import(
    root: Path, tmp_path: Path, selection: Selection | None = None
) -> tuple[MediaReport, ImportResult, FakeSink]:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    settings = MediaSettings(scanner_required=False, work_dir=work)
    sink = FakeSink(work)
    before = snapshot(root)
    with open_source(root, settings) as src:
        report = inspect_media(src, settings)
        plan = plan_import(report, selection or Selection.parse(["patient:1"]))
        result = run_import(
            src, plan, TARGET, OPERATOR, settings.station, settings, NullScanner(), sink, now=NOW
        )
    assert snapshot(root) == before, "the medium was modified"
    assert list(work.iterdir()) == [], "temporary files were left behind"
    return report, result, sink


def codes(report: MediaReport) -> set[FindingCode]:
    return {f.code for f in report.findings}


def stored_paths(result: ImportResult) -> set[str]:
    return {i.path for i in result.imported}


def all_instance_paths(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / "DICOM").rglob("IM*")}


@pytest.mark.parametrize(
    ("hostile", "label"),
    [
        (b"..\\..\\..\\..\\..\\..\\ETC\\PASSWD", "dot-dot"),
        (b"\\ETC\\PASSWD", "absolute-backslash"),
        (b"/etc/passwd", "absolute-slash"),
        (b"C:\\WINDOWS\\WIN_INI", "drive"),
    ],
)
def test_hostile_file_ids_are_refused(
    medium: Path, tmp_path: Path, hostile: bytes, label: str
) -> None:
    patch_same_length(medium / "DICOMDIR", file_id_bytes(FIRST), hostile)
    report, result, sink = inspect_and_import(medium, tmp_path)
    hostile_findings = [f for f in report.findings if f.code is FindingCode.FILE_ID_HOSTILE]
    assert len(hostile_findings) == 1, label
    refused = [i for *_x, i in report.instances() if i.status is InstanceStatus.REFUSED]
    assert len(refused) == 1 and refused[0].path is None
    assert all(".." not in f.path and not f.path.startswith("/") for f in report.files)
    # The real file is still on the medium, now unreferenced: it is reported and
    # shown from its own header, so every genuine instance is still imported.
    assert FindingCode.UNREFERENCED_DICOM_FILE in codes(report)
    assert stored_paths(result) == all_instance_paths(medium)
    assert len(sink.stored) == 4


def test_symlink_out_of_the_medium_is_refused(medium: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(medium / SECOND, outside / "IM000002")
    os.symlink(outside / "IM000002", medium / SECOND)
    report, result, sink = inspect_and_import(medium, tmp_path)
    assert {FindingCode.SYMLINK, FindingCode.FILE_ID_NOT_A_FILE} <= codes(report)
    assert SECOND in report.never_imported
    assert SECOND not in report.file_hashes()  # never read
    assert SECOND not in result.media_sha256
    assert stored_paths(result) == all_instance_paths(medium) - {SECOND}
    assert len(sink.stored) == 3


def test_symlinked_folder_is_not_entered(medium: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.move(medium / "DICOM" / "ST000001" / "SE000002", outside)
    os.symlink(outside, medium / "DICOM" / "ST000001" / "SE000002")
    report, result, _sink = inspect_and_import(medium, tmp_path)
    link_findings = [f for f in report.findings if f.code is FindingCode.FILE_ID_NOT_A_FILE]
    assert link_findings and "link" in link_findings[0].message
    assert not any("SE000002" in p for p in result.media_sha256)
    assert len(result.imported) == 3


def test_truncated_file_is_reported_and_skipped(medium: Path, tmp_path: Path) -> None:
    data = (medium / SECOND).read_bytes()
    (medium / SECOND).write_bytes(data[:-10])
    report, result, sink = inspect_and_import(medium, tmp_path)
    truncated = [f for f in report.findings if f.code is FindingCode.TRUNCATED_DICOM]
    assert [f.path for f in truncated] == [SECOND]
    [entry] = [i for *_x, i in report.instances() if i.path == SECOND]
    assert entry.status is InstanceStatus.MALFORMED and entry.sha256 is not None
    assert stored_paths(result) == all_instance_paths(medium) - {SECOND}
    assert len(sink.stored) == 3


def test_file_cut_before_its_pixel_data_is_truncated(medium: Path, tmp_path: Path) -> None:
    data = (medium / SECOND).read_bytes()
    cut = data.rfind(b"\xe0\x7f\x10\x00")  # Pixel Data tag, explicit VR little endian
    (medium / SECOND).write_bytes(data[:cut])
    report, result, _sink = inspect_and_import(medium, tmp_path)
    assert FindingCode.TRUNCATED_DICOM in codes(report)
    assert SECOND not in stored_paths(result)


def test_garbage_in_place_of_a_dicom_file(medium: Path, tmp_path: Path) -> None:
    (medium / SECOND).write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 300)
    report, result, _sink = inspect_and_import(medium, tmp_path)
    assert FindingCode.MALFORMED_DICOM in codes(report)
    assert len(result.imported) == 3


def test_dicomdir_pointing_at_missing_files(medium: Path, tmp_path: Path) -> None:
    (medium / SECOND).unlink()
    (medium / "DICOM" / "ST000001" / "SE000002" / "IM000001").unlink()
    report, result, _sink = inspect_and_import(medium, tmp_path)
    missing = sorted(f.path for f in report.findings if f.code is FindingCode.RECORD_FILE_MISSING)
    assert missing == ["DICOM\\ST000001\\SE000001\\IM000002", "DICOM\\ST000001\\SE000002\\IM000001"]
    statuses = [i.status for *_x, i in report.instances()]
    assert statuses.count(InstanceStatus.MISSING) == 2
    assert len(result.imported) == 2


def test_autorun_and_programs_are_listed_never_read_or_imported(
    medium: Path, tmp_path: Path
) -> None:
    (medium / "AUTORUN.INF").write_text("[autorun]\nopen=SETUP.EXE\n")
    (medium / "SETUP.EXE").write_bytes(b"MZ" + b"\x00" * 200)
    (medium / "VIEWER").mkdir()
    (medium / "VIEWER" / "VIEWER.EXE").write_bytes(b"MZ" + b"\x90" * 100)
    (medium / "VIEWER" / "DATA.BIN").write_bytes(b"\x00" * 50)
    (medium / "RUN.SH").write_text("#!/bin/sh\nrm -rf /\n")
    (medium / "README").write_bytes(b"\x7fELF" + b"\x00" * 60)  # a program without extension
    report, result, _sink = inspect_and_import(medium, tmp_path)
    found = codes(report)
    assert {
        FindingCode.AUTORUN,
        FindingCode.EXECUTABLE,
        FindingCode.SCRIPT,
        FindingCode.VIEWER_FOLDER,
    } <= found
    for path in ("AUTORUN.INF", "SETUP.EXE", "VIEWER/VIEWER.EXE", "VIEWER/DATA.BIN", "RUN.SH"):
        assert path in report.never_imported
        assert path not in report.file_hashes()
    readme = [f for f in report.findings if f.path == "README"]
    assert readme and readme[0].code is FindingCode.EXECUTABLE
    plan_reasons = {e.what: e.reason for e in plan_import(report, Selection()).excluded}
    assert plan_reasons["SETUP.EXE"].startswith("never imported")
    assert stored_paths(result) == all_instance_paths(medium)


def test_dicom_preamble_carrying_a_program_is_disarmed(medium: Path, tmp_path: Path) -> None:
    data = bytearray((medium / SECOND).read_bytes())
    data[0:2] = b"MZ"  # PE/DICOM polyglot: the preamble is a Windows program header
    (medium / SECOND).write_bytes(bytes(data))
    report, result, sink = inspect_and_import(medium, tmp_path)
    polyglot = [f for f in report.findings if f.code is FindingCode.EXECUTABLE]
    assert [f.path for f in polyglot] == [SECOND]
    uid = next(i.sop_instance_uid for i in result.imported if i.path == SECOND)
    assert sink.stored[uid][:128] == b"\x00" * 128


def test_fifo_on_the_medium_is_never_opened(medium: Path, tmp_path: Path) -> None:
    os.mkfifo(medium / "PIPE")
    report, result, _sink = inspect_and_import(medium, tmp_path)
    assert FindingCode.SPECIAL_FILE in codes(report)
    assert "PIPE" in report.never_imported
    assert len(result.imported) == 4


def test_dicomdir_that_is_garbage_falls_back_to_scanning(medium: Path, tmp_path: Path) -> None:
    (medium / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(500))
    report, result, _sink = inspect_and_import(medium, tmp_path)
    assert not report.dicomdir_used
    assert FindingCode.DICOMDIR_UNREADABLE in codes(report)
    assert stored_paths(result) == all_instance_paths(medium)


def test_dicomdir_with_a_record_loop_is_cut(medium: Path, tmp_path: Path) -> None:
    from pydicom.tag import Tag

    ds = dcmread(medium / "DICOMDIR")
    records = list(ds.DirectoryRecordSequence)
    image = next(r for r in records if r.DirectoryRecordType == "IMAGE")
    offset_bytes = image.seq_item_tell.to_bytes(4, "little")
    data = (medium / "DICOMDIR").read_bytes()
    # Make the first IMAGE record's "next" offset point at itself.
    next_tag = Tag(0x0004, 0x1400)
    marker = next_tag.group.to_bytes(2, "little") + next_tag.element.to_bytes(2, "little") + b"UL"
    at = data.index(marker, image.seq_item_tell)
    patched = data[: at + 8] + offset_bytes + data[at + 12 :]
    (medium / "DICOMDIR").write_bytes(patched)
    report, result, _sink = inspect_and_import(medium, tmp_path)
    assert FindingCode.RECORD_LOOP in codes(report)
    assert len(result.imported) == 4  # the unlinked ones are found by the scan


def test_lowercase_names_without_dicomdir_import(tmp_path: Path) -> None:
    root = tmp_path / "usb"
    study = StudySpec(DOE_ASCII, [SeriesSpec("CR", 2)])
    (root / "dicom").mkdir(parents=True)
    for i in range(2):
        dcmwrite(root / "dicom" / f"image{i}.dcm", make_instance(study, study.series[0], 1, i + 1),
                 enforce_file_format=True)  # fmt: skip
    report, result, sink = inspect_and_import(root, tmp_path)
    assert FindingCode.DICOMDIR_MISSING in codes(report)
    assert len(result.imported) == 2 and len(sink.stored) == 2


def test_hostile_iso_image(tmp_path: Path) -> None:
    root = tmp_path / "src"
    write_studies(root, one_patient_studies())
    run_dcmmkdir(root)
    patch_same_length(root / "DICOMDIR", file_id_bytes(FIRST), b"..\\..\\ETC\\PASSWD")
    (root / "AUTORUN.INF").write_text("[autorun]\n")
    os.symlink("/etc/passwd", root / "PASSWD")
    image = make_iso(root, tmp_path / "hostile.iso")
    report, result, _sink = inspect_and_import(image, tmp_path)
    assert {FindingCode.FILE_ID_HOSTILE, FindingCode.AUTORUN, FindingCode.SYMLINK} <= codes(report)
    assert len(result.imported) == 4
