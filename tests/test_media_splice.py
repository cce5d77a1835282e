"""The splice writer: untouched elements copied byte for byte (R-PDI-1, PS3.5 §7, PS3.10 §7.1).

Every output is read back by pydicom *and* by DCMTK ``dcmdump``; untouched
elements are compared as raw bytes with the source, element by element,
using the structure walk (:func:`media.dicomfile.parse_layout`) on both files.
Syntaxes: Explicit VR Little Endian, Implicit VR Little Endian, Explicit VR
Big Endian and encapsulated (RLE) pixel data are spliced; a deflated data set
falls back to the pydicom rewrite.
"""

from __future__ import annotations

import io
import struct
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from media_factory import DOE_ASCII, SUZUKI_UTF8, YAMADA_IR87, SeriesSpec, StudySpec, make_instance
from pydicom import dcmread, dcmwrite
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from media.dicomfile import ElementSpan, parse_file, parse_layout
from media.import_result import SkipReason
from media.reconcile import RECONCILED_TAGS, LocalPatient, Operator
from media.rewrite import (
    Reconciliation,
    RewriteRefused,
    Rewritten,
    _layout,
    _rewrite_with_pydicom,
    rewrite_instance,
)
from media.selection import PlannedFile
from media.settings import StationInfo
from media.splice import (
    FileMetaTemplates,
    MemorySource,
    can_splice,
    file_meta_bytes,
    new_file_meta,
)

DCMDUMP = "/usr/bin/dcmdump"
NOW = datetime(2024, 3, 1, 0, 0, tzinfo=UTC)
OPERATOR = Operator("u001", "Uketsuke^Hanako=受付^花子")
STATION = StationInfo(station_name="RECEPTION1", institution_name="Sekisho Hospital")
LOCAL = LocalPatient("H0001", "SEKISHO")

PATIENT_ID = 0x00100020
ISSUER = 0x00100021
OTHER_IDS = 0x00101002
ORIGINAL_ATTRIBUTES = 0x04000561
CONTRIBUTING = 0x0018A001
ORIGIN_STATUS = 0x04000600
PIXEL_DATA = 0x7FE00010
#: What reconciliation changes when only the patient ID and issuer are coerced.
COERCED = frozenset({PATIENT_ID, ISSUER, OTHER_IDS, ORIGINAL_ATTRIBUTES, CONTRIBUTING})


def job_for(tmp_path: Path, target: LocalPatient = LOCAL, **kw: object) -> Reconciliation:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    values: dict[str, object] = {"accession_number": None, "confirm_mismatch": True}
    values.update(kw)
    return Reconciliation(target, OPERATOR, STATION, NOW, work_dir=work, **values)  # type: ignore[arg-type]


def planned_for(data: bytes) -> PlannedFile:
    header = parse_file(io.BytesIO(data), len(data))
    return PlannedFile(
        "DICOM/IM000001",
        header.sop_instance_uid,
        header.sop_class_uid,
        header.study_instance_uid,
        header.series_instance_uid,
        "1",
        len(data),
        None,
    )


def rewrite(data: bytes, job: Reconciliation) -> tuple[Rewritten, bytes]:
    out = rewrite_instance(MemorySource(data), planned_for(data), job)
    written = out.path.read_bytes()
    out.path.unlink()
    return out, written


def elements(data: bytes) -> dict[int, bytes]:
    """Raw bytes of each top-level data set element, by tag."""
    _header, spans = parse_layout(io.BytesIO(data), len(data))
    assert spans is not None
    return {s.tag: data[s.start : s.end] for s in spans}


def dcmdump_ok(data: bytes, tmp_path: Path) -> str:
    """DCMTK reads the file without an error or warning; returns the dump."""
    path = tmp_path / "dump.dcm"
    path.write_bytes(data)
    proc = subprocess.run([DCMDUMP, str(path)], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert not proc.stderr.strip(), proc.stderr.decode(errors="replace")
    return proc.stdout.decode("latin-1")


def factory_file(syntax: str, patient=YAMADA_IR87, **extra: object) -> bytes:  # noqa: ANN001
    study = StudySpec(patient, [SeriesSpec("CT", 1)])
    ds = make_instance(study, study.series[0], 1, 1)
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def pydicom_file(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()  # type: ignore[arg-type]


def charset_file(name: str) -> bytes:
    return Path(get_charset_files(name)[0]).read_bytes()


SPLICED = {
    "explicit-le-ir87": lambda: factory_file(ExplicitVRLittleEndian),
    "implicit-le-ir87": lambda: factory_file(ImplicitVRLittleEndian),
    "explicit-be-ir87": lambda: factory_file(ExplicitVRBigEndian),
    "explicit-le-utf8": lambda: factory_file(ExplicitVRLittleEndian, SUZUKI_UTF8),
    "pydicom-bigendian": lambda: pydicom_file("MR_small_bigendian.dcm"),
    "pydicom-implicit": lambda: pydicom_file("MR_small_implicit.dcm"),
    "pydicom-ct-latin1": lambda: pydicom_file("CT_small.dcm"),
    "pydicom-rle-encapsulated": lambda: pydicom_file("SC_rgb_rle.dcm"),
    "pydicom-jpeg-encapsulated": lambda: pydicom_file("SC_rgb_jpeg_gdcm.dcm"),
    "pydicom-ir87": lambda: charset_file("chrH31.dcm"),
    "pydicom-ir13-ir87": lambda: charset_file("chrH32.dcm"),
}


@pytest.mark.parametrize("name", sorted(SPLICED))
def test_spliced_file_keeps_untouched_elements_byte_for_byte(name: str, tmp_path: Path) -> None:
    source = SPLICED[name]()
    out, written = rewrite(source, job_for(tmp_path))
    assert out.spliced, "this syntax must be spliced, not rewritten by pydicom"
    before, after = elements(source), elements(written)
    untouched = {t for t in before if t not in COERCED and t & 0xFFFF != 0}
    for tag in sorted(untouched):
        assert after.get(tag) == before[tag], f"({tag >> 16:04X},{tag & 0xFFFF:04X}) changed"
    assert set(after) - set(before) <= COERCED | {ORIGIN_STATUS}
    tags = list(after)
    assert tags == sorted(tags), "elements must be in ascending tag order (PS3.5 §7.1)"
    ds = dcmread(io.BytesIO(written))
    original = dcmread(io.BytesIO(source))
    assert ds.PatientID == "H0001" and ds.IssuerOfPatientID == "SEKISHO"
    assert ds.OtherPatientIDsSequence[-1].PatientID == original.PatientID
    modified = ds.OriginalAttributesSequence[-1].ModifiedAttributesSequence[0]
    assert modified.PatientID == original.PatientID
    assert ds.OriginalAttributesSequence[-1].ReasonForTheAttributeModification == "COERCE"
    assert ds.ContributingEquipmentSequence[-1].OperatorsName is not None
    assert ds.InstanceOriginStatus == "IMPORTED"
    assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert written[:128] == b"\0" * 128 and written[128:132] == b"DICM"
    assert out.size == len(written)
    dump = dcmdump_ok(written, tmp_path)
    assert "H0001" in dump and "IMPORTED" in dump and "MEDIM" in dump


def test_japanese_name_and_character_set_keep_their_iso_2022_bytes(tmp_path: Path) -> None:
    source = charset_file("chrH32.dcm")  # ISO 2022 IR 13 + IR 87: half-width kana and kanji
    _out, written = rewrite(source, job_for(tmp_path))
    before, after = elements(source), elements(written)
    for tag in (0x00080005, 0x00100010):  # Specific Character Set, Patient's Name
        assert after[tag] == before[tag]
    assert b"\x1b$B" in after[0x00100010], "the JIS X 0208 escape sequence is kept"
    assert str(dcmread(io.BytesIO(written)).PatientName) == str(
        dcmread(io.BytesIO(source)).PatientName
    )


def test_encapsulated_pixel_data_is_copied_with_its_undefined_length(tmp_path: Path) -> None:
    source = pydicom_file("SC_rgb_rle.dcm")
    _out, written = rewrite(source, job_for(tmp_path))
    pixel = elements(written)[PIXEL_DATA]
    assert pixel == elements(source)[PIXEL_DATA]
    assert pixel[8:12] == b"\xff\xff\xff\xff" and pixel.endswith(b"\xfe\xff\xdd\xe0\0\0\0\0")
    ds = dcmread(io.BytesIO(written))
    assert ds.pixel_array.shape == dcmread(io.BytesIO(source)).pixel_array.shape


@pytest.mark.parametrize(
    "source",
    [
        lambda: factory_file(DeflatedExplicitVRLittleEndian),
        lambda: pydicom_file("image_dfl.dcm"),
    ],
    ids=["factory", "pydicom"],
)
def test_deflated_data_set_falls_back_to_the_pydicom_rewrite(source, tmp_path: Path) -> None:  # noqa: ANN001
    data = source()
    out, written = rewrite(data, job_for(tmp_path))
    assert not out.spliced
    ds = dcmread(io.BytesIO(written))
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert ds.PatientID == "H0001" and ds.InstanceOriginStatus == "IMPORTED"
    dcmdump_ok(written, tmp_path)


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
@pytest.mark.parametrize("patient", [YAMADA_IR87, SUZUKI_UTF8, DOE_ASCII], ids=lambda p: p.charset)
def test_splice_writes_what_the_pydicom_rewrite_writes(
    syntax: str, patient: object, tmp_path: Path
) -> None:
    """Same bytes as a full pydicom reconcile-and-rewrite, demographics coerced too.

    This also shows that reconciliation reads nothing outside
    ``RECONCILED_TAGS``: the pydicom path reconciles the whole data set.
    """
    data = factory_file(syntax, patient)
    target = LocalPatient("H0001", "SEKISHO", "Kanri^Taro", "19991231", "O")
    job = job_for(tmp_path, target, accession_number="L42")
    spliced, written = rewrite(data, job)
    header, _spans = _layout(MemorySource(data), planned_for(data))
    reference = _rewrite_with_pydicom(MemorySource(data), header, job)
    assert spliced.spliced and not reference.spliced
    assert written == reference.path.read_bytes()
    assert spliced.sha256 == reference.sha256 and spliced.notes == reference.notes
    ds = dcmread(io.BytesIO(written))
    assert (ds.PatientName, ds.PatientBirthDate, ds.PatientSex) == ("Kanri^Taro", "19991231", "O")
    assert ds.AccessionNumber == "L42"
    reference.path.unlink()


def with_other_ids(undefined: bool, patient_id: str = "OTH-0001") -> bytes:
    study = StudySpec(YAMADA_IR87, [SeriesSpec("CT", 1)])
    ds = make_instance(study, study.series[0], 1, 1)
    item = Dataset()
    item.PatientID, item.TypeOfPatientID = "EARLIER-1", "TEXT"
    ds.OtherPatientIDsSequence = Sequence([item])
    ds["OtherPatientIDsSequence"].is_undefined_length = undefined
    ds.PatientID = patient_id
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_existing_other_patient_ids_sequence_gets_the_new_item(
    undefined: bool, tmp_path: Path
) -> None:
    source = with_other_ids(undefined)
    assert (elements(source)[OTHER_IDS][8:12] == b"\xff\xff\xff\xff") is undefined
    out, written = rewrite(source, job_for(tmp_path))
    assert out.spliced
    ids = [item.PatientID for item in dcmread(io.BytesIO(written)).OtherPatientIDsSequence]
    assert ids == ["EARLIER-1", "OTH-0001"]
    dcmdump_ok(written, tmp_path)


def test_unchanged_undefined_length_sequence_is_copied_as_is(tmp_path: Path) -> None:
    source = with_other_ids(True, patient_id="H0001")
    same = LocalPatient("H0001", YAMADA_IR87.issuer)  # already the local ID: no coercion
    _out, written = rewrite(source, job_for(tmp_path, same))
    assert elements(written)[OTHER_IDS] == elements(source)[OTHER_IDS]
    assert [i.PatientID for i in dcmread(io.BytesIO(written)).OtherPatientIDsSequence] == [
        "EARLIER-1"
    ]


def test_instances_with_the_same_patient_elements_share_one_reconciliation(
    tmp_path: Path,
) -> None:
    study = StudySpec(YAMADA_IR87, [SeriesSpec("CT", 3)])
    files = []
    for n in (1, 2, 3):
        ds = make_instance(study, study.series[0], 1, n)
        if n == 3:
            ds.PatientName = "Yamada^Jirou"
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        files.append(buffer.getvalue())
    job = job_for(tmp_path)
    outputs = [dcmread(io.BytesIO(rewrite(data, job)[1])) for data in files]
    assert len(job.cache._entries) == 2  # the third instance's name differs
    for data, ds in zip(files, outputs, strict=True):
        source = dcmread(io.BytesIO(data))
        assert ds.SOPInstanceUID == source.SOPInstanceUID
        assert ds.InstanceNumber == source.InstanceNumber
        assert ds.PatientName == source.PatientName
        assert ds.PixelData == source.PixelData


def test_demographic_mismatch_is_refused_unless_confirmed(tmp_path: Path) -> None:
    data = factory_file(ExplicitVRLittleEndian)
    other = LocalPatient("H0001", "", "Tanaka^Jiro")
    job = job_for(tmp_path, other, confirm_mismatch=False)
    for _ in range(2):  # the second answer comes from the cache
        with pytest.raises(RewriteRefused) as refused:
            rewrite(data, job)
        assert refused.value.reason is SkipReason.DEMOGRAPHICS
    assert list((tmp_path / "work").iterdir()) == []


def insert_after(data: bytes, tag: int, extra: bytes) -> bytes:
    _header, spans = parse_layout(io.BytesIO(data), len(data))
    assert spans is not None
    span = next(s for s in spans if s.tag == tag)
    return data[: span.end] + extra + data[span.end :]


def test_duplicate_tag_falls_back_to_the_pydicom_rewrite(tmp_path: Path) -> None:
    data = factory_file(ExplicitVRLittleEndian)
    study_id = elements(data)[0x00200010]
    out, written = rewrite(insert_after(data, 0x00200010, study_id), job_for(tmp_path))
    assert not out.spliced
    assert dcmread(io.BytesIO(written)).PatientID == "H0001"


def test_retired_group_length_is_dropped(tmp_path: Path) -> None:
    data = factory_file(ExplicitVRLittleEndian)
    first = min(elements(data))
    group_length = struct.pack("<HH2sHI", 0x0008, 0x0000, b"UL", 4, 1234)
    _header, spans = parse_layout(io.BytesIO(data), len(data))
    assert spans is not None
    start = next(s for s in spans if s.tag == first).start
    source = data[:start] + group_length + data[start:]
    out, written = rewrite(source, job_for(tmp_path))
    assert out.spliced and 0x00080000 not in elements(written)
    dcmdump_ok(written, tmp_path)


def test_layout_spans_cover_the_data_set_without_gaps() -> None:
    data = charset_file("chrH31.dcm")
    header, spans = parse_layout(io.BytesIO(data), len(data))
    assert spans is not None and header.character_set == ("", "ISO 2022 IR 87")
    for a, b in zip(spans, spans[1:], strict=False):
        assert a.end == b.start
    assert spans[-1].end == len(data)
    assert isinstance(spans[0], ElementSpan) and spans[0].tag == 0x00080005


def test_reconciled_tags_hold_every_attribute_the_coercion_writes() -> None:
    assert COERCED | {ORIGIN_STATUS, 0x00100010, 0x00100030, 0x00100040} <= RECONCILED_TAGS


@pytest.mark.parametrize(
    ("uid", "spliced"),
    [
        (ExplicitVRLittleEndian, True),
        (ImplicitVRLittleEndian, True),
        (ExplicitVRBigEndian, True),
        ("1.2.840.10008.1.2.5", True),  # RLE Lossless: encapsulated, explicit VR LE data set
        (DeflatedExplicitVRLittleEndian, False),
        ("1.2.840.10008.1.2.4.95", False),  # JPIP Referenced Deflate
        ("1.2.826.0.1.3680043.10.1234.99", False),  # a private syntax pydicom cannot know
        ("not a uid", False),
    ],
)
def test_which_transfer_syntaxes_are_spliced(uid: str, spliced: bool) -> None:
    assert can_splice(uid) is spliced


def test_file_meta_templates_encode_what_pydicom_encodes() -> None:
    templates = FileMetaTemplates()
    ct, ts = "1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian
    uids = ["1.2.3.4", "1.2.3.5", "1.2.3.44", "1.2.3.45", "1.2.3.4", "2.25.1"]
    for uid in uids * 2:  # the second round comes from the templates
        got = templates.encode(ct, uid, ts)
        assert got == file_meta_bytes(new_file_meta(ct, uid, ts)), uid
        assert dcmread(io.BytesIO(got)).file_meta.MediaStorageSOPInstanceUID == uid
