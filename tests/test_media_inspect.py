"""Inspecting conformant and tolerated media (R-PDI-1, R-PDI-3)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from media_factory import (
    DOE_ASCII,
    SUZUKI_UTF8,
    YAMADA_IR87,
    SeriesSpec,
    StudySpec,
    build_large_media,
    build_media,
    make_instance,
    make_iso,
    standard_studies,
)
from pydicom import dcmwrite
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet

from media.conformance import FindingCode, Severity
from media.inspect import inspect_media
from media.report import InstanceStatus, MediaReport
from media.settings import MediaSettings
from media.source import open_source

SETTINGS = MediaSettings()
PYDICOM_DIR = Path(get_testdata_file("DICOMDIR")).parent


def inspect(path: Path) -> MediaReport:
    with open_source(path, SETTINGS) as src:
        return inspect_media(src, SETTINGS)


def codes(report: MediaReport) -> set[FindingCode]:
    return {f.code for f in report.findings}


def comparable(report: MediaReport) -> dict[str, object]:
    data = report.to_dict()
    data.pop("source_kind")
    data.pop("label")
    return data


@pytest.fixture(scope="module")
def gp_medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gp")
    build_media(root, profile="-Pgp")
    return root


def test_dcmmkdir_general_purpose_medium_is_read(gp_medium: Path) -> None:
    report = inspect(gp_medium)
    assert report.dicomdir_used and report.dicomdir_path == "DICOMDIR"
    assert report.file_set_id == "DCMTK_MEDIA_DEMO"
    assert not [f for f in report.findings if f.severity is not Severity.INFO], report.findings
    by_id = {p.patient_id: p for p in report.patients}
    assert set(by_id) == {"OTH-0001", "OTH-0002", "OTH-0003"}
    yamada = by_id["OTH-0001"]
    assert yamada.name == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert b"\x1b$B" in yamada.name_raw  # ISO 2022 IR 87 bytes kept as stored
    assert yamada.character_set == ("", "ISO 2022 IR 87")
    assert (yamada.birth_date, yamada.sex, yamada.issuer_of_patient_id) == (
        "19700102",
        "M",
        "OTHER_HOSP",
    )
    ct_study = next(s for s in yamada.studies if s.accession_number == "A1001")
    assert ct_study.description == "胸部CT"
    assert ct_study.institution_name == "Other Hospital"
    assert [s.number_of_images for s in ct_study.series] == [3, 2]
    assert ct_study.modalities == ["CT"]
    suzuki = by_id["OTH-0002"]
    assert suzuki.name == "Suzuki^Hanako=鈴木^花子=すずき^はなこ"
    assert suzuki.character_set == ("ISO_IR 192",)
    assert suzuki.studies[0].series[0].modality == "MR"
    assert by_id["OTH-0003"].studies[0].series[0].modality == "CR"
    assert report.number_of_instances == sum(
        s.count for st in standard_studies() for s in st.series
    )


def test_each_instance_has_identifiers_path_and_hash(gp_medium: Path) -> None:
    report = inspect(gp_medium)
    for _p, _s, _r, inst in report.instances():
        assert inst.status is InstanceStatus.OK and inst.referenced
        assert inst.sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.")
        assert inst.transfer_syntax_uid == "1.2.840.10008.1.2.1"
        assert inst.file_id == inst.path.replace("/", "\\")
        data = (gp_medium / inst.path).read_bytes()
        assert inst.sha256 == hashlib.sha256(data).hexdigest()
        assert inst.size == len(data)
    dicomdir = (gp_medium / "DICOMDIR").read_bytes()
    assert report.file_hashes()["DICOMDIR"] == hashlib.sha256(dicomdir).hexdigest()
    json.dumps(report.to_dict())  # the CLI's --json must always work
    assert "[1.1.1]" in report.to_text()


def test_dvd_profile_medium_gives_the_same_hierarchy(gp_medium: Path, tmp_path: Path) -> None:
    dvd = tmp_path / "dvd"
    shutil.copytree(gp_medium / "DICOM", dvd / "DICOM")
    from media_factory import run_dcmmkdir

    run_dcmmkdir(dvd, profile="-Pdv")
    a, b = inspect(gp_medium), inspect(dvd)
    assert [p.to_dict()["studies"] for p in a.patients] == [
        p.to_dict()["studies"] for p in b.patients
    ]


@pytest.mark.parametrize("extensions", [(True, True), (False, True), (False, False)])
def test_iso_image_gives_the_same_report(
    gp_medium: Path, tmp_path: Path, extensions: tuple[bool, bool]
) -> None:
    rock_ridge, joliet = extensions
    image = make_iso(gp_medium, tmp_path / "m.iso", rock_ridge=rock_ridge, joliet=joliet)
    folder_report, iso_report = inspect(gp_medium), inspect(image)
    assert iso_report.source_kind == "iso" and iso_report.label == "PDI_TEST"
    assert comparable(iso_report) == comparable(folder_report)


def _pydicom_medium(tmp_path: Path, variant: str | None = None) -> Path:
    root = tmp_path / "pydicom"
    shutil.copytree(PYDICOM_DIR, root)
    if variant is not None:
        shutil.copyfile(root / variant, root / "DICOMDIR")
    return root


def _fileset_instances(root: Path) -> set[tuple[str, str, str]]:
    fs = FileSet(root / "DICOMDIR")
    out = set()
    for instance in fs:
        rel = Path(instance.path).relative_to(root).as_posix()
        out.add((rel, instance.SOPInstanceUID, instance.PatientID))
    return out


def _report_instances(report: MediaReport) -> set[tuple[str, str, str]]:
    return {
        (inst.path, inst.sop_instance_uid, patient.patient_id)
        for patient, _s, _r, inst in report.instances()
        if inst.referenced
    }


def test_pydicom_test_dicomdir_matches_pydicom_fileset(tmp_path: Path) -> None:
    root = _pydicom_medium(tmp_path)
    report = inspect(root)
    assert _report_instances(report) == _fileset_instances(root)
    assert len(_report_instances(report)) == 31
    names = {p.name for p in report.patients}
    assert {"Doe^Archibald", "Doe^Peter"} <= names
    # The other DICOMDIR variants in that folder are directory files, not instances.
    assert FindingCode.EXTRA_DICOMDIR in codes(report)
    # TINY_ALPHA's files are not in the root DICOMDIR: still shown, and reported.
    unreferenced = [f for f in report.findings if f.code is FindingCode.UNREFERENCED_DICOM_FILE]
    assert len(unreferenced) == 50
    assert all(f.path.startswith("TINY_ALPHA/") for f in unreferenced)


@pytest.mark.parametrize(
    "variant", ["DICOMDIR-implicit", "DICOMDIR-bigEnd", "DICOMDIR-reordered", "DICOMDIR-nooffset"]
)
def test_pydicom_dicomdir_variants_give_the_same_instances(tmp_path: Path, variant: str) -> None:
    expected = _report_instances(inspect(_pydicom_medium(tmp_path / "base")))
    report = inspect(_pydicom_medium(tmp_path / "v", variant))
    assert report.dicomdir_used
    assert _report_instances(report) == expected


def test_dicomdir_without_patient_records_still_lists_the_instances(tmp_path: Path) -> None:
    report = inspect(_pydicom_medium(tmp_path, "DICOMDIR-nopatient"))
    assert report.dicomdir_used
    uids = {inst.sop_instance_uid for *_x, inst in report.instances()}
    assert len(uids) >= 31
    assert FindingCode.RECORD_OUT_OF_PLACE in codes(report)


def test_no_dicomdir_lowercase_dcm_names_are_found_by_scanning(tmp_path: Path) -> None:
    root = tmp_path / "usb"
    study = StudySpec(SUZUKI_UTF8, [SeriesSpec("MR", 3)], "頭部MRI")
    (root / "images" / "study1").mkdir(parents=True)
    for i in range(3):
        dcmwrite(
            root / "images" / "study1" / f"img{i}.dcm",
            make_instance(study, study.series[0], 1, i + 1),
            enforce_file_format=True,
        )
    (root / "notes.txt").write_text("not dicom")
    report = inspect(root)
    found = codes(report)
    assert not report.dicomdir_used
    assert {
        FindingCode.DICOMDIR_MISSING,
        FindingCode.FILE_ID_LOWERCASE,
        FindingCode.FILE_ID_EXTENSION,
        FindingCode.NON_DICOM_FILE,
    } <= found
    assert FindingCode.UNREFERENCED_DICOM_FILE not in found  # no DICOMDIR to compare with
    assert report.number_of_instances == 3
    series = report.patients[0].studies[0].series[0]
    assert [i.path for i in series.instances] == [f"images/study1/img{i}.dcm" for i in range(3)]
    assert report.patients[0].name == "Suzuki^Hanako=鈴木^花子=すずき^はなこ"


def test_file_without_preamble_is_accepted_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    study = StudySpec(DOE_ASCII, [SeriesSpec("CR", 1)])
    ds = make_instance(study, study.series[0], 1, 1)
    del ds.file_meta
    dcmwrite(root / "IMG", ds, implicit_vr=True, little_endian=True)
    assert (root / "IMG").read_bytes()[128:132] != b"DICM"
    report = inspect(root)
    assert FindingCode.NO_PREAMBLE in codes(report)
    [(_p, _s, _r, inst)] = list(report.instances())
    assert inst.importable and inst.transfer_syntax_uid == "1.2.840.10008.1.2"


def test_file_ids_are_resolved_case_insensitively(gp_medium: Path, tmp_path: Path) -> None:
    root = tmp_path / "case"
    shutil.copytree(gp_medium, root)
    target = root / "DICOM" / "ST000001" / "SE000001" / "IM000002"
    target.rename(target.with_name("im000002"))
    report = inspect(root)
    assert FindingCode.FILE_ID_CASE_MISMATCH in codes(report)
    paths = {inst.path for *_x, inst in report.instances() if inst.importable}
    assert "DICOM/ST000001/SE000001/im000002" in paths
    assert FindingCode.RECORD_FILE_MISSING not in codes(report)


def test_unreferenced_dicom_file_is_shown_and_reported(gp_medium: Path, tmp_path: Path) -> None:
    root = tmp_path / "extra"
    shutil.copytree(gp_medium, root)
    study = StudySpec(YAMADA_IR87, [SeriesSpec("CT", 1)], accession="EXTRA")
    (root / "EXTRA").mkdir()
    dcmwrite(root / "EXTRA" / "IM1", make_instance(study, study.series[0], 1, 1),
             enforce_file_format=True)  # fmt: skip
    report = inspect(root)
    hits = [f for f in report.findings if f.code is FindingCode.UNREFERENCED_DICOM_FILE]
    assert [f.path for f in hits] == ["EXTRA/IM1"]
    assert any(s.accession_number == "EXTRA" for p in report.patients for s in p.studies)


def test_ten_thousand_entry_dicomdir(tmp_path: Path) -> None:
    root = tmp_path / "big"
    build_large_media(root, 10_000)
    report = inspect(root)
    assert report.dicomdir_used
    assert report.number_of_instances == 10_000
    assert sum(1 for *_x, i in report.instances() if i.importable) == 10_000
    assert len(report.patients) == 1 and len(report.patients[0].studies) == 1
    assert len(report.patients[0].studies[0].series) == 100
    assert not report.has_errors()
