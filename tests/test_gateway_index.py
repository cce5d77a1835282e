"""Indexing a received instance: the plain-ASCII shortcut gives what pydicom gives.

``gateway.store.index`` reads plain ASCII values straight from the raw data
elements instead of converting them through pydicom.  These tests pin that the
two agree, value by value, for every index attribute, on generated values (with
padding, NULs, leading spaces, delimiters, escape sequences, non-ASCII bytes)
and on pydicom's own test files, in explicit and implicit VR.  The reference is
the conversion through pydicom (``_converted_text``, ``_converted_int``), which
indexing falls back to for any other value.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from gateway.store import index as ix

TEXT_KEYWORDS = list(ix.TEXT_KEYWORDS)
INT_KEYWORDS = list(ix.INTEGER_KEYWORDS)


def _encoded(keyword: str, raw: bytes, implicit: bool) -> bytes:
    """A Part 10 file whose ``keyword`` element holds exactly ``raw``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.add_new(
        pydicom.datadict.tag_for_keyword(keyword), pydicom.datadict.dictionary_VR(keyword), raw
    )
    out = BytesIO()
    # pydicom writes bytes values as they are (padded to even length with the VR's pad).
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _both(data: bytes) -> tuple[Dataset, Dataset]:
    """The same file read twice: one copy for the shortcut, one for the reference."""
    return (
        pydicom.dcmread(BytesIO(data), defer_size=1024),
        pydicom.dcmread(BytesIO(data), defer_size=1024),
    )


value_bytes = st.one_of(
    st.binary(max_size=24),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=24).map(
        str.encode
    ),
    st.from_regex(rb"\A[ ]{0,2}[+-]?[0-9]{1,12}[ ]{0,2}\x00?\Z"),
    st.sampled_from(
        [
            b"",
            b" ",
            b"\x00",
            b"A\\B",
            b" A",
            b"A ",
            b"\x1b$B",
            b"YAMADA^TARO",
            b"1.2.840.10008",
            b"1.2.3\x00",
            b"+12",
            b"-0",
            b"1.0",
            b"ISO_IR 100",
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    keyword=st.sampled_from(TEXT_KEYWORDS + INT_KEYWORDS), raw=value_bytes, implicit=st.booleans()
)
def test_shortcut_matches_pydicom(keyword: str, raw: bytes, implicit: bool) -> None:
    try:
        data = _encoded(keyword, raw, implicit)
        fast, slow = _both(data)
        if keyword in INT_KEYWORDS:
            expected: object = ix._converted_int(slow, keyword)
        else:
            expected = ix._converted_text(slow, keyword)
    except Exception:  # noqa: BLE001 - values pydicom itself cannot write or read
        return
    got = ix._int(fast, keyword) if keyword in INT_KEYWORDS else ix._text(fast, keyword)
    assert got == expected


def test_shortcut_taken_for_plain_values() -> None:
    """The shortcut is really used: the raw element stays unconverted."""
    data = _encoded("PatientID", b"P12345", implicit=False)
    ds, _ = _both(data)
    assert ix._text(ds, "PatientID") == "P12345"
    assert type(ds._dict[pydicom.tag.Tag("PatientID")]).__name__ == "RawDataElement"


#: pydicom's bundled test files (get_testdata_files would try to download more).
TEST_FILES = sorted(
    str(p) for p in (Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm")
)


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_index_of_test_files_matches_reference(path: str) -> None:
    try:
        fast, slow = (pydicom.dcmread(path, defer_size=1024) for _ in range(2))
    except Exception:  # noqa: BLE001 - some test files are deliberately broken
        pytest.skip("pydicom cannot read this test file")
    for keyword in TEXT_KEYWORDS:
        try:
            expected = ix._converted_text(slow, keyword)
        except Exception:  # noqa: BLE001 - undecodable values: index_dataset refuses them
            continue
        assert ix._text(fast, keyword) == expected, keyword
    for keyword in INT_KEYWORDS:
        assert ix._int(fast, keyword) == ix._converted_int(slow, keyword), keyword


# -- the prefix scanner agrees with pydicom ----------------------------------
def _prefix_views(data: bytes) -> list[tuple[object, ...]]:
    """What PrefixIndex decides for several prefixes and sizes of ``data``."""
    out: list[tuple[object, ...]] = []
    for cut in (len(data), 65536, 4096, 1000, 400, 200):
        prefix = data[:cut]
        pi = ix.PrefixIndex(prefix)
        for size in sorted({len(prefix), len(data), len(data) - 1, len(data) + 7}):
            try:
                got: object = pi.result(size)
            except ix.InvalidInputError as exc:
                got = (type(exc).__name__, exc.message)
            out.append((cut, size, got))
    return out


def _both_ways(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    scanned = _prefix_views(data)
    with monkeypatch.context() as m:
        m.setattr(ix, "_scan_part10", lambda _buf: None)
        assert _prefix_views(data) == scanned


def _files() -> list[str]:
    return TEST_FILES


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.rsplit("/", 1)[-1])
def test_prefix_scan_matches_pydicom_on_test_files(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(path, "rb") as fh:
        data = fh.read()
    _both_ways(data, monkeypatch)


def test_the_scanner_is_used_for_ordinary_files() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "P1", "YAMADA^TARO"
    ds.BitsAllocated = 8
    ds.PixelData = b"\0" * 200_000
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    scanned = ix._scan_part10(out.getvalue()[:65536])
    assert scanned is not None
    assert scanned[2] == 0x7FE00010 and scanned[1] == len(out.getvalue())


def _generated(implicit: bool, undefined_sq: bool, encapsulated: bool, charset: bool) -> bytes:
    from pydicom.dataset import Dataset as DS
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence

    ds = DS()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ts = (
        "1.2.840.10008.1.2.4.50"
        if encapsulated
        else (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    )
    ds.file_meta.TransferSyntaxUID = ts
    if charset:
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = "Yamada^Tarou=\033$B;3ED\033(B^\033$BB@O:\033(B"
    else:
        ds.PatientName = "YAMADA^TARO"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", uid
    ds.StudyDate = "20250401"
    item = DS()
    item.CodeValue, item.CodeMeaning = "X1", "inner"
    inner = DS()
    inner.CodeValue = "Y"
    item.ConceptNameCodeSequence = Sequence([inner])
    ds.ProcedureCodeSequence = Sequence([item, item])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "P-9", "OT", "3", " 12 "
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.SamplesPerPixel = 8, 1
    if encapsulated:
        ds.PixelData = encapsulate([b"\xff\xd8" + b"x" * 3000 + b"\xff\xd9"] * 2)
    else:
        ds.PixelData = b"\x01" * 70_000
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=None if encapsulated else implicit)
    data = out.getvalue()
    if undefined_sq:
        # Re-encode the sequence with undefined lengths by hand through pydicom.
        for elem in ds.iterall():
            if elem.VR == "SQ":
                elem.is_undefined_length = True
        for s in (ds.ProcedureCodeSequence[0], ds.ProcedureCodeSequence[1]):
            s.is_undefined_length_sequence_item = True
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True, implicit_vr=None if encapsulated else implicit)
        data = out.getvalue()
    return data


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("undefined_sq", [False, True])
@pytest.mark.parametrize("encapsulated", [False, True])
@pytest.mark.parametrize("charset", [False, True])
def test_prefix_scan_matches_pydicom_on_generated_files(
    implicit: bool,
    undefined_sq: bool,
    encapsulated: bool,
    charset: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _generated(implicit, undefined_sq, encapsulated, charset)
    _both_ways(data, monkeypatch)
    # Every cut position of the first bytes, too.
    for cut in range(130, min(len(data), 1400), 7):
        prefix = data[:cut]
        fast = ix.PrefixIndex(prefix)
        with monkeypatch.context() as m:
            m.setattr(ix, "_scan_part10", lambda _buf: None)
            slow = ix.PrefixIndex(prefix)
        for size in (cut, len(data)):
            outcome = []
            for pi in (fast, slow):
                try:
                    outcome.append(pi.result(size))
                except ix.InvalidInputError as exc:
                    outcome.append(exc.message)
            assert outcome[0] == outcome[1], (cut, size)


def test_the_scanner_keeps_every_attribute_index_dataset_reads() -> None:
    """The prefix scanner keeps only the listed attributes: the list must be complete."""
    import inspect
    import re

    source = inspect.getsource(ix.index_dataset)
    read = set(re.findall(r'_(?:text|int)\(ds, "(\w+)"\)', source))
    assert read, "index_dataset reads its attributes through _text/_int"
    assert read <= set(ix.TEXT_KEYWORDS) | set(ix.INTEGER_KEYWORDS)
