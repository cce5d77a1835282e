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

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from gateway.store import index as ix

TEXT_KEYWORDS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ReferringPhysicianName",
    "Modality",
    "SeriesDescription",
    "SpecificCharacterSet",
]
INT_KEYWORDS = ["SeriesNumber", "InstanceNumber"]


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


@pytest.mark.parametrize("path", get_testdata_files("*.dcm")[:200])
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
