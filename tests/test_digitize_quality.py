"""The film quality gate and the Secondary Capture it produces (R-DIG-1, R-DIG-2).

Pure-library tests of :mod:`media.digitize`, :mod:`media.paper` and
:mod:`media.secondary_capture`; inputs are written by Pillow and pydicom, the
output is read back by pydicom and by DCMTK ``dcmdump``.
"""

from __future__ import annotations

import io
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from media.digitize import (
    MAMMOGRAPHY_LIMITS,
    QualityLimits,
    ScanInfo,
    build_film_sc,
    check_quality,
    enforce_quality,
    read_digitizer_dicom,
    read_scan_image,
    scan_info_from_mapping,
)
from media.paper import build_document_sc, build_encapsulated_pdf, pages_to_pdf, read_pages
from media.secondary_capture import (
    DOCD,
    FILMD,
    MULTIFRAME_GRAYSCALE_WORD_SC,
    SC_IMAGE,
    Contribution,
    PatientStudy,
    SeriesInfo,
    check_sc_iod,
)
from pki.errors import DigitizationError, InvalidInputError
from tests.digitize_fixtures import make_scan

JST = timezone(timedelta(hours=9))
NOW = datetime(2026, 11, 19, 10, 30, tzinfo=JST)
GOOD = ScanInfo(pitch_um=175.0, density_min=0.0, density_max=3.6)


def _patient() -> PatientStudy:
    return PatientStudy("P-0001", generate_uid(), patient_name="Yamada^Hanako=山田^花子")


def _series() -> SeriesInfo:
    return SeriesInfo(generate_uid(), 9001, 1, "Digitized film")


def _contribution(purpose: tuple[str, str, str] = FILMD) -> Contribution:
    return Contribution(
        "op01",
        "Sousa^Ichiro",
        "Film Scan Co",
        model="FS-16",
        manager="Kanri^Taro",
        institution="Sekisho Demo Hospital",
        station="DIGI-1",
        purpose=purpose,
    )


def _part10(ds: pydicom.Dataset, path: Path) -> Path:
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------- quality gate (R-DIG-2)
def test_16_bit_scan_at_175_um_passes(tmp_path: Path) -> None:
    scan = read_scan_image(make_scan(tmp_path / "film.png"), GOOD)
    assert scan.container_bits == 16 and scan.stats.effective_bits == 12
    assert check_quality(scan, QualityLimits()) == []


def test_250_um_scan_refused_naming_the_pitch_limit(tmp_path: Path) -> None:
    scan = read_scan_image(
        make_scan(tmp_path / "film.png"), ScanInfo(pitch_um=250.0, density_min=0.0, density_max=3.6)
    )
    with pytest.raises(DigitizationError) as err:
        enforce_quality(scan, QualityLimits())
    assert "sampling pitch: 250 µm (required: <= 200 µm)" in err.value.message
    assert err.value.detail == "sampling pitch"


def test_8_bit_scan_refused_naming_the_grey_level_limit(tmp_path: Path) -> None:
    scan = read_scan_image(make_scan(tmp_path / "film8.png", bits=8, container=8), GOOD)
    with pytest.raises(DigitizationError) as err:
        enforce_quality(scan, QualityLimits())
    assert "grey levels: 256 levels (8 bits stored)" in err.value.message
    assert ">= 1024 levels (10 bits)" in err.value.message


def test_8_bit_data_in_a_16_bit_file_is_refused_too(tmp_path: Path) -> None:
    """Declared depth is not enough: the values must use >= 10 bits (padding removed)."""
    values = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint16) << 8
    path = tmp_path / "shifted.png"
    Image.fromarray(values).save(path)
    scan = read_scan_image(path, GOOD)
    assert scan.bits_stored == 16 and scan.stats.padding_bits == 8
    (failure,) = check_quality(scan, QualityLimits())
    assert failure.limit == "grey levels" and "use only 8 bits" in failure.actual


@pytest.mark.parametrize(
    ("dmin", "dmax", "ok"),
    [(0.0, 3.0, True), (0.1, 3.6, False), (0.0, 2.8, False), (None, 3.0, False)],
)
def test_density_range_must_cover_0_to_3_d(tmp_path: Path, dmin, dmax, ok) -> None:
    info = ScanInfo(pitch_um=100.0, density_min=dmin, density_max=dmax)
    failures = check_quality(read_scan_image(make_scan(tmp_path / "f.png"), info), QualityLimits())
    assert (failures == []) is ok
    if not ok:
        assert [f.limit for f in failures] == ["density range"]


def test_every_failed_limit_is_named(tmp_path: Path) -> None:
    info = ScanInfo(pitch_um=300.0, density_min=0.5, density_max=2.0)
    scan = read_scan_image(make_scan(tmp_path / "f.png", bits=8, container=8), info)
    with pytest.raises(DigitizationError) as err:
        enforce_quality(scan, QualityLimits())
    assert err.value.detail == "sampling pitch,grey levels,density range"


def test_mammography_has_its_own_limits(tmp_path: Path) -> None:
    scan = read_scan_image(make_scan(tmp_path / "mg.png", bits=12), GOOD)
    assert check_quality(scan, QualityLimits()) == []
    failures = check_quality(scan, MAMMOGRAPHY_LIMITS)
    assert [f.limit for f in failures] == ["sampling pitch"]  # 175 µm > 50 µm
    fine = read_scan_image(
        make_scan(tmp_path / "mg2.png", bits=12),
        ScanInfo(pitch_um=50.0, density_min=0.0, density_max=4.0),
    )
    assert check_quality(fine, MAMMOGRAPHY_LIMITS) == []


def test_sidecar_keys_are_checked() -> None:
    info = scan_info_from_mapping({"pitch_um": 100, "density_max": 3.5, "manufacturer": "X"})
    assert info.pitch_um == 100.0 and info.manufacturer == "X"
    with pytest.raises(InvalidInputError, match="unknown key"):
        scan_info_from_mapping({"pitch": 100})
    with pytest.raises(InvalidInputError, match="pitch_um must be a number"):
        scan_info_from_mapping({"pitch_um": "100"})


def test_rgb_or_unreadable_files_are_refused(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "rgb.png")
    with pytest.raises(InvalidInputError, match="not grayscale"):
        read_scan_image(tmp_path / "rgb.png", GOOD)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InvalidInputError, match="not a readable"):
        read_scan_image(tmp_path / "junk.png", GOOD)


# ---------------------------------------------------------------- Secondary Capture (R-DIG-1)
def test_film_sc_has_df_pitch_and_filmd_item(tmp_path: Path) -> None:
    scan = read_scan_image(make_scan(tmp_path / "film.png"), GOOD)
    ds = build_film_sc(
        scan, _patient(), _series(), _contribution(), sop_instance_uid=generate_uid(), now=NOW
    )
    assert check_sc_iod(ds) == []
    assert ds.SOPClassUID == MULTIFRAME_GRAYSCALE_WORD_SC
    assert ds.ConversionType == "DF"
    assert [float(v) for v in ds.NominalScannedPixelSpacing] == [0.175, 0.175]
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 16, 15)
    (item,) = ds.ContributingEquipmentSequence
    code = item.PurposeOfReferenceCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == FILMD
    assert str(item.OperatorsName) == "Sousa^Ichiro"
    assert item.Manufacturer == "Film Scan Co" and item.ManufacturerModelName == "FS-16"
    assert (
        "information-creation manager (情報作成管理者) Kanri^Taro" in item.ContributionDescription
    )
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    out = _part10(ds, tmp_path / "sc.dcm")
    proc = subprocess.run(["dcmdump", str(out)], capture_output=True, check=True)
    dump = proc.stdout.decode(errors="replace")  # dcmdump cuts long UTF-8 values
    assert "(0008,0064) CS [DF]" in dump
    assert "(0018,2010) DS [0.175\\0.175]" in dump
    assert "[FILMD]" in dump and "(0008,1070) PN [Sousa^Ichiro]" in dump
    back = pydicom.dcmread(out)
    assert np.array_equal(back.pixel_array, scan.pixels)


def test_declared_bits_stored_is_written(tmp_path: Path) -> None:
    info = ScanInfo(pitch_um=100.0, density_min=0.0, density_max=3.2, bits_stored=12)
    scan = read_scan_image(make_scan(tmp_path / "film.png", bits=12), info)
    ds = build_film_sc(
        scan, _patient(), _series(), _contribution(), sop_instance_uid=generate_uid(), now=NOW
    )
    assert (ds.BitsStored, ds.HighBit) == (12, 11) and check_sc_iod(ds) == []


def test_monochrome1_scan_becomes_sc_image(tmp_path: Path) -> None:
    info = ScanInfo(pitch_um=100.0, density_min=0.0, density_max=3.2, photometric="MONOCHROME1")
    scan = read_scan_image(make_scan(tmp_path / "film.png"), info)
    ds = build_film_sc(
        scan, _patient(), _series(), _contribution(), sop_instance_uid=generate_uid(), now=NOW
    )
    assert ds.SOPClassUID == SC_IMAGE and ds.PhotometricInterpretation == "MONOCHROME1"
    assert check_sc_iod(ds) == []


def test_iod_check_finds_missing_attributes(tmp_path: Path) -> None:
    scan = read_scan_image(make_scan(tmp_path / "film.png"), GOOD)
    ds = build_film_sc(
        scan, _patient(), _series(), _contribution(), sop_instance_uid=generate_uid(), now=NOW
    )
    del ds.NominalScannedPixelSpacing
    del ds.PatientID
    problems = check_sc_iod(ds)
    assert problems == ["Type 2 PatientID missing"]
    ds.PatientID = "P"
    assert check_sc_iod(ds) == [
        "Type 1C Nominal Scanned Pixel Spacing missing (Conversion Type DF)"
    ]


def test_digitizer_dicom_is_read_with_its_spacing(tmp_path: Path) -> None:
    scan = read_scan_image(make_scan(tmp_path / "film.png"), GOOD)
    src = build_film_sc(
        scan, _patient(), _series(), _contribution(), sop_instance_uid=generate_uid(), now=NOW
    )
    src.NominalScannedPixelSpacing = ["0.1", "0.1"]
    src.Manufacturer = "Digitizer Inc"
    path = _part10(src, tmp_path / "digitizer.dcm")
    again = read_digitizer_dicom(path, ScanInfo(density_min=0.0, density_max=3.5))
    assert again.info.pitch_um == pytest.approx(100.0)
    assert again.info.manufacturer == "Digitizer Inc"
    assert check_quality(again, QualityLimits()) == []


# ---------------------------------------------------------------- paper (R-DIG-1)
def test_paper_pages_become_pdf_and_sd_sc(tmp_path: Path) -> None:
    Image.new("L", (170, 220), 230).save(tmp_path / "p1.png", dpi=(200, 200))
    Image.new("RGB", (170, 220), (250, 250, 240)).save(tmp_path / "p2.png", dpi=(200, 200))
    pages = read_pages([tmp_path / "p1.png", tmp_path / "p2.png"])
    pdf = pages_to_pdf(pages, title="Referral letter", author="op01")
    assert pdf.startswith(b"%PDF-")
    from pyhanko.pdf_utils.reader import PdfFileReader

    assert len(PdfFileReader(io.BytesIO(pdf)).root["/Pages"]["/Kids"]) == 2
    for page in pages:
        ds = build_document_sc(
            page,
            _patient(),
            _series(),
            _contribution(DOCD),
            sop_instance_uid=generate_uid(),
            now=NOW,
        )
        assert ds.ConversionType == "SD" and check_sc_iod(ds) == []
        code = ds.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0]
        assert (code.CodeValue, code.CodeMeaning) == ("DOCD", "Document Digitizer Equipment")
    enc = build_encapsulated_pdf(
        pdf,
        _patient(),
        _series(),
        _contribution(DOCD),
        sop_instance_uid=generate_uid(),
        title="Referral",
        now=NOW,
    )
    assert enc.ConversionType == "SD" and enc.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert bytes(enc.EncapsulatedDocument)[: len(pdf)] == pdf
