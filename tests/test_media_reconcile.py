"""Patient reconciliation and the importer's responsibility (R-PDI-4, R-PDI-5).

The written files are checked with DCMTK ``dcmdump``, not only with pydicom.
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from media_factory import DOE_ASCII, SUZUKI_UTF8, YAMADA_IR87, PatientSpec, SeriesSpec, StudySpec
from media_factory import make_instance as factory_instance
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset

from media.reconcile import (
    LocalPatient,
    MediaDemographics,
    Operator,
    check_demographics,
    compare_demographics,
    reconcile,
    reconcile_instance,
)
from media.settings import StationInfo
from pki.errors import InvalidInputError, ReconciliationError

JST = timezone(timedelta(hours=9))
NOW = datetime(2024, 3, 1, 9, 30, 15, tzinfo=JST)
STATION = StationInfo(
    station_name="RECEPTION1",
    institution_name="関所病院",
    institution_name_alphabetic="Sekisho Hospital",
    manufacturer="Sekisho",
)
OPERATOR = Operator("u001", "Uketsuke^Hanako=受付^花子")


def instance(patient: PatientSpec, tmp_path: Path) -> Path:
    study = StudySpec(patient, [SeriesSpec("CT", 1)], accession="MEDIA-ACC")
    path = tmp_path / f"in-{patient.patient_id}.dcm"
    dcmwrite(path, factory_instance(study, study.series[0], 1, 1), enforce_file_format=True)
    return path


def reconcile_file(src: Path, target: LocalPatient, out: Path, **kw: object) -> Dataset:
    ds = dcmread(src)
    reconcile(ds, target, importer=OPERATOR, station=STATION, now=NOW, **kw)  # type: ignore[arg-type]
    dcmwrite(out, ds, enforce_file_format=True)
    return dcmread(out)


def dcmdump(path: Path) -> str:
    proc = subprocess.run(["dcmdump", "+U8", str(path)], capture_output=True)
    if proc.returncode != 0:  # DCMTK's iconv cannot convert ISO 2022 IR 87; dump raw bytes
        proc = subprocess.run(["dcmdump", str(path)], capture_output=True, check=True)
    return proc.stdout.decode("utf-8", "replace")


def section(dump: str, start_tag: str) -> str:
    lines = dump.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(start_tag))
    out = [lines[start]]
    for line in lines[start + 1 :]:
        if line.startswith("("):  # back at top level
            break
        out.append(line)
    return "\n".join(out)


def test_utf8_instance_reconciled_and_checked_with_dcmdump(tmp_path: Path) -> None:
    src = instance(SUZUKI_UTF8, tmp_path)
    original = dcmread(src)
    target = LocalPatient("H123456", "SEKISHO_HOSP", "Suzuki^Hanako=鈴木^花子", "19851224", "F")
    out = tmp_path / "out.dcm"
    result = reconcile_file(src, target, out, accession_number="L0001")
    assert result.PatientID == "H123456" and result.IssuerOfPatientID == "SEKISHO_HOSP"
    assert result.AccessionNumber == "L0001"
    assert result.InstanceOriginStatus == "IMPORTED"
    for uid in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert result[uid].value == original[uid].value
    dump = dcmdump(out)
    equipment = section(dump, "(0018,a001)")
    assert "(0008,0100) SH [MEDIM]" in equipment
    assert "(0008,0102) SH [DCM]" in equipment
    assert "[Portable Media Importer Equipment]" in equipment
    assert "(0008,1070) PN [Uketsuke^Hanako=受付^花子]" in equipment
    assert "(0008,0080) LO [関所病院]" in equipment
    assert "(0008,1010) SH [RECEPTION1]" in equipment
    assert "(0018,a002) DT [20240301093015.000000+0900]" in equipment
    assert "[u001]" in equipment  # Operator Identification Sequence
    others = section(dump, "(0010,1002)")
    assert "(0010,0020) LO [OTH-0002]" in others
    assert "(0010,0021) LO [OTHER_HOSP]" in others
    assert "(0010,0022) CS [TEXT]" in others
    originals = section(dump, "(0400,0561)")
    assert "(0010,0020) LO [OTH-0002]" in originals
    assert "(0010,0021) LO [OTHER_HOSP]" in originals
    assert "(0008,0050) SH [MEDIA-ACC]" in originals
    assert "(0400,0565) CS [COERCE]" in originals
    assert "(0400,0563) LO [SEKISHO]" in originals
    assert "(0400,0562) DT [20240301093015.000000+0900]" in originals
    assert "(0400,0564) LO [Other Hospital]" in originals
    assert "(0400,0600) CS [IMPORTED]" in dump


def test_iso_2022_ir87_instance_keeps_its_bytes(tmp_path: Path) -> None:
    src = instance(YAMADA_IR87, tmp_path)
    raw_before = src.read_bytes()
    name_bytes = raw_before[raw_before.index(b"Yamada") :].split(b"\x10\x00\x20\x00")[0]
    target = LocalPatient("H777", "SEKISHO", "Yamada^Tarou=山田^太郎", "19700102", "M")
    out = tmp_path / "out.dcm"
    result = reconcile_file(src, target, out)
    written = out.read_bytes()
    # The name agreed with the local one, so it is not coerced: same bytes.
    assert written.count(name_bytes) == 1
    assert result.SpecificCharacterSet == ["", "ISO 2022 IR 87"]
    dump = dcmdump(out)
    equipment = section(dump, "(0018,a001)")
    # ISO 2022 IR 87: the operator's kanji are written with the JIS X 0208 escape.
    assert "Uketsuke^Hanako=\x1b$B" in equipment
    originals = section(dump, "(0400,0561)")
    assert "[OTH-0001]" in originals and "PatientName" not in originals


def test_ascii_instance_gets_alphabetic_values_only(tmp_path: Path) -> None:
    src = instance(DOE_ASCII, tmp_path)
    target = LocalPatient("H555", "", "Yamada^Tarou=山田^太郎", None, None)
    ds = dcmread(src)
    outcome = reconcile_instance(ds, target, importer=OPERATOR, station=STATION, now=NOW)
    assert str(ds.PatientName) == "Yamada^Tarou"
    assert any("alphabetic part" in n for n in outcome.notes)
    item = ds.ContributingEquipmentSequence[-1]
    assert str(item.OperatorsName) == "Uketsuke^Hanako"
    assert item.InstitutionName == "Sekisho Hospital"
    assert "IssuerOfPatientID" not in ds  # the medium's issuer no longer applies
    modified = ds.OriginalAttributesSequence[-1].ModifiedAttributesSequence[0]
    assert str(modified.PatientName) == "Doe^John"
    assert "PatientName" in outcome.coerced


def test_operator_name_that_fits_nowhere_falls_back_to_the_id(tmp_path: Path) -> None:
    ds = dcmread(instance(DOE_ASCII, tmp_path))
    outcome = reconcile_instance(
        ds, LocalPatient("H1"), importer=Operator("u42", "受付^花子"), station=STATION, now=NOW
    )
    assert str(ds.ContributingEquipmentSequence[-1].OperatorsName) == "u42"
    assert any("operator ID" in n for n in outcome.notes)


def test_existing_sequences_are_appended_not_replaced(tmp_path: Path) -> None:
    ds = dcmread(instance(DOE_ASCII, tmp_path))
    previous = Dataset()
    previous.Manufacturer = "Earlier"
    ds.ContributingEquipmentSequence = [previous]
    reconcile(ds, LocalPatient("H1"), importer=OPERATOR, station=STATION, now=NOW)
    reconcile(ds, LocalPatient("H2"), importer=OPERATOR, station=STATION, now=NOW)
    assert [i.Manufacturer for i in ds.ContributingEquipmentSequence] == [
        "Earlier",
        "Sekisho",
        "Sekisho",
    ]
    assert len(ds.OriginalAttributesSequence) == 2
    assert [i.PatientID for i in ds.OtherPatientIDsSequence] == ["OTH-0003", "H1"]


def test_same_local_id_is_not_coerced(tmp_path: Path) -> None:
    ds = dcmread(instance(DOE_ASCII, tmp_path))
    outcome = reconcile_instance(
        ds, LocalPatient("OTH-0003"), importer=OPERATOR, station=STATION, now=NOW
    )
    assert outcome.coerced == []
    assert "OtherPatientIDsSequence" not in ds and "OriginalAttributesSequence" not in ds
    assert ds.InstanceOriginStatus == "IMPORTED"
    assert len(ds.ContributingEquipmentSequence) == 1


@pytest.mark.parametrize(
    ("media", "local", "fields"),
    [
        (("Yamada^Tarou", "19700102", "M"), ("YAMADA^TAROU", "19700102", "M"), []),
        (("Yamada^Tarou=山田^太郎=やまだ^たろう", "", ""), ("山田^太郎", None, None), []),
        (("Yamada^Tarou=山田^太郎=やまだ^たろう", "", ""), ("ヤマダ^タロウ", None, None), []),
        (("ＹＡＭＡＤＡ^ＴＡＲＯＵ", "", ""), ("yamada ^ tarou", None, None), []),
        (("Yamada^Tarou^^^", "", ""), ("Yamada^Tarou", None, None), []),
        (("Yamada^Tarou=山田^太郎", "", ""), ("Yamada^Tarou=山本^太郎", None, None), ["name"]),
        (("Yamada^Tarou", "", ""), ("山田^太郎", None, None), ["name"]),  # nothing comparable
        (("Suzuki^Hanako", "19851224", "F"), ("Suzuki^Hanako", "19851225", "M"),
         ["birth_date", "sex"]),
        (("Suzuki^Hanako", "", ""), ("Suzuki^Hanako", "19851225", "F"), []),  # absent: no clash
    ],
)  # fmt: skip
def test_compare_demographics(
    media: tuple[str, str, str], local: tuple[str, str | None, str | None], fields: list[str]
) -> None:
    mismatches = compare_demographics(MediaDemographics(*media), LocalPatient("H1", "", *local))
    assert [m.field for m in mismatches] == fields


def test_mismatch_needs_confirmation(tmp_path: Path) -> None:
    ds = dcmread(instance(SUZUKI_UTF8, tmp_path))
    local = LocalPatient("H1", "", "Tanaka^Ichiro", "19851224", "M")
    with pytest.raises(ReconciliationError) as err:
        check_demographics(ds, local)
    assert "name" in err.value.message and "sex" in err.value.message
    assert "Suzuki" not in err.value.message and "Tanaka" not in err.value.message  # no PHI
    confirmed = check_demographics(ds, local, confirm=True)
    assert {m.field for m in confirmed} == {"name", "sex"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patient_id": ""},
        {"patient_id": "山田"},
        {"patient_id": "A\\B"},
        {"patient_id": "X" * 65},
        {"patient_id": "H1", "issuer_of_patient_id": "病院"},
        {"patient_id": "H1", "birth_date": "1970-01-02"},
        {"patient_id": "H1", "sex": "X"},
    ],
)
def test_local_patient_values_are_validated(kwargs: dict[str, str]) -> None:
    with pytest.raises(InvalidInputError):
        LocalPatient(**kwargs)


def test_previous_instance_origin_status_is_kept_in_original_attributes(tmp_path: Path) -> None:
    ds = dcmread(instance(DOE_ASCII, tmp_path))
    ds.InstanceOriginStatus = "LOCAL"
    outcome = reconcile_instance(
        ds, LocalPatient("H1"), importer=OPERATOR, station=STATION, now=NOW
    )
    assert ds.InstanceOriginStatus == "IMPORTED"
    assert "InstanceOriginStatus" in outcome.coerced
    modified = ds.OriginalAttributesSequence[-1].ModifiedAttributesSequence[0]
    assert modified.InstanceOriginStatus == "LOCAL"


def test_bad_accession_number_is_refused(tmp_path: Path) -> None:
    ds = dcmread(instance(DOE_ASCII, tmp_path))
    with pytest.raises(InvalidInputError, match="accession"):
        reconcile(ds, LocalPatient("H1"), importer=OPERATOR, station=STATION, now=NOW,
                  accession_number="受付番号")  # fmt: skip
    assert ds.PatientID == "OTH-0003"  # nothing was changed
